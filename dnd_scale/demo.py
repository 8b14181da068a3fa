"""`dnd demo`: the whole pipeline at tiny scale on CPU, for a task family the generator never saw.

The recipe `configs/tiny-cpu.yaml` (synthetic task families, a tiny random-init Qwen2 base) → collect
a LoRA trajectory per training family → pack → shard → train the generator (DeepSpeed, one process)
→ generate adapters for the held-out family from its prompts alone → evaluate base / training LoRAs /
generated adapters on the held-out family. Prints the table and writes a report folder. Seeded: the
same command gives the same numbers. A random-init base knows nothing, so the table shows the
machinery working end to end — accuracies near chance are expected; real numbers need a pretrained
base (see README).
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from dnd_scale.config import ConfigError, save_config
from dnd_scale.io import write_json

if TYPE_CHECKING:  # the recipe imports every stage; the demo imports it when it runs
    from dnd_scale.recipe import RunConfig

# The recipe the demo runs: every number of its stages comes from there.
TINY_RECIPE = Path(__file__).resolve().parents[1] / "configs" / "tiny-cpu.yaml"


@dataclass
class DemoConfig:
    """What the demo does besides running the recipe's stages."""

    heldout_family: str = "sum_mc"
    """The synthetic family the generator never sees; adapters for it come from its prompts alone."""
    generated_samples: int = 5
    """Adapters generated for the held-out family, each from another prompt sample."""
    seed: int = 0
    """Seed of the first prompt sample (the i-th adapter's is seed + i)."""


def run_demo(run: RunConfig, demo: DemoConfig, out: str | os.PathLike) -> dict:
    """Run recipe `run` into `out` and score adapters generated for `demo.heldout_family`."""
    from dnd_scale.basemodel import load_base_model
    from dnd_scale.collect import collect
    from dnd_scale.eval_report import write_report
    from dnd_scale.evaluate import evaluate
    from dnd_scale.generate import AdapterGenerator
    from dnd_scale.generator_export import export_folder
    from dnd_scale.pack import pack
    from dnd_scale.recipe import record_recipe
    from dnd_scale.rundir import RunDir
    from dnd_scale.shards import build_shards
    from dnd_scale.store import final_checkpoint, read_manifest, read_prompt_pools
    from dnd_scale.targets import PackedTargets
    from dnd_scale.tasks import load_task, load_tasks
    from dnd_scale.train_checkpoint import CHECKPOINTS_DIR, latest_checkpoint
    from dnd_scale.trainer import train

    out = Path(out)
    folder = RunDir(out)
    _claim_folder(run, demo, out)
    save_config(demo, out / DEMO_CONFIG)
    record_recipe(out, run, "collect")  # the run folder's recipe, as `dnd collect --config` records it
    timings: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(stage: str) -> None:
        nonlocal clock
        timings[stage] = round(time.perf_counter() - clock, 2)
        clock = time.perf_counter()
        print(f"[demo] {stage} done in {timings[stage]:.1f} s", flush=True)

    # 1. the recipe's tasks (the held-out family's prompts are drawn as collect draws a task's)
    tasks = load_tasks(run.tasks, num_records=run.synthetic_records, seed=run.collect.seed)
    heldout_spec = f"synthetic:{demo.heldout_family}"
    if heldout_spec in run.tasks:
        raise ConfigError(f"the held-out family {demo.heldout_family!r} is one of the recipe's training tasks; "
                          "hold out another (--demo.heldout_family=...) or drop it from the recipe's tasks")
    heldout = load_task(heldout_spec, num_records=run.synthetic_records, seed=run.collect.seed)

    # 2. collect a LoRA trajectory per training family
    collect(run.collect, tasks, out)
    lap("collect")

    # 3. pack and shard
    targets = PackedTargets(pack(out, run.pack))
    build_shards(targets, read_prompt_pools(out, targets.tasks), folder.shards, run.shard)
    lap("pack+shard")

    # 4. train the generator (one DeepSpeed process on CPU)
    resume = latest_checkpoint(folder.train_output(run.train.output_dir) / CHECKPOINTS_DIR) is not None
    export = export_folder(train(run.train, out, resume=resume))
    lap("train")

    # 5. generate adapters for the held-out family from its prompts only (no answers, no training)
    generator = AdapterGenerator(export, "cpu")
    generated = [
        generator.generate(heldout.prompts, folder.adapters / f"{demo.heldout_family}-{i}", seed=demo.seed + i,
                           overwrite=True)
        for i in range(demo.generated_samples)
    ]
    lap("generate")

    # 6. evaluate on held-out records the LoRAs never trained on (eval.task_seed, not collect's seed)
    training = [final_checkpoint(out, name) for name in dict.fromkeys(r["task"] for r in read_manifest(out))]
    base = load_base_model(folder.base_model, dtype=run.eval.dtype, device=run.eval.device)
    results = evaluate(base, [heldout_spec], {"training_lora": training, "generated": generated}, run.eval)
    results["demo"] = {"timings_s": timings}
    paths = write_report(results, out / "report")
    lap("eval")
    summary = _summary(results, demo.heldout_family)
    write_json(out / "report" / "demo_summary.json", summary)
    print(_table(summary))
    print(f"[demo] report: {paths['results.md']}")
    return summary


