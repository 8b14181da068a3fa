"""`dnd experiment`: does a generated adapter help the base model on a task it never saw?

One recipe (`configs/experiments/*.yaml`) describes a leave-one-out study; this module runs it
end to end with the pipeline's own stages and writes every number it measures:

1. Data. Each held-out task's test file is split by a fixed seed into a *conditioning* half (its
   prompts, never its answers, feed the generator) and a *scoring* half (the only records scored),
   so no scored question is ever shown to the generator.
2. Collect (`dnd_scale.collect`): one LoRA trajectory per training task, plus an *oracle* LoRA per
   held-out task, trained on that task's own train file (or, without one, on its conditioning half
   with answers: still disjoint from the scoring half). All share one checkpoint store, so every
   LoRA starts from the same initialization. Each task is collected in its own call and timed.
3. Per held-out task, a run folder of its own whose checkpoint store is the shared one: pack only
   the training tasks, shard their prompt pools, train the generator (`dnd_scale.trainer`), and
   generate adapters (`dnd_scale.generate`): `generated_samples` from disjoint batches of the
   conditioning half, and `control_samples` from another task's prompts (does the prompt matter?).
4. Score (`dnd_scale.evaluate`, both deterministic scorers: option log-likelihood and greedy
   generation with the chosen option parsed from the reply) on the scoring half: the base model,
   each training LoRA's final checkpoint alone, the weight average of those final checkpoints (a
   zero-cost baseline a generator must beat), the generated and control adapters, and the oracle.
   Every accuracy carries a 95% interval (Wilson for one adapter; bootstrap over the scored
   questions for a group's mean).
5. `results.json` + `results.md`: the table, wall times (collect per task, train, generate, the
   oracle LoRA's training against one generation), and the generated adapters' distances in weight
   space to the training mean, the oracle and each training LoRA.

Every step leaves its artifact on disk and is skipped when it is already there, so a run stopped
at any point (a time limit, SIGTERM) continues where it stopped when the same command is run
again; generator training resumes from its last checkpoint. `variations` re-train a held-out
task's generator with other settings (more steps, a larger generator) and score its adapters.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from dnd_scale.collect_config import CollectConfig
from dnd_scale.config import ConfigError, apply_overrides, from_dict, read_recipe, save_config, to_dict
from dnd_scale.eval_scoring import wilson_interval
from dnd_scale.evaluate import EvalConfig
from dnd_scale.export import ADAPTER_WEIGHTS, write_adapter
from dnd_scale.generator_export import export_folder, is_exported
from dnd_scale.io import load_safetensors, read_json, sha256_file, sha256_text, write_json
from dnd_scale.layout import HF_CONFIG
from dnd_scale.rundir import RunDir
from dnd_scale.shards import ShardConfig, is_shard_set
from dnd_scale.store import final_checkpoint as final_store_checkpoint
from dnd_scale.store import is_complete, read_collect_meta, read_layout, store_dir
from dnd_scale.targets import is_packed
from dnd_scale.tasks import Task, TaskRecord, load_task
from dnd_scale.tokenizer import TokenizerConfig
from dnd_scale.trainer import CHECKPOINTS_DIR, TRAIN_INFO, TrainConfig

SCORERS = ("loglik", "generate")
COLLECT_RUN = "collect"  # the run folder, under the experiment folder, that holds the one shared checkpoint store
RESULTS = "results.json"
BOOTSTRAP_RESAMPLES = 2000


@dataclass
class TaskFiles:
    """Where one task's records come from (paths relative to the experiment's `data_dir`)."""

    train: str | None = None
    """Records its LoRA is trained on (the training LoRA, or the oracle when the task is held out)."""
    test: str | None = None
    """Held-out records, split into the conditioning and the scoring half; needed to hold the task out."""
    synthetic: str | None = None
    """Instead of files: a `synthetic:<family>` spec (tiny runs); `train` and `test` are then seeded
    draws of `synthetic_records` records each."""


@dataclass
class HeldOut:
    """One leave-one-out experiment."""

    task: str
    """The task the generator never sees; needs a `test` file."""
    train_on: list[str]
    """Tasks whose LoRA trajectories train this generator."""
    control: str
    """A task whose prompts make the control adapters (typically a training task of another format)."""


@dataclass
class Variation:
    """The generator of one held-out task re-trained with other settings."""

    name: str
    """Folder name of the variation (letters, digits, '-', '_')."""
    heldout: str
    """Which held-out task (one of `heldout`)."""
    overrides: list[str] = field(default_factory=list)
    """Overrides of the experiment's sections, e.g. ["train.steps=1500", "shard.num_prompts=16"]."""


