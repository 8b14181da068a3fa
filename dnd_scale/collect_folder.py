"""The run folder as `dnd collect` finds it: one collect at a time, leftovers of a killed run removed,
the base model and the run's config recorded on the first run and checked on every later one, and
the manifest reconciled with the tasks that are finished.

Only rank 0 (or the single process) calls `prepare_folder`, holding `exclusive_collect`, before any
task trains (see `collect_distributed`).
"""

from __future__ import annotations

import contextlib
import hashlib
import shutil
from pathlib import Path
from typing import Any, Sequence

import torch

from dnd_scale.basemodel import BaseModel, base_identity, load_base_model, save_base_model
from dnd_scale.collect_config import CollectConfig
from dnd_scale.io import TMP_SUFFIX, ArtifactError, exclusive_folder, read_jsonl, remove_stale_builds, write_json
from dnd_scale.layout import LayoutError, LoraLayout
from dnd_scale.rundir import RunDir
from dnd_scale.store import (
    COLLECT_META,
    MANIFEST,
    RESUME,
    completion_marker,
    completion_markers,
    is_complete,
    read_collect_meta,
    read_completion,
    save_layout,
    store_dir,
    write_manifest,
)
from dnd_scale.tasks import Task


def exclusive_collect(checkpoints: Path) -> contextlib.AbstractContextManager[None]:
    """Refuse a second collect on the same run folder."""
    return exclusive_folder(checkpoints, "dnd collect", "wait for it or use another run folder")


def load_base(config: CollectConfig, device: str) -> tuple[BaseModel, LoraLayout]:
    """The base model on `device` and the layout of the config's LoRA on it."""
    base = load_base_model(config.base_model, dtype=config.dtype, device=device, seed=config.seed)
    return base, LoraLayout.from_config(base.model.config, config.lora)


def prepare_folder(
    config: CollectConfig, run_dir: Path, names: Sequence[str], device: str
) -> tuple[BaseModel, LoraLayout, list[dict[str, Any]], dict[str, list[dict[str, Any]]]]:
    """(base, layout, manifest lines kept, lines to add per task) of a run folder made ready for
    collecting `names`: leftovers removed, the base loaded, the run's config recorded or checked
    (`_prepare_run`) and the manifest reconciled (`_reconcile_manifest`). Call it holding `exclusive_collect`."""
    _remove_temporaries(run_dir)
    base, layout = load_base(config, device)
    _prepare_run(config, base, layout, run_dir)
    manifest, missing = _reconcile_manifest(store_dir(run_dir), layout.fingerprint(), names)
    return base, layout, manifest, missing


def _remove_temporaries(run_dir: Path) -> None:
    """Temporary files left by a killed run; nothing refers to them (renames never happened). Also the
    resume state of a task killed after its completion marker was written."""
    run = RunDir(run_dir)
    for path in run.checkpoints.rglob(f"*{TMP_SUFFIX}"):
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    remove_stale_builds(run.base_model, "dnd collect")
    for marker in completion_markers(run.checkpoints):
        (marker.parent / RESUME).unlink(missing_ok=True)


