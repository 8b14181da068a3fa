"""`dnd bench scale`: how large a generator trains and generates on one GPU, measured beside `dnd plan`.

Three sections, each selectable (`--sections zero largest generate70b`), each writing its results
into one JSON file as soon as it finishes (a later time limit never loses earlier numbers; a second
call with the same `--out` adds to the file):

- **zero**: the Qwen2.5-7B-target generator (the paper's "qwen2.5-7b" preset: condition (16, 1000,
  384) → 4928 tokens of (18, 514), r = 16, chunk 512) trained for a few steps through `train()` and
  DeepSpeed's engine with ZeRO 0, 2, 3, 3 + optimizer offload and 3 + optimizer and parameter
  offload. Per configuration: peak GPU memory (allocated and reserved), peak host RSS, the median
  step time after warm-up, and `dnd plan`'s prediction beside them with the error.
- **largest**: auto-sized generators for larger targets (14B, 32B, 72B layouts by default) tried
  in order under the given configurations; stops at the first target none of them trains.
- **generate70b**: a random-init auto-sized generator for the Llama-3.1-70B layout exported as
  `dnd train` exports, loaded by `AdapterGenerator` (the `dnd generate` path, real condition
  encoder), prompts → PEFT folder: peak GPU memory and latency, and a check that the folder's keys
  and shapes equal what peft builds for that model (on the meta device, no weights).

Nothing here needs an LLM, real LoRAs or a trained encoder: the targets are random tokens of the
real layout's geometry written by the real pack writers, the shards by the real shard writer, and
the conditions by `RandomConditionEncoder` into the real condition cache (training then gathers them
by prompt index as always). A measured training run is `train()` itself with a micro-batch stream
(`BenchStream`) that ends the run after the measured steps, so neither the final checkpoint nor
the export (minutes and tens of GB at these sizes) enter the numbers.

The generation section's generator is auto-sized from the condition (16, 1000, 384) and the 70B
layout (r = 16, c = 512: 25,280 tokens of (18, 514)) with max_channels 2048: 4.79 B parameters
(19 GB in fp32), random-init; the conditions come from the real packaged MiniLM encoder (prompts of
~20 tokens, zero-padded to L = 1000).

Every configuration runs in its own subprocess, so the CUDA caching allocator, DeepSpeed's engine
and pinned host buffers of one never count towards the next, and an out-of-memory error or a host
OOM kill ends only that configuration (recorded as "oom" or "killed").

This module holds the sections and the command line; what is trained (targets, synthetic run,
predictions) is in `bench_scale_targets`, the worker processes in `bench_scale_workers`, the results
file and table in `bench_scale_results`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from dnd_scale.bench_scale_results import REPO, ResultsFile, format_table, record_summary
from dnd_scale.bench_scale_targets import CONFIGS, TargetSpec, build_synthetic_run, config_prediction
from dnd_scale.bench_scale_workers import WORKERS, run_isolated, tune_worker
from dnd_scale.train_config import TrainConfig

SECTIONS = ("zero", "largest", "generate70b")


def log(message: str) -> None:
    """A progress line with a UTC timestamp (flushed, so a killed run still shows how far it got)."""
    print(f"[{time.strftime('%H:%M:%S', time.gmtime())}] {message}", flush=True)


def _error(measured: int | None, predicted: int | None) -> float | None:
    """(predicted - measured) / measured, or None when either is missing."""
    if not measured or predicted is None:
        return None
    return (predicted - measured) / measured


# --------------------------------------------------------------------------------------------------
# Sections


@dataclass
class BenchOptions:
    """Knobs shared by the sections (CLI flags of `dnd bench scale`)."""

    work_dir: Path
    steps: int = 5
    warmup_steps: int = 2
    micro_batch: int = 4
    timeout_s: float = 300.0
    tune_timeout_s: float = 400.0
    impl: str = "auto"
    cudnn_benchmark: bool = TrainConfig.cudnn_benchmark  # the trainer's default
    bf16: bool | None = None  # None: on a GPU
    keep: bool = False  # keep run folders (else removed when a section is done with them)
    isolate: bool = True  # a subprocess per configuration (False: in this process, for tests)

    def job(self, **fields: Any) -> dict:
        job = {"steps": self.steps, "warmup_steps": self.warmup_steps, "micro_batch": self.micro_batch,
               "impl": self.impl, "cudnn_benchmark": self.cudnn_benchmark, **fields}  # fmt: skip
        if self.bf16 is not None:
            job["bf16"] = self.bf16
        return job

    def run(self, kind: str, job: dict, name: str) -> dict:
        if self.isolate:
            return run_isolated(kind, job, self.timeout_s, self.work_dir / "logs" / f"{name}.log")
        return WORKERS[kind](job)


def _tune(target: TargetSpec, opts: BenchOptions, name: str) -> dict:
    """The tuning pass of `target`'s generator (tune_worker) before its configurations train: what
    their first step would otherwise spend autotuning, measured once and saved to the tune file."""
    from dnd_kernels.hyperconv.tiling import TUNE_FILE_ENV

    job = opts.job(target=asdict(target), tune_file=os.environ.get(TUNE_FILE_ENV))
    record = (run_isolated("tune", job, opts.tune_timeout_s, opts.work_dir / "logs" / f"{name}.log")
              if opts.isolate else tune_worker(job))  # fmt: skip
    log(f"{name}: {record['status']}: " + (f"first call {record['first_call_s']:.1f} s, second {record['second_call_s']:.2f} s"
                                          if record["status"] == "ok" else record.get("error", "")))  # fmt: skip
    return record


def _measure_training(target: TargetSpec, run_dir: Path, config: str, opts: BenchOptions, name: str) -> dict:
    """One configuration trained, with the plan's prediction and its error beside the measurement."""
    sizes = target.sizes()
    job = opts.job(target=asdict(target), run_dir=str(run_dir), config=config, out_dir=str(run_dir / f"gen-{config}"))
    record = opts.run("train", job, name)
    record.setdefault("config", config)
    prediction = config_prediction(sizes, config, opts.micro_batch)
    record["predicted"] = prediction
    record["predicted_error"] = _error(record.get("gpu_max_allocated_bytes"), prediction["gpu_bytes"])
    record["predicted_error_reserved"] = _error(record.get("gpu_max_reserved_bytes"), prediction["gpu_bytes"])
    if record.get("features") is not None:
        record["features_match_plan"] = [list(f) for f in record["features"]] == sizes["features"]
    shutil.rmtree(run_dir / f"gen-{config}", ignore_errors=True)
    return record


