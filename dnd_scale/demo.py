"""`dnd demo`: the whole pipeline at tiny scale on CPU, for a task family the generator never saw.

Synthetic task families → a tiny random-init Qwen2 base → collect a LoRA trajectory per training
family → pack → shard → train the generator (DeepSpeed, one process) → generate adapters for the
held-out family from its prompts alone → evaluate base / training LoRAs / generated adapters on the
held-out family. Prints the table and writes a report folder. Seeded: the same command gives the
same numbers. A random-init base knows nothing, so the table shows the machinery working end to
end — accuracies near chance are expected; real numbers need a pretrained base (see README).
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from dnd_scale.config import save_config
from dnd_scale.io import write_json


@dataclass
class DemoConfig:
    """What the demo runs (every number small enough for 2 CPU cores in a few minutes)."""

    train_families: tuple[str, ...] = (
        "reverse_word", "sort_letters", "uppercase", "add_numbers", "count_letters",
        "largest_number_mc", "starts_with_mc", "parity_tf", "palindrome_tf",
    )
    """Synthetic families the generator learns from (one LoRA trajectory each)."""
    heldout_family: str = "sum_mc"
    """The family the generator never sees; adapters for it come from its prompts alone."""
    records: int = 96
    """Records generated per family (prompt pools and LoRA training data)."""
    hidden: int = 64
    """Width of the tiny random-init Qwen2 base."""
    layers: int = 2
    """Decoder layers of the base."""
    rank: int = 4
    """LoRA rank."""
    chunk: int = 32
    """Token chunk width c (tokens are (rank + 2, c + 2))."""
    collect_steps: int = 40
    """LoRA training steps per family; the last `trajectory` are kept as checkpoints."""
    trajectory: int = 8
    """Checkpoints kept per family."""
    num_prompts: int = 8
    """Prompts per condition."""
    condition_length: int = 32
    """Encoder tokens per prompt."""
    pairs_per_task: int = 96
    """Prompt-checkpoint pairs sharded per family."""
    train_steps: int = 150
    """Generator optimizer steps."""
    generated_samples: int = 5
    """Adapters generated for the held-out family, each from another prompt sample."""
    eval_records: int = 64
    """Held-out records scored per adapter."""
    seed: int = 0
    """Seed of everything (records, base init, LoRA training, generator, sampling)."""


def run_demo(config: DemoConfig, out: str | os.PathLike) -> dict:
    from dnd_scale.basemodel import build_tiny_tokenizer, load_base_model
    from dnd_scale.collect import CollectConfig, collect
    from dnd_scale.encoder import EncoderConfig
    from dnd_scale.eval_report import write_report
    from dnd_scale.evaluate import EvalConfig, evaluate
    from dnd_scale.generate import AdapterGenerator
    from dnd_scale.generator import GeneratorConfig
    from dnd_scale.generator_export import export_folder
    from dnd_scale.layout import HF_CONFIG, LoraSpec
    from dnd_scale.pack import pack
    from dnd_scale.rundir import RunDir
    from dnd_scale.shards import ShardConfig, build_shards
    from dnd_scale.store import final_checkpoint, read_manifest
    from dnd_scale.targets import PackedTargets
    from dnd_scale.tasks import load_task
    from dnd_scale.tokenizer import TokenizerConfig
    from dnd_scale.trainer import CHECKPOINTS_DIR, TrainConfig, latest_checkpoint, train
    import transformers

    out = Path(out)
    run = RunDir(out)
    _claim_folder(config, out)
    save_config(config, out / DEMO_CONFIG)
    timings: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(stage: str) -> None:
        nonlocal clock
        timings[stage] = round(time.perf_counter() - clock, 2)
        clock = time.perf_counter()
        print(f"[demo] {stage} done in {timings[stage]:.1f} s", flush=True)

    # 1. tasks and a tiny random-init base whose vocabulary is the offline character tokenizer's
    tasks = [load_task(f"synthetic:{f}", num_records=config.records, seed=config.seed) for f in config.train_families]
    heldout_spec = f"synthetic:{config.heldout_family}"
    heldout = load_task(heldout_spec, num_records=config.records, seed=config.seed)
    base_dir = out / "base_config"
    base_config = transformers.Qwen2Config(
        hidden_size=config.hidden, intermediate_size=2 * config.hidden, num_hidden_layers=config.layers,
        num_attention_heads=4, num_key_value_heads=2, vocab_size=len(build_tiny_tokenizer()),
        max_position_embeddings=512, tie_word_embeddings=True,
    )
    base_config.save_pretrained(base_dir)

    # 2. collect a LoRA trajectory per training family
    collect(CollectConfig(
        base_model=str(base_dir / HF_CONFIG), lora=LoraSpec(rank=config.rank, alpha=2.0 * config.rank),
        steps=config.collect_steps, save_last=config.trajectory, lr=5e-3, batch_size=8, max_length=256,
        seed=config.seed, device="cpu", dtype="float32",
    ), tasks, out)
    lap("collect")

    # 3. pack and shard
    targets = pack(out, TokenizerConfig(chunk=config.chunk))
    build_shards(PackedTargets(targets), {t.name: t.prompts for t in tasks}, run.shards,
                 ShardConfig(num_prompts=config.num_prompts, pairs_per_task=config.pairs_per_task,
                             shard_size=128, seed=config.seed))
    lap("pack+shard")

    # 4. train the generator (one DeepSpeed process on CPU, ZeRO-0, fp32)
    train_config = TrainConfig(
        generator=GeneratorConfig(preset="auto", num_stages=3, max_channels=64, kernel_size=3),
        encoder=EncoderConfig(max_length=config.condition_length),
        micro_batch_size=8, steps=config.train_steps, lr=1e-3, warmup_steps=10, zero_stage=0,
        checkpoint_every=config.train_steps, log_every=10, seed=config.seed, num_workers=0,
    )
    resume = latest_checkpoint(run.train_output(train_config.output_dir) / CHECKPOINTS_DIR) is not None
    export = export_folder(train(train_config, out, resume=resume))
    lap("train")

    # 5. generate adapters for the held-out family from its prompts only (no answers, no training)
    generator = AdapterGenerator(export, "cpu")
    generated = [
        generator.generate(heldout.prompts, run.adapters / f"{config.heldout_family}-{i}", seed=config.seed + i,
                           overwrite=True)
        for i in range(config.generated_samples)
    ]
    lap("generate")

    # 6. evaluate on held-out records the LoRAs never trained on (another record seed)
    training = [final_checkpoint(out, name) for name in dict.fromkeys(r["task"] for r in read_manifest(out))]
    base = load_base_model(run.base_model, dtype="float32", device="cpu")
    eval_task = load_task(heldout_spec, num_records=config.eval_records, seed=config.seed + 1)
    results = evaluate(base, [eval_task], {"training_lora": training, "generated": generated},
                       EvalConfig(device="cpu", dtype="float32"))
    results["demo"] = {"timings_s": timings}
    paths = write_report(results, out / "report")
    lap("eval")
    summary = _summary(results, config.heldout_family)
    write_json(out / "report" / "demo_summary.json", summary)
    print(_table(summary))
    print(f"[demo] report: {paths['results.md']}")
    return summary


DEMO_CONFIG = "demo_config.yaml"


def _claim_folder(config: DemoConfig, out: Path) -> None:
    """The demo's run folder: new, empty, or an earlier demo of the same settings (whose finished
    stages are then reused: collect skips its tasks, train resumes its finished run, the rest is
    redone). Anything else is refused before a file is written."""
    import yaml

    from dnd_scale.config import ConfigError, to_dict

    saved_path = out / DEMO_CONFIG
    if saved_path.is_file():
        saved, now = yaml.safe_load(saved_path.read_text()) or {}, to_dict(config)
        changed = {k: (saved.get(k), v) for k, v in now.items() if saved.get(k) != v}
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
    parser = argparse.ArgumentParser(prog="dnd demo", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/demo",
                        help="run folder: created, or an earlier demo of the same settings (its finished stages are reused)")
    parser.add_argument("--train-steps", type=int, default=DemoConfig.train_steps)
    parser.add_argument("--seed", type=int, default=DemoConfig.seed)
    args = parser.parse_args(argv)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    run_demo(DemoConfig(train_steps=args.train_steps, seed=args.seed), args.out)
    print(f"[demo] total {time.perf_counter() - start:.0f} s")
    return 0