def _weights_sha256(model: torch.nn.Module) -> str:
    """Hash of a model's weights: proves a re-run re-created the same random-init base."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        # Raw bytes through a uint8 view: exact for every dtype, bfloat16 included (numpy has none).
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _prepare_run(config: CollectConfig, base: BaseModel, layout: LoraLayout, run_dir: Path) -> None:
    """Write `COLLECT_META` and the layout on the first run; on a re-run, refuse anything that changed.

    `COLLECT_META` binds the run once a task is finished (its checkpoints are kept). Before that, a
    collect that failed (a record without a response, an lr that diverges) kept nothing, so the next
    attempt writes it anew from its corrected config.
    """
    checkpoints, base_folder = RunDir(run_dir).checkpoints, RunDir(run_dir).base_model
    meta_path = checkpoints / COLLECT_META
    base_sha = _weights_sha256(base.model) if base.kind == "random-init" else None
    if meta_path.exists() and completion_markers(checkpoints):
        meta = read_collect_meta(checkpoints)
        if meta["layout_fingerprint"] != layout.fingerprint():
            raise LayoutError(
                f"{checkpoints} holds checkpoints of LoRA layout {meta['layout_fingerprint'][:12]} "
                f"(rank {meta['config']['lora']['rank']}), but the base model {config.base_model!r} with LoRA "
                f"spec rank {layout.rank}, modules {list(layout.spec.modules)} gives layout "
                f"{layout.fingerprint()[:12]}; collect into a new run folder, or use the base model and LoRA "
                f"spec recorded in {COLLECT_META}"
            )
        changed = {key: (old, new) for key, new in config.checkpoint_fields().items()
                   if (old := meta["config"].get(key)) != new}
        if changed:
            details = ", ".join(f"{key}: {old!r} -> {new!r}" for key, (old, new) in changed.items())
            raise ValueError(
                f"{checkpoints} was collected with another config ({details}); checkpoints of one run must "
                "share it. Use the recorded values or a new run folder."
            )
        if meta.get("base_weights_sha256") != base_sha:
            raise ValueError(
                f"the random-init base model re-created from {config.base_model!r} differs from the one the "
                f"checkpoints in {checkpoints} were trained on (saved in {base_folder}); "
                f"pass {base_folder} as base_model"
            )
        return
    if base.kind == "random-init":
        # Without COLLECT_META nothing refers to a base_model folder yet: it may be stale, so replace it.
        shutil.rmtree(base_folder, ignore_errors=True)
        save_base_model(base, base_folder)
    save_layout(checkpoints, layout)
    write_json(meta_path, {
        "config": config.checkpoint_fields(),
        "base_model": {"source": base.source, "kind": base.kind,
                       "saved_to": base_folder.name if base.kind == "random-init" else None},
        "base_weights_sha256": base_sha,
        "base_identity": base_identity(base.model),  # carried into the generator's adapters, checked by eval
        "layout_fingerprint": layout.fingerprint(),
    })


def _reconcile_manifest(
    checkpoints: Path, fingerprint: str, names: Sequence[str]
) -> tuple[list[dict[str, Any]], dict[str, list[dict[str, Any]]]]:
    """(manifest lines kept, lines to add per task): keep the lines of finished tasks only (an
    interrupted task is collected again), and find the finished tasks the manifest lacks.

    A task lacks its lines when a multi-process job stopped before rank 0 merged them; its
    completion marker holds them. Those of the tasks in `names` are returned, to be added at their place
    in `names`; any others are added now, by name, after the kept lines.
    """
    path = checkpoints / MANIFEST
    records = read_jsonl(path)
    finished = {task for task in {r["task"] for r in records} if is_complete(checkpoints, task)}
    kept = [r for r in records if r["task"] in finished]
    missing = {}
    for marker in completion_markers(checkpoints):
        if marker.parent.name in finished:
            continue
        lines = read_completion(marker).get("manifest")
        if lines is not None:  # None: a marker without lines, which is_finished reports
            missing[marker.parent.name] = lines
    foreign = [r for r in [*kept, *(r for lines in missing.values() for r in lines)]
               if r["layout_fingerprint"] != fingerprint]
    if foreign:
        raise LayoutError(
            f"{path}: {len(foreign)} checkpoints (e.g. task {foreign[0]['task']!r} step {foreign[0]['step']}) have "
            f"layout {foreign[0]['layout_fingerprint'][:12]}, not this run's {fingerprint[:12]}; "
            "the folder mixes runs — collect into a new run folder"
        )
    kept += [r for task in sorted(set(missing) - set(names)) for r in missing.pop(task)]
    if path.exists() or kept:
        write_manifest(checkpoints, kept)
    return kept, missing


def is_finished(task: Task, config: CollectConfig, checkpoints: Path, manifest: list[dict[str, Any]]) -> bool:
    """Whether the task is collected: its completion marker exists, made from the same records, and
    `manifest` lists every checkpoint step; a finished task that does not fit is an error saying what to do."""
    if not is_complete(checkpoints, task.name):
        return False
    done = read_completion(completion_marker(checkpoints, task.name))
    if done["task_fingerprint"] != task.fingerprint():
        raise ValueError(
            f"task {task.name!r} was collected from other records than {task.source!r} gives now; "
            f"delete {checkpoints / task.name} to collect it again, or give the new data another task name"
        )
    steps = [r["step"] for r in manifest if r["task"] == task.name]
    if steps != config.checkpoint_steps():
        raise ArtifactError(
            f"{checkpoints / MANIFEST} lists steps {steps} for finished task {task.name!r}, expected "
            f"{config.checkpoint_steps()}; delete {checkpoints / task.name} to collect it again"
        )
    return True