def section_zero(target: TargetSpec, configs: Sequence[str], opts: BenchOptions, save: Callable[[dict], None],
                 previous: dict | None = None) -> dict:
    """Train `target`'s generator under each configuration; the section is saved after each one.

    `previous`: this section from an earlier call; its configurations are kept (and re-run ones
    replaced) when it measured the same target, micro-batch and steps, so the five configurations
    can be spread over several time-limited calls."""
    run_dir = opts.work_dir / "run-zero"
    log(f"zero: building the synthetic run for {Path(target.model).stem} (r={target.rank}, c={target.chunk})")
    result = {"target": asdict(target), "sizes": build_synthetic_run(run_dir, target), "micro_batch": opts.micro_batch,
              "steps": opts.steps, "warmup_steps": opts.warmup_steps, "configs": {}}  # fmt: skip
    same = ("target", "micro_batch", "steps", "warmup_steps")
    if previous and all(previous.get(k) == _as_json(result[k]) for k in same):
        result["configs"] = dict(previous["configs"])
    plan_check = _plan_agrees(target, result["sizes"], opts.micro_batch)
    result["dnd_plan"] = plan_check
    log(f"zero: {result['sizes']['generator_params'] / 1e9:.2f} B generator parameters, "
        f"{result['sizes']['tokens']} tokens of {tuple(result['sizes']['token_shape'])}")  # fmt: skip
    result["tuning"] = _tune(target, opts, "zero-tune")
    save(result)
    for config in configs:
        log(f"zero: {config} ...")
        record = _measure_training(target, run_dir, config, opts, f"zero-{config}")
        result["configs"][config] = record
        log(f"zero: {config} {record['status']}: " + record_summary(record))
        save(result)
    if not opts.keep:
        shutil.rmtree(run_dir, ignore_errors=True)
    return result