@dataclass
class ExperimentConfig:
    """A leave-one-out study (see the module docstring)."""

    base_model: str = ""
    """The frozen base: a HF folder, a .gguf file, or a model config.json (random init, tiny runs)."""
    data_dir: str = "."
    """Folder the task files are relative to (relative paths: to the recipe file)."""
    tasks: dict[str, TaskFiles] = field(default_factory=dict)
    """Task name -> its files."""
    heldout: list[HeldOut] = field(default_factory=list)
    """The leave-one-out experiments, run in this order."""
    split_seed: int = 0
    """Seed of the conditioning/scoring split of every test file and of the prompt batches."""
    scoring_records: int | None = None
    """Score at most this many records of each scoring half (a seeded subset); None: all of it."""
    synthetic_records: int = 64
    """Records per split of a synthetic task."""
    generated_samples: int = 5
    """Adapters generated per held-out task, each from its own disjoint batch of conditioning prompts."""
    control_samples: int = 2
    """Control adapters per held-out task, from disjoint batches of the control task's prompts."""
    collect: CollectConfig = field(default_factory=CollectConfig)
    """How every LoRA is trained (its base_model is set from `base_model`)."""
    pack: TokenizerConfig = field(default_factory=TokenizerConfig)
    """The weight-token scheme."""
    shard: ShardConfig = field(default_factory=ShardConfig)
    """Pairs per training task and prompts per condition."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """The generator and its training."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Scoring settings shared by both scorers (its `mode` and `max_records` are set per scorer)."""
    scorers: list[str] = field(default_factory=lambda: list(SCORERS))
    """Which scorers run: "loglik" (option log-likelihood) and/or "generate" (greedy, parsed choice)."""
    variations: list[Variation] = field(default_factory=list)
    """Re-trainings, each run right after its held-out task (in recipe order)."""

    def __post_init__(self) -> None:
        self.tasks = {name: files if isinstance(files, TaskFiles) else from_dict(TaskFiles, files, f"tasks.{name}.")
                      for name, files in self.tasks.items()}
        problems = []
        for held in self.heldout:
            for name in [held.task, held.control, *held.train_on]:
                if name not in self.tasks:
                    problems.append(f"heldout {held.task!r} names task {name!r}, which `tasks` does not define")
            if held.task in held.train_on:
                problems.append(f"heldout {held.task!r} trains on itself")
            if held.task in self.tasks and not (self.tasks[held.task].test or self.tasks[held.task].synthetic):
                problems.append(f"heldout {held.task!r} has no test file to split")
        names = [held.task for held in self.heldout]
        for variation in self.variations:
            if variation.heldout not in names:
                problems.append(f"variation {variation.name!r} names heldout {variation.heldout!r}, not one of {names}")
        unknown = sorted(set(self.scorers) - set(SCORERS))
        if unknown or not self.scorers:
            problems.append(f"scorers must be a non-empty subset of {list(SCORERS)}, got {self.scorers}")
        if self.generated_samples < 1 or self.control_samples < 0:
            problems.append("generated_samples must be >= 1 and control_samples >= 0")
        if problems:
            raise ConfigError("invalid experiment recipe: " + "; ".join(problems))


def load_experiment(recipe: str | os.PathLike, overrides: Sequence[str] = ()) -> tuple[ExperimentConfig, dict]:
    """(config, the raw recipe with overrides applied); relative `data_dir` and `base_model` paths
    resolve relative to the recipe file."""
    raw = apply_overrides(read_recipe(recipe), overrides)
    config = from_dict(ExperimentConfig, raw)
    here = Path(recipe).resolve().parent
    if not os.path.isabs(config.data_dir):
        config.data_dir = str((here / config.data_dir).resolve())
    if config.base_model and not os.path.isabs(config.base_model):
        config.base_model = str((here / config.base_model).resolve())
    return config, raw


# --------------------------------------------------------------------------------------------------
# 1. Data: training records, conditioning and scoring halves


