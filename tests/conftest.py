"""Shared test setup."""

import json
import os
import sys

import pytest
import torch
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a hub


@pytest.fixture(scope="module")
def one_thread():
    """Run a module's tiny-model tests on one intra-op thread.

    Tiny shapes gain nothing from threads; on a loaded 2-core machine two threads made a
    (4, 300, 32) x (32, 48) linear 60x slower (26 ms against 0.4 ms).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

if not torch.cuda.is_available():
    # DeepSpeed picks its accelerator at import; on a machine without a GPU it must be the CPU one
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    # Triton kernels run under the interpreter on CPU tensors; triton.jit reads this when a kernel is
    # defined, so it is set before any test module imports dnd_kernels.
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def launch_run(tmp_path_factory):
    """(run folder, recipe) of the tiny run every launched-trainer test trains on: 3 tasks × 4
    checkpoints, 8 shards, N=4 prompts, L=8, D=16 (tests/tinyrun.py)."""
    from launching import CHECKPOINT_EVERY, STEPS
    from tinyrun import make_tiny_encoder, make_tiny_run, tiny_features

    root = tmp_path_factory.mktemp("launch")
    encoder = make_tiny_encoder(root / "encoder")
    run = make_tiny_run(root / "run")
    recipe = root / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"train": {
        "generator": {"preset": None, "features": [list(s) for s in tiny_features()], "kernel_size": 3},
        "encoder": {"name": str(encoder), "max_length": 8},
        "micro_batch_size": 2, "grad_accum_steps": 2, "steps": STEPS, "lr": 1e-2, "warmup_steps": 2,
        "checkpoint_every": CHECKPOINT_EVERY, "log_every": 1, "num_workers": 0, "seed": 0,
    }}))
    return run, recipe


@pytest.fixture(scope="session")
def single_process(launch_run):
    """One process, world size 1, global batch 8 (micro 2 × accumulation 4), the references that
    launches of several ranks are compared with (one launch, three trainings):

    - single: one global order of the pairs (the 2-rank ZeRO runs of test_distributed.py);
    - uninterrupted: the production loader, 30 steps (test_distributed.py's kill/resume test);
    - two_node_reference: the production loader streams of rank 0 and rank 1 of a 2-rank world,
      replayed in turn (test_launchers.py's two-node launch).
    """
    from launching import ENTRY, RESUME_STEPS, run_logged

    run, recipe = launch_run
    runs = [
        {"stream": "global", "output_dir": "single", "zero_stage": 0, "grad_accum_steps": 4},
        {"stream": "loader", "output_dir": "uninterrupted", "zero_stage": 2, "steps": RESUME_STEPS, "num_workers": 2},
        {"stream": "loader_of_2_ranks", "output_dir": "two_node_reference", "zero_stage": 0, "grad_accum_steps": 1,
         "global_batch_size": 8},
    ]
    run_logged([sys.executable, str(ENTRY), "--run", str(run), "--config", str(recipe), "--runs", json.dumps(runs)],
               run / "single.log")
    return run