def section_largest(models: Sequence[str], base: TargetSpec, configs: Sequence[str], opts: BenchOptions,
                    save: Callable[[dict], None], previous: dict | None = None) -> dict:
    """For each model layout in order, the first configuration that trains its auto-sized generator;
    stops at the first model that none trains. `previous`: this section from an earlier call; its
    entries for models not tried now are kept (same base target only)."""
    result: dict[str, Any] = {"configs_tried": list(configs), "base": asdict(base), "targets": [], "largest_fit": None}
    names = {Path(m).stem for m in models}
    if previous and previous.get("base") == _as_json(result["base"]):
        result["targets"] = [t for t in previous["targets"] if t["model"] not in names]
        _update_largest_fit(result)
    for model in models:
        target = replace(base, model=model, preset="auto")
        sizes = target.sizes()
        entry = {"model": sizes["model"], "sizes": sizes, "attempts": {}, "fits": False}
        result["targets"].append(entry)
        log(f"largest: {sizes['model']}: {sizes['tokens']} tokens, {sizes['generator_params'] / 1e9:.2f} B generator "
            "parameters; building the synthetic run")  # fmt: skip
        run_dir = opts.work_dir / f"run-{sizes['model']}"
        build_synthetic_run(run_dir, target)
        entry["tuning"] = _tune(target, opts, f"largest-{sizes['model']}-tune")
        for config in configs:
            log(f"largest: {sizes['model']} {config} ...")
            record = _measure_training(target, run_dir, config, opts, f"largest-{sizes['model']}-{config}")
            entry["attempts"][config] = record
            log(f"largest: {sizes['model']} {config} {record['status']}: " + record_summary(record))
            save(result)
            if record["status"] == "ok":
                entry["fits"], entry["config"] = True, config
                _update_largest_fit(result)
                break
        shutil.rmtree(run_dir, ignore_errors=True)
        save(result)
        if not entry["fits"]:
            log(f"largest: {sizes['model']} trains under none of {list(configs)}; stopping")
            break
    return result


def _as_json(value: Any) -> Any:
    """`value` as it reads back from the results file (tuples become lists), for comparisons."""
    return json.loads(json.dumps(value))


def _update_largest_fit(result: dict) -> None:
    """The fitting target with the most generator parameters (targets may come from several calls)."""
    fits = [t for t in result["targets"] if t["fits"]]
    best = max(fits, key=lambda t: t["sizes"]["generator_params"], default=None)
    result["largest_fit"] = None if best is None else {
        "model": best["model"], "config": best["config"], "generator_params": best["sizes"]["generator_params"],
        "tokens": best["sizes"]["tokens"]}  # fmt: skip


def section_generate(target: TargetSpec, opts: BenchOptions, warmup: int, repeats: int, dtype: str,
                     encoder: str | None, save: Callable[[dict], None]) -> dict:
    sizes = target.sizes()
    log(f"generate: {sizes['model']}: {sizes['tokens']} tokens, {sizes['generator_params'] / 1e9:.2f} B generator "
        "parameters (random init)")  # fmt: skip
    work = opts.work_dir / "generate"
    job = {"target": asdict(target), "work_dir": str(work), "warmup": warmup, "repeats": repeats, "dtype": dtype,
           "encoder": encoder, "impl": None if opts.impl == "auto" else opts.impl}  # fmt: skip
    record = opts.run("generate", job, "generate")
    result = {"target": asdict(target), "sizes": sizes, **record}
    # The generator's forward keeps no activations: weights + the largest stage's input and output.
    result["predicted_weights_bytes"] = 4 * sizes["generator_params"]
    result["predicted_error_after_load"] = _error(record.get("gpu_after_load_bytes"), result["predicted_weights_bytes"])
    log(f"generate: {record['status']}: " + record_summary(record))
    save(result)
    if not opts.keep:
        shutil.rmtree(work, ignore_errors=True)
    return result