def _records(config: ExperimentConfig, name: str, split: str) -> list[TaskRecord]:
    files = config.tasks[name]
    if files.synthetic:
        seed = {"train": 0, "test": 1}[split]  # train and test are independent draws
        return load_task(files.synthetic, num_records=config.synthetic_records, seed=seed).records
    path = getattr(files, split)
    return load_task(str(Path(config.data_dir) / path)).records


def split_heldout(config: ExperimentConfig, name: str) -> tuple[list[TaskRecord], list[TaskRecord]]:
    """(conditioning half, scoring half) of a held-out task's test records: a seeded permutation cut in two."""
    records = _records(config, name, "test")
    order = list(range(len(records)))
    random.Random(f"{config.split_seed}/{name}").shuffle(order)
    half = len(order) // 2
    conditioning = [records[i] for i in sorted(order[:half])]
    scoring = [records[i] for i in sorted(order[half:])]
    if config.scoring_records is not None and len(scoring) > config.scoring_records:
        keep = sorted(random.Random(f"{config.split_seed}/{name}/score").sample(range(len(scoring)),
                                                                                 config.scoring_records))
        scoring = [scoring[i] for i in keep]
    return conditioning, scoring


def lora_task(config: ExperimentConfig, name: str) -> Task:
    """The records a task's LoRA trains on: its train file, or else its conditioning half (with answers)."""
    files = config.tasks[name]
    if files.train or files.synthetic:
        return Task(name, _records(config, name, "train"), files.synthetic or files.train)
    conditioning, _ = split_heldout(config, name)
    return Task(name, conditioning, f"{files.test} (conditioning half, seed {config.split_seed})")


def prompt_batches(prompts: Sequence[str], size: int, count: int, seed: str) -> list[list[str]]:
    """`count` disjoint batches of `size` prompts, drawn by a seeded permutation."""
    if size * count > len(prompts):
        raise ConfigError(
            f"{count} disjoint batches of {size} prompts need {size * count} prompts, the pool has {len(prompts)}; "
            "lower generated_samples / control_samples or shard.num_prompts"
        )
    order = list(range(len(prompts)))
    random.Random(seed).shuffle(order)
    return [[prompts[i] for i in order[k * size:(k + 1) * size]] for k in range(count)]


# --------------------------------------------------------------------------------------------------
# The run folder


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


def _log(message: str) -> None:
    print(f"[experiment {time.strftime('%H:%M:%S')}] {message}", flush=True)


def prepare_base(config: ExperimentConfig, out: Path) -> str:
    """The base model as a HF folder under the run (a .gguf is dequantized once, so every later load
    is a plain folder read); other sources are used as they are."""
    source = Path(config.base_model)
    if source.suffix != ".gguf":
        return config.base_model
    folder = out / "base"
    if not (folder / HF_CONFIG).is_file():
        from dnd_scale.basemodel import load_base_model, save_base_model

        _log(f"dequantizing {source.name} into {folder}")
        base = load_base_model(source, dtype=config.collect.dtype, device="cpu")
        save_base_model(base, folder)
        write_json(out / "base_source.json", {"gguf": str(source), "sha256": sha256_file(source),
                                              "dtype": config.collect.dtype})
    return str(folder)


def collect_all(config: ExperimentConfig, base: str, out: Path, timings: Timings) -> None:
    """Every training task's and every held-out task's (oracle) LoRA into one store, one task per call."""
    from dnd_scale.collect import collect

    names = list(dict.fromkeys([t for h in config.heldout for t in h.train_on] + [h.task for h in config.heldout]))
    collect_config = replace(config.collect, base_model=base)
    for name in names:
        if is_complete(store_dir(out / COLLECT_RUN), name):
            continue
        _log(f"collect {name}")
        with timings.measure(f"collect/{name}"):
            collect(collect_config, [lora_task(config, name)], out / COLLECT_RUN)


def final_checkpoint(out: Path, task: str) -> Path:
    """The last checkpoint of a collected task's trajectory."""
    return final_store_checkpoint(out / COLLECT_RUN, task)


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
            pack(folder, config.pack, training, device=_device())
    return RunDir(folder).targets


