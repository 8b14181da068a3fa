"""The experiment recipe (`configs/experiments/*.yaml`): the study's tasks and their files, the
leave-one-out experiments, the variations, and the settings of every stage (see `experiment`)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from dnd_scale.collect_config import CollectConfig
from dnd_scale.config import ConfigError, apply_overrides, from_dict, read_recipe
from dnd_scale.evaluate import EvalConfig
from dnd_scale.shards import ShardConfig
from dnd_scale.tokenizer import TokenizerConfig
from dnd_scale.trainer import TrainConfig

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
    """A leave-one-out study (see `experiment`)."""

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