def repredict(data: dict, git_rev: str | None) -> int:
    """Add `dnd plan`'s prediction as the code now makes it (`predicted_now`: revision, bytes, error
    against the measured peak) beside the one recorded at measurement time, to every training record
    of a results file (`data`, as ResultsFile holds it); returns how many records it updated."""
    from dnd_scale.bench import git_revision

    sections = data["sections"]
    groups = []  # (sizes, records)
    if "zero" in sections:
        groups.append((sections["zero"]["sizes"], sections["zero"]["configs"].values()))
    for target in sections.get("largest", {}).get("targets", []):
        groups.append((target["sizes"], target["attempts"].values()))
    rev = git_rev or git_revision() or "unknown"
    count = 0
    for sizes, records in groups:
        for record in records:
            if "micro_batch" not in record:  # a record of a worker that did not start
                continue
            now = config_prediction(sizes, record["config"], record["micro_batch"])
            record["predicted_now"] = {"git_rev": rev, **now,
                                       "error": _error(record.get("gpu_max_allocated_bytes"), now["gpu_bytes"])}  # fmt: skip
            count += 1
    return count


def _plan_agrees(target: TargetSpec, sizes: dict, micro_batch: int) -> dict:
    """What `dnd plan` (make_plan) says for this target: whether it sizes the same generator as the
    one trained here, and its memory per GPU at world size 1 (no offload) per ZeRO stage."""
    from dnd_scale.plan import PlanConfig, make_plan

    n, length, dim = target.condition
    plan = make_plan(target.model, target.lora_spec(),
                     PlanConfig(num_prompts=n, max_tokens=length, embed_dim=dim, chunk=target.chunk,
                                preset=target.preset, micro_batch=micro_batch))  # fmt: skip
    return {"features_equal": plan["generator"]["features"] == sizes["features"],
            "params": plan["generator"]["params"], "tokens": plan["tokens"]["count"],
            "memory_world1_bytes": {stage: per_world["1"] for stage, per_world in plan["memory_per_gpu_bytes"].items()}}

# --------------------------------------------------------------------------------------------------
# Command line


def _condition(text: str) -> tuple[int, int, int]:
    parts = tuple(int(v) for v in text.split(","))
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"condition is N,L,D (e.g. 16,1000,384), got {text!r}")
    return parts


