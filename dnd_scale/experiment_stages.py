"""The study's stages, each run through the pipeline's own stage and skipped when its artifact is
already on disk: the base model, one shared checkpoint store of every LoRA, the weight average of
the training LoRAs, and per held-out task (or variation) its packed targets, shards, generator and
generated adapters. Each stage is timed into `Timings`."""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Iterator, Sequence

import torch

from dnd_scale.experiment_data import lora_task, prompt_batches, split_heldout
from dnd_scale.experiment_recipe import ExperimentConfig, HeldOut
from dnd_scale.export import ADAPTER_WEIGHTS, write_adapter
from dnd_scale.generator_export import export_folder, is_exported
from dnd_scale.io import load_safetensors, read_json, sha256_file, write_json
from dnd_scale.layout import HF_CONFIG
from dnd_scale.rundir import RunDir
from dnd_scale.shards import is_shard_set
from dnd_scale.store import final_checkpoint as final_store_checkpoint
from dnd_scale.store import is_complete, read_collect_meta, read_layout, store_dir
from dnd_scale.targets import is_packed
from dnd_scale.train_checkpoint import CHECKPOINTS_DIR

COLLECT_RUN = "collect"  # the run folder, under the experiment folder, that holds the one shared checkpoint store
BASE_SOURCE = "base_source.json"  # which .gguf the base folder was dequantized from


class Timings:
    """Wall times of the run's steps, kept in `timings.json` across resumed invocations."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.values: dict[str, float] = read_json(path) if path.is_file() else {}

    @contextlib.contextmanager
    def measure(self, key: str) -> Iterator[None]:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        yield
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.values[key] = round(time.perf_counter() - start, 3)
        write_json(self.path, self.values)


def log_progress(message: str) -> None:
    print(f"[experiment {time.strftime('%H:%M:%S')}] {message}", flush=True)


def prepare_base(config: ExperimentConfig, out: Path) -> str:
    """The base model as a HF folder under the run (a .gguf is dequantized once, so every later load
    is a plain folder read); other sources are used as they are."""
    source = Path(config.run.collect.base_model)
    if source.suffix != ".gguf":
        return config.run.collect.base_model
    folder = out / "base"
    if not (folder / HF_CONFIG).is_file():
        from dnd_scale.basemodel import load_base_model, save_base_model

        log_progress(f"dequantizing {source.name} into {folder}")
        base = load_base_model(source, dtype=config.run.collect.dtype, device="cpu")
        save_base_model(base, folder)
        write_json(out / BASE_SOURCE, {"gguf": str(source), "sha256": sha256_file(source),
                                       "dtype": config.run.collect.dtype})
    return str(folder)


def collect_all(config: ExperimentConfig, base: str, out: Path, timings: Timings) -> None:
    """Every training task's and every held-out task's (oracle) LoRA into one store, one task per call."""
    from dnd_scale.collect import collect

    names = list(dict.fromkeys([t for h in config.heldout for t in h.train_on] + [h.task for h in config.heldout]))
    collect_config = replace(config.run.collect, base_model=base)
    for name in names:
        if is_complete(store_dir(out / COLLECT_RUN), name):
            continue
        log_progress(f"collect {name}")
        with timings.measure(f"collect/{name}"):
            collect(collect_config, [lora_task(config, name)], out / COLLECT_RUN)


def final_checkpoint(out: Path, task: str) -> Path:
    """The last checkpoint of a collected task's trajectory."""
    return final_store_checkpoint(out / COLLECT_RUN, task)


def average_folder(out: Path, task: str) -> Path:
    """Where the weight average of a held-out task's training LoRAs is written."""
    return out / "baselines" / task / "average"


def average_adapter(out: Path, tasks: Sequence[str], folder: Path) -> Path:
    """The element-wise mean of the tasks' final checkpoints as a PEFT folder."""
    if (folder / ADAPTER_WEIGHTS).is_file():
        return folder
    layout = read_layout(store_dir(out / COLLECT_RUN))
    states = [load_safetensors(final_checkpoint(out, t), "checkpoint") for t in tasks]
    mean = {key: torch.stack([s[key] for s in states]).mean(dim=0) for key in states[0]}
    collected = read_collect_meta(store_dir(out / COLLECT_RUN))  # the base the LoRAs were trained on
    return write_adapter(mean, layout, folder, provenance={"average_of": list(tasks),
                                                           "base_identity": collected.get("base_identity")})


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _link_store(run: Path, out: Path) -> None:
    """Give a run folder the shared checkpoint store (a relative link, so the run folder can move)."""
    run.mkdir(parents=True, exist_ok=True)
    if not store_dir(run).exists():
        store_dir(run).symlink_to(os.path.relpath(store_dir(out / COLLECT_RUN), run))


