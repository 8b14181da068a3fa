"""Multi-process trainer tests: the real `deepspeed` launcher with 2 CPU ranks (gloo), and kill/resume.

One tiny run folder (real targets, shards and a tiny sentence-transformers encoder) serves every
test. Launches are shared through fixtures: one single-process launch (conftest.py's
`single_process`, shared with test_launchers.py) runs the references, one 2-rank launch runs ZeRO-2
and ZeRO-3, and the resume test adds three short launches (killed, terminated, finished).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dnd_scale.train_config import deepspeed_config, load_train_config
from launching import (
    BIN,
    CHECKPOINT_EVERY,
    ENTRY,
    LAUNCH_TIMEOUT_S,
    REPO,
    RESUME_STEPS,
    STEPS,
    free_port,
    launch_env,
    run_logged,
    step_losses,
    wait_for_step,
)
from tinyrun import tiny_features

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def two_ranks(launch_run):
    """`deepspeed --num_gpus 2` on CPU: ZeRO-2 then ZeRO-3, micro 2 × accumulation 2 × 2 ranks."""
    run, recipe = launch_run
    runs = [{"stream": "global", "output_dir": f"zero{s}", "zero_stage": s} for s in (2, 3)]
    run_logged([str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()), "--no_local_rank",
                str(ENTRY), "--run", str(run), "--config", str(recipe), "--runs", json.dumps(runs)], run / "two_ranks.log")
    return run


@pytest.mark.parametrize("stage", [2, 3], ids=["zero2", "zero3"])
def test_zero_losses_match_single_process(single_process, two_ranks, stage):
    reference = step_losses(single_process / "single")
    zero = step_losses(two_ranks / f"zero{stage}")
    assert sorted(reference) == sorted(zero) == list(range(1, STEPS + 1))
    errors = {step: abs(zero[step] - reference[step]) for step in reference}
    assert max(errors.values()) <= 1e-5, f"per-step |loss difference| vs the single process: {errors}"
    assert reference[STEPS] < 0.6 * reference[1], "the tiny generator should learn in 12 steps"


def test_zero3_parameters_are_partitioned(two_ranks):
    info3 = json.loads((two_ranks / "zero3" / "train_info.json").read_text())
    info2 = json.loads((two_ranks / "zero2" / "train_info.json").read_text())
    total = info3["parameters"]
    assert info3["world_size"] == 2 and info3["global_batch"] == 8
    # ZeRO-3: each rank stores its ds_tensor shard (about half, padded); ZeRO-2: all of it.
    assert all(local < total for local in info3["parameters_per_rank"]), info3
    assert sum(info3["parameters_per_rank"]) >= total
    tensors = 9 * (len(info3["features"]) - 1)  # a shard is ceil(numel / 2) of each tensor
    assert all(abs(local - total / 2) <= tensors for local in info3["parameters_per_rank"]), info3
    assert info2["parameters_per_rank"] == [total, total]


@pytest.mark.parametrize("stage", [2, 3], ids=["zero2", "zero3"])
def test_export_equals_consolidated_state(two_ranks, stage):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    out = two_ranks / f"zero{stage}"
    exported = load_file(out / "export" / "model.safetensors")
    tag = (out / "checkpoints" / "latest").read_text().strip()
    assert tag == f"step{STEPS:08d}"
    consolidated = get_fp32_state_dict_from_zero_checkpoint(str(out / "checkpoints"), tag=tag)
    assert sorted(exported) == sorted(consolidated)
    for name, value in exported.items():
        assert value.shape == consolidated[name].shape, name
        assert (value == consolidated[name].float()).all(), name
    config = json.loads((out / "export" / "config.json").read_text())
    assert config["generator"]["features"] == [list(s) for s in tiny_features()]
    assert config["encoder"]["length"] == 8 and config["step"] == STEPS


def test_export_serves_dnd_generate(two_ranks):
    from dnd_scale.generate import AdapterGenerator
    from dnd_scale.generator import HyperConvGenerator

    generator = AdapterGenerator(two_ranks / "zero3" / "export")
    prompts = ["What is 3 plus 4?", "Is 9 prime?", "Spell 'cat'.", "Name a color."]
    tokens = generator.tokens(prompts)
    assert tokens.shape == tiny_features()[-1]
    # The same weights in a freshly built generator give the same tokens.
    model = HyperConvGenerator(generator.generator.config)
    model.load_state_dict(load_file(two_ranks / "zero3" / "export" / "model.safetensors"))
    with torch.no_grad():
        torch.testing.assert_close(model(generator.encoder.encode(prompts)[None])[0], tokens)


def test_deepspeed_json_is_generated_from_config(launch_run, two_ranks):
    _, recipe = launch_run
    saved = json.loads((two_ranks / "zero3" / "deepspeed_config.json").read_text())
    config = load_train_config(str(recipe), ["--train.zero_stage=3"])
    assert saved == deepspeed_config(config, world_size=2)
    assert saved["train_batch_size"] == 2 * 2 * 2 and saved["zero_optimization"]["stage"] == 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_deepspeed_on_gpu_triton_stages_match_torch(launch_run):
    """`deepspeed --num_gpus 1` on a GPU (NCCL, ZeRO-2): the fused Triton stages (the GPU default) and
    the PyTorch stages train the same curve; a bf16 run with the Triton stages learns too."""
    run, recipe = launch_run
    generator = {"preset": None, "features": [list(s) for s in tiny_features()], "kernel_size": 3}
    runs = [{"stream": "global", "output_dir": f"gpu_{impl}", "zero_stage": 2, "generator": {**generator, "impl": impl},
             "cudnn_benchmark": impl == "auto"} for impl in ("auto", "torch")]  # fmt: skip
    runs.append({"stream": "global", "output_dir": "gpu_bf16", "zero_stage": 2, "bf16": True})
    env = {k: v for k, v in launch_env().items() if k != "DS_ACCELERATOR"}
    with open(run / "gpu.log", "w") as out:
        proc = subprocess.run([sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "1", "--master_port",
                               str(free_port()), "--no_local_rank", str(ENTRY), "--run", str(run), "--config",
                               str(recipe), "--runs", json.dumps(runs)],
                              cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=LAUNCH_TIMEOUT_S)  # fmt: skip
    assert proc.returncode == 0, (run / "gpu.log").read_text()[-4000:]
    info = {name: json.loads((run / name / "train_info.json").read_text()) for name in ("gpu_auto", "gpu_torch", "gpu_bf16")}
    assert [i["impl"] for i in info.values()] == ["triton", "torch", "triton"]
    assert [i["cudnn_benchmark"] for i in info.values()] == [True, False, False]  # the field, and its default
    assert all(i["device"].startswith("cuda") for i in info.values())
    fused, reference, bf16 = (step_losses(run / name) for name in info)
    assert sorted(fused) == sorted(reference) == list(range(1, STEPS + 1))
    # fp32 parameters; both paths may round GEMM operands to TF32 on the GPU (~1e-3 relative).
    gaps = {step: abs(fused[step] - reference[step]) / reference[step] for step in reference}
    assert max(gaps.values()) <= 2e-2, f"per-step relative loss gap, triton vs torch: {gaps}"
    assert fused[STEPS] < 0.6 * fused[1] and bf16[STEPS] < 0.6 * bf16[1], (fused, bf16)


def _launch(run: Path, recipe: Path, out: str, log: Path, resume: bool) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "dnd_scale.cli", "train", "--run", str(run), "--config", str(recipe),
           f"--train.output_dir={out}", f"--train.steps={RESUME_STEPS}", "--train.zero_stage=2", "--train.num_workers=2"]
    # Own session: the signal goes to the whole group, DataLoader workers included, as SLURM and
    # the deepspeed launcher deliver it.
    with open(log, "w") as out:
        return subprocess.Popen(cmd + (["--resume"] if resume else []), cwd=REPO, env=launch_env(), stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)


def _signal_at(proc: subprocess.Popen, metrics: Path, step: int, signum: int) -> int:
    """Send `signum` to the process group once `metrics` logs `step`; returns the last logged step then."""
    logged = wait_for_step(proc, metrics, step)
    os.killpg(proc.pid, signum)
    return logged


def test_resume_after_sigkill_and_sigterm_reproduces_the_run(launch_run, single_process):
    """SIGKILL after a checkpoint, resume; SIGTERM (checkpoint at the step boundary), resume; the
    per-step losses equal the uninterrupted run's, which needs the data position restored too."""
    run, recipe = launch_run
    rng = random.Random(4)
    metrics = run / "resumed" / "metrics.jsonl"

    killed = _launch(run, recipe, "resumed", run / "killed.log", resume=False)
    kill_step = _signal_at(killed, metrics, rng.randint(CHECKPOINT_EVERY + 1, 2 * CHECKPOINT_EVERY + 1), signal.SIGKILL)
    assert killed.wait(timeout=60) == -signal.SIGKILL
    checkpoint = int((run / "resumed" / "checkpoints" / "latest").read_text().strip()[4:])
    assert CHECKPOINT_EVERY <= checkpoint <= kill_step

    terminated = _launch(run, recipe, "resumed", run / "terminated.log", resume=True)
    term_step = _signal_at(terminated, metrics, rng.randint(checkpoint + 2, RESUME_STEPS - 16), signal.SIGTERM)
    assert terminated.wait(timeout=120) == 0, (run / "terminated.log").read_text()[-3000:]
    info = json.loads((run / "resumed" / "train_info.json").read_text())
    assert info["resumed_from"] == checkpoint
    stopped = int((run / "resumed" / "checkpoints" / "latest").read_text().strip()[4:])
    assert term_step <= stopped < RESUME_STEPS, "SIGTERM must save a checkpoint at the step it stopped"
    assert not (run / "resumed" / "export").exists(), "an interrupted run must not export"

    finished = _launch(run, recipe, "resumed", run / "finished.log", resume=True)
    assert finished.wait(timeout=LAUNCH_TIMEOUT_S) == 0, (run / "finished.log").read_text()[-3000:]
    assert json.loads((run / "resumed" / "train_info.json").read_text())["resumed_from"] == stopped

    expected, resumed = step_losses(single_process / "uninterrupted"), step_losses(run / "resumed")
    assert sorted(resumed) == sorted(expected) == list(range(1, RESUME_STEPS + 1))
    errors = {step: abs(resumed[step] - expected[step]) for step in expected}
    assert max(errors.values()) <= 1e-6, f"killed at {kill_step}, terminated at {term_step}: {errors}"
    final = load_file(run / "resumed" / "export" / "model.safetensors")
    reference = load_file(single_process / "uninterrupted" / "export" / "model.safetensors")
    assert final.keys() == reference.keys()
    assert all((final[name] == reference[name]).all() for name in final), "resumed weights differ"
