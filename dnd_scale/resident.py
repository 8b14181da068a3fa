"""A run's training data held on the accelerator: packed targets and condition caches, copied once.

Streamed from the host, every step moves its pairs' targets through the loader's workers and a
host-to-device copy: at the 0.5B geometry (4296 tokens of (10, 130), float32) that is 22 MB per pair,
715 MB per micro-batch of 32, and the step of a 146 M-parameter generator on one H200 took 1.0 s
where its arithmetic needs about 0.15 s (`benchmarks/results/heldout_qwen0.5b_attempt2.json`). A
run's targets are usually small beside a GPU (5 tasks × 50 checkpoints of that layout: 5.6 GB), so
`train.resident` copies them, and the condition caches, to the device before the first step; the
workers then pass pair indices only and a step gathers its rows on the device. The values are the
same either way (float32 targets, conditions widened from the cache dtype to float32), so a run may
switch between the two on resume.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from dnd_scale.encoder import ConditionCache, condition_rows
from dnd_scale.targets import PackedTargets

RESIDENT_MODES = ("auto", "device", "host")
AUTO_FRACTION = 0.25
"""`resident: auto` holds the data on the device when it takes at most this share of the device's
free memory before the generator is built (the rest is the generator's: see `dnd plan`)."""
_COPY_ROWS = 1 << 20  # condition rows per host-to-device copy (384 × 2 B each: 0.8 GB)


def resident_bytes(targets: PackedTargets, caches: Mapping[str, ConditionCache] | None) -> int:
    """Device bytes `ResidentData` takes: every checkpoint's float32 tokens and every cache's rows."""
    tokens = sum(targets.num_checkpoints.values()) * targets.num_tokens * int(np.prod(targets.token_shape)) * 4
    rows = sum(cache.embeddings.nbytes + cache.offsets.numel() * 8 for cache in (caches or {}).values())
    return tokens + rows


def resolve_resident(mode: str, device: torch.device, needed: int, has_caches: bool) -> bool:
    """Whether the run holds its data on the device (`train.resident`); raises ValueError when
    "device" cannot be honoured."""
    if mode not in RESIDENT_MODES:
        raise ValueError(f"train.resident must be one of {RESIDENT_MODES}, got {mode!r}")
    if mode == "host":
        return False
    reason = None
    if device.type != "cuda":
        reason = f"the device is {device.type}, whose memory is the host's"
    elif not has_caches:
        reason = "the conditions are encoded on the fly (encoder.cache: false), so the prompts must travel anyway"
    else:
        free = torch.cuda.mem_get_info(device)[0]
        if needed > (free if mode == "device" else AUTO_FRACTION * free):
            reason = (f"the targets and condition caches take {needed / 2**30:.1f} GiB, the device has "
                      f"{free / 2**30:.1f} GiB free")
    if reason is None:
        return True
    if mode == "device":
        raise ValueError(f"train.resident=device: {reason}; use train.resident=host (stream from the host)")
    return False


class ResidentData:
    """The targets of every (task, checkpoint) and the conditions of every pool's prompts, on one
    device; `batch` turns a batch of indices into the step's (conditions, targets) there."""

    def __init__(self, targets: PackedTargets, caches: Mapping[str, ConditionCache], device: torch.device):
        self.device = device
        counts = targets.num_checkpoints
        self._checkpoint_base = dict(zip(counts, np.cumsum([0, *counts.values()]).tolist()))
        self.tokens = torch.empty((sum(counts.values()), targets.num_tokens, *targets.token_shape),
                                  dtype=torch.float32, device=device)  # (K_total, T, H, W)
        bar = tqdm(total=self.tokens.shape[0], desc="targets to device", unit="checkpoint")
        for task, base in self._checkpoint_base.items():
            for checkpoint in range(counts[task]):
                self.tokens[base + checkpoint].copy_(targets.get(task, checkpoint))
                bar.update(1)
        bar.close()
        # Every pool's rows end to end; a prompt's offsets are shifted by the rows before its pool.
        first = next(iter(caches.values()))
        self.length = first.length
        total = sum(cache.embeddings.shape[0] for cache in caches.values())
        dtype = torch.from_numpy(np.empty(0, dtype=first.embeddings.dtype)).dtype  # the cache's dtype
        self.embeddings = torch.empty((total, first.dim), dtype=dtype, device=device)  # (total_tokens, D)
        offsets, self._prompt_base, row = [], {}, 0
        prompts = 0
        for task, cache in caches.items():
            for begin in range(0, cache.embeddings.shape[0], _COPY_ROWS):
                chunk = np.array(cache.embeddings[begin: begin + _COPY_ROWS])  # a writable copy, for torch
                self.embeddings[row + begin: row + begin + len(chunk)].copy_(torch.from_numpy(chunk))
            self._prompt_base[task] = prompts
            offsets.append(cache.offsets[:-1] + row)
            row += cache.embeddings.shape[0]
            prompts += len(cache)
        offsets.append(torch.tensor([row]))
        self.offsets = torch.cat(offsets).to(device)  # (P_total + 1,)

    def batch(self, batch: Mapping) -> tuple[Tensor, Tensor]:
        """A batch of indices ("task": B names, "checkpoint": (B,), "prompt_ids": (B, N)) →
        conditions (B, N, L, D) float32 and targets (B, T, H, W) float32, on the device."""
        tasks: Sequence[str] = batch["task"]
        rows = torch.tensor([self._checkpoint_base[t] for t in tasks]) + batch["checkpoint"]  # (B,)
        prompt_ids = batch["prompt_ids"] + torch.tensor([self._prompt_base[t] for t in tasks])[:, None]  # (B, N)
        ids = prompt_ids.to(self.device, non_blocking=True)
        token_rows, valid = condition_rows(self.offsets, ids.reshape(-1), self.length)  # (B·N, L) each
        conditions = self.embeddings[token_rows].float() * valid[..., None]  # (B·N, L, D)
        targets = self.tokens[rows.to(self.device, non_blocking=True)]  # (B, T, H, W)
        return conditions.view(*ids.shape, self.length, -1), targets
