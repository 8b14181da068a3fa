"""The recipe: one `RunConfig` (model, tasks, a section per stage) that every stage reads.

A recipe (`configs/*.yaml`) sets what differs from the defaults; a stage's command line overrides
single fields of its own section (`--train.lr=3e-5`). Paths in a recipe (`model_config`,
`collect.base_model`, task files) are relative to the recipe file, so a recipe works from any
working directory; paths given on the command line are relative to the working directory.

A stage given `--config R.yaml` records the resolved recipe (every field, overrides applied, paths
absolute) in its run folder as `RECIPE_FILE` once it has passed its checks: just before its first
write (`io.defer_write`), or when it ends having written nothing; a stage refused by its checks (bad
arguments, a run folder bound to another config, missing inputs) leaves the run folder as it was. A
stage run without `--config` reads that file (its overrides then hold for that run only), and with
neither it stops and asks for `--config` — a stage never falls back to defaults silently (`dnd
generate` alone needs no recipe: without one it runs on its section's defaults, which are its flags'
defaults, and the export carries everything else; `dnd plan` without one sizes RunConfig's
defaults and lists them). A stage never rewrites what the stages before it
in the pipeline ran with: `dnd train --config R2.yaml` records R2's `train:` (and `generate:`,
`eval:`) sections and keeps the `collect:`, `pack:` and `shard:` sections of the recipe that
collect, pack and shard ran with.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from dnd_scale.collect_config import CollectConfig
from dnd_scale.config import ConfigError, apply_overrides, from_dict, read_recipe, read_yaml, save_config, set_field, to_dict
from dnd_scale.evaluate import EvalConfig
from dnd_scale.generate import GenerateConfig
from dnd_scale.io import defer_write, drop_deferred_writes
from dnd_scale.shards import ShardConfig
from dnd_scale.tokenizer import TokenizerConfig
from dnd_scale.train_config import TrainConfig

RECIPE_FILE = "recipe.yaml"  # the resolved recipe a run folder keeps


@dataclass
class RunConfig:
    """A whole run: the model, the training tasks and one section per stage."""

    model_config: str = ""
    """The model's config.json (shapes only): what `dnd plan --config` sizes before the weights are
    at hand; empty: plan sizes `collect.base_model`."""
    tasks: list[str] = field(default_factory=list)
    """The training tasks `dnd collect` trains a LoRA for: file.json, file.jsonl, hf:name[:split],
    synthetic:family. Later stages read what collect kept (the prompt pools), never these specs."""
    synthetic_records: int = 256
    """Records generated per `synthetic:` task (prompt pool and LoRA training data; files are read whole)."""
    collect: CollectConfig = field(default_factory=CollectConfig)
    """`dnd collect`: the base model, the LoRA and how it is trained."""
    pack: TokenizerConfig = field(default_factory=TokenizerConfig)
    """`dnd pack`: the weight-token scheme."""
    shard: ShardConfig = field(default_factory=ShardConfig)
    """`dnd shard`: prompts per condition and pairs per task."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """`dnd train`: the generator and its training."""
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    """`dnd generate`: how adapters are made from prompt files (samples, seed, dtype, device, impl)."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """`dnd eval`: how the base model and the adapters are scored."""

    def __post_init__(self) -> None:
        if self.synthetic_records < 1:
            raise ValueError(f"synthetic_records must be >= 1, got {self.synthetic_records}")


# The pipeline's order: a stage records its own fields and those of the stages after it.
STAGE_FIELDS = {
    "collect": ("model_config", "tasks", "synthetic_records", "collect"),
    "pack": ("pack",),
    "shard": ("shard",),
    "train": ("train",),
    "generate": ("generate",),
    "eval": ("eval",),
}


def _is_file_task(spec: str) -> bool:
    return not spec.startswith(("synthetic:", "hf:"))


def resolve_recipe_paths(data: dict[str, Any], here: Path) -> dict[str, Any]:
    """The recipe's relative paths made absolute against `here` (in place); other values untouched."""

    def resolve(path: Any) -> Any:
        return str((here / path).resolve()) if isinstance(path, str) and path and not os.path.isabs(path) else path

    if "model_config" in data:
        data["model_config"] = resolve(data["model_config"])
    if isinstance(data.get("tasks"), list):
        data["tasks"] = [resolve(s) if isinstance(s, str) and _is_file_task(s) else s for s in data["tasks"]]
    if isinstance(data.get("collect"), dict) and "base_model" in data["collect"]:
        data["collect"]["base_model"] = resolve(data["collect"]["base_model"])
    return data