def train_generator(config: ExperimentConfig, held: HeldOut, run: Path, out: Path, timings: Timings,
                    key: str) -> Path | None:
    """Pack, shard and train the generator of one held-out task in `run`; its export folder, or None
    when training stopped early (SIGTERM: the next invocation resumes it)."""
    from dnd_scale.pack import pack
    from dnd_scale.shards import build_shards
    from dnd_scale.store import read_prompt_pools
    from dnd_scale.targets import PackedTargets
    from dnd_scale.trainer import latest_checkpoint, train

    export = export_folder(RunDir(run).train_output(config.train.output_dir))
    if is_exported(export):
        return export
    _link_store(run, out)
    if not is_shard_set(RunDir(run).shards):
        shared = pack_all(config, out, timings)
        with timings.measure(f"{key}/pack_shard"):
            targets = pack(run, config.pack, held.train_on, device=_device(), reuse=shared)
            pools = read_prompt_pools(run, held.train_on)  # what collect kept, checked against its marker
            build_shards(PackedTargets(targets), pools, RunDir(run).shards, config.shard)
    resume = latest_checkpoint(RunDir(run).train_output(config.train.output_dir) / CHECKPOINTS_DIR) is not None
    _log(f"train the generator of {key}" + (" (resumed)" if resume else ""))
    with timings.measure(f"{key}/train" + ("_resumed" if resume else "")):
        train(config.train, run, resume=resume)
    return export if is_exported(export) else None


def generate_adapters(config: ExperimentConfig, held: HeldOut, export: Path, run: Path, timings: Timings,
                      key: str) -> tuple[dict[str, list[Path]], dict[str, str]]:
    """The generated adapters (disjoint conditioning batches) and the control adapters (the control
    task's prompts), and the ones the generator could not write (an unusable output is a result too:
    `failures.json` keeps why, and the rest is still scored)."""
    from dnd_scale.generate import AdapterGenerator
    from dnd_scale.layout import LayoutError

    conditioning, _ = split_heldout(config, held.task)
    n = config.shard.num_prompts
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
                    _log(f"{key}: {folder.name} unusable: {error}")
    written = {label: [f for f in group if (f / ADAPTER_WEIGHTS).is_file()] for label, group in folders.items()}
    return written, failures


# --------------------------------------------------------------------------------------------------
# 4. Scoring, cached per (task, scorer, adapter)


class Scorer:
    """The base model loaded once; scores adapters on prepared scoring halves, caching every result."""

    def __init__(self, config: ExperimentConfig, base: str, out: Path) -> None:
        from dnd_scale.basemodel import load_base_model

        self.config, self.out = config, out
        self.base = load_base_model(base, dtype=config.eval.dtype, device=config.eval.device,
                                    seed=config.collect.seed)
        self._prepared: dict[tuple[str, str], Any] = {}

    def _prepare(self, task: str, scorer: str):
        from dnd_scale.eval_records import prepare_task

        if (task, scorer) not in self._prepared:
            _, scoring = split_heldout(self.config, task)
            eval_config = replace(self.config.eval, mode=scorer, max_records=None)
            self._prepared[task, scorer] = (prepare_task(Task(task, scoring, "scoring half"), self.base.tokenizer,
                                                         eval_config), eval_config)
        return self._prepared[task, scorer]

    def score(self, task: str, scorer: str, label: str, adapter: Path | None) -> dict:
        """Scores of one model (the base when `adapter` is None) on a held-out task's scoring half."""
        from dnd_scale.eval_adapters import applied_adapter, check_adapter
        from dnd_scale.eval_scoring import score_model

        name = "base" if adapter is None else f"{label}--" + "--".join(adapter.relative_to(self.out).parts)
        cache = self.out / "scores" / task / scorer / f"{name}.json"
        if cache.is_file():
            return read_json(cache)
        prepared, eval_config = self._prepare(task, scorer)
        if adapter is None:
            metrics = score_model(self.base.model, self.base.tokenizer, [prepared], eval_config)[task]
        else:
            checked = check_adapter(adapter, self.base.model.config)
            with applied_adapter(self.base.model, checked) as model:
                metrics = score_model(model, self.base.tokenizer, [prepared], eval_config)[task]
        result = {"task": task, "scorer": scorer, "label": label, "adapter": None if adapter is None else str(adapter),
                  "answers": [item.answer for item in prepared.items], **metrics}
        write_json(cache, result)
        return result


def _correct(result: dict) -> list[bool]:
    return [p is not None and p == a for p, a in zip(result["predictions"], result["answers"])]


