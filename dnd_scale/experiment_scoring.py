"""Scoring for the study: the base model loaded once, each model scored on a held-out task's scoring
half by one scorer (`experiment_recipe.SCORERS`), every result cached on disk per (task, scorer, adapter) so a
continued run scores nothing twice."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Any

from dnd_scale.experiment_data import split_heldout
from dnd_scale.experiment_recipe import ExperimentConfig
from dnd_scale.io import read_json, write_json
from dnd_scale.tasks import Task

SCORES = "scores"  # the score cache under the experiment folder: <task>/<scorer>/<model>.json


class Scorer:
    """The base model loaded once; scores adapters on prepared scoring halves, caching every result."""

    def __init__(self, config: ExperimentConfig, base: str, out: Path) -> None:
        from dnd_scale.basemodel import load_base_model

        self.config, self.out = config, out
        self.base = load_base_model(base, dtype=config.run.eval.dtype, device=config.run.eval.device,
                                    seed=config.run.collect.seed)
        self._prepared: dict[tuple[str, str], Any] = {}

    def _prepare(self, task: str, scorer: str):
        from dnd_scale.eval_records import prepare_task

        if (task, scorer) not in self._prepared:
            _, scoring = split_heldout(self.config, task)
            eval_config = replace(self.config.run.eval, mode=scorer, max_records=None)
            self._prepared[task, scorer] = (prepare_task(Task(task, scoring, "scoring half"), self.base.tokenizer,
                                                         eval_config), eval_config)
        return self._prepared[task, scorer]

    def score(self, task: str, scorer: str, label: str, adapter: Path | None) -> dict:
        """Scores of one model (the base when `adapter` is None) on a held-out task's scoring half."""
        from dnd_scale.eval_adapters import applied_adapter, check_adapter
        from dnd_scale.eval_scoring import score_model

        name = "base" if adapter is None else f"{label}--" + "--".join(adapter.relative_to(self.out).parts)
        cache = self.out / SCORES / task / scorer / f"{name}.json"
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


def cached_scores(out: str | os.PathLike, task: str) -> dict[str, dict[str, list[dict]]]:
    """The cached scores of a held-out task's main experiment, {scorer: {label: [results]}} (variations'
    adapters, which live under `variation-*`, are left out)."""
    scores: dict[str, dict[str, list[dict]]] = {}
    for path in sorted((Path(out) / SCORES / task).glob("*/*.json")):
        result = read_json(path)
        if result["adapter"] is None or "variation-" not in result["adapter"]:
            scores.setdefault(path.parent.name, {}).setdefault(result["label"], []).append(result)
    return scores
