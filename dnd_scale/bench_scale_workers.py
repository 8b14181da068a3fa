"""The workers of `dnd bench scale`, each one measured configuration, and running one in its own
process: `run_isolated` starts `python -m dnd_scale.bench_scale_workers KIND JOB RESULT
STACKS_EVERY_S` (`worker_command`), which runs `WORKERS[KIND]` on the job file and writes its
record to the result file. A fresh process per configuration keeps the CUDA caching allocator,
DeepSpeed's engine and pinned host buffers of one from counting towards the next, and an
out-of-memory error or a host OOM kill ends only that configuration."""

from __future__ import annotations

import faulthandler
import gc
import json
import os
import resource
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

from dnd_scale.bench_scale_results import REPO, environment
from dnd_scale.bench_scale_targets import CONFIGS, SYNTHETIC_ENCODER, BenchmarkDone, BenchStream, TargetSpec
from dnd_scale.train_config import TrainConfig

# --------------------------------------------------------------------------------------------------
# Workers: one measured configuration each, run in a fresh process


def _device_memory() -> dict[str, int | None]:
    if not torch.cuda.is_available():
        return {"gpu_max_allocated_bytes": None, "gpu_max_reserved_bytes": None}
    return {"gpu_max_allocated_bytes": int(torch.cuda.max_memory_allocated()),
            "gpu_max_reserved_bytes": int(torch.cuda.max_memory_reserved())}  # fmt: skip


def _host_peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


def tile_counts() -> tuple[int, int]:
    """(shapes this process autotuned, shapes whose tile it read from the tune file) so far."""
    from dnd_kernels.hyperconv import tiling

    tuned = tiling.tuned_configs()
    here = sum(1 for v in tuned.values() if v["candidates_ms"])
    return here, len(tuned) - here


def train_worker(job: dict) -> dict:
    """Train `job["target"]`'s generator in `job["run_dir"]` under configuration `job["config"]` for
    `job["steps"]` steps through `train()`; peak memory, step times and the plan's prediction."""
    from dnd_scale.encoder import EncoderConfig
    from dnd_scale.io import read_json, read_jsonl
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
        cudnn_benchmark=bool(job.get("cudnn_benchmark", TrainConfig.cudnn_benchmark)), **CONFIGS[job["config"]],
    )  # fmt: skip
    record: dict[str, Any] = {"config": job["config"], "ds_fields": CONFIGS[job["config"]],
                              "micro_batch": config.micro_batch_size, "bf16": config.bf16, "steps": steps,
                              "cudnn_benchmark": config.cudnn_benchmark}  # fmt: skip
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
        record["tiles_tuned_here"] = tile_counts()[0]
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
    benchmark = bool(job.get("cudnn_benchmark", TrainConfig.cudnn_benchmark))
    if cuda:
        torch.backends.cudnn.benchmark = benchmark  # as the trainer sets it
        torch.cuda.reset_peak_memory_stats()
    with torch.device(device):
        model = HyperConvGenerator(target.generator_config(job.get("impl", "auto")), target.condition,
                                   tok.token_shape, tok.num_tokens).to(dtype)  # fmt: skip
    cond = torch.randn(int(job["micro_batch"]), *target.condition, device=device, dtype=dtype)  # (B, N, L, D)
    record: dict[str, Any] = {"impl": resolve_impl(model.stages[0].impl, device), "micro_batch": int(job["micro_batch"]),
                              "cudnn_benchmark": benchmark}  # fmt: skip
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

        record["tiles_tuned_here"], record["tiles_from_file"] = tile_counts()
        if job.get("tune_file"):
            tiling.save_tuned(job["tune_file"])
    return record


# --------------------------------------------------------------------------------------------------
# Peft key check (the generate worker's last step)


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
# Running a worker in its own process


WORKERS: dict[str, Callable[[dict], dict]] = {
    "train": train_worker,
    "tune": tune_worker,
    "generate": generate_worker,
    "environment": lambda job: environment(job.get("git_rev")),
}


def worker_command(kind: str, job_path: Path, result_path: Path, stacks_every_s: float) -> list[str]:
    """The command line of one worker process (see main)."""
    return [sys.executable, "-m", "dnd_scale.bench_scale_workers", kind, str(job_path), str(result_path),
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


def main(argv: list[str] | None = None) -> int:
    """One worker process (worker_command's arguments): run `WORKERS[KIND]` on the job file JOB and
    write its record to RESULT, printing every thread's stack every STACKS_EVERY_S seconds."""
    kind, job_path, result_path, stacks_every_s = list(sys.argv[1:] if argv is None else argv)[:4]
    faulthandler.dump_traceback_later(float(stacks_every_s), repeat=True)  # where a slow worker is
    record = WORKERS[kind](json.loads(Path(job_path).read_text()))
    faulthandler.cancel_dump_traceback_later()
    Path(result_path).write_text(json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
