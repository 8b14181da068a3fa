"""Full-state checkpoints of `dnd train`: what is saved at a step boundary, how it is loaded back,
and the checks that a resumption continues the same run.

A checkpoint is the engine's state (model, optimizer, scheduler) plus, per rank, the data-stream
position and RNG states, and the run it belongs to (`run_identity`: resolved train config, data
identity), written every K steps and on SIGTERM (`StopRequest`). LATEST in CHECKPOINTS_DIR names the
newest complete one; every `.pt` file is loaded with `weights_only=True`
(`weights_only_checkpoint_engine`).
"""

from __future__ import annotations

import pickle
import random
import shutil
import signal
from pathlib import Path
from typing import Mapping

import numpy as np
import torch

from dnd_scale.config import flatten, read_yaml, to_dict
from dnd_scale.io import DiskFullError, atomic_path, reporting_full_disk
from dnd_scale.targets import canonical_json_sha256
from dnd_scale.train_config import TrainConfig, TrainError
from dnd_scale.train_data import BatchStream, TrainingData

CHECKPOINTS_DIR = "checkpoints"
LATEST = "latest"


class StopRequest:
    """SIGTERM sets a flag; the loop checks it at the step boundary (never mid-step)."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def __enter__(self) -> "StopRequest":
        self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        signal.signal(signal.SIGTERM, self._previous)


def rng_state() -> dict:
    """Every RNG a step may draw from, as JSON-friendly values."""
    np_state = np.random.get_state()
    state = {
        "python": [list(x) if isinstance(x, tuple) else x for x in random.getstate()],
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state().tolist()
    return state


def set_rng_state(state: Mapping) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8))


def checkpoint_tag(step: int) -> str:
    """The folder name of the checkpoint at `step` (what `latest` names), e.g. step00000042."""
    return f"step{step:08d}"


def latest_checkpoint(checkpoint_dir: Path) -> str | None:
    """Tag of the newest complete checkpoint (the LATEST file is written only after all ranks finish)."""
    path = checkpoint_dir / LATEST
    return path.read_text().strip() if path.is_file() else None


def run_identity(config: TrainConfig, data: TrainingData) -> dict:
    """What a checkpoint belongs to: the resolved train config and the data it was trained on (the
    packed targets' and the shard set's index.json, which list every file with its sha256).

    Stored inside every checkpoint, so a resumption compares against the checkpoint itself, not
    against the saved train config (`trainer.TRAIN_CONFIG`) that may have been deleted or an output
    folder copied from another run.
    """
    return {
        "train_config": to_dict(config),
        "data": {
            "targets_index_sha256": canonical_json_sha256(data.targets.index),
            "shards_index_sha256": canonical_json_sha256(data.shard_index),
        },
    }


def check_checkpoint_run(saved: Mapping | None, current: Mapping, where: Path) -> None:
    """Refuse to continue (or export) a checkpoint of another run: a different train config (beyond
    RESUME_MAY_CHANGE) or different data. Checkpoints written before run binding (no record) pass."""
    if saved is None:
        return
    flat_saved, flat_now = flatten(saved), flatten(current)
    changed = {
        key: (flat_saved.get(key), flat_now.get(key))
        for key in sorted(set(flat_saved) | set(flat_now))
        if flat_saved.get(key) != flat_now.get(key) and key.removeprefix("train_config.") not in RESUME_MAY_CHANGE
    }
    if changed:
        raise TrainError(
            f"checkpoint {where} belongs to another run: these differ (checkpoint -> now): "
            + ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items())
            + ". Restore the train fields it was trained with (train.* above) and the run folder's targets/ "
            "and shards/ it was trained on (data.* above), or train into a new train.output_dir"
        )


def save_checkpoint(engine, checkpoint_dir: Path, step: int, stream: BatchStream, keep: int, run: Mapping) -> None:
    """Full state of every rank at a step boundary, bound to `run` (`run_identity`); collective."""
    import deepspeed.comm as dist

    world, tag = dist.get_world_size(), checkpoint_tag(step)
    mine = {"data": stream.state_dict(), "rng": rng_state()}
    ranks: list = [None] * world
    dist.all_gather_object(ranks, mine)  # rank 0's model-states file carries every rank's position
    client = {"step": step, "world_size": world, "ranks": ranks, "run": run}
    try:
        # torch.save reports a full disk as "unexpected pos ...": reporting_full_disk says what it is.
        with reporting_full_disk(checkpoint_dir / tag):
            engine.save_checkpoint(str(checkpoint_dir), tag=tag, client_state=client, save_latest=False)
    except DiskFullError as err:
        shutil.rmtree(checkpoint_dir / tag, ignore_errors=True)  # incomplete, and `latest` never named it
        previous = latest_checkpoint(checkpoint_dir)
        then = f"`{LATEST}` still names {previous}: continue with --resume" if previous else "train again"
        raise TrainError(f"{err}. The incomplete checkpoint {tag} was removed; {then} once there is space") from err
    dist.barrier()  # every rank's shard is on disk before `latest` may point at it
    if dist.get_rank() == 0:
        with atomic_path(checkpoint_dir / LATEST) as tmp:
            tmp.write_text(tag)
        tags = sorted(p.name for p in checkpoint_dir.iterdir() if p.is_dir() and p.name.startswith("step"))
        for old in tags[: -keep] if keep < len(tags) else []:
            if old != tag:
                shutil.rmtree(checkpoint_dir / old, ignore_errors=True)
    dist.barrier()


def load_checkpoint(engine, checkpoint_dir: Path, stream: BatchStream, run: Mapping | None = None) -> int:
    """Restore the newest checkpoint on every rank, refusing one of another run than `run`
    (`run_identity`); returns its step."""
    import deepspeed.comm as dist

    tag = latest_checkpoint(checkpoint_dir)
    if tag is None:
        raise TrainError(
            f"no checkpoint to resume from or export in {checkpoint_dir} (no '{LATEST}' file); run without "
            "--resume to start training, or point --run / --train.output_dir at the run to continue"
        )
    path, client = engine.load_checkpoint(str(checkpoint_dir), tag=tag)
    if path is None:
        raise TrainError(f"--resume: checkpoint {checkpoint_dir / tag} could not be loaded (files missing?)")
    if run is not None:
        check_checkpoint_run(client.get("run"), run, checkpoint_dir / tag)
    world = dist.get_world_size()
    if client["world_size"] != world:
        raise TrainError(
            f"checkpoint {tag} was written by {client['world_size']} ranks, this run has {world}: every rank's "
            f"data position is part of the state; resume with {client['world_size']} ranks"
        )
    mine = client["ranks"][dist.get_rank()]
    stream.load_state_dict(mine["data"])
    set_rng_state(mine["rng"])
    return int(client["step"])


# Fields that may change between a run and its resumption: they do not alter the trajectory up to
# the checkpoint. `steps` continues a run past its end (`--resume --train.steps=MORE`, never below
# the checkpoint's step): the LR schedule comes back from the checkpoint as the run started it.
RESUME_MAY_CHANGE = {"log_every", "checkpoint_every", "keep_checkpoints", "encoder.batch_size", "generator.impl",
                     "cudnn_benchmark", "steps", "resident"}  # fmt: skip


def check_resume_config(config: TrainConfig, saved_path: Path) -> None:
    """Refuse to resume with a config that would not continue the same trajectory."""
    if not saved_path.is_file():
        return  # nothing recorded: the checkpoint lookup reports the real problem
    saved = flatten(read_yaml(saved_path, "saved train config") or {})
    current = flatten(to_dict(config))
    changed = {k: (saved.get(k), v) for k, v in current.items() if saved.get(k) != v and k not in RESUME_MAY_CHANGE}
    if changed:
        raise TrainError(
            "--resume continues the run recorded in " + str(saved_path) + ", but these train fields differ "
            "(saved -> now): " + ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in sorted(changed.items()))
            + "; restore them, or train into a new train.output_dir"
        )


def _checkpoint_globals() -> list:
    """The only non-builtin types DeepSpeed writes into our checkpoints' `.pt` files (ZeRO 0-3, fp32):
    plain data holders, rebuilt from their saved fields without running any method of theirs beyond
    an Enum lookup. Everything else a pickle may name (functions, `os.system`, ...) stays refused."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def weights_only_checkpoint_engine(engine):
    """DeepSpeed's torch checkpoint engine, but loading every `.pt` file with `weights_only=True`.

    `engine.load_checkpoint` reads the model, optimizer and ZeRO files through
    `engine.checkpoint_engine.load`, whose stock version unpickles with `weights_only=False`: a
    crafted `mp_rank_00_model_states.pt` would run its code on `--resume` or `--export-only`.
    Saving is unchanged (the stock engine's `torch.save`).
    """
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    if type(engine.checkpoint_engine) is not TorchCheckpointEngine:  # decoupled/fast writers: not configured here
        raise TrainError(f"unexpected DeepSpeed checkpoint engine {type(engine.checkpoint_engine).__name__}; "
                         "dnd train only loads checkpoints through the torch engine with weights_only=True")

    class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location=None):
            with torch.serialization.safe_globals(_checkpoint_globals()):
                try:
                    return torch.load(path, map_location=map_location, weights_only=True)
                except pickle.UnpicklingError as err:
                    reason = str(err).split("WeightsUnpickler error: ")[-1].split(". ")[0]
                    raise TrainError(
                        f"checkpoint file {path} holds more than tensors and plain data ({reason}); dnd train "
                        "loads checkpoints with torch.load(weights_only=True) and never runs code from them. A "
                        "checkpoint dnd train wrote never needs more: this file was altered or comes from "
                        f"elsewhere. Delete that checkpoint folder (and point {CHECKPOINTS_DIR}/{LATEST} at an "
                        "older one), or train into a new train.output_dir"
                    ) from None

    return WeightsOnlyCheckpointEngine(engine._config)
