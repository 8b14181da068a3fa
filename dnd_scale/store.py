"""The checkpoint store, `<run>/checkpoints`: what `dnd collect` writes, and what pack, shard, train
and eval read of it.

    collect.json                the config, base model (and its identity, checked by eval) and layout
                                fingerprint that made the checkpoints
    layout.json                 the LoraLayout (`LoraLayout.load`)
    manifest.jsonl              one line per checkpoint:
                                {task, step, loss, seed, layout_fingerprint, file, sha256}
    <task>/<step>.safetensors   the adapter: PEFT keys exactly as `get_peft_model_state_dict` (and
                                `save_pretrained`) give them, float32
    <task>/prompts.jsonl        the task's prompt pool, one {"prompt": ...} per line (no answers):
                                what `dnd shard` pairs with the checkpoints (`read_prompt_pools`)
    <task>/complete.json        written after the task's last checkpoint: the task is finished. It
                                also holds the task's manifest lines, its prompt pool's size and
                                sha256, and which rank (of how many, on which host) collected it.
    <task>/resume.safetensors   while a task is unfinished: its LoRA, AdamW state, RNG state, step,
                                losses and manifest lines so far (see `collect`, "Crash safety");
                                removed when the task completes

Every file is written to a temporary name and renamed into place. The manifest lists finished
tasks only: a line counts once its task's complete.json exists.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import torch

from dnd_scale.io import (
    ArtifactError,
    atomic_path,
    load_safetensors,
    read_json,
    read_jsonl,
    save_safetensors,
    sha256_file,
    write_json,
)
from dnd_scale.layout import LayoutError, LoraLayout
from dnd_scale.rundir import RunDir

MANIFEST = "manifest.jsonl"
COLLECT_META = "collect.json"  # the store's config, base model and its identity, layout
LAYOUT = "layout.json"
COMPLETE = "complete.json"
RESUME = "resume.safetensors"  # an unfinished task's training state
PROMPTS = "prompts.jsonl"  # a task's prompt pool, one {"prompt": ...} per line, for `dnd shard`
# Only PEFT's own metadata: safetensors writes metadata keys in hash-map order, so more than one key
# would make the bytes (and the sha256) differ between identical runs.
_CHECKPOINT_METADATA = {"format": "pt"}


def store_dir(run_dir: str | os.PathLike) -> Path:
    """The checkpoint store of a run folder."""
    return RunDir(run_dir).checkpoints


def completion_marker(store: Path, task: str) -> Path:
    return store / task / COMPLETE


def completion_markers(store: Path) -> list[Path]:
    """The completion markers of the store's finished tasks, by task name."""
    return sorted(store.glob(f"*/{COMPLETE}"))


def is_complete(store: Path, task: str) -> bool:
    return completion_marker(store, task).is_file()


def read_completion(marker: Path) -> dict[str, Any]:
    return read_json(marker, "task completion marker")


def write_completion(store: Path, task: str, record: Mapping[str, Any]) -> None:
    """Mark `task` finished: written after its last checkpoint and manifest line."""
    write_json(completion_marker(store, task), dict(record))


def write_checkpoint(store: Path, task: str, step: int, state: Mapping[str, torch.Tensor]) -> tuple[str, str]:
    """Write one checkpoint of `task`; returns (its manifest `file`, relative to the store; its sha256)."""
    name = f"{task}/{step}.safetensors"
    save_safetensors(state, store / name, _CHECKPOINT_METADATA)
    return name, sha256_file(store / name)


def write_manifest(store: Path, records: list[dict[str, Any]]) -> None:
    """Replace the manifest (`MANIFEST`) atomically; the same serialization as append_jsonl, so an unchanged
    manifest is left untouched."""
    path = store / MANIFEST
    text = "".join(json.dumps(record, sort_keys=True) + "\n" for record in records)
    if not path.exists() or path.read_text() != text:
        with atomic_path(path) as tmp:
            tmp.write_text(text)


def read_collect_meta(store: Path, what: str = "collect metadata") -> dict[str, Any]:
    """The store's `COLLECT_META`; ArtifactError naming `what` when it is missing."""
    return read_json(store / COLLECT_META, what)


def collected_base(store: Path) -> dict[str, Any]:
    """What `COLLECT_META` records of the base model, {} when the store has none."""
    path = store / COLLECT_META
    return read_json(path, "collect metadata") if path.is_file() else {}


def read_layout(store: Path) -> LoraLayout:
    """The store's LoRA layout; ArtifactError when `dnd collect` has not written it."""
    if not (store / LAYOUT).is_file():
        raise ArtifactError(f"{store / LAYOUT} is missing; run `dnd collect` for this run first")
    return LoraLayout.load(store / LAYOUT)