def group_summary(results: Sequence[dict], seed: str) -> dict[str, Any]:
    """Mean, sample std, best and worst accuracy of a group of adapters, and a 95% interval: Wilson for
    one adapter; for several, a bootstrap over the scored questions of the group's mean accuracy."""
    accuracies = [r["accuracy"] for r in results]
    mean = sum(accuracies) / len(accuracies)
    summary: dict[str, Any] = {
        "n": len(results), "mean": mean, "best": max(accuracies), "worst": min(accuracies), "values": accuracies,
        "std": None if len(results) < 2 else
        (sum((a - mean) ** 2 for a in accuracies) / (len(accuracies) - 1)) ** 0.5,
    }
    if len(results) == 1:
        summary["ci95"] = list(wilson_interval(results[0]["correct"], results[0]["count"]))
        return summary
    correct = torch.tensor([_correct(r) for r in results], dtype=torch.float32)  # (adapters, questions)
    generator = torch.Generator().manual_seed(int(sha256_text(seed)[:12], 16))
    picks = torch.randint(0, correct.shape[1], (BOOTSTRAP_RESAMPLES, correct.shape[1]), generator=generator)
    means = correct[:, picks].mean(dim=(0, 2))  # (resamples,)
    summary["ci95"] = [float(means.quantile(0.025)), float(means.quantile(0.975))]
    return summary


PAIRED = (("generated", "average"), ("generated", "best_training"), ("generated", "control"),
          ("generated", "base"), ("oracle", "average"))
"""The comparisons `paired_summaries` makes (group, reference)."""


def paired_difference(group: Sequence[dict], reference: Sequence[dict], seed: str) -> dict[str, Any]:
    """Mean accuracy of `group` minus that of `reference`, both scored on the same questions, with a
    paired bootstrap over the questions (95% interval, and the share of resamples where the group is
    not ahead): tighter than comparing two intervals, since both see the same hard questions."""
    a = torch.tensor([_correct(r) for r in group], dtype=torch.float32).mean(dim=0)  # (questions,)
    b = torch.tensor([_correct(r) for r in reference], dtype=torch.float32).mean(dim=0)
    if a.shape != b.shape:
        raise ValueError(f"paired comparison of {a.shape[0]} and {b.shape[0]} questions")
    diff = a - b
    generator = torch.Generator().manual_seed(int(sha256_text(seed)[:12], 16))
    picks = torch.randint(0, diff.shape[0], (BOOTSTRAP_RESAMPLES, diff.shape[0]), generator=generator)
    means = diff[picks].mean(dim=1)
    return {"difference": float(diff.mean()), "ci95": [float(means.quantile(0.025)), float(means.quantile(0.975))],
            "p_not_ahead": float((means <= 0).float().mean())}


def paired_summaries(by_label: dict[str, list[dict]], seed: str) -> dict[str, dict]:
    """`PAIRED` comparisons of one held-out task under one scorer ("best_training": the training
    LoRA with the highest accuracy here, picked after the fact, so a generous baseline)."""
    groups = dict(by_label)
    if groups.get("training"):
        groups["best_training"] = [max(groups["training"], key=lambda r: r["accuracy"])]
    return {f"{a}-{b}": paired_difference(groups[a], groups[b], f"{seed}/{a}-{b}")
            for a, b in PAIRED if groups.get(a) and groups.get(b)}


def cached_scores(out: str | os.PathLike, task: str) -> dict[str, dict[str, list[dict]]]:
    """The cached scores of a held-out task's main experiment, {scorer: {label: [results]}} (variations'
    adapters, which live under `variation-*`, are left out)."""
    scores: dict[str, dict[str, list[dict]]] = {}
    for path in sorted((Path(out) / "scores" / task).glob("*/*.json")):
        result = read_json(path)
        if result["adapter"] is None or "variation-" not in result["adapter"]:
            scores.setdefault(path.parent.name, {}).setdefault(result["label"], []).append(result)
    return scores


# --------------------------------------------------------------------------------------------------
# 5. Weight space