def load_recipe(
    recipe: str | os.PathLike | None, overrides: Sequence[str] = (), values: Mapping[str, Any] | None = None
) -> RunConfig:
    """RunConfig from a YAML recipe (None: the defaults), `--section.field=value` overrides and
    `values` (dotted field name -> value, from a stage's own flags such as `dnd collect --tasks`).

    The recipe's relative paths resolve against the recipe's folder, those of overrides and values
    against the working directory. A field that does not exist or does not fit its type is a
    ConfigError naming it.
    """
    data = read_recipe(recipe)
    if recipe is not None:
        resolve_recipe_paths(data, Path(recipe).resolve().parent)
    apply_overrides(data, overrides)
    for name, value in (values or {}).items():
        set_field(data, name.split("."), value)
    return from_dict(RunConfig, resolve_recipe_paths(data, Path.cwd()))


def check_stage_overrides(stage: str, overrides: Sequence[str]) -> None:
    """A stage takes overrides of its own section only, so a typo in another section never goes unseen."""
    foreign = [o for o in overrides if not (o.lstrip("-").startswith(f"{stage}.") and "=" in o)]
    if foreign:
        raise ConfigError(f"dnd {stage} takes overrides of the {stage} section only (--{stage}.field=value), "
                          f"got {foreign}")


def saved_recipe(run_dir: str | os.PathLike) -> Path:
    """The resolved recipe a run folder keeps."""
    return Path(run_dir) / RECIPE_FILE


def recipe_for(stage: str, config: str | None, run_dir: str | os.PathLike | None) -> str:
    """The recipe `dnd <stage>` reads: --config's, else the one saved in the run folder."""
    if config is not None:
        return config
    if run_dir is not None and saved_recipe(run_dir).is_file():
        return str(saved_recipe(run_dir))
    where = f"{run_dir} holds no {RECIPE_FILE}" if run_dir is not None else "no run folder was given"
    raise ConfigError(f"dnd {stage} needs a recipe: {where}; pass --config R.yaml (configs/ has the shipped ones)")


def record_recipe(run_dir: str | os.PathLike, config: RunConfig, stage: str) -> None:
    """Save `config` as the run folder's recipe; the fields of the stages before `stage` keep the
    values saved by those stages (what they ran with)."""
    path = saved_recipe(run_dir)
    resolved = to_dict(config)
    if path.is_file():
        earlier = list(STAGE_FIELDS)[: list(STAGE_FIELDS).index(stage)]
        saved = read_yaml(path, "saved recipe") or {}
        for key in (key for name in earlier for key in STAGE_FIELDS[name]):
            if key in saved:
                resolved[key] = saved[key]
        from_dict(RunConfig, resolved)  # what is saved must load again
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    save_config(resolved, path)


def parse_stage_args(
    parser: argparse.ArgumentParser,
    argv: Sequence[str] | None,
    stage: str,
    flags: Callable[[argparse.Namespace], Mapping[str, Any]] | None = None,
    *,
    needs_recipe: bool = True,
) -> tuple[argparse.Namespace, RunConfig]:
    """(arguments, RunConfig) for `dnd <stage>`: the recipe of --config or of the run folder (--run),
    with `--<stage>.field=value` overrides and the fields `flags(args)` sets (a None value sets
    nothing). A stage that does not `needs_recipe` runs on RunConfig's defaults without either.

    With --config, the run folder records the resolved recipe (rank 0 only, under a launcher) once
    the stage starts work: the recording is deferred to the process's first artifact write
    (`io.defer_write`); `dnd` records it at the latest when the stage ends well having written
    nothing, and drops it when the stage is refused. Overrides of a run without --config hold for
    that run only. Any other unknown argument is a usage error."""
    args, overrides = parser.parse_known_args(argv)
    bad = [o for o in overrides if not (o.startswith("--") and "=" in o)]
    if bad:
        parser.error(f"unrecognized arguments: {bad}")
    check_stage_overrides(stage, overrides)
    drop_deferred_writes()  # what an earlier stage of this process deferred and never wrote: it was refused
    values = {name: value for name, value in (flags(args) if flags else {}).items() if value is not None}
    run_dir = getattr(args, "run", None)
    wanted = needs_recipe or args.config is not None or run_dir is not None
    config = load_recipe(recipe_for(stage, args.config, run_dir) if wanted else None, overrides, values)
    if run_dir is not None and args.config is not None and is_rank_zero():
        defer_write(lambda: record_recipe(run_dir, config, stage))
    return args, config


def is_rank_zero() -> bool:
    """Whether this process writes run-wide files: always, unless a launcher set RANK to another rank."""
    return int(os.environ.get("RANK", "0")) == 0

