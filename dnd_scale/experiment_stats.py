"""Statistics of the study's scores: a model group's mean accuracy with its 95% interval (Wilson for
one adapter, a bootstrap over the scored questions for several), and paired differences between
groups scored on the same questions."""

from __future__ import annotations

from typing import Any, Sequence

import torch

from dnd_scale.eval_scoring import wilson_interval
from dnd_scale.io import sha256_text

BOOTSTRAP_RESAMPLES = 2000


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
