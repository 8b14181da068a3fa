"""What the tests that launch trainer processes share: the tiny run's schedule, a CPU rank's
environment, free ports, logged launches and the per-step losses a run logged.

The run folder and the single-process reference runs themselves are session fixtures in
conftest.py (`launch_run`, `single_process`), so every module that launches ranks compares with
the same references and pays their launch once.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ENTRY = REPO / "tests" / "dist_train_entry.py"
BIN = Path(sys.executable).parent
STEPS = 12  # per-step losses compared over these
RESUME_STEPS = 30
CHECKPOINT_EVERY = 4
LAUNCH_TIMEOUT_S = 400


def launch_env(**extra: str) -> dict:
    """The environment of a launch: CPU ranks, one intra-op thread each, this environment's tools first."""
    env = dict(os.environ)
    # One intra-op thread per rank: two ranks on two cores otherwise fight over the cores.
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore")
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"  # the launchers call `deepspeed` and `dnd`
    env.update(extra)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_logged(cmd: list[str], log: Path) -> None:
    """Run `cmd` to completion with its output in `log`; a failure shows the log's tail."""
    with open(log, "w") as out:
        proc = subprocess.run(cmd, cwd=REPO, env=launch_env(), stdout=out, stderr=subprocess.STDOUT,
                              timeout=LAUNCH_TIMEOUT_S)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed ({proc.returncode}):\n{log.read_text()[-4000:]}"


def step_losses(out_dir: Path) -> dict[int, float]:
    """{step: loss} of a run's metrics.jsonl."""
    return {r["step"]: r["loss"] for r in map(json.loads, (out_dir / "metrics.jsonl").read_text().splitlines())}


def wait_for_step(proc: subprocess.Popen, metrics: Path, step: int) -> int:
    """Wait until `metrics` logs `step` while `proc` runs; returns the last step logged by then."""
    deadline = time.monotonic() + LAUNCH_TIMEOUT_S
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the run ended (rc {proc.returncode}) before step {step}; it was meant to be interrupted"
        lines = metrics.read_text().splitlines() if metrics.exists() else []
        logged = [json.loads(line)["step"] for line in lines[:-1]]  # the last line may be half written
        if lines and lines[-1].endswith("}"):
            logged.append(json.loads(lines[-1])["step"])
        if logged and logged[-1] >= step:
            return logged[-1]
        time.sleep(0.01)
    raise TimeoutError(f"step {step} never logged in {metrics}")