def pack_all(config: ExperimentConfig, out: Path, timings: Timings) -> Path:
    """Every task some generator trains on, tokenized once (`out/packed/targets`; an oracle-only
    task is never a target); each held-out run links its tasks from here and computes its own
    criterion weights from those alone."""
    from dnd_scale.pack import pack

    folder = out / "packed"
    if not is_packed(RunDir(folder).targets):
        _link_store(folder, out)
        training = list(dict.fromkeys(t for held in config.heldout for t in held.train_on))
        with timings.measure("pack_all"):
            pack(folder, config.run.pack, training, device=_device())
    return RunDir(folder).targets


def train_generator(config: ExperimentConfig, held: HeldOut, run: Path, out: Path, timings: Timings,
                    key: str) -> Path | None:
    """Pack, shard and train the generator of one held-out task in `run`; its export folder, or None
    when training stopped early (SIGTERM: the next invocation resumes it)."""
    from dnd_scale.pack import pack
    from dnd_scale.shards import build_shards
    from dnd_scale.store import read_prompt_pools
    from dnd_scale.targets import PackedTargets
    from dnd_scale.train_checkpoint import latest_checkpoint
    from dnd_scale.trainer import train

    export = export_folder(RunDir(run).train_output(config.run.train.output_dir))
    if is_exported(export):
        return export
    _link_store(run, out)
    if not is_shard_set(RunDir(run).shards):
        shared = pack_all(config, out, timings)
        with timings.measure(f"{key}/pack_shard"):
            targets = pack(run, config.run.pack, held.train_on, device=_device(), reuse=shared)
            pools = read_prompt_pools(run, held.train_on)  # what collect kept, checked against its marker
            build_shards(PackedTargets(targets), pools, RunDir(run).shards, config.run.shard)
    resume = latest_checkpoint(RunDir(run).train_output(config.run.train.output_dir) / CHECKPOINTS_DIR) is not None
    log_progress(f"train the generator of {key}" + (" (resumed)" if resume else ""))
    with timings.measure(f"{key}/train" + ("_resumed" if resume else "")):
        train(config.run.train, run, resume=resume)
    return export if is_exported(export) else None


def generate_adapters(config: ExperimentConfig, held: HeldOut, export: Path, run: Path, timings: Timings,
                      key: str) -> tuple[dict[str, list[Path]], dict[str, str]]:
    """The generated adapters (disjoint conditioning batches) and the control adapters (the control
    task's prompts), and the ones the generator could not write (an unusable output is a result too:
    `failures.json` keeps why, and the rest is still scored)."""
    from dnd_scale.generate import AdapterGenerator
    from dnd_scale.layout import LayoutError

    conditioning, _ = split_heldout(config, held.task)
    n = config.run.shard.num_prompts
    batches = {
        "generated": prompt_batches([r.prompt for r in conditioning], n, config.generated_samples,
                                    f"{config.split_seed}/{held.task}/condition"),
        "control": prompt_batches(lora_task(config, held.control).prompts, n, config.control_samples,
                                  f"{config.split_seed}/{held.control}/control"),
    }
    folders = {label: [RunDir(run).adapters / f"{label}-{i}" for i in range(len(b))] for label, b in batches.items()}
    failures_path = RunDir(run).adapters / "failures.json"
    failures: dict[str, str] = read_json(failures_path) if failures_path.is_file() else {}

    def done(folder: Path) -> bool:
        return (folder / ADAPTER_WEIGHTS).is_file() or folder.name in failures

    if not all(done(f) for group in folders.values() for f in group):
        generator = AdapterGenerator(export, _device())
        for label, group in batches.items():
            for i, prompts in enumerate(group):
                folder = folders[label][i]
                if done(folder):
                    continue
                try:
                    with timings.measure(f"{key}/generate/{label}-{i}"):
                        generator.generate(prompts, folder, seed=i, extra={
                            "experiment_label": label, "prompts_of": held.task if label == "generated" else held.control})
                except LayoutError as error:  # e.g. a statistics code out of range: NaN/Inf weights
                    failures[folder.name] = str(error)
                    write_json(failures_path, failures)
                    log_progress(f"{key}: {folder.name} unusable: {error}")
    written = {label: [f for f in group if (f / ADAPTER_WEIGHTS).is_file()] for label, group in folders.items()}
    return written, failures
