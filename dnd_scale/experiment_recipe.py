"""The experiment recipe (`configs/experiments/*.yaml`): the study's tasks and their files, the
leave-one-out experiments and the variations, around one pipeline recipe (`recipe.RunConfig`, under
`run:`) that every run of the study shares (see `experiment`)."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from dnd_scale.config import ConfigError, apply_overrides, from_dict, read_recipe
from dnd_scale.recipe import RunConfig, resolve_recipe_paths

SCORERS = ("loglik", "generate")


@dataclass
class TaskFiles:
    """Where one task's records come from (paths relative to the experiment's `data_dir`)."""

    train: str | None = None
    """Records its LoRA is trained on (the training LoRA, or the oracle when the task is held out)."""
    test: str | None = None
    """Held-out records, split into the conditioning and the scoring half; needed to hold the task out."""
    synthetic: str | None = None
    """Instead of files: a `synthetic:<family>` spec (tiny runs); `train` and `test` are then seeded
    draws of `run.synthetic_records` records each."""


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
    """Overrides of the experiment's fields, e.g. ["run.train.steps=1500", "run.shard.num_prompts=16"]."""


@dataclass
class ExperimentConfig:
    """A leave-one-out study (see `experiment`)."""

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
    generated_samples: int = 5
    """Adapters generated per held-out task, each from its own disjoint batch of conditioning prompts."""
    control_samples: int = 2
    """Control adapters per held-out task, from disjoint batches of the control task's prompts."""
    scorers: list[str] = field(default_factory=lambda: list(SCORERS))
    """Which scorers run: "loglik" (option log-likelihood) and/or "generate" (greedy, parsed choice)."""
    variations: list[Variation] = field(default_factory=list)
    """Re-trainings, each run right after its held-out task (in recipe order)."""
    run: RunConfig = field(default_factory=RunConfig)
    """The pipeline recipe every run of the study shares, as in `configs/*.yaml`: `run.collect` trains
    every LoRA, and its `base_model` is the frozen base (a HF folder, a .gguf file, dequantized once,
    or a model config.json: random init, tiny runs); `run.pack`, `run.shard` and `run.train` make each
    held-out task's generator; `run.eval` holds what both scorers share (its `mode` and `max_records`
    are set per scorer); `run.synthetic_records` is the records per split of a synthetic task. The
    study's tasks are `tasks`, so `run.tasks` stays empty."""

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
            for override in variation.overrides:
                if override.lstrip("-").split(".")[0] in _moved_to_run():
                    problems.append(f"variation {variation.name!r} overrides {override!r}: the stage sections are "
                                    f"under `run:`, write 'run.{override.lstrip('-')}'")
        unknown = sorted(set(self.scorers) - set(SCORERS))
        if unknown or not self.scorers:
            problems.append(f"scorers must be a non-empty subset of {list(SCORERS)}, got {self.scorers}")
        if self.generated_samples < 1 or self.control_samples < 0:
            problems.append("generated_samples must be >= 1 and control_samples >= 0")
        if self.run.tasks:
            problems.append(f"run.tasks must stay empty: the study's tasks are `tasks` (name -> files), "
                            f"got {self.run.tasks}")
        if problems:
            raise ConfigError("invalid experiment recipe: " + "; ".join(problems))


def _moved_to_run() -> set[str]:
    """The top-level names of an experiment recipe from before it embedded `run:` that now live there
    (`base_model` as `run.collect.base_model`)."""
    own = {f.name for f in dataclasses.fields(ExperimentConfig)}
    return ({f.name for f in dataclasses.fields(RunConfig)} - own) | {"base_model"}


def load_experiment(recipe: str | os.PathLike, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """The experiment recipe with `--field=value` overrides (`--run.train.steps=600`) applied; a
    relative `data_dir` and the `run` section's relative paths (`run.collect.base_model`, ...) resolve
    against the recipe's folder, those of overrides included."""
    raw = apply_overrides(read_recipe(recipe), overrides)
    moved = sorted(set(raw) & _moved_to_run())
    if moved:
        raise ConfigError(
            f"experiment recipe {str(recipe)!r} (or an override) sets {moved} at the top level; the pipeline's "
            "sections live under `run:` (run.collect, run.collect.base_model, run.train, ...): move them there, "
            "and write overrides as --run.train.steps=600"
        )
    here = Path(recipe).resolve().parent
    if isinstance(raw.get("run"), dict):
        resolve_recipe_paths(raw["run"], here)
    config = from_dict(ExperimentConfig, raw)
    if not os.path.isabs(config.data_dir):
        config.data_dir = str((here / config.data_dir).resolve())
    return config