def _flat(state: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([state[key].float().flatten() for key in sorted(state)])


def _state(path: Path) -> dict[str, torch.Tensor]:
    return load_safetensors(path / ADAPTER_WEIGHTS if path.is_dir() else path, "adapter")


def update_gram(states: Sequence[dict[str, torch.Tensor]]) -> torch.Tensor:
    """(n, n) Frobenius inner products <ΔW_i, ΔW_j> summed over modules, ΔW = B A of each LoRA module,
    without forming ΔW: <B1 A1, B2 A2> = sum((B1ᵀ B2) * (A1 A2ᵀ)), products of r x r matrices."""
    n = len(states)
    gram = torch.zeros(n, n, dtype=torch.float64)
    for key_a in (k for k in sorted(states[0]) if ".lora_A." in k):
        key_b = key_a.replace(".lora_A.", ".lora_B.")
        a = torch.stack([s[key_a].double() for s in states])  # (n, r, in)
        b = torch.stack([s[key_b].double() for s in states])  # (n, out, r)
        bb = torch.einsum("ior,jos->ijrs", b, b)  # B_iᵀ B_j
        aa = torch.einsum("irx,jsx->ijrs", a, a)  # A_i A_jᵀ
        gram += (bb * aa).sum(dim=(2, 3))
    return gram


def _distances(k: torch.Tensor, groups: dict[str, list[int]]) -> dict[str, Any]:
    """From the Gram matrix `k` of some vectors: the relative distance ||g - x|| / ||x|| of each
    generated one to the mean of the training ones and to the oracle, the oracle's to that mean, and
    each generated one's norm ratio and cosine to the oracle (`groups` holds their indices in `k`)."""
    gen, train, ora = groups["generated"], groups["training"], groups["oracle"][0]

    def sq(u: dict[int, float], v: dict[int, float]) -> float:  # <u, v> for u, v combinations of items
        return float(sum(cu * cv * k[i, j] for i, cu in u.items() for j, cv in v.items()))

    def rel(u: dict[int, float], x: dict[int, float]) -> float:
        diff = dict(u)
        for i, c in x.items():
            diff[i] = diff.get(i, 0.0) - c
        return max(sq(diff, diff), 0.0) ** 0.5 / sq(x, x) ** 0.5

    mean = {i: 1.0 / len(train) for i in train}
    return {
        "to_training_mean": [rel({g: 1.0}, mean) for g in gen],
        "to_oracle": [rel({g: 1.0}, {ora: 1.0}) for g in gen],
        "oracle_to_training_mean": rel({ora: 1.0}, mean),
        "norm_ratio_to_oracle": [(float(k[g, g]) / float(k[ora, ora])) ** 0.5 for g in gen],
        "cosine_to_oracle": [float(k[g, ora] / (k[g, g] * k[ora, ora]).sqrt()) for g in gen],
    }


def weight_distances(generated: Sequence[Path], training: dict[str, Path], oracle: Path) -> dict[str, Any]:
    """Relative L2 distances ||g - x|| / ||x|| of each generated adapter to the training mean, the
    oracle and each training LoRA, and the spread of the generated adapters among themselves: over
    the raw A and B matrices (dominated by A's shared initialization, which training moves little)
    and, under "update", over the updates ΔW = B A the adapters apply to the base."""
    states = [_state(p) for p in [*generated, *training.values(), oracle]]  # each file read once
    g, t = len(generated), len(training)
    gen = torch.stack([_flat(s) for s in states[:g]])  # (G, P)
    train = {name: _flat(s) for name, s in zip(training, states[g:g + t])}
    mean = torch.stack(list(train.values())).mean(dim=0)
    ora = _flat(states[-1])

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a - b).norm() / b.norm())

    gram = update_gram(states)
    groups = {"generated": list(range(g)), "training": list(range(g, g + t)), "oracle": [g + t]}
    update = _distances(gram, groups)
    update["to_training"] = {name: [_distances(gram, {**groups, "training": [g + i]})["to_training_mean"][j]
                                    for j in range(g)] for i, name in enumerate(training)}
    return {
        "to_training_mean": [rel(x, mean) for x in gen],
        "to_oracle": [rel(x, ora) for x in gen],
        "to_training": {name: [rel(x, tr) for x in gen] for name, tr in train.items()},
        "between_generated": float(torch.pdist(gen).mean() / gen.norm(dim=1).mean()) if len(gen) > 1 else None,
        "oracle_to_training_mean": rel(ora, mean),
        "oracle_to_training": {name: rel(ora, tr) for name, tr in train.items()},
        "update": update,
    }


