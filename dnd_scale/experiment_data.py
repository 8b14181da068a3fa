"""The study's data: each task's records, every held-out test set split by a fixed seed into a
*conditioning* half (its prompts, never its answers, feed the generator) and a *scoring* half (the
only records scored), and disjoint prompt batches drawn from a pool."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Sequence

from dnd_scale.config import ConfigError
from dnd_scale.experiment_recipe import ExperimentConfig
from dnd_scale.tasks import Task, TaskRecord, load_task


def _records(config: ExperimentConfig, name: str, split: str) -> list[TaskRecord]:
    files = config.tasks[name]
    if files.synthetic:
        seed = {"train": 0, "test": 1}[split]  # train and test are independent draws
        return load_task(files.synthetic, num_records=config.run.synthetic_records, seed=seed).records
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
            "lower generated_samples / control_samples or run.shard.num_prompts"
        )
    order = list(range(len(prompts)))
    random.Random(seed).shuffle(order)
    return [[prompts[i] for i in order[k * size:(k + 1) * size]] for k in range(count)]
