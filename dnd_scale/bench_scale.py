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
"""

from __future__ import annotations

import argparse
import faulthandler
import gc
import json
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS_FORMAT = "dnd-bench-scale-1"
SECTIONS = ("zero", "largest", "generate70b")
GIB = 1024**3
TASK = "synthetic"
SYNTHETIC_ENCODER = "synthetic-random"

# The training configurations of the zero section: TrainConfig fields per name.
CONFIGS: dict[str, dict[str, Any]] = {
    "zero0": {"zero_stage": 0},
    "zero2": {"zero_stage": 2},
    "zero3": {"zero_stage": 3},
    "zero3_offload_opt": {"zero_stage": 3, "offload_optimizer": True},
    "zero3_offload_all": {"zero_stage": 3, "offload_optimizer": True, "offload_params": True},
}


def log(message: str) -> None:
    """A progress line with a UTC timestamp (flushed, so a killed run still shows how far it got)."""
    print(f"[{time.strftime('%H:%M:%S', time.gmtime())}] {message}", flush=True)


# --------------------------------------------------------------------------------------------------
# What is trained: a target layout and its generator


@dataclass
class TargetSpec:
    """A LoRA layout (from a model config) and the generator that writes it."""

    model: str
    """config.json of the base model (shapes only), e.g. configs/models/qwen2.5-7b.json."""
    rank: int = 16
    """LoRA rank r."""
    modules: str = "all-linear"
    """LoRA target modules ("all-linear" or names joined by '+')."""
    chunk: int = 512
    """Token chunk width c."""
    condition: tuple[int, int, int] = (16, 1000, 384)
    """(N prompts, L tokens, D dims) of the condition."""
    preset: str = "auto"
    """Generator preset name, or "auto" (the sizing rule `features_for`)."""
    max_channels: int = 2048
    """Cap on the hidden N of an auto-sized generator (GeneratorConfig.max_channels)."""
    num_stages: int = 8
    """Stages of an auto-sized generator (GeneratorConfig.num_stages)."""

    def __post_init__(self) -> None:
        self.condition = tuple(int(v) for v in self.condition)

    def lora_spec(self):
        from dnd_scale.layout import LoraSpec

        modules = "all-linear" if self.modules == "all-linear" else tuple(self.modules.split("+"))
        return LoraSpec(rank=self.rank, alpha=2.0 * self.rank, target_modules=modules)

    def layout(self):
        from dnd_scale.layout import LoraLayout

        return LoraLayout.from_config(self.model, self.lora_spec())

    def tokenizer(self):
        from dnd_scale.tokenizer import WeightTokenizer

        return WeightTokenizer(self.layout(), chunk=self.chunk)

    def generator_config(self, impl: str = "auto"):
        from dnd_scale.generator import GeneratorConfig

        return GeneratorConfig(preset=self.preset, max_channels=self.max_channels, num_stages=self.num_stages,
                               impl=impl)  # fmt: skip

    def sizes(self) -> dict[str, Any]:
        """Geometry and generator size, computed without building anything."""
        from dnd_scale.generator import DEFAULT_KERNEL_SIZE, PRESETS, count_parameters, resolve_features

        tok = self.tokenizer()
        features = resolve_features(self.generator_config(), self.condition, tok.token_shape, tok.num_tokens)
        kernel = PRESETS[self.preset].kernel_size if self.preset in PRESETS else DEFAULT_KERNEL_SIZE
        return {
            "model": Path(self.model).stem,
            "lora_params": tok.layout.num_params,
            "tokens": tok.num_tokens,
            "token_shape": list(tok.token_shape),
            "features": [list(f) for f in features],
            "kernel_size": kernel,
            "generator_params": count_parameters(features, kernel),
        }


# --------------------------------------------------------------------------------------------------
# A synthetic run folder: real writers, random contents


class RandomConditionEncoder:
    """Stands in for the frozen encoder when building condition caches: every prompt's L tokens are
    a fixed N(0, 1) draw seeded by the prompt's position in the pool. It offers what
    `ConditionCache.build` calls, so the cache file is the real format and training reads it as any."""

    def __init__(self, length: int, dim: int, seed: int = 0) -> None:
        self.name, self.length, self.max_tokens, self.dim, self.seed = SYNTHETIC_ENCODER, length, length, dim, seed

    def _check_prompts(self, prompts: Sequence[str]) -> list[str]:
        return list(prompts)

    def token_counts(self, prompts: Sequence[str]) -> list[int]:
        return [self.length] * len(prompts)

    def encode_ragged(self, prompts: Sequence[str]) -> list[torch.Tensor]:
        out = []
        for i, _ in enumerate(prompts):
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
            out.append(torch.randn(self.length, self.dim, generator=gen))  # (L, D)
        return out


def build_synthetic_run(run_dir: Path, target: TargetSpec, seed: int = 0) -> dict[str, Any]:
    """targets/ (one task, one checkpoint of random tokens), shards/ and the condition cache of a run
    for `target`, all through the pipeline's own writers; returns the target's sizes."""
    from dnd_scale.encoder import ConditionCache
    from dnd_scale.shards import ShardConfig, build_shards
    from dnd_scale.targets import PackedTargets, write_common, write_task_targets
    from dnd_scale.rundir import RunDir
    from dnd_scale.train_data import condition_cache_dir

    run_dir = Path(run_dir)
    shutil.rmtree(run_dir, ignore_errors=True)  # the writers add to a folder; start from an empty one
    tok = target.tokenizer()
    layout = tok.layout
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randn((1, tok.num_tokens, *tok.token_shape), generator=gen)  # (K=1, T, H, W)
    write_task_targets(RunDir(run_dir).targets, TASK, tokens)
    del tokens
    write_common(  # one checkpoint has no spread across a trajectory: every criterion weight is 1
        RunDir(run_dir).targets, tok.mask(), torch.ones(tok.num_tokens),
        {**layout.to_dict(), "fingerprint": layout.fingerprint()},
        extra={"tokenizer": tok.state_dict_config()}, fingerprint=layout.fingerprint(),
    )  # fmt: skip
    n, length, dim = target.condition
    pool = [f"synthetic prompt {i}" for i in range(n)]
    build_shards(PackedTargets(RunDir(run_dir).targets), {TASK: pool}, RunDir(run_dir).shards,
                 ShardConfig(num_prompts=n, pairs_per_task=4, shard_size=4, seed=seed), progress=False)  # fmt: skip
    cache_dir = condition_cache_dir(run_dir, SYNTHETIC_ENCODER, length, "float32")
    ConditionCache.build(RandomConditionEncoder(length, dim, seed), pool, cache_dir / f"{TASK}.safetensors")
    return target.sizes()


class BenchStream:
    """Every step the same full micro-batch (the run's one checkpoint, a fixed prompt set), so step
    times measure the engine, not the data path; after `steps` optimizer steps it raises
    `BenchmarkDone`, which ends `train()` before its final checkpoint and export."""

    def __init__(self, data, config, steps: int) -> None:
        n = data.num_prompts
        task = data.targets.tasks[0]
        b = config.micro_batch_size
        self.batch = {
            "prompt_ids": torch.arange(n).repeat(b, 1),  # (B, N)
            "task": [task] * b,
            "checkpoint": torch.zeros(b, dtype=torch.long),  # (B,)
            "tokens": data.targets.gather([task] * b, [0] * b),  # (B, T, H, W)
        }
        self.limit = steps * config.grad_accum_steps
        self.served = 0

    def __next__(self) -> dict:
        if self.served == self.limit:
            raise BenchmarkDone(self.served)
        self.served += 1
        return self.batch

    def state_dict(self) -> dict:
        return {"served": self.served}

    def load_state_dict(self, state) -> None:
        self.served = int(state["served"])


class BenchmarkDone(Exception):
    """The measured steps are done (raised by BenchStream inside train())."""


# --------------------------------------------------------------------------------------------------
# Predictions (dnd plan's functions)


def predicted_memory(features: list, kernel_size: int, micro_batch: int, zero_stage: int,
                     offload_optimizer: bool = False, offload_params: bool = False) -> dict[str, Any]:
    """`dnd plan`'s memory per GPU for one configuration on one GPU: model states + stage activations
    (bf16, as plan assumes); with offload, DeepSpeed's estimators' GPU and CPU parts."""
    from dnd_scale.generator import count_parameters, stage_parameters
    from dnd_scale.plan import activation_bytes_per_sample, model_state_bytes, offload_model_state_bytes

    features = [tuple(f) for f in features]
    params = count_parameters(features, kernel_size)
    largest = max(stage_parameters(a, b, kernel_size) for a, b in zip(features, features[1:]))
    activations = activation_bytes_per_sample(features) * micro_batch
    if offload_optimizer or offload_params:
        gpu, cpu = offload_model_state_bytes(params, largest, zero_stage, 1, offload_params=offload_params)
    else:
        gpu, cpu = model_state_bytes(params, largest, zero_stage, 1), None
    return {"gpu_bytes": gpu + activations, "model_states_gpu_bytes": gpu, "activation_bytes": activations,
            "model_states_cpu_bytes": cpu, "generator_params": params}  # fmt: skip


def _error(measured: int | None, predicted: int | None) -> float | None:
    """(predicted - measured) / measured, or None when either is missing."""
    if not measured or predicted is None:
        return None
    return (predicted - measured) / measured


# --------------------------------------------------------------------------------------------------
# Workers: one measured configuration, run in a fresh process


def _device_memory() -> dict[str, int | None]:
    if not torch.cuda.is_available():
        return {"gpu_max_allocated_bytes": None, "gpu_max_reserved_bytes": None}
    return {"gpu_max_allocated_bytes": int(torch.cuda.max_memory_allocated()),
            "gpu_max_reserved_bytes": int(torch.cuda.max_memory_reserved())}  # fmt: skip


def _host_peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


def train_worker(job: dict) -> dict:
    """Train `job["target"]`'s generator in `job["run_dir"]` under configuration `job["config"]` for
    `job["steps"]` steps through `train()`; peak memory, step times and the plan's prediction."""
    from dnd_scale.encoder import EncoderConfig
    from dnd_scale.io import read_json, read_jsonl
    from dnd_scale.train_config import TrainConfig
    from dnd_scale.train_metrics import METRICS
    from dnd_scale.trainer import TRAIN_INFO, train

    target = TargetSpec(**job["target"])
    cuda = torch.cuda.is_available()
    steps, warmup = int(job["steps"]), int(job["warmup_steps"])
    out_dir = Path(job["out_dir"])
    config = TrainConfig(
        generator=target.generator_config(job.get("impl", "auto")),
        encoder=EncoderConfig(name=SYNTHETIC_ENCODER, max_length=target.condition[1]),
        micro_batch_size=int(job["micro_batch"]),
        steps=steps + 1,  # BenchStream stops the run before the last step: no final checkpoint
        warmup_steps=1, checkpoint_every=2**30, log_every=1, num_workers=0,
        bf16=bool(job.get("bf16", cuda)), output_dir=str(out_dir),
        **CONFIGS[job["config"]],
    )  # fmt: skip
    record: dict[str, Any] = {"config": job["config"], "ds_fields": CONFIGS[job["config"]],
                              "micro_batch": config.micro_batch_size, "bf16": config.bf16, "steps": steps}
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    try:
        train(config, job["run_dir"], make_stream=lambda data, cfg, rank, world: BenchStream(data, cfg, steps))
        raise RuntimeError("train() returned although BenchStream should have stopped it")
    except BenchmarkDone:
        record["status"] = "ok"
    except Exception as err:  # noqa: BLE001 - an OOM (or any failure) is this configuration's result
        if not _is_oom(err):
            raise
        record.update(status="oom", error=f"{type(err).__name__}: {str(err).splitlines()[0][:300]}")
    if cuda:
        torch.cuda.synchronize()
    record["wall_s"] = time.perf_counter() - start
    record.update(_device_memory())
    record["host_peak_rss_bytes"] = _host_peak_rss()
    info_path = out_dir / TRAIN_INFO
    info = read_json(info_path, "train_info") if info_path.is_file() else {}
    record["impl"] = info.get("impl")
    if record["impl"] == "triton":  # shapes autotuned in this process (not read from the tune file)
        from dnd_kernels.hyperconv import tiling

        record["tiles_tuned_here"] = sum(1 for v in tiling.tuned_configs().values() if v["candidates_ms"])
    record["features"] = info.get("features")
    record["parameters"] = info.get("parameters")
    metrics = read_jsonl(out_dir / METRICS) if (out_dir / METRICS).is_file() else []
    times = [m["step_time_s"] for m in metrics]
    record["step_times_s"] = times
    record["median_step_s"] = statistics.median(times[warmup:]) if len(times) > warmup else None
    record["losses"] = [m["loss"] for m in metrics]
    return record


def generate_worker(job: dict) -> dict:
    """Random-init auto-sized generator for `job["target"]`, exported like `dnd train` exports, loaded
    by `AdapterGenerator` and run prompts → PEFT folder: memory, latency and the peft key check."""
    from dnd_scale.config import to_dict
    from dnd_scale.encoder import resolve_encoder_path
    from dnd_scale.export import ADAPTER_WEIGHTS
    from dnd_scale.generate import AdapterGenerator
    from dnd_scale.generator import HyperConvGenerator, resolve_impl
    from dnd_scale.generator_export import export_folder, write_export

    target = TargetSpec(**job["target"])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tok = target.tokenizer()
    layout = tok.layout
    work = Path(job["work_dir"])
    export_dir = export_folder(work)
    t0 = time.perf_counter()
    torch.manual_seed(0)
    with torch.device(device):  # random init where the generator runs (fast on a GPU)
        module = HyperConvGenerator(target.generator_config(), target.condition, tok.token_shape, tok.num_tokens)
    encoder_name = resolve_encoder_path(job.get("encoder"))[0]
    write_export(export_dir, module.state_dict(), {
        "generator": to_dict(module.config),
        "layout": {**layout.to_dict(), "fingerprint": layout.fingerprint()},
        "tokenizer": tok.state_dict_config(),
        "encoder": {"name": encoder_name, "length": target.condition[1], "dim": target.condition[2]},
        "num_prompts": target.condition[0], "base_model": None, "step": 0, "random_init": True,
    }, writer="dnd bench scale")  # fmt: skip
    record: dict[str, Any] = {"features": [list(f) for f in module.features], "kernel_size": module.config.kernel_size,
                              "parameters": sum(p.numel() for p in module.parameters()), "encoder": encoder_name,
                              "export_s": time.perf_counter() - t0}  # fmt: skip
    del module
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    t0 = time.perf_counter()
    generator = AdapterGenerator(export_dir, device, job.get("impl"))
    record["load_s"] = time.perf_counter() - t0
    record["impl"] = resolve_impl(generator.generator.stages[0].impl, device)
    if device.type == "cuda":
        record["gpu_after_load_bytes"] = int(torch.cuda.memory_allocated())
    prompts = [f"Question {i}: which of the options best completes the sentence about item {i}?"
               for i in range(generator.num_prompts)]  # fmt: skip
    adapter = work / "adapter"
    timings: dict[str, list[float]] = {"generate_s": [], "tokens_s": []}
    try:
        for i in range(int(job["warmup"]) + int(job["repeats"])):
            sync()
            t0 = time.perf_counter()
            generator.tokens(prompts)  # encoder + generator forward
            sync()
            t1 = time.perf_counter()
            generator.generate(prompts, adapter, dtype=job["dtype"], overwrite=True)  # prompts -> PEFT folder on disk
            sync()
            t2 = time.perf_counter()
            if i >= int(job["warmup"]):
                timings["tokens_s"].append(t1 - t0)
                timings["generate_s"].append(t2 - t1)
        record["status"] = "ok"
    except Exception as err:  # noqa: BLE001
        if not _is_oom(err):
            raise
        record.update(status="oom", error=f"{type(err).__name__}: {str(err).splitlines()[0][:300]}")
    record.update(_device_memory())
    record["host_peak_rss_bytes"] = _host_peak_rss()
    record.update({k: v for k, v in timings.items()})
    record["median_generate_s"] = statistics.median(timings["generate_s"]) if timings["generate_s"] else None
    record["median_tokens_s"] = statistics.median(timings["tokens_s"]) if timings["tokens_s"] else None
    record["adapter_dtype"] = job["dtype"]
    if record["status"] == "ok":
        record["adapter_bytes"] = (adapter / ADAPTER_WEIGHTS).stat().st_size
        record["peft_check"] = peft_key_check(adapter / ADAPTER_WEIGHTS, target.model, layout.to_peft_config())
    return record


def tune_worker(job: dict) -> dict:
    """The generator's forward and backward at the training micro-batch, twice, outside DeepSpeed:
    the first call includes the kernels' autotuning (every candidate tile compiled and timed per
    shape, cuDNN's algorithm search), the second is a plain call. The tiles chosen are saved to
    `job["tune_file"]` (DND_KERNELS_TUNE_FILE), so the training workers after it only compile the
    chosen tiles; `tiles_from_file` counts the shapes an earlier call had already tuned."""
    from dnd_scale.generator import HyperConvGenerator, resolve_impl

    target = TargetSpec(**job["target"])
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if job.get("bf16", cuda) else torch.float32
    tok = target.tokenizer()
    if cuda:
        torch.backends.cudnn.benchmark = True  # as the trainer sets it (train.cudnn_benchmark's default)
        torch.cuda.reset_peak_memory_stats()
    with torch.device(device):
        model = HyperConvGenerator(target.generator_config(job.get("impl", "auto")), target.condition,
                                   tok.token_shape, tok.num_tokens).to(dtype)  # fmt: skip
    cond = torch.randn(int(job["micro_batch"]), *target.condition, device=device, dtype=dtype)  # (B, N, L, D)
    record: dict[str, Any] = {"impl": resolve_impl(model.stages[0].impl, device), "micro_batch": int(job["micro_batch"])}
    calls = []
    for _ in range(2):
        start = time.perf_counter()
        model(cond).float().square().mean().backward()
        if cuda:
            torch.cuda.synchronize()
        calls.append(time.perf_counter() - start)
    record.update(status="ok", first_call_s=calls[0], second_call_s=calls[1], **_device_memory())
    if record["impl"] == "triton":
        from dnd_kernels.hyperconv import tiling

        tuned = tiling.tuned_configs()
        record["tiles_tuned_here"] = sum(1 for v in tuned.values() if v["candidates_ms"])
        record["tiles_from_file"] = len(tuned) - record["tiles_tuned_here"]
        if job.get("tune_file"):
            tiling.save_tuned(job["tune_file"])
    return record


WORKERS: dict[str, Callable[[dict], dict]] = {
    "train": train_worker,
    "tune": tune_worker,
    "generate": generate_worker,
    "environment": lambda job: environment(job.get("git_rev")),
}


def worker_command(kind: str, job_path: Path, result_path: Path, stacks_every_s: float) -> list[str]:
    """The command line of one worker process (see main's --worker)."""
    return [sys.executable, "-m", "dnd_scale.bench_scale", "--worker", kind, str(job_path), str(result_path),
            f"{stacks_every_s:g}"]  # fmt: skip


def run_isolated(kind: str, job: dict, timeout_s: float, log_path: Path) -> dict:
    """Run worker `kind` on `job` in a fresh Python process (its own CUDA context and allocator);
    its record, or {"status": "oom" | "killed" | "failed" | "timeout", ...} when it did not finish.

    The worker prints every thread's Python stack to its log every quarter of `timeout_s`, so a
    timed-out record's log tail says where it was. The worker runs in its own process group, killed
    whole on timeout and also when this process ends early (SIGTERM, Ctrl-C): a worker left running
    would hold the GPU under the next measurement."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    job_path, result_path = log_path.with_suffix(".job.json"), log_path.with_suffix(".result.json")
    job_path.write_text(json.dumps(job))
    result_path.unlink(missing_ok=True)
    cmd = worker_command(kind, job_path, result_path, max(timeout_s / 4, 1.0))
    start = time.perf_counter()
    with open(log_path, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, cwd=REPO)
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            rc = None
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)  # the worker and anything it started
                proc.wait()
    elapsed = time.perf_counter() - start
    tail = log_path.read_text(errors="replace")[-2000:]
    if rc == 0 and result_path.is_file():
        record = json.loads(result_path.read_text())
    elif rc is None:
        record = {"status": "timeout", "error": f"no result within {timeout_s:.0f} s", "log_tail": tail}
    elif rc < 0:
        # SIGKILL without our timeout: most often the kernel's OOM killer (host memory).
        record = {"status": "killed", "error": f"killed by signal {-rc} (host out of memory?)", "log_tail": tail}
    else:
        status = "oom" if "out of memory" in tail.lower() else "failed"
        record = {"status": status, "error": f"exit code {rc}", "log_tail": tail}
    record["process_s"] = elapsed
    return record


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
    bf16: bool | None = None  # None: on a GPU
    keep: bool = False  # keep run folders (else removed when a section is done with them)
    isolate: bool = True  # a subprocess per configuration (False: in this process, for tests)

    def job(self, **fields: Any) -> dict:
        job = {"steps": self.steps, "warmup_steps": self.warmup_steps, "micro_batch": self.micro_batch,
               "impl": self.impl, **fields}  # fmt: skip
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
    fields = CONFIGS[config]
    job = opts.job(target=asdict(target), run_dir=str(run_dir), config=config, out_dir=str(run_dir / f"gen-{config}"))
    record = opts.run("train", job, name)
    record.setdefault("config", config)
    prediction = predicted_memory(sizes["features"], sizes["kernel_size"], opts.micro_batch, fields["zero_stage"],
                                  fields.get("offload_optimizer", False), fields.get("offload_params", False))
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
        log(f"zero: {config} {record['status']}: " + _summary(record))
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
            log(f"largest: {sizes['model']} {config} {record['status']}: " + _summary(record))
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
    log(f"generate: {record['status']}: " + _summary(record))
    save(result)
    if not opts.keep:
        shutil.rmtree(work, ignore_errors=True)
    return result


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
# Peft key check


def peft_key_check(adapter_file: str | os.PathLike, model_config: Any, peft_config) -> dict:
    """Compare a saved adapter's keys and shapes with what peft builds for `model_config` under
    `peft_config`: the base model is built on the meta device (no memory), wrapped with
    get_peft_model, and get_peft_model_state_dict's keys and shapes are the expected ones."""
    import transformers
    from peft import get_peft_model, get_peft_model_state_dict
    from safetensors import safe_open

    from dnd_scale.layout import load_config_dict

    raw = load_config_dict(model_config)
    model_type = raw.pop("model_type")
    hf_config = transformers.AutoConfig.for_model(model_type, **{k: v for k, v in raw.items() if not k.startswith("_")})
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(hf_config)
        peft_model = get_peft_model(model, peft_config)
    expected = {k: tuple(v.shape) for k, v in get_peft_model_state_dict(peft_model).items()}
    with safe_open(str(adapter_file), framework="pt") as f:
        saved = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    missing = sorted(set(expected) - set(saved))
    unexpected = sorted(set(saved) - set(expected))
    shapes = sorted(k for k in set(expected) & set(saved) if expected[k] != saved[k])
    return {
        "match": not (missing or unexpected or shapes),
        "expected_keys": len(expected), "saved_keys": len(saved),
        "missing": missing[:5], "unexpected": unexpected[:5],
        "shape_mismatch": [(k, expected[k], saved[k]) for k in shapes[:5]],
        "num_missing": len(missing), "num_unexpected": len(unexpected), "num_shape_mismatch": len(shapes),
    }  # fmt: skip


# --------------------------------------------------------------------------------------------------
# Results file and table


def environment(git_rev: str | None = None) -> dict:
    """GPU, versions, git revision (`git_rev` when given: a copy of the tree may have no .git), host."""
    dirty = None
    if git_rev is None:
        try:
            git_rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                                     check=True).stdout.strip()  # fmt: skip
            dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                                        capture_output=True, text=True).stdout.strip())  # fmt: skip
        except (OSError, subprocess.CalledProcessError):
            git_rev = "unknown"
    env: dict[str, Any] = {"gpu": None, "gpu_memory_bytes": None, "torch": torch.__version__, "cuda": torch.version.cuda,
                           "git_rev": git_rev, "git_dirty": dirty, "cpus": os.cpu_count(),
                           "host_memory_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
                           "date": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())}  # fmt: skip
    for name in ("deepspeed", "triton", "peft", "transformers"):
        try:
            env[name] = __import__(name).__version__
        except ImportError:
            env[name] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env["gpu"], env["gpu_memory_bytes"] = props.name, int(props.total_memory)
    return env


