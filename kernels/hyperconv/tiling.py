"""The hyper-convolution kernels' tile configurations and the small autotuner that picks one per
problem shape (timed with CUDA events on first use, cached per process, optionally saved to and read
from a JSON file named by DND_KERNELS_TUNE_FILE)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Callable

import torch
import triton
from triton.runtime.errors import OutOfResources

from .buffers import interpreted


@dataclass(frozen=True)
class TileConfig:
    """Tile shape and launch parameters of a GEMM-like kernel."""

    block_m: int
    """Rows of the output tile (positions for the convolution, output channels for wgrad)."""
    block_n: int
    """Columns of the output tile (output channels; input channels for wgrad)."""
    block_k: int
    """Reduction step (channels of one tap; positions for wgrad)."""
    num_warps: int
    """Warps per program."""
    num_stages: int
    """Software-pipelining depth of the K loop."""


# Candidates timed on first use of each shape (sides shrink to the problem: see _cap). At the 0.5B
# preset's shapes on an H100 (benchmarks/results/kernels_h100_run2_tiles.json, every candidate's
# time) the convolution picks 128x256 and 256x128 most often, 128x128 and the 4-warp 128x64 for
# some batch-1 shapes; the weight gradient picks 128x128 at every large shape (wider tiles spill)
# when cuDNN is not among its candidates (conv_wgrad).
# Under the interpreter one small tile is used.
_GPU_TILES = ((128, 128, 8, 3), (128, 256, 8, 3), (256, 128, 8, 3), (128, 64, 4, 4))
_TUNED: dict[tuple, TileConfig | str] = {}
_TUNE_LOG: dict[tuple, dict[str, float]] = {}
_FIRST_FIT: dict[tuple, TileConfig | str] = {}  # without autotuning: the first candidate that fits
TUNE_FILE_ENV = "DND_KERNELS_TUNE_FILE"


# Candidates that are not Triton tiles: the weight gradient through cuDNN on the channels-last
# buffers themselves, or on NCHW copies of them (see conv_wgrad).
CUDNN = "cudnn"
CUDNN_NCHW = "cudnn-nchw"


def _candidate_from_json(best: dict | str) -> TileConfig | str:
    return best if isinstance(best, str) else TileConfig(**best)


def _candidate_name(c: TileConfig | str) -> str:
    return c if isinstance(c, str) else f"{c.block_m}x{c.block_n}x{c.block_k}/w{c.num_warps}/s{c.num_stages}"


def _tuned_from_file() -> dict[str, TileConfig | str]:
    """Choices made by an earlier process (JSON written by `save_tuned`), when the env var names one."""
    path = os.environ.get(TUNE_FILE_ENV)
    if not path or not os.path.exists(path):
        return {}
    with open(path) as f:
        return {k: _candidate_from_json(v["best"]) for k, v in json.load(f).items()}


def save_tuned(path: str | os.PathLike) -> None:
    """Write the tiles chosen so far (and their timings) to `path` (JSON, atomic), merged with any
    file already there; a later process reads it through DND_KERNELS_TUNE_FILE and skips the timing."""
    merged = {}
    if os.path.exists(path):
        with open(path) as f:
            merged = json.load(f)
    # A choice read back from the file carries no timings; keep the entry that has them.
    merged.update({k: v for k, v in tuned_configs().items() if v["candidates_ms"] or k not in merged})
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(merged, f, indent=1)
    os.replace(tmp, path)


def autotune_enabled() -> bool:
    """Time the candidate tiles on first use of a shape (default on GPU; DND_KERNELS_AUTOTUNE=0 off)."""
    return not interpreted() and os.environ.get("DND_KERNELS_AUTOTUNE", "1") != "0"


def largest_block(extent: int, options: tuple[int, ...] = (64, 32, 16)) -> int:
    """The largest of `options` that divides `extent` (extents are multiples of 16)."""
    return next(b for b in options if extent % b == 0)


def _cap(block: int, extent: int) -> int:
    """Shrink a tile side to the smallest power of two >= extent (>= 16, the MMA minimum)."""
    return min(block, max(16, triton.next_power_of_2(extent)))


def tile_candidates(m_extent: int, n_extent: int, block_k: int) -> list[TileConfig]:
    if interpreted():
        return [TileConfig(_cap(32, m_extent), _cap(32, n_extent), min(16, block_k), 4, 1)]
    seen, out = set(), []
    for bm, bn, warps, stages in _GPU_TILES:
        cfg = TileConfig(_cap(bm, m_extent), _cap(bn, n_extent), block_k, warps, stages)
        if (cfg.block_m, cfg.block_n) not in seen:
            seen.add((cfg.block_m, cfg.block_n))
            out.append(cfg)
    return out


def _launches(cfg: TileConfig | str, launch: Callable[[TileConfig | str], None]) -> bool:
    """Launch `cfg` once (compiling it): False when its tile does not fit the GPU (an fp32 tile
    needs twice the shared memory of a bf16 one: 288 KiB for 256x128x64 in 3 stages, against the
    H200's 227 KiB), True when it ran."""
    try:
        launch(cfg)
    except OutOfResources:
        return False
    return True


def _none_fits(key: tuple, candidates: list) -> RuntimeError:
    return RuntimeError(f"no tile candidate of {key} fits this GPU's resources (tried "
                        f"{', '.join(map(_candidate_name, candidates))}); run the stage in bf16, or with impl torch")


def pick(key: tuple, candidates: list, launch: Callable[[TileConfig | str], None]) -> TileConfig | str:
    """The fastest candidate for `key` (timed once with CUDA events, then cached), else the first
    that fits the GPU; candidates whose tile needs more shared memory than the GPU has are skipped."""
    if interpreted():  # one small tile, no hardware limits
        return candidates[0]
    if len(candidates) == 1 or not autotune_enabled():
        if key not in _FIRST_FIT:
            first = next((c for c in candidates if _launches(c, launch)), None)
            if first is None:
                raise _none_fits(key, candidates)
            _FIRST_FIT[key] = first
        return _FIRST_FIT[key]
    if key not in _TUNED:
        saved = _tuned_from_file().get(repr(key))
        if saved in candidates:
            _TUNED[key] = saved
    if key not in _TUNED:
        timings, fitting = [], []
        for cfg in candidates:
            if not _launches(cfg, launch):  # compile and warm up
                continue
            fitting.append(cfg)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            launch(cfg)
            end.record()
            end.synchronize()
            first = start.elapsed_time(end)
            reps = max(1, min(10, int(20.0 / max(first, 1e-3))))  # about 20 ms per candidate
            start.record()
            for _ in range(reps):
                launch(cfg)
            end.record()
            end.synchronize()
            timings.append(start.elapsed_time(end) / reps)
        if not fitting:
            raise _none_fits(key, candidates)
        _TUNED[key] = fitting[min(range(len(fitting)), key=timings.__getitem__)]
        _TUNE_LOG[key] = {_candidate_name(c): ms for c, ms in zip(fitting, timings)}
    return _TUNED[key]



def tuned_configs() -> dict[str, dict]:
    """The tiles chosen so far with every candidate's time (ms), keyed by the problem description."""
    return {repr(k): {"best": v if isinstance(v, str) else vars(v), "candidates_ms": _TUNE_LOG.get(k, {})}
            for k, v in _TUNED.items()}  # fmt: skip

