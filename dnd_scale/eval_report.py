"""The report of `dnd eval` (`write_report`): results.json (every number, the config, the adapters),
results.md (a table per metric: base / each adapter group as mean ± std (best) per task) and
accuracy.png."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

from dnd_scale.eval_records import SKIP_REASONS
from dnd_scale.io import atomic_path, write_json

BASE_LABEL = "base"
"""The base model's column in the results (no adapter label may take it)."""
REPORT_FILES = ("results.json", "results.md", "accuracy.png")


def _percent(value: float) -> str:
    return f"{100 * value:.1f}"


def _nats(value: float) -> str:
    return f"{value:.3f}"


def format_cell(stats: Mapping[str, Any], form=_percent) -> str:
    """"41.2" for one model, "41.2 ± 1.3 (best 43.0)" for a group (`form` writes one number)."""
    if stats["n"] == 1:
        return form(stats["mean"])
    return f"{form(stats['mean'])} ± {form(stats['std'])} (best {form(stats['best'])})"


def accuracy_tables(results: Mapping[str, Any]) -> list[str]:
    """Markdown lines: one accuracy table per metric (rows: tasks; columns: base and each adapter group)."""
    labels = [BASE_LABEL, *results["adapters"]]
    counts = {label: len(group) for label, group in results["adapters"].items()}
    headers = ["task", "records", *(label if label == BASE_LABEL else f"{label} (n={counts[label]})"
                                    for label in labels)]
    titles = {
        "accuracy": "accuracy (%), option with the highest summed log-likelihood" if results["mode"] == "loglik"
        else "accuracy (%), greedy generation, exact match after normalization",
        "accuracy_norm": "accuracy (%), option with the highest log-likelihood per token (secondary)",
        # At chance-level accuracy (a random-init base, a weak adapter) this still moves: the signal left.
        "answer_logprob_mean": "mean log-probability of the right answer (nats, summed over its tokens; higher is better)",
    }
    lines: list[str] = []
    for metric in results["metrics"]:
        form = _nats if metric == "answer_logprob_mean" else _percent
        lines += ["", f"## {titles[metric]}", "", "| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
        for task, groups in results["summary"].items():
            cells = [task, str(results["tasks"][task]["evaluated"]),
                     *(format_cell(groups[label][metric], form) for label in labels)]
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def markdown_report(results: Mapping[str, Any]) -> str:
    """results.md: the accuracy tables, the record counts (skips by reason), warnings and the adapters."""
    base = results["base_model"]
    lines = [
        "# dnd eval",
        "",
        f"Base model `{base['source']}` ({base['kind']}, {base['model_type']}, {base['dtype']}, {base['device']}); "
        f"mode {results['mode']}; at most {results['config']['max_records'] or 'all'} records per task "
        f"(seed {results['config']['seed']}). Groups of several adapters: mean ± sample std (best).",
    ]
    if base["kind"].startswith("random-init"):
        lines += ["", "The base model is random-init: it knows nothing, so accuracies near chance are expected; "
                      "the mean log-probability of the right answer is the signal that remains."]
    lines += accuracy_tables(results)
    lines += ["", "## records", "", "| task | records | scorable | evaluated | " + " | ".join(SKIP_REASONS) + " |",
              "|" + "---|" * (4 + len(SKIP_REASONS))]
    for task, info in results["tasks"].items():
        cells = [task, info["num_records"], info["scorable"], info["evaluated"],
                 *(info["skipped"][reason] for reason in SKIP_REASONS)]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    warnings = [w for info in results["tasks"].values() for w in info["warnings"]]
    if warnings:
        lines += ["", "## warnings", "", *(f"- {w}" for w in warnings)]
    lines += ["", "## adapters", ""]
    for label, group in results["adapters"].items():
        lines += [f"- {label}:", *(f"  - `{a['path']}`" for a in group)]
    if not results["adapters"]:
        lines.append("none (base model only)")
    return "\n".join(lines) + "\n"


def plot_report(results: Mapping[str, Any], path: str | os.PathLike) -> None:
    """accuracy.png: per task, a bar per model group (mean, std as error bar) and a dot per adapter."""
    # Figure + the Agg canvas directly: no pyplot global state, no display needed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    tasks = list(results["summary"])
    labels = [BASE_LABEL, *results["adapters"]]
    figure = Figure(figsize=(max(4.0, 1.2 + 1.1 * len(tasks) * len(labels) ** 0.5), 3.6), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    width = 0.8 / len(labels)
    for offset, label in enumerate(labels):
        x = [t + (offset - (len(labels) - 1) / 2) * width for t in range(len(tasks))]
        stats = [results["summary"][task][label]["accuracy"] for task in tasks]
        errors = [100 * (s["std"] or 0.0) for s in stats]
        axes.bar(x, [100 * s["mean"] for s in stats], width * 0.9, label=label, yerr=errors if any(errors) else None,
                 capsize=3)
        for xi, s in zip(x, stats):
            if s["n"] > 1:
                axes.scatter([xi] * s["n"], [100 * v for v in s["values"]], s=8, color="black", zorder=3)
    axes.set_xticks(range(len(tasks)), tasks, rotation=20 if len(tasks) > 3 else 0)
    axes.set_ylabel("accuracy (%)")
    axes.set_ylim(0, 100)
    axes.set_title(f"dnd eval ({results['mode']})")
    axes.legend(fontsize="small")
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=120)


def write_report(results: Mapping[str, Any], out_dir: str | os.PathLike) -> dict[str, Path]:
    """Write results.json, results.md and accuracy.png into `out_dir`, each file atomically."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {name: out_dir / name for name in REPORT_FILES}
    write_json(paths["results.json"], results)
    with atomic_path(paths["results.md"]) as tmp:
        tmp.write_text(markdown_report(results))
    plot_report(results, paths["accuracy.png"])
    return paths
