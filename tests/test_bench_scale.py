"""`dnd bench scale` at tiny sizes on CPU: the same code path the GPU run takes (synthetic run folder,
train() under ZeRO 0 and 3, a worker in its own process, export → AdapterGenerator → PEFT folder,
the meta-device peft key check), with the GPU-only figures (memory) None here."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from tinymodels import tiny_config
from tinyrun import make_tiny_encoder

from dnd_scale import bench_scale, bench_scale_workers
from dnd_scale.bench_scale import BenchOptions
from dnd_scale.bench_scale_results import RESULTS_FORMAT, ResultsFile, format_table
from dnd_scale.bench_scale_targets import TargetSpec
from dnd_scale.bench_scale_workers import peft_key_check
from dnd_scale.layout import LoraLayout, LoraSpec

CUDA = torch.cuda.is_available()


@pytest.fixture(scope="module")
def tiny_target(tmp_path_factory) -> TargetSpec:
    """One Qwen2 layer, all-linear r=2, chunk 16, condition (4, 8, 16), the auto-sized generator
    (default stages and channel cap, so `dnd plan` sizes the same one)."""
    folder = tmp_path_factory.mktemp("model")
    tiny_config(layers=1).to_json_file(folder / "config.json")
    return TargetSpec(model=str(folder / "config.json"), rank=2, chunk=16, condition=(4, 8, 16), preset="auto")


def _options(tmp_path, **kw) -> BenchOptions:
    return BenchOptions(work_dir=tmp_path / "work", steps=3, warmup_steps=1, micro_batch=2, bf16=False, **kw)


def _check_training_record(record: dict, steps: int, features: list) -> None:
    assert record["status"] == "ok", record.get("log_tail") or record.get("error")
    assert len(record["step_times_s"]) == steps and all(t > 0 for t in record["step_times_s"])
    assert record["median_step_s"] > 0
    assert len(record["losses"]) == steps and all(math.isfinite(v) for v in record["losses"])
    assert record["features"] == features and record["features_match_plan"] is True
    assert record["host_peak_rss_bytes"] > 0
    p = record["predicted"]
    assert p["gpu_bytes"] == p["model_states_gpu_bytes"] + p["activation_bytes"] > 0
    if CUDA:
        assert record["gpu_max_allocated_bytes"] > 0 and record["predicted_error"] is not None
    else:  # memory figures are GPU-only
        assert record["gpu_max_allocated_bytes"] is None and record["predicted_error"] is None


def test_zero_section_trains_through_train_and_writes_results(tmp_path, tiny_target, one_thread, monkeypatch):
    """ZeRO-0 in this process, then ZeRO-3 in its own process (the GPU run's way) in a second call
    that adds to the first call's section: both through train()."""
    results = ResultsFile(tmp_path / "scale.json")
    bench_scale.section_zero(tiny_target, ["zero0"], _options(tmp_path, isolate=False), results.saver("zero"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the worker process: tiny shapes gain nothing from threads
    opts = _options(tmp_path)
    results = ResultsFile(tmp_path / "scale.json", git_rev="abc123")  # a second call, same file
    section = bench_scale.section_zero(tiny_target, ["zero3"], opts, results.saver("zero"), results.previous("zero"))
    data = json.loads((tmp_path / "scale.json").read_text())
    assert data["format"] == RESULTS_FORMAT
    first_env, env = data["environments"]
    assert env["torch"] == torch.__version__ and env["deepspeed"] and env["git_rev"] == "abc123"
    assert first_env["git_rev"] not in (None, "abc123")
    saved = data["sections"]["zero"]
    assert list(saved["configs"]) == ["zero0", "zero3"] and saved["environment"] == env
    assert [saved["configs"][c]["environment_index"] for c in ("zero0", "zero3")] == [0, 1]
    assert saved["dnd_plan"]["features_equal"] is True
    tune = saved["tuning"]  # the second call's tuning pass, in its own process like the configurations
    assert tune["status"] == "ok" and tune["first_call_s"] > 0 and tune["second_call_s"] > 0 and "process_s" in tune
    assert tune["impl"] == ("triton" if CUDA else "torch") and tune["micro_batch"] == opts.micro_batch
    assert tune["cudnn_benchmark"] is False and saved["configs"]["zero3"]["cudnn_benchmark"] is False  # the default
    for config, stage in (("zero0", "zero0"), ("zero3", "zero3")):  # the prediction is `dnd plan`'s own number
        assert saved["configs"][config]["predicted"]["gpu_bytes"] == saved["dnd_plan"]["memory_world1_bytes"][stage]
    for config in ("zero0", "zero3"):
        _check_training_record(saved["configs"][config], opts.steps, section["sizes"]["features"])
    assert "process_s" in saved["configs"]["zero3"] and "process_s" not in saved["configs"]["zero0"]
    # ZeRO 0 and 3 train the same generator from the same seed on the same batch: same first loss.
    first = [saved["configs"][c]["losses"][0] for c in ("zero0", "zero3")]
    assert first[0] == pytest.approx(first[1], rel=1e-4)
    table = format_table(data)
    assert "| zero0 | ok |" in table and "| zero3 | ok |" in table
    assert not (opts.work_dir / "run-zero").exists()  # scratch removed unless --keep


def test_isolated_worker_timeout(tmp_path):
    # A worker past its time limit is killed (with anything it started) and reported, not waited for.
    slow = bench_scale_workers.run_isolated("train", {}, timeout_s=0.01, log_path=tmp_path / "logs" / "slow.log")
    assert slow["status"] == "timeout" and slow["process_s"] < 60


def test_a_stopped_benchmark_kills_its_running_worker(tmp_path):
    """SIGTERM to the benchmark (a job's time limit) while a worker runs: the worker's process group
    is killed too, so it cannot hold the GPU under the next measurement (it did, once, before this)."""
    pid_file = tmp_path / "worker.pid"
    child = textwrap.dedent(f"""
        import signal, sys
        from pathlib import Path
        from dnd_scale import bench_scale_workers
        bench_scale_workers.worker_command = lambda *args: [sys.executable, "-c",
            "import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(120)"]
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))  # as bench_scale.main() does
        bench_scale_workers.run_isolated("train", {{}}, 120, Path({str(tmp_path / "logs" / "w.log")!r}))
    """)  # fmt: skip
    bench = subprocess.Popen([sys.executable, "-c", child])
    deadline = time.monotonic() + 60
    while not (pid_file.is_file() and pid_file.read_text()) and time.monotonic() < deadline:
        time.sleep(0.1)
    worker = int(pid_file.read_text())
    bench.send_signal(signal.SIGTERM)
    assert bench.wait(timeout=30) == 128 + signal.SIGTERM
    deadline = time.monotonic() + 10
    while _alive(worker) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(worker)


def _alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie waiting for its parent to reap it counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def test_a_timed_out_worker_logs_where_it_was(tmp_path):
    # The worker prints its stack every quarter of the limit: a timeout's log tail names the line.
    job = tmp_path / "job.json"
    job.write_text("{}")
    code = ("import sys, time; from dnd_scale import bench_scale_workers; "
            "bench_scale_workers.WORKERS['stuck'] = lambda job: time.sleep(3) or {}; "
            f"sys.exit(bench_scale_workers.main(['stuck', {str(job)!r}, {str(tmp_path / 'r.json')!r}, '0.5']))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "Thread" in out.stderr and "<lambda>" in out.stderr, out.stderr


def test_generate_section_folder_matches_peft(tmp_path, tiny_target, one_thread):
    encoder = make_tiny_encoder(tmp_path / "encoder", dim=16)
    results = ResultsFile(tmp_path / "scale.json")
    target = tiny_target
    opts = _options(tmp_path, isolate=False, keep=True)
    section = bench_scale.section_generate(target, opts, warmup=1, repeats=2, dtype="bfloat16", encoder=str(encoder),
                                           save=results.saver("generate70b"))  # fmt: skip
    saved = json.loads((tmp_path / "scale.json").read_text())["sections"]["generate70b"]
    assert saved["status"] == "ok" and saved["encoder"] == str(encoder)
    assert len(saved["generate_s"]) == 2 and saved["median_generate_s"] > 0 and saved["median_tokens_s"] > 0
    assert saved["parameters"] == section["sizes"]["generator_params"]
    check = saved["peft_check"]
    layout = target.layout()
    assert check["match"] is True and check["saved_keys"] == check["expected_keys"] == len(layout.matrices)
    assert (saved["gpu_max_allocated_bytes"] is None) == (not CUDA)

    adapter = tmp_path / "work" / "generate" / "adapter" / "adapter_model.safetensors"
    # The check really compares: another model's layout (two layers) misses keys ...
    other = tmp_path / "other.json"
    tiny_config(layers=2).to_json_file(other)
    wrong = peft_key_check(adapter, other, LoraLayout.from_config(other, target.lora_spec()).to_peft_config())
    assert wrong["match"] is False and wrong["num_missing"] == len(layout.matrices)
    # ... and another rank gives every key a wrong shape.
    rank4 = LoraLayout.from_config(target.model, LoraSpec(rank=4)).to_peft_config()
    wrong_rank = peft_key_check(adapter, target.model, rank4)
    assert wrong_rank["match"] is False and wrong_rank["num_shape_mismatch"] == len(layout.matrices)


def test_offload_prediction_follows_deepspeed_estimators():
    from dnd_scale.plan import model_state_bytes, offload_model_state_bytes

    params, largest = 10**9, 10**8
    gpu, cpu = offload_model_state_bytes(params, largest, 3, 1)
    assert gpu == 4 * largest + 2 * params and cpu == int(16 * 1.5 * params)  # bf16 params on GPU; fp32 Adam on CPU
    gpu_all, cpu_all = offload_model_state_bytes(params, largest, 3, 1, offload_params=True)
    assert gpu_all == 4 * largest and cpu_all > cpu
    assert offload_model_state_bytes(params, largest, 2, 1)[0] == 2 * params < model_state_bytes(params, largest, 2, 1)
    with pytest.raises(ValueError, match="ZeRO-3"):
        offload_model_state_bytes(params, largest, 2, 1, offload_params=True)


def test_largest_section_records_what_fits(tmp_path, tiny_target, one_thread):
    two_layers = tmp_path / "two.json"
    tiny_config(layers=2).to_json_file(two_layers)
    results = ResultsFile(tmp_path / "scale.json")
    opts = _options(tmp_path, isolate=False, cudnn_benchmark=False)
    section = bench_scale.section_largest([tiny_target.model, str(two_layers)], tiny_target, ["zero3"], opts,
                                          results.saver("largest"))  # fmt: skip
    saved = json.loads((tmp_path / "scale.json").read_text())["sections"]["largest"]
    assert [t["fits"] for t in saved["targets"]] == [True, True]
    assert [t["sizes"]["tokens"] for t in saved["targets"]] == [43, 86]  # one layer's tokens, then two layers'
    assert saved["largest_fit"]["model"] == "two" and saved["largest_fit"]["config"] == "zero3"
    assert saved["targets"][1]["attempts"]["zero3"]["status"] == "ok"
    assert all(t["tuning"]["status"] == "ok" for t in saved["targets"])
    # --cudnn-benchmark off reaches the tuning pass and the trainer's config (train.cudnn_benchmark).
    assert [(t["tuning"]["cudnn_benchmark"], t["attempts"]["zero3"]["cudnn_benchmark"]) for t in saved["targets"]] \
        == [(False, False)] * 2  # each target's shapes tuned before it trains
    # A later call for another model keeps these entries; the largest fit is the largest of all.
    previous = {**section, "targets": section["targets"][:1]}
    bench_scale._update_largest_fit(previous)
    assert previous["largest_fit"]["model"] == "config"


H200_RESULTS = ("scale_h200.json", "scale_h200_triton_a.json", "scale_h200_triton_b.json")


def test_plan_predicts_the_peaks_measured_on_an_h200(capsys, tmp_path):
    """The committed H200 measurements (the 7B target under every configuration, impl torch and
    triton; the 72B target under ZeRO-3) against `dnd plan` as the code makes it now (`--repredict`):
    within 5% of the measured peak without offload; with CPU offload an underestimate, of at most 40%
    (DeepSpeed's offload estimators count only the gathered largest stage)."""
    results = Path(bench_scale.REPO) / "benchmarks" / "results"
    checked = {"plain": 0, "offload": 0}
    for name in H200_RESULTS:
        copy = tmp_path / name
        copy.write_text((results / name).read_text())
        assert bench_scale.main(["--repredict", str(copy), "--git-rev", "test"]) == 0
        data = json.loads(copy.read_text())
        records = [*data["sections"]["zero"]["configs"].values(),
                   *(a for t in data["sections"].get("largest", {}).get("targets", []) for a in t["attempts"].values())]
        for record in records:
            assert record["status"] == "ok" and record["predicted_now"]["git_rev"] == "test"
            error = record["predicted_now"]["error"]
            assert error == (record["predicted_now"]["gpu_bytes"] - record["gpu_max_allocated_bytes"]) / record["gpu_max_allocated_bytes"]
            offload = record["ds_fields"].get("offload_optimizer", False)
            assert (-0.40 <= error < 0) if offload else abs(error) <= 0.05, (name, record["config"], error)
            checked["offload" if offload else "plain"] += 1
    assert checked == {"plain": 7, "offload": 4}