def save_layout(store: Path, layout: LoraLayout) -> None:
    layout.save(store / LAYOUT)


def read_manifest(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Manifest lines of the finished tasks of a run, in collection order."""
    store = store_dir(run_dir)
    if not (store / MANIFEST).is_file():
        raise ArtifactError(f"{store / MANIFEST} not found; run `dnd collect` into {run_dir} first")
    return [r for r in read_jsonl(store / MANIFEST) if is_complete(store, r["task"])]


def read_prompt_pools(run_dir: str | os.PathLike, tasks: list[str] | tuple[str, ...]) -> dict[str, list[str]]:
    """The prompt pools `dnd collect` kept for `tasks`, each checked against its completion marker."""
    store = store_dir(run_dir)
    pools = {}
    for task in tasks:
        if not is_complete(store, task):
            raise ArtifactError(f"task {task!r} has not been collected in {run_dir}; run `dnd collect` for it")
        entry = read_completion(completion_marker(store, task)).get("prompt_pool")
        path = store / task / PROMPTS
        if entry is None or not path.is_file() or sha256_file(path) != entry["sha256"]:
            raise ArtifactError(f"the prompt pool of task {task!r} in {store / task} is missing or changed "
                                f"since collection; run `dnd collect` into {run_dir} again: it writes it anew")
        pools[task] = [record["prompt"] for record in read_jsonl(path)]
    return pools


def checkpoint_store(run_dir: str | Path) -> tuple[LoraLayout, dict[str, list[dict]]]:
    """The layout and, per *finished* task, the manifest records of its checkpoints sorted by step."""
    store = store_dir(run_dir)
    layout = read_layout(store)
    tasks: dict[str, list[dict]] = {}
    for record in read_manifest(run_dir):
        tasks.setdefault(record["task"], []).append(record)
    if not tasks:
        raise ArtifactError(f"{store / MANIFEST} lists no finished task; run `dnd collect` to completion first")
    return layout, {task: sorted(records, key=lambda r: int(r["step"])) for task, records in sorted(tasks.items())}


def final_checkpoint(run_dir: str | os.PathLike, task: str) -> Path:
    """The last checkpoint of a collected task's trajectory."""
    records = [r for r in read_manifest(run_dir) if r["task"] == task]
    if not records:
        raise ArtifactError(f"task {task!r} has no finished checkpoints in {store_dir(run_dir)}; run `dnd collect` for it")
    last = max(records, key=lambda r: int(r["step"]))
    return store_dir(run_dir) / last["file"]


def load_checkpoint(
    run_dir: str | os.PathLike, record: dict[str, Any], layout: LoraLayout | None = None
) -> dict[str, torch.Tensor]:
    """The adapter state dict of one manifest line, after checking its sha256 (and its layout if given)."""
    path = store_dir(run_dir) / record["file"]
    if not path.is_file():
        raise ArtifactError(f"checkpoint {path} listed in the manifest is missing; run `dnd collect` again")
    if sha256_file(path) != record["sha256"]:
        raise ArtifactError(f"checkpoint {path} does not match its manifest sha256; the file changed after collect")
    state = load_safetensors(path, "checkpoint")
    if layout is not None:
        if record["layout_fingerprint"] != layout.fingerprint():
            raise LayoutError(
                f"checkpoint {path} has layout {record['layout_fingerprint'][:12]}, expected "
                f"{layout.fingerprint()[:12]}; it was collected for another base model or LoRA spec"
            )
        layout.check_state_dict(state, str(path))
    return state


def store_of_checkpoint(path: Path) -> Path:
    """The store a checkpoint file `<store>/<task>/<step>.safetensors` sits in."""
    return path.parent.parent


def check_collected_hash(path: Path) -> None:
    """A checkpoint file given by path must be the file its manifest line hashed."""
    manifest = store_of_checkpoint(path) / MANIFEST
    name = f"{path.parent.name}/{path.name}"
    records = [r for r in read_jsonl(manifest) if r.get("file") == name] if manifest.is_file() else []
    if not records:
        raise ArtifactError(
            f"checkpoint {path} has no line in {manifest}; only checkpoints that `dnd collect` finished are "
            "evaluated as files: pass a PEFT adapter folder for anything else"
        )
    if sha256_file(path) != records[-1]["sha256"]:
        raise ArtifactError(f"checkpoint {path} does not match the sha256 of its manifest line; the file changed "
                            "after collect: run `dnd collect` again for its task")  # fmt: skip
