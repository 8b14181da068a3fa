"""`dnd demo` from the installed package: finishes within its 10-minute bound on CPU, prints the table
it measured, and is reproducible."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

TIME_BOUND_S = 600
TINY_RECIPE = Path(__file__).resolve().parents[1] / "configs" / "tiny-cpu.yaml"


def run_demo(out):
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "dnd_scale.cli", "demo", "--out", str(out)], env=env,
                          capture_output=True, text=True, timeout=TIME_BOUND_S)
    elapsed = time.perf_counter() - start
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout, elapsed


@pytest.mark.slow
def test_demo_runs_in_time_and_reports_what_it_measured(tmp_path):
    stdout, elapsed = run_demo(tmp_path / "demo")
    assert elapsed < TIME_BOUND_S
    summary = json.loads((tmp_path / "demo" / "report" / "demo_summary.json").read_text())
    results = json.loads((tmp_path / "demo" / "report" / "results.json").read_text())
    # the printed table carries the numbers of the evaluation, not constants
    accuracy = {}
    for model in results["models"]:
        accuracy.setdefault(model["label"], []).append(next(iter(model["tasks"].values()))["accuracy"])
    assert summary["base"] == accuracy["base"][0]
    assert summary["generated_mean"] == pytest.approx(sum(accuracy["generated"]) / len(accuracy["generated"]))
    assert summary["training_lora_best"] == max(accuracy["training_lora"])
    assert f"{100 * summary['base']:5.1f}" in stdout and "generated: mean" in stdout
    assert (tmp_path / "demo" / "report" / "accuracy.png").stat().st_size > 0
    # generated adapters are real PEFT folders for a family the generator never saw
    adapters = sorted((tmp_path / "demo" / "adapters").iterdir())
    assert len(adapters) == summary["n_generated"] and all((a / "adapter_config.json").is_file() for a in adapters)
    from dnd_scale.export import check_vllm_contract

    assert all(check_vllm_contract(a) for a in adapters)  # and in the format vLLM's LoRA loader takes

    # seeded: a second run reproduces the table exactly
    stdout_again, _ = run_demo(tmp_path / "demo-again")
    table = [line for line in stdout.splitlines() if line.startswith("|")]
    assert table == [line for line in stdout_again.splitlines() if line.startswith("|")]


def test_the_demo_runs_twice_into_one_folder_and_refuses_other_settings(tmp_path, one_thread):
    from dnd_scale.config import ConfigError
    from dnd_scale.demo import DemoConfig, run_demo
    from dnd_scale.recipe import load_recipe

    run = load_recipe(TINY_RECIPE, [
        "--tasks=[synthetic:reverse_word, synthetic:parity_tf]", "--synthetic_records=16", "--collect.steps=3",
        "--collect.save_last=2", "--shard.num_prompts=4", "--shard.pairs_per_task=8", "--train.steps=2",
        "--eval.task_records=4"])
    demo = DemoConfig(generated_samples=1)
    first = run_demo(run, demo, tmp_path / "demo")
    assert run_demo(run, demo, tmp_path / "demo") == first  # the README's command, again: the same table
    with pytest.raises(ConfigError, match=r"other settings \(train.steps: 2 -> 3\).*--out"):
        run_demo(load_recipe(tmp_path / "demo" / "recipe.yaml", ["--train.steps=3"]), demo, tmp_path / "demo")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="holds no earlier demo"):
        run_demo(run, demo, tmp_path / "other")


def test_the_demo_runs_the_tiny_recipe(monkeypatch):
    """`dnd demo` takes every number of its stages from configs/tiny-cpu.yaml, not from a copy."""
    from dnd_scale import demo
    from dnd_scale.recipe import load_recipe

    seen = []
    monkeypatch.setattr(demo, "run_demo", lambda run, config, out: seen.append((run, config, out)))
    assert demo.main(["--out", "somewhere", "--train.steps=7", "--demo.heldout_family=parity_tf"]) == 0
    run, config, out = seen[0]
    assert demo.TINY_RECIPE == TINY_RECIPE and run == load_recipe(TINY_RECIPE, ["--train.steps=7"])
    assert config.heldout_family == "parity_tf" and out == "somewhere"
