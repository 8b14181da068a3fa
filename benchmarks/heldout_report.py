"""One JSON of a `dnd experiment` run for `benchmarks/results/`: its results.json, the paired
comparisons recomputed from the score cache, each LoRA's collection losses and each generator's
loss curve (also of a generator whose training the run had not finished).

The run folder may be the run itself or its small files alone (weights left out), e.g.
    python benchmarks/heldout_report.py --run runs/commonsense --out benchmarks/results/heldout.json \\
        --what "first complete run" --git-rev abc1234
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from dnd_scale.experiment_report import RESULTS
from dnd_scale.experiment_scoring import cached_scores
from dnd_scale.experiment_stages import COLLECT_RUN
from dnd_scale.experiment_stats import paired_summaries
from dnd_scale.generator_export import export_folder, is_exported
from dnd_scale.io import read_json, write_json
from dnd_scale.rundir import RunDir
from dnd_scale.store import completion_markers, read_completion, store_dir
from dnd_scale.train_config import TrainConfig
from dnd_scale.train_metrics import METRICS


def collect_summary(run: Path) -> dict:
    rows = {}
    for path in completion_markers(store_dir(run / COLLECT_RUN)):
        done = read_completion(path)
        losses = done["losses"]
        rows[done["task"]] = {"source": done["source"], "num_records": done["num_records"], "steps": len(losses),
                              "checkpoints": len(done["manifest"]), "skipped_steps": done.get("skipped_steps", []),
                              "loss_first": losses[0], "loss_last10_mean": sum(losses[-10:]) / len(losses[-10:])}
    return rows


def generator_curves(run: Path) -> dict:
    curves = {}
    for path in sorted(run.glob(f"*/{TrainConfig.output_dir}/{METRICS}")):
        lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        steps = [row for row in lines if "loss" in row]
        curves[path.parent.parent.name] = {
            "last_step": max((row["step"] for row in steps), default=0),
            "finished": is_exported(export_folder(path.parent))
            or RunDir(path.parent.parent).adapters.is_dir(),
            "loss": [[row["step"], row["loss"]] for row in steps],
            "step_time_s_median": sorted(row["step_time_s"] for row in steps)[len(steps) // 2] if steps else None,
        }
    return curves


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="the experiment's run folder (or its small files)")
    parser.add_argument("--out", required=True, help="JSON to write")
    parser.add_argument("--what", required=True, help="one line: which run this is")
    parser.add_argument("--git-rev", required=True, help="revision the run ran at")
    parser.add_argument("--device", default="", help="the machine, in words")
    args = parser.parse_args(argv)
    run = Path(args.run)
    results = read_json(run / RESULTS)
    for key, entry in results["heldout"].items():
        # what run_experiment writes at this revision; recomputed here for runs made before it did
        entry["paired"] = {scorer: paired_summaries(by_label, f"{key}/{scorer}")
                           for scorer, by_label in cached_scores(run, key).items()}
    report = {"what": args.what, "git_revision": args.git_rev, "device": args.device,
              "collect": collect_summary(run), "generator_training": generator_curves(run), **results}
    write_json(Path(args.out), report)
    print(f"wrote {args.out}: held-out {sorted(results['heldout'])}, variations {sorted(results['variations'])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
