"""The study's results: one entry per held-out task (and variation) with its groups' accuracies,
paired differences, weight distances and generator, and the whole as `RESULTS` and `RESULTS_MD`
(tables per scorer, wall times, the oracle LoRA's cost against one generation)."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch

from dnd_scale.config import to_dict
from dnd_scale.experiment_recipe import ExperimentConfig, HeldOut
from dnd_scale.experiment_stages import BASE_SOURCE, Timings, final_checkpoint
from dnd_scale.experiment_stats import PAIRED, group_summary, paired_summaries
from dnd_scale.experiment_weights import weight_distances
from dnd_scale.io import read_json, write_json
from dnd_scale.rundir import RunDir
from dnd_scale.train_config import TrainConfig
from dnd_scale.trainer import TRAIN_INFO

RESULTS = "results.json"
RESULTS_MD = "results.md"


def heldout_entry(
    key: str, held: HeldOut, scores: dict[str, dict[str, list[dict]]], adapters: dict[str, list[Path]],
    failures: dict[str, str], out: Path, run: Path, train: TrainConfig,
) -> dict[str, Any]:
    """The results of one generator run (`key`: a held-out task or a variation) from its scores
    {scorer: {label: [results]}}, its adapters and those it could not write, in run folder `run`."""
    return {
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
        "generator": read_json(RunDir(run).train_output(train.output_dir) / TRAIN_INFO),
        "train_config": to_dict(train),
        # every model is scored on the same questions: the first scorer's first model's count
        "num_scored": next(iter(next(iter(scores.values())).values()))[0]["count"],
    }


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
    """`RESULTS` and `RESULTS_MD` from what has been measured so far."""
    results = {
        "config": to_dict(config),
        "base_source": read_json(out / BASE_SOURCE) if (out / BASE_SOURCE).is_file() else None,
        "timings_s": timings.values,
        "overhead": overhead(timings.values, config),
        "versions": _versions(),
        **report,
    }
    write_json(out / RESULTS, results)
    (out / RESULTS_MD).write_text(markdown(results))
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