class ResultsFile:
    """The benchmark's JSON: loaded if present (sections of an earlier call are kept), rewritten
    atomically whenever a section reports progress."""

    def __init__(self, path: Path, git_rev: str | None = None, env: dict | None = None) -> None:
        from dnd_scale.io import read_json

        self.path = path
        self.data = read_json(path, "scale results") if path.is_file() else {"format": RESULTS_FORMAT, "sections": {}}
        self.data.setdefault("environments", []).append(env or environment(git_rev))

    def previous(self, section: str) -> dict | None:
        """The section as an earlier call left it (None if it has none)."""
        return self.data["sections"].get(section)

    def saver(self, section: str) -> Callable[[dict], None]:
        """A callback that stores `section`'s result and rewrites the file; records measured in this
        call are stamped with this call's index into "environments"."""
        index = len(self.data["environments"]) - 1

        def save(result: dict) -> None:
            from dnd_scale.io import write_json

            for record in [*result.get("configs", {}).values(),
                           *(a for t in result.get("targets", []) for a in t["attempts"].values())]:  # fmt: skip
                record.setdefault("environment_index", index)
            if section == "generate70b":
                result.setdefault("environment_index", index)
            self.data["sections"][section] = {**result, "environment": self.data["environments"][-1]}
            write_json(self.path, self.data)

        return save