# --------------------------------------------------------------------------------------------------
# The whole study


def _models(config: ExperimentConfig, held: HeldOut, out: Path, adapters: dict[str, list[Path]]) -> list[tuple[str, Path | None]]:
    """(label, adapter) of every model scored for a held-out task, cheapest and most telling first."""
    models: list[tuple[str, Path | None]] = [("base", None)]
    models.append(("average", out / "baselines" / held.task / "average"))
    models += [("generated", p) for p in adapters["generated"]]
    models += [("control", p) for p in adapters["control"]]
    models.append(("oracle", final_checkpoint(out, held.task)))
    models += [("training", final_checkpoint(out, name)) for name in held.train_on]
    return models


def run_order(config: ExperimentConfig, out: Path) -> list[tuple[str, HeldOut, ExperimentConfig, Path]]:
    """The generator runs of a study, in the order they run: (key, held-out task, its recipe, folder).
    Each held-out task is followed by its variations (in recipe order): a run cut short by a time
    limit then has finished tasks with their variations, whose baselines are already scored."""
    runs = []
    for held in config.heldout:
        runs.append((held.task, held, config, out / f"heldout-{held.task}"))
        for variation in (v for v in config.variations if v.heldout == held.task):
            varied = from_dict(ExperimentConfig, apply_overrides(to_dict(config), variation.overrides))
            varied.data_dir = config.data_dir
            runs.append((f"variation-{variation.name}", held, varied, out / f"variation-{variation.name}"))
    return runs