def main(argv: list[str] | None = None) -> int:
    models = REPO / "configs" / "models"
    parser = argparse.ArgumentParser(prog="dnd bench scale", description=__doc__.splitlines()[0])
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "scale.json"),
                        help="results JSON (sections already in it are kept unless re-run)")
    parser.add_argument("--work-dir", help="scratch folder for run folders (default: a temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folders")
    parser.add_argument("--model", default=str(models / "qwen2.5-7b.json"), help="zero section: target model config")
    parser.add_argument("--preset", default="qwen2.5-7b", help="zero section: generator preset (or auto)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--chunk", type=int, default=512)
    parser.add_argument("--condition", type=_condition, default=(16, 1000, 384), help="N,L,D")
    parser.add_argument("--max-channels", type=int, default=2048, help="auto-sized generators' max_channels")
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    parser.add_argument("--largest-models", nargs="+",
                        default=[str(models / f"qwen2.5-{s}.json") for s in ("14b", "32b", "72b")])
    parser.add_argument("--largest-configs", nargs="+", choices=list(CONFIGS), default=["zero3", "zero3_offload_opt"],
                        help="tried in order for each target; a target fits when one of them trains")
    parser.add_argument("--generate-model", default=str(models / "llama-3.1-70b.json"))
    parser.add_argument("--generate-repeats", type=int, default=5)
    parser.add_argument("--generate-warmup", type=int, default=2)
    parser.add_argument("--generate-dtype", default="float32", help="adapter dtype (dnd generate's default)")
    parser.add_argument("--encoder", default=None, help="condition encoder for generation (default: packaged MiniLM)")
    parser.add_argument("--steps", type=int, default=5, help="optimizer steps per configuration (warm-up included)")
    parser.add_argument("--warmup-steps", type=int, default=2, help="first steps left out of the median")
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per configuration")
    parser.add_argument("--impl", choices=["auto", "torch", "triton"], default="auto")
    parser.add_argument("--cudnn-benchmark", choices=["on", "off"], default="on" if TrainConfig.cudnn_benchmark else "off",
                        help="cuDNN's algorithm search on first use of each shape (train.cudnn_benchmark; the "
                             "default is the trainer's)")
    parser.add_argument("--tune-timeout", type=float, default=400.0,
                        help="seconds for each target's tuning pass (autotuning before its configurations)")
    parser.add_argument("--tune-file", help="kernel tiles file kept across calls (DND_KERNELS_TUNE_FILE; "
                        "default: that variable, else one in the scratch folder)")
    parser.add_argument("--generate-timeout", type=float, default=540.0,
                        help="seconds for the generation worker (export, load, warm-up autotuning, repeats)")
    parser.add_argument("--git-rev", help="revision to record when the tree has no .git")
    parser.add_argument("--repredict", metavar="RESULTS",
                        help="measure nothing: add the plan's prediction as this revision makes it (predicted_now) "
                             "to every training record of RESULTS, a results file of this benchmark")
    args = parser.parse_args(argv)
    if args.repredict:
        from dnd_scale.io import read_json, write_json

        data = read_json(Path(args.repredict), "scale results")
        log(f"{repredict(data, args.git_rev)} records of {args.repredict} re-predicted")
        write_json(Path(args.repredict), data)
        return 0

    # SIGTERM (a job's time limit, `timeout`) unwinds like Ctrl-C: the running worker is killed and
    # the results saved so far stay.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    work_dir = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="dnd-bench-scale-"))
    opts = BenchOptions(work_dir=work_dir, steps=args.steps, warmup_steps=args.warmup_steps,
                        micro_batch=args.micro_batch, timeout_s=args.timeout, tune_timeout_s=args.tune_timeout,
                        impl=args.impl, cudnn_benchmark=args.cudnn_benchmark == "on", keep=args.keep)  # fmt: skip
    from dnd_kernels.hyperconv.tiling import TUNE_FILE_ENV

    # Every worker process reads (and the tuning passes write) the same tiles file.
    os.environ[TUNE_FILE_ENV] = args.tune_file or os.environ.get(TUNE_FILE_ENV) or str(work_dir / "tuned-tiles.json")
    env = None
    if torch.cuda.is_available():  # asked in a worker: this process never holds a CUDA context the workers lack
        env = run_isolated("environment", {"git_rev": args.git_rev}, 120, work_dir / "logs" / "environment.log")
        env = None if "status" in env else {k: v for k, v in env.items() if k != "process_s"}
    results = ResultsFile(Path(args.out), args.git_rev, env)
    log(f"dnd bench scale: sections {args.sections}, results to {args.out}, scratch {work_dir}")
    base = TargetSpec(model=args.model, rank=args.rank, chunk=args.chunk, condition=args.condition,
                      preset=args.preset, max_channels=args.max_channels)  # fmt: skip
    try:
        if "zero" in args.sections:
            section_zero(base, args.configs, opts, results.saver("zero"), results.previous("zero"))
        if "largest" in args.sections:
            section_largest(args.largest_models, base, args.largest_configs, opts, results.saver("largest"),
                            results.previous("largest"))  # fmt: skip
        if "generate70b" in args.sections:
            target = replace(base, model=args.generate_model, preset="auto")
            section_generate(target, replace(opts, timeout_s=args.generate_timeout), args.generate_warmup,
                             args.generate_repeats, args.generate_dtype, args.encoder, results.saver("generate70b"))
    finally:
        if not args.keep and not args.work_dir:
            shutil.rmtree(work_dir, ignore_errors=True)
    print(format_table(results.data))
    log(f"results in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
