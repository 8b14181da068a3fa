"""`dnd eval`: accuracy of the base model, training LoRAs and generated adapters on held-out tasks.

The base model is loaded once and every task's scorable records are tokenized once
(`dnd_scale.eval_records`); every adapter is checked against the base model before any scoring
(`dnd_scale.eval_adapters`); the base model, then each adapter applied to it, is scored on every task
(`dnd_scale.eval_scoring`: option log-likelihood, deterministic, or greedy generation); each adapter
group is summarized as mean ± std and best, and the report is written (`dnd_scale.eval_report`:
results.json, results.md, accuracy.png).
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
from dataclasses import asdict, dataclass
from typing import Any, Literal, Mapping, Sequence

import torch
from tqdm.auto import tqdm

from dnd_scale.basemodel import BaseModel, base_identity, load_base_model
from dnd_scale.eval_adapters import applied_adapter, check_adapter, expand_adapter_paths
from dnd_scale.eval_records import prepare_task
from dnd_scale.eval_report import BASE_LABEL, REPORT_FILES, accuracy_tables, write_report
from dnd_scale.eval_scoring import METRICS, score_model
from dnd_scale.tasks import Task, load_task

_LABEL = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]*$")


@dataclass
class EvalConfig:
    """How `dnd eval` scores the base model and the adapters."""

    mode: Literal["loglik", "generate"] = "loglik"
    """"loglik": compare the log-likelihood of each option (deterministic, the main number);
    "generate": greedy decoding, exact match with the reference after normalization."""
    max_records: int | None = None
    """Score at most this many scorable records per task: a seeded random subsample, the same for
    every model. None scores them all."""
    seed: int = 0
    """Seed of the subsample (combined with the task name, so tasks get independent subsamples)."""
    batch_size: int = 32
    """Sequences per forward pass: (record, option) pairs in loglik mode, prompts in generate mode."""
    max_length: int = 2048
    """Most tokens of context + option (or prompt + generated tokens); longer records are skipped and
    counted as "too_long"."""
    max_new_tokens: int = 16
    """Generate mode: the most tokens generated per prompt (generation also stops at end-of-turn)."""
    dtype: str = "auto"
    """Base model dtype: "auto" (bfloat16 on a GPU that has it, else float32), "float32", "bfloat16",
    "float16". Log-probabilities are always computed in float32 from the logits."""
    device: str = "auto"
    """"auto" (cuda when available, else cpu), "cpu", "cuda", "cuda:1", ..."""
    task_records: int = 256
    """Records per synthetic family (`synthetic:<family>` specs only; files are read whole)."""
    task_seed: int = 1
    """Seed of synthetic family records; keep it different from collect's seed, so that eval items
    are not the items the training LoRAs saw."""
    base_seed: int = 0
    """Init seed of a random-init base model (base given as a config.json). Prefer the HF folder
    `dnd collect` writes to <run>/base_model, which holds the exact weights the LoRAs were trained on."""
    allow_other_base: bool = False
    """Score adapters whose recorded base model (provenance.json, or collect.json of a checkpoint)
    is another model of the same shapes (another seed or family) anyway, with a warning; off: refused."""

    def __post_init__(self) -> None:
        problems = []
        if self.mode not in METRICS:
            problems.append(f"mode must be one of {sorted(METRICS)}, got {self.mode!r}")
        if self.max_records is not None and self.max_records < 1:
            problems.append(f"max_records must be >= 1 or None, got {self.max_records}")
        for name in ("batch_size", "max_new_tokens", "task_records"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_length < 2:
            problems.append(f"max_length must be >= 2, got {self.max_length}")
        if problems:
            raise ValueError("invalid eval config: " + "; ".join(problems))


# ----------------------------------------------------------------------------------------------------
# evaluate: base, then every adapter; summary


def spread(values: Sequence[float]) -> dict[str, Any]:
    """Mean, sample std (None for one value), best and worst of per-adapter accuracies."""
    return {
        "n": len(values),
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else None,
        "best": max(values),
        "worst": min(values),
        "values": list(values),
    }


def _versions() -> dict[str, str]:
    import peft
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}


def evaluate(
    base_model_source: str | os.PathLike | BaseModel,
    eval_tasks: Sequence[str | Task],
    adapters: Mapping[str, Sequence[str | os.PathLike]] | None = None,
    config: EvalConfig | None = None,
) -> dict[str, Any]:
    """Accuracy of the base model and of every adapter on every task; returns the results.json content.

    `base_model_source`: what `load_base_model` takes, or an already loaded BaseModel (left unchanged).
    `eval_tasks`: task specs (`load_task`) or Task objects. `adapters`: label → adapter paths; each label's
    accuracies are summarized as mean ± std and best (e.g. "train": the training LoRAs, "generated": adapters
    generated from independent prompt batches).
    """
    config = config or EvalConfig()
    adapters = dict(adapters or {})
    for label, paths in adapters.items():
        if label == BASE_LABEL or not _LABEL.match(label):
            raise ValueError(
                f"adapter label {label!r} must start with a letter, use letters, digits, '.', '_', '-', "
                f"and not be {BASE_LABEL!r}"
            )
        if not paths:
            raise ValueError(f"adapter label {label!r} has no adapter paths")
    if isinstance(base_model_source, BaseModel):
        base = base_model_source
    else:
        base = load_base_model(base_model_source, dtype=config.dtype, device=config.device, seed=config.base_seed)
    tasks = [t if isinstance(t, Task) else load_task(t, num_records=config.task_records, seed=config.task_seed)
             for t in eval_tasks]
    if not tasks:
        raise ValueError("no eval tasks given; pass task files (.json/.jsonl) or synthetic:<family> specs")
    names = [task.name for task in tasks]
    if len(set(names)) != len(names):
        raise ValueError(f"eval task names must be unique, got {names}")

    # Every adapter is checked before any scoring: a mismatch fails in seconds, not after the base pass.
    identity = base_identity(base.model)
    checked = {label: [check_adapter(path, base.model.config, identity, config.allow_other_base) for path in paths]
               for label, paths in adapters.items()}
    prepared = [prepare_task(task, base.tokenizer, config) for task in tasks]

    models = [{"label": BASE_LABEL, "path": None, "tasks": score_model(base.model, base.tokenizer, prepared, config)}]
    todo = [(label, adapter) for label, group in checked.items() for adapter in group]
    for label, adapter in tqdm(todo, desc="adapters", disable=not todo):
        with applied_adapter(base.model, adapter) as model:
            scores = score_model(model, base.tokenizer, prepared, config)
        models.append({"label": label, "path": str(adapter.path), "tasks": scores})

    summary: dict[str, Any] = {}
    for task in tasks:
        summary[task.name] = {}
        for label in [BASE_LABEL, *checked]:
            group = [m["tasks"][task.name] for m in models if m["label"] == label]
            summary[task.name][label] = {metric: spread([g[metric] for g in group]) for metric in METRICS[config.mode]}
    parameter = next(base.model.parameters())
    return {
        "mode": config.mode,
        "metrics": list(METRICS[config.mode]),
        "config": asdict(config),
        "base_model": {"source": base.source, "kind": base.kind, "dtype": str(parameter.dtype).removeprefix("torch."),
                       "device": str(parameter.device), "model_type": base.model.config.model_type},
        "adapters": {
            label: [{"path": str(a.path), "layout_fingerprint": a.layout.fingerprint(), "provenance": a.provenance}
                    for a in group]
            for label, group in checked.items()
        },
        "tasks": {
            p.task.name: {"source": p.task.source, "num_records": len(p.task.records), "scorable": p.scorable,
                          "evaluated": len(p.items), "skipped": p.skipped, "warnings": p.warnings,
                          "records": [item.record for item in p.items],
                          "answers": [item.answer if config.mode == "loglik" else item.reference for item in p.items]}
            for p in prepared
        },
        "models": models,
        "summary": summary,
        "versions": _versions(),
    }


# ----------------------------------------------------------------------------------------------------
# command line


def parse_adapter_groups(tokens: Sequence[str]) -> dict[str, list[str]]:
    """`["train=a", "b", "generated=c", "d"]` → {"train": ["a", "b"], "generated": ["c", "d"]}.

    A token starts a new group when it reads LABEL=PATH and is not itself an existing path.
    """
    groups: dict[str, list[str]] = {}
    label = None
    for token in tokens:
        name, sep, path = token.partition("=")
        if sep and _LABEL.match(name) and not os.path.exists(token):
            label = name
            groups.setdefault(label, [])
            token = path
        if label is None:
            raise ValueError(f"adapter path {token!r} comes before any LABEL=PATH; write e.g. --adapters train={token}")
        if token:
            groups[label].append(token)
    return groups


# `dnd eval` flags that set a field of the recipe's `eval:` section (as --eval.<field>=value does).
EVAL_FLAGS = ("mode", "max_records", "seed", "batch_size", "max_length", "max_new_tokens", "dtype", "device",
              "task_records", "task_seed", "base_seed")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="dnd eval", description=__doc__.splitlines()[0] + " Settings: the recipe's `eval:` section; "
        "overrides: --eval.field=value or the flags below.")
    parser.add_argument("--config", help="YAML recipe; its `eval:` section is read")
    parser.add_argument("--run", help="run folder whose saved recipe is read when --config is not given")
    parser.add_argument("--base", required=True, help="base model: HF folder, .gguf file, or config.json (random init)")
    parser.add_argument("--tasks", nargs="+", required=True, help="task files (.json/.jsonl) or synthetic:<family>")
    parser.add_argument("--adapters", nargs="+", action="extend", default=[], metavar="LABEL=PATH [PATH ...]",
                        help="adapter groups, e.g. --adapters 'train=run/checkpoints/*/200.safetensors' "
                             "generated=out/adapters: a path is an adapter folder, a checkpoint, a glob (quoted, "
                             "dnd expands it) or a folder of adapters")
    parser.add_argument("--out", required=True, help=f"report folder ({', '.join(REPORT_FILES)})")
    parser.add_argument("--mode", choices=sorted(METRICS))
    parser.add_argument("--max-records", type=int, help="seeded subsample per task")
    parser.add_argument("--seed", type=int, help="subsample seed")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--max-length", type=int)
    parser.add_argument("--max-new-tokens", type=int)
    parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"))
    parser.add_argument("--device")
    parser.add_argument("--task-records", type=int, help="records per synthetic family")
    parser.add_argument("--task-seed", type=int, help="seed of synthetic family records")
    parser.add_argument("--base-seed", type=int, help="init seed of a random-init base")
    parser.add_argument("--allow-other-base", action="store_true", default=None,
                        help="score adapters made for another base model of the same shapes anyway (a warning)")
    from dnd_scale.recipe import parse_stage_args  # imports every stage's config: for the command line only

    args, run = parse_stage_args(parser, argv, "eval", lambda args: {
        f"eval.{name}": getattr(args, name) for name in (*EVAL_FLAGS, "allow_other_base")})
    try:
        adapters = {label: expand_adapter_paths(paths) for label, paths in parse_adapter_groups(args.adapters).items()}
    except ValueError as error:
        parser.error(str(error))
    results = evaluate(args.base, args.tasks, adapters, run.eval)
    paths = write_report(results, args.out)
    print("\n".join(accuracy_tables(results)))
    print(f"report: {', '.join(str(p) for p in paths.values())}")
    return 0