def run_experiment(config: ExperimentConfig, out: str | os.PathLike) -> dict:
    """Run (or continue) the study into `out`; returns the results (also written as results.json/.md)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_config(config, out / "experiment.yaml")
    timings = Timings(out / "timings.json")
    base = prepare_base(config, out)
    collect_all(config, base, out, timings)
    for held in config.heldout:
        average_adapter(out, held.train_on, out / "baselines" / held.task / "average")

    scorer: Scorer | None = None
    report: dict[str, Any] = {"heldout": {}, "variations": {}}
    for key, held, run_config, run in run_order(config, out):
        export = train_generator(run_config, held, run, out, timings, key)
        if export is None:
            _log(f"{key}: training stopped before its last step; run the same command again to resume")
            break
        adapters, failures = generate_adapters(run_config, held, export, run, timings, key)
        if scorer is None:
            # A random-init base exists only as the folder collect saved (the weights the LoRAs saw).
            saved = RunDir(out / COLLECT_RUN).base_model
            scorer = Scorer(config, str(saved) if saved.is_dir() else base, out)
        # A variation's other models are the main experiment's, already scored: cache hits.
        models = _models(config, held, out, adapters)
        scores: dict[str, dict[str, list[dict]]] = {}
        for scorer_name in config.scorers:
            for label, adapter in models:
                _log(f"{key}: score {label} {adapter.name if adapter else ''} ({scorer_name})")
                scores.setdefault(scorer_name, {}).setdefault(label, []).append(
                    scorer.score(held.task, scorer_name, label, adapter))
        entry = {
            "train_on": held.train_on, "control": held.control,
            "summary": {s: {label: group_summary(group, f"{key}/{s}/{label}") for label, group in by_label.items()}
                        for s, by_label in scores.items()},
            "paired": {s: paired_summaries(by_label, f"{key}/{s}") for s, by_label in scores.items()},
            "per_training_lora": {s: {Path(r["adapter"]).parent.name: r["accuracy"] for r in by_label.get("training", [])}
                                  for s, by_label in scores.items()},
            "unparsed": {label: [r.get("unparsed") for r in group] for label, group in scores.get("generate", {}).items()},
            "unusable_adapters": failures,
            "weights": weight_distances(adapters["generated"],
                                        {name: final_checkpoint(out, name) for name in held.train_on},
                                        final_checkpoint(out, held.task)) if adapters["generated"] else None,
            "generator": read_json(RunDir(run).train_output(run_config.train.output_dir) / TRAIN_INFO),
            "train_config": to_dict(run_config.train),
            "num_scored": scores[config.scorers[0]][models[0][0]][0]["count"],
        }
        (report["variations"] if key.startswith("variation-") else report["heldout"])[key] = entry
        write_results(config, out, report, timings)
    return write_results(config, out, report, timings)


def _versions() -> dict[str, str]:
    import peft
    import transformers

    versions = {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}
    with contextlib.suppress(ImportError):
        import deepspeed

        versions["deepspeed"] = deepspeed.__version__
    if torch.cuda.is_available():
        versions["gpu"] = torch.cuda.get_device_name()
    return versions


def write_results(config: ExperimentConfig, out: Path, report: dict, timings: Timings) -> dict:
    """results.json and results.md from what has been measured so far."""
    results = {
        "config": to_dict(config),
        "base_source": read_json(out / "base_source.json") if (out / "base_source.json").is_file() else None,
        "timings_s": timings.values,
        "overhead": overhead(timings.values, config),
        "versions": _versions(),
        **report,
    }
    write_json(out / RESULTS, results)
    (out / "results.md").write_text(markdown(results))
    return results


def overhead(values: dict[str, float], config: ExperimentConfig) -> dict[str, Any]:
    """Per held-out task: the oracle LoRA's collection time against one generation (median)."""
    rows = {}
    for held in config.heldout:
        generations = sorted(v for k, v in values.items() if k.startswith(f"{held.task}/generate/generated-"))
        lora = values.get(f"collect/{held.task}")
        if generations and lora:
            median = generations[len(generations) // 2]
            rows[held.task] = {"oracle_lora_s": lora, "generation_median_s": median, "ratio": lora / median}
    return rows


LABELS = ("base", "training", "average", "generated", "control", "oracle")


def _cell(stats: dict | None) -> str:
    if stats is None:
        return "—"
    low, high = stats["ci95"]
    text = f"{100 * stats['mean']:.1f} [{100 * low:.1f}, {100 * high:.1f}]"
    if stats["n"] > 1:
        text += f" ±{100 * stats['std']:.1f} (n={stats['n']})"
    return text


def markdown(results: dict) -> str:
    """The results as tables: per scorer, per held-out task, every model group with its 95% interval."""
    lines = ["# dnd experiment", "", "Accuracy (%) on each held-out task's scoring half, [95% interval], "
             "± std over adapters (n).", ""]
    for scorer in results["config"]["scorers"]:
        lines += [f"## scorer: {scorer}", "", "| held-out | " + " | ".join(LABELS) + " |", "|---" * (len(LABELS) + 1) + "|"]
        for key, entry in {**results["heldout"], **results["variations"]}.items():
            summary = entry["summary"].get(scorer, {})
            lines.append(f"| {key} | " + " | ".join(_cell(summary.get(label)) for label in LABELS) + " |")
        lines.append("")
    lines += ["## paired differences (percentage points, same questions), [95% bootstrap interval]", "",
              "| held-out | scorer | " + " | ".join(f"{a} - {b}" for a, b in PAIRED) + " |",
              "|---" * (len(PAIRED) + 2) + "|"]
    for key, entry in {**results["heldout"], **results["variations"]}.items():
        for scorer, rows in entry.get("paired", {}).items():
            cells = [rows.get(f"{a}-{b}") for a, b in PAIRED]
            lines.append(f"| {key} | {scorer} | " + " | ".join(
                "—" if c is None else f"{100 * c['difference']:+.1f} [{100 * c['ci95'][0]:+.1f}, {100 * c['ci95'][1]:+.1f}]"
                for c in cells) + " |")
    lines += ["", "## wall times (s)", "", *(f"- {k}: {v}" for k, v in results["timings_s"].items()), ""]
    for task, row in results["overhead"].items():
        lines.append(f"- {task}: oracle LoRA {row['oracle_lora_s']:.1f} s vs one generation "
                     f"{row['generation_median_s']:.3f} s: {row['ratio']:.0f}x")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dnd experiment", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="experiment recipe (configs/experiments/*.yaml)")
    parser.add_argument("--out", required=True, help="run folder; an existing one is continued")
    parser.add_argument("--fresh", action="store_true", help="delete the run folder first")
    args, overrides = parser.parse_known_args(argv)
    bad = [o for o in overrides if not (o.startswith("--") and "=" in o)]
    if bad:
        parser.error(f"unrecognized arguments: {bad} (overrides look like --section.field=value)")
    config, _ = load_experiment(args.config, overrides)
    if args.fresh and Path(args.out).exists():
        shutil.rmtree(args.out)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    results = run_experiment(config, args.out)
    print(markdown(results))
    return 0
