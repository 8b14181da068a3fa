"""`dnd experiment`: does a generated adapter help the base model on a task it never saw?

One recipe (`configs/experiments/*.yaml`, `experiment_recipe`) describes a leave-one-out study;
this module runs it end to end with the pipeline's own stages (`experiment_stages`) and writes
every number it measures:

1. Data (`experiment_data`). Each held-out task's test file is split by a fixed seed into a
   *conditioning* half (its prompts, never its answers, feed the generator) and a *scoring* half
   (the only records scored), so no scored question is ever shown to the generator.
2. Collect (`dnd_scale.collect`): one LoRA trajectory per training task, plus an *oracle* LoRA per
   held-out task, trained on that task's own train file (or, without one, on its conditioning half
   with answers: still disjoint from the scoring half). All share one checkpoint store, so every
   LoRA starts from the same initialization. Each task is collected in its own call and timed.
3. Per held-out task, a run folder of its own whose checkpoint store is the shared one: pack only
   the training tasks, shard their prompt pools, train the generator (`dnd_scale.trainer`), and
   generate adapters (`dnd_scale.generate`): `generated_samples` from disjoint batches of the
   conditioning half, and `control_samples` from another task's prompts (does the prompt matter?).
4. Score (`experiment_scoring` through `dnd_scale.evaluate`, both deterministic scorers: option
   log-likelihood and greedy generation with the chosen option parsed from the reply) on the
   scoring half: the base model, each training LoRA's final checkpoint alone, the weight average of
   those final checkpoints (a zero-cost baseline a generator must beat), the generated and control
   adapters, and the oracle. Every accuracy carries a 95% interval (`experiment_stats`: Wilson for
   one adapter; bootstrap over the scored questions for a group's mean).
5. `experiment_report.RESULTS` + `RESULTS_MD`: the table, wall times (collect per task, train,
   generate, the oracle LoRA's training against one generation), and the generated adapters'
   distances in weight space (`experiment_weights`) to the training mean, the oracle and each
   training LoRA.

Every step leaves its artifact on disk and is skipped when it is already there, so a run stopped
at any point (a time limit, SIGTERM) continues where it stopped when the same command is run
again; generator training resumes from its last checkpoint. `variations` re-train a held-out
task's generator with other settings (more steps, a larger generator) and score its adapters.
"""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from dnd_scale.config import apply_overrides, from_dict, save_config, to_dict
from dnd_scale.experiment_recipe import ExperimentConfig, HeldOut, load_experiment
from dnd_scale.experiment_report import heldout_entry, markdown, write_results
from dnd_scale.experiment_scoring import Scorer
from dnd_scale.experiment_stages import (
    COLLECT_RUN,
    Timings,
    average_adapter,
    average_folder,
    collect_all,
    final_checkpoint,
    generate_adapters,
    log_progress,
    prepare_base,
    train_generator,
)
from dnd_scale.rundir import RunDir


def _models(config: ExperimentConfig, held: HeldOut, out: Path, adapters: dict[str, list[Path]]) -> list[tuple[str, Path | None]]:
    """(label, adapter) of every model scored for a held-out task, cheapest and most telling first."""
    models: list[tuple[str, Path | None]] = [("base", None)]
    models.append(("average", average_folder(out, held.task)))
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
    """Run (or continue) the study into `out`; returns the results (also written as
    `experiment_report.RESULTS` and `RESULTS_MD`)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_config(config, out / "experiment.yaml")
    timings = Timings(out / "timings.json")
    base = prepare_base(config, out)
    collect_all(config, base, out, timings)
    for held in config.heldout:
        average_adapter(out, held.train_on, average_folder(out, held.task))

    scorer: Scorer | None = None
    report: dict[str, Any] = {"heldout": {}, "variations": {}}
    for key, held, run_config, run in run_order(config, out):
        export = train_generator(run_config, held, run, out, timings, key)
        if export is None:
            log_progress(f"{key}: training stopped before its last step; run the same command again to resume")
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
                log_progress(f"{key}: score {label} {adapter.name if adapter else ''} ({scorer_name})")
                scores.setdefault(scorer_name, {}).setdefault(label, []).append(
                    scorer.score(held.task, scorer_name, label, adapter))
        entry = heldout_entry(key, held, scores, adapters, failures, out, run, run_config.run.train)
        (report["variations"] if key.startswith("variation-") else report["heldout"])[key] = entry
        write_results(config, out, report, timings)
    return write_results(config, out, report, timings)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dnd experiment", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="experiment recipe (configs/experiments/*.yaml)")
    parser.add_argument("--out", required=True, help="run folder; an existing one is continued")
    parser.add_argument("--fresh", action="store_true", help="delete the run folder first")
    args, overrides = parser.parse_known_args(argv)
    bad = [o for o in overrides if not (o.startswith("--") and "=" in o)]
    if bad:
        parser.error(f"unrecognized arguments: {bad} (overrides look like --section.field=value, "
                     "e.g. --run.train.steps=600)")
    config = load_experiment(args.config, overrides)
    if args.fresh and Path(args.out).exists():
        shutil.rmtree(args.out)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    results = run_experiment(config, args.out)
    print(markdown(results))
    return 0
