"""`dnd pack`: tokenize every collected checkpoint once into memory-mappable packed targets.

Input: the checkpoint store of `dnd collect` (`store`: the manifest, one safetensors file per
checkpoint, the layout). Output: the run's packed targets (`targets`) — the tokens (K, T, H, W) of
each task in step order, the padding mask, the criterion weights (averaged over tasks), the layout
and an index with content hashes. Checkpoints are verified against the manifest's hashes and the
layout's fingerprint before anything is written; a task whose checkpoints are unchanged since the
last pack is not tokenized again (its file is hard-linked). A pack is built whole in a staging
folder and swapped in for the previous one (`io.atomic_folder`): all of it or none of it, so a
killed `dnd pack` never leaves new tokens beside old loss weights.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Sequence

import torch
from tqdm import tqdm

from dnd_scale.io import ArtifactError, atomic_folder, exclusive_folder
from dnd_scale.layout import LoraLayout
from dnd_scale.rundir import RunDir
from dnd_scale.store import checkpoint_store, load_checkpoint
from dnd_scale.targets import PackedTargets, is_packed, link_task_targets, write_common, write_task_targets
from dnd_scale.tokenizer import TokenizerConfig, WeightTokenizer, criterion_weights

logger = logging.getLogger(__name__)

PACK_LOCK = ".pack.lock"  # in the run folder: targets/ itself is swapped whole


def pack(
    run_dir: str | Path,
    config: TokenizerConfig | None = None,
    tasks: Sequence[str] | None = None,
    *,
    device: str | torch.device = "cpu",
    reuse: str | Path | None = None,
) -> Path:
    """Tokenize the run's checkpoints into ``<run>/targets``; returns that folder.

    `device`: where the tokenizer's arithmetic runs. `reuse`: another targets folder (e.g. of a run
    sharing this checkpoint store) whose tokens are linked (or copied) for every task whose
    checkpoint hashes, layout and token scheme match, instead of tokenizing that task again.
    The new pack replaces the previous one whole: it holds exactly `tasks` (default: all collected).
    """
    run_dir = Path(run_dir)
    with exclusive_folder(run_dir, "dnd pack", "wait for it to finish", name=PACK_LOCK):
        return _pack(run_dir, config or TokenizerConfig(), tasks, device, reuse)


def _pack(run_dir: Path, config: TokenizerConfig, tasks: Sequence[str] | None, device, reuse) -> Path:
    layout, store = checkpoint_store(run_dir)
    if tasks is not None:
        unknown = sorted(set(tasks) - set(store))
        if unknown:
            raise ArtifactError(f"tasks {unknown} have no checkpoints; collected tasks: {sorted(store)}")
        store = {t: store[t] for t in tasks}
    tokenizer = WeightTokenizer(layout, config)
    out = RunDir(run_dir).targets
    earlier = [_previous_pack(out, layout, tokenizer)]
    if reuse is not None:
        earlier.append(_previous_pack(Path(reuse), layout, tokenizer))
    # The new pack is built whole in a staging folder beside `out` and swapped in at the end: a run
    # killed half-way leaves the previous pack as it was (tokens, loss weights and index together);
    # a run killed by SIGKILL leaves its staging folder, removed by the next pack.
    with atomic_folder(out, "dnd pack") as staging:
        _build(run_dir, store, earlier, tokenizer, layout, device, staging)
    return out


def _build(run_dir: Path, store: dict, earlier: list, tokenizer: WeightTokenizer, layout: LoraLayout,
           device: str | torch.device, staging: Path) -> None:
    """The pack's files, in `staging`."""
    mask = tokenizer.mask()
    weights, hashes = [], {}
    for task, records in store.items():
        hashes[task] = [r["sha256"] for r in records]
        # The first earlier pack that holds this task's very checkpoints (this folder's own first).
        source = next((packed for packed, previous in earlier if previous.get(task) == hashes[task]), None)
        if source is not None:
            link_task_targets(staging, task, source)  # a hard link: the file is not rewritten
            stacked = torch.stack([source.get(task, k) for k in range(len(records))])
        else:
            stacked = torch.stack([
                _tokenize_checkpoint(run_dir, record, tokenizer, device)
                for record in tqdm(records, desc=f"pack {task}", unit="ckpt", leave=False)
            ])  # (K, T, H, W)
            write_task_targets(staging, task, stacked)
        weights.append(criterion_weights(stacked, mask))
    write_common(
        staging, mask, torch.stack(weights).mean(dim=0), {**layout.to_dict(), "fingerprint": layout.fingerprint()},
        extra={"tokenizer": tokenizer.state_dict_config(), "checkpoint_sha256": hashes},
        fingerprint=layout.fingerprint(),
    )


def _previous_pack(
    out: Path, layout: LoraLayout, tokenizer: WeightTokenizer
) -> tuple[PackedTargets | None, dict[str, list[str]]]:
    """An earlier pack with the same layout and tokenizer, and its checkpoint hashes per task; else (None, {})."""
    if not is_packed(out):
        return None, {}
    try:
        packed = PackedTargets(out, layout.fingerprint())
    except ValueError:
        return None, {}
    extra = packed.extra
    if extra.get("tokenizer") != tokenizer.state_dict_config():
        return None, {}
    return packed, {t: h for t, h in extra.get("checkpoint_sha256", {}).items() if t in packed.tasks}


def _tokenize_checkpoint(run_dir: Path, record: dict, tokenizer: WeightTokenizer, device) -> torch.Tensor:
    state_dict = load_checkpoint(run_dir, record, tokenizer.layout)  # checks sha256 and layout
    tokens, _ = tokenizer.tokenize(state_dict, source=record["file"], device=device)
    return tokens


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="dnd pack", description=__doc__.splitlines()[0] + " Overrides: --pack.field=value (e.g. --pack.chunk=256)."
    )
    parser.add_argument("--run", required=True, help="run folder holding checkpoints/ from `dnd collect`")
    parser.add_argument("--config", help="YAML recipe; its `pack:` section (the token scheme) is read "
                                         "(default: the recipe saved in the run folder)")
    parser.add_argument("--tasks", nargs="*", help="pack only these tasks (default: all collected)")
    from dnd_scale.recipe import parse_stage_args  # imports every stage's config: for the command line only

    args, run = parse_stage_args(parser, argv, "pack")
    out = pack(args.run, run.pack, args.tasks)
    packed = PackedTargets(out)
    print(f"packed {len(packed.tasks)} tasks, {sum(packed.num_checkpoints.values())} checkpoints, "
          f"{packed.num_tokens} tokens of {packed.token_shape} -> {out}")
    return 0