def _gib(value: int | None) -> str:
    return "-" if value is None else f"{value / GIB:.1f}"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:+.0%}"


def _summary(record: dict) -> str:
    if record.get("status") != "ok":
        return record.get("error", "")
    parts = [
        f"GPU peak {_gib(record.get('gpu_max_allocated_bytes'))} GiB alloc / "
        f"{_gib(record.get('gpu_max_reserved_bytes'))} reserved",
        f"host RSS {_gib(record.get('host_peak_rss_bytes'))} GiB",
    ]
    if record.get("median_step_s") is not None:
        parts.append(f"median step {record['median_step_s']:.3f} s")
    if record.get("median_generate_s") is not None:
        parts.append(f"prompts->folder {record['median_generate_s'] * 1e3:.0f} ms")
    return ", ".join(parts)


def format_table(data: dict) -> str:
    lines = []
    zero = data["sections"].get("zero")
    if zero:
        lines += [f"zero: {zero['sizes']['model']} target, {zero['sizes']['generator_params'] / 1e9:.2f} B generator, "
                  f"micro-batch {zero['micro_batch']}",
                  "| config | status | GPU alloc GiB | GPU reserved GiB | plan GiB | plan error (alloc) | host RSS GiB "
                  "| plan host GiB | median step s |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        tune = zero.get("tuning")
        if tune:
            lines.insert(1, f"tuning pass (forward + backward at the micro-batch, no DeepSpeed): {tune['status']}"
                         + (f", first call {tune['first_call_s']:.1f} s, second {tune['second_call_s']:.2f} s"
                            if tune["status"] == "ok" else f": {tune.get('error', '')}"))  # fmt: skip
        for name, r in zero["configs"].items():
            p = r["predicted"]
            step = "-" if r.get("median_step_s") is None else f"{r['median_step_s']:.3f}"
            cells = [name, r["status"], _gib(r.get("gpu_max_allocated_bytes")), _gib(r.get("gpu_max_reserved_bytes")),
                     _gib(p["gpu_bytes"]), _pct(r.get("predicted_error")), _gib(r.get("host_peak_rss_bytes")),
                     _gib(p["model_states_cpu_bytes"]), step]  # fmt: skip
            lines.append("| " + " | ".join(cells) + " |")
    largest = data["sections"].get("largest")
    if largest:
        lines += ["", "largest: | target | tokens | generator B params | result |", "|---|---|---|---|"]
        for t in largest["targets"]:
            tried = ", ".join(f"{c}: {a['status']}" for c, a in t["attempts"].items())
            lines.append(f"| {t['model']} | {t['sizes']['tokens']} | {t['sizes']['generator_params'] / 1e9:.2f} | {tried} |")
        lines.append(f"largest that trains: {largest['largest_fit']}")
    gen = data["sections"].get("generate70b")
    if gen:
        lines += ["", f"generate70b: {gen['sizes']['model']}, {gen['sizes']['generator_params'] / 1e9:.2f} B generator: "
                  f"{gen['status']}; " + _summary(gen)]  # fmt: skip
        if gen.get("peft_check"):
            c = gen["peft_check"]
            lines.append(f"peft keys/shapes equal: {c['match']} ({c['saved_keys']} saved, {c['expected_keys']} expected)")
        lines.append(f"weights after load {_gib(gen.get('gpu_after_load_bytes'))} GiB vs 4 B/param "
                     f"{_gib(gen['predicted_weights_bytes'])} GiB ({_pct(gen.get('predicted_error_after_load'))})")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Command line


def _condition(text: str) -> tuple[int, int, int]:
    parts = tuple(int(v) for v in text.split(","))
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"condition is N,L,D (e.g. 16,1000,384), got {text!r}")
    return parts


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--worker"]:  # a configuration measured in its own process (run_isolated)
        kind, job_path, result_path, stacks_every_s = argv[1:5]
        faulthandler.dump_traceback_later(float(stacks_every_s), repeat=True)  # where a slow worker is
        record = WORKERS[kind](json.loads(Path(job_path).read_text()))
        faulthandler.cancel_dump_traceback_later()
        Path(result_path).write_text(json.dumps(record))
        return 0
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
    parser.add_argument("--tune-timeout", type=float, default=400.0,
                        help="seconds for each target's tuning pass (autotuning before its configurations)")
    parser.add_argument("--tune-file", help="kernel tiles file kept across calls (DND_KERNELS_TUNE_FILE; "
                        "default: that variable, else one in the scratch folder)")
    parser.add_argument("--generate-timeout", type=float, default=540.0,
                        help="seconds for the generation worker (export, load, warm-up autotuning, repeats)")
    parser.add_argument("--git-rev", help="revision to record when the tree has no .git")
    args = parser.parse_args(argv)

    # SIGTERM (a job's time limit, `timeout`) unwinds like Ctrl-C: the running worker is killed and
    # the results saved so far stay.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    work_dir = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="dnd-bench-scale-"))
    opts = BenchOptions(work_dir=work_dir, steps=args.steps, warmup_steps=args.warmup_steps,
                        micro_batch=args.micro_batch, timeout_s=args.timeout, tune_timeout_s=args.tune_timeout,
                        impl=args.impl, keep=args.keep)  # fmt: skip
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