DEMO_CONFIG = "demo_config.yaml"


def _claim_folder(run: RunConfig, demo: DemoConfig, out: Path) -> None:
    """The demo's run folder: new, empty, or an earlier demo of the same settings (whose finished
    stages are then reused: collect skips its tasks, train resumes its finished run, the rest is
    redone). Anything else is refused before a file is written."""
    from dnd_scale.config import flatten, read_yaml, to_dict
    from dnd_scale.recipe import saved_recipe

    saved_path = out / DEMO_CONFIG
    if saved_path.is_file():
        saved = flatten({"recipe": read_yaml(saved_recipe(out), "saved recipe") or {},
                         "demo": read_yaml(saved_path, "saved demo config") or {}})
        now = flatten({"recipe": to_dict(run), "demo": to_dict(demo)})
        changed = {k.partition(".")[2]: (saved.get(k), v) for k, v in now.items() if saved.get(k) != v}
        if changed:
            details = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items())
            raise ConfigError(
                f"{out} holds a demo run with other settings ({details}); run this one into a new folder "
                f"(dnd demo --out OTHER), or delete {out} first"
            )
    elif out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out} is not empty and holds no earlier demo; give dnd demo --out a new folder")
    out.mkdir(parents=True, exist_ok=True)


def _summary(results: dict, family: str) -> dict:
    """base / training-LoRA mean / generated mean ± std accuracy on the held-out family."""
    row = {}
    for model in results["models"]:
        acc = next(t["accuracy"] for t in model["tasks"].values())
        row.setdefault(model["label"], []).append(acc)
    t = torch.tensor
    return {
        "heldout_family": family,
        "base": row["base"][0],
        "training_lora_mean": float(t(row["training_lora"]).mean()),
        "training_lora_best": float(t(row["training_lora"]).max()),
        "generated_mean": float(t(row["generated"]).mean()),
        "generated_std": float(t(row["generated"]).std()) if len(row["generated"]) > 1 else 0.0,
        "n_training": len(row["training_lora"]),
        "n_generated": len(row["generated"]),
    }


def _table(s: dict) -> str:
    pct = lambda x: f"{100 * x:5.1f}"  # noqa: E731
    return "\n".join([
        f"held-out family: {s['heldout_family']} (accuracy %, option log-likelihood)",
        "| base | training LoRAs: mean (best) | generated: mean ± std |",
        "|---|---|---|",
        f"| {pct(s['base'])} | {pct(s['training_lora_mean'])} ({pct(s['training_lora_best'])}), n={s['n_training']} "
        f"| {pct(s['generated_mean'])} ± {pct(s['generated_std'])}, n={s['n_generated']} |",
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="dnd demo", description=__doc__.splitlines()[0] + " Overrides: --section.field=value of any recipe "
        "section (e.g. --train.steps=300) and --demo.field=value (e.g. --demo.heldout_family=parity_tf).")
    parser.add_argument("--out", default="runs/demo",
                        help="run folder: created, or an earlier demo of the same settings (its finished stages are reused)")
    parser.add_argument("--config", default=str(TINY_RECIPE), help="the recipe to run (default: configs/tiny-cpu.yaml)")
    args, overrides = parser.parse_known_args(argv)
    bad = [o for o in overrides if not (o.startswith("--") and "=" in o)]
    if bad:
        parser.error(f"unrecognized arguments: {bad}")
    from dnd_scale.config import apply_overrides, from_dict
    from dnd_scale.recipe import load_recipe

    demo_overrides = [o for o in overrides if o.startswith("--demo.")]
    demo = from_dict(DemoConfig, apply_overrides({}, demo_overrides).get("demo", {}), "demo.")
    run = load_recipe(args.config, [o for o in overrides if o not in demo_overrides])
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    run_demo(run, demo, args.out)
    print(f"[demo] total {time.perf_counter() - start:.0f} s")
    return 0
