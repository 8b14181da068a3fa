"""`dnd collect` split across 2 CPU ranks by the real deepspeed launcher (gloo).

Four tiny tasks on a random-init Qwen2, dealt round robin: rank 0 trains add_numbers and
largest_number_mc, rank 1 parity_tf and uppercase. Two launches serve the launcher tests: the
first is killed (each rank SIGKILLs itself in its second task, once both first tasks are finished),
the second, through `deepspeed $(which dnd) collect`, restarts it. A single process in this process
is the reference: same checkpoint bytes, same manifest. Rank 0's preparation and the rank
environment are checked in this process too.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from dnd_scale.basemodel import build_tiny_tokenizer
from dnd_scale.collect import collect, main
from dnd_scale.collect_config import CollectConfig
from dnd_scale.collect_distributed import collect_as_rank, deal_tasks
from dnd_scale.collect_ranks import Ranks
from dnd_scale.recipe import load_recipe
from dnd_scale.io import ArtifactError, sha256_file
from dnd_scale.store import load_checkpoint, read_manifest
from dnd_scale.tasks import load_tasks
from tinymodels import tiny_config

pytestmark = pytest.mark.distributed

REPO = Path(__file__).resolve().parents[1]
ENTRY = REPO / "tests" / "dist_collect_entry.py"
BIN = Path(sys.executable).parent
LAUNCH_TIMEOUT_S = 400
TASK_SPECS = ["synthetic:add_numbers", "synthetic:parity_tf", "synthetic:largest_number_mc", "synthetic:uppercase"]
TASKS = [spec.split(":")[1] for spec in TASK_SPECS]
FIRST_SHARE = {"add_numbers": 0, "parity_tf": 1}  # each rank's first task: finished before the kill
SECOND_SHARE = {"largest_number_mc": 0, "uppercase": 1}  # interrupted, then dealt again on restart
CLI_ARGS = ["--synthetic-records", "16"]


@pytest.fixture(scope="module", autouse=True)
def _single_threaded(one_thread):
    """The reference runs on one thread, as each rank does (OMP_NUM_THREADS=1)."""


def _env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    # One intra-op thread per rank: two ranks on two cores otherwise fight over the cores.
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore", **extra)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(script: Path, run: Path, recipe: Path, log: Path, *launcher_args: str, **env: str) -> int:
    cmd = [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(_free_port()), *launcher_args,
           str(script), "collect", "--run", str(run), "--config", str(recipe), *CLI_ARGS]
    with open(log, "w") as out:
        return subprocess.run(cmd, cwd=REPO, env=_env(**env), stdout=out, stderr=subprocess.STDOUT,
                              timeout=LAUNCH_TIMEOUT_S).returncode


def _trained(log: Path) -> set[tuple[int, str]]:
    """(rank, task) of every progress bar in a launch's log: which rank trained what."""
    return {(int(rank), task) for rank, task in re.findall(r"\[rank (\d+)\] collect (\w+)", log.read_text())}


def _stamps(run: Path, tasks) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for task in tasks for p in (run / "checkpoints" / task).iterdir()}


def _done(run: Path) -> dict[str, dict]:
    """complete.json of every finished task."""
    return {p.parent.name: json.loads(p.read_text()) for p in sorted((run / "checkpoints").glob("*/complete.json"))}


def _manifest_text(run: Path) -> str:
    return (run / "checkpoints" / "manifest.jsonl").read_text()


def _assert_same_checkpoints(run: Path, reference: Path) -> None:
    """The run's manifest is the reference's, byte for byte, and so is every checkpoint it lists."""
    assert _manifest_text(run) == _manifest_text(reference)
    records = read_manifest(run)
    assert [(r["task"], r["step"]) for r in records] == [(t, s) for t in TASKS for s in (2, 4, 6, 8)]
    for record in records:
        load_checkpoint(run, record)  # the file's sha256 is the line's
        ours, theirs = (folder / "checkpoints" / record["file"] for folder in (run, reference))
        assert sha256_file(ours) == sha256_file(theirs)
    on_disk = sorted(str(p.relative_to(run / "checkpoints")) for p in (run / "checkpoints").rglob("*.safetensors"))
    assert on_disk == sorted(r["file"] for r in records)
    assert [p for p in run.rglob("*") if p.name.endswith(".tmp")] == []


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    folder = tmp_path_factory.mktemp("recipe")
    config = tiny_config("qwen2", hidden=32, intermediate=48, vocab=len(build_tiny_tokenizer()))
    config.max_position_embeddings = 512
    config.save_pretrained(folder / "base")
    collect_section = {
        "base_model": str(folder / "base" / "config.json"), "lora": {"rank": 2, "alpha": 4.0}, "steps": 8,
        "save_last": 8, "save_every": 2, "lr": 1e-2, "batch_size": 4, "max_length": 256, "seed": 5,
        "device": "cpu", "dtype": "float32",
    }
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump({"collect": collect_section, "tasks": TASK_SPECS}))
    return path


@pytest.fixture(scope="module")
def reference(recipe, tmp_path_factory):
    """One process, no launcher: what every multi-rank run must reproduce."""
    run = tmp_path_factory.mktemp("single") / "run"
    assert main(["--run", str(run), "--config", str(recipe), *CLI_ARGS]) == 0
    return run


@pytest.fixture(scope="module")
def killed(recipe, tmp_path_factory):
    """(run, untouched copy of it, its log): 2 ranks, each SIGKILLed at its 6th checkpoint — the 2nd of
    its 2nd task, between write and rename — once both first tasks are finished."""
    root = tmp_path_factory.mktemp("two-ranks")
    run, log = root / "run", root / "killed.log"
    wait_for = os.pathsep.join(str(run / "checkpoints" / task / "complete.json") for task in FIRST_SHARE)
    rc = _launch(ENTRY, run, recipe, log, "--no_local_rank", COLLECT_KILL_AT="6", COLLECT_KILL_AFTER=wait_for)
    assert rc != 0, f"the launch was meant to be killed:\n{log.read_text()[-4000:]}"
    shutil.copytree(run, root / "copy")  # keeps the mtimes
    return run, root / "copy", log


@pytest.fixture(scope="module")
def restarted(recipe, killed):
    """(run, log, mtimes of the finished tasks' files before): the killed run launched again, as a user
    would (`deepspeed --num_gpus 2 $(which dnd) collect ...`, the launcher passing --local_rank)."""
    run, _, _ = killed
    stamps = _stamps(run, FIRST_SHARE)
    log = run.parent / "restarted.log"
    rc = _launch(BIN / "dnd", run, recipe, log)
    assert rc == 0, log.read_text()[-4000:]
    return run, log, stamps


def test_a_killed_job_keeps_each_task_a_rank_finished(killed, reference):
    _, run, log = killed
    assert _trained(log) >= set((rank, task) for task, rank in FIRST_SHARE.items())
    trained_by = {}
    for rank, task in _trained(log):
        assert trained_by.setdefault(task, rank) == rank, f"task {task} trained by ranks {trained_by[task]} and {rank}"
    done = _done(run)
    assert {task: d["collected_by"]["rank"] for task, d in done.items()} == FIRST_SHARE
    assert all(d["collected_by"]["world_size"] == 2 for d in done.values())
    assert any(p.name.endswith(".tmp") for p in (run / "checkpoints").rglob("*"))  # a rank died before a rename
    # Rank 0 merges only at the end: the job died first, so the lines live in the markers alone.
    assert not (run / "checkpoints" / "manifest.jsonl").exists()
    with pytest.raises(ArtifactError, match="manifest.jsonl not found"):
        read_manifest(run)
    # Same seeds whoever trains a task: rank 1's parity_tf is bit for bit the single process's.
    expected = [r for r in read_manifest(reference) if r["task"] in FIRST_SHARE]
    assert [r for task in FIRST_SHARE for r in done[task]["manifest"]] == expected
    for record in expected:
        assert sha256_file(run / "checkpoints" / record["file"]) == record["sha256"]


def test_restart_trains_only_the_interrupted_tasks_and_writes_the_single_process_manifest(restarted, reference):
    run, log, stamps = restarted
    assert _trained(log) == set((rank, task) for task, rank in SECOND_SHARE.items())  # each on one rank
    assert _stamps(run, FIRST_SHARE) == stamps  # finished tasks untouched
    done = _done(run)
    assert {task: d["collected_by"]["rank"] for task, d in done.items()} == {**FIRST_SHARE, **SECOND_SHARE}
    _assert_same_checkpoints(run, reference)
    text = log.read_text()
    assert "dnd collect: 4 tasks, 16 checkpoints" in text and "rank 1 of 2 collected 1 tasks" in text


def test_one_process_finishes_a_killed_multi_rank_job(killed, reference, tmp_path, recipe):
    run = tmp_path / "run"
    shutil.copytree(killed[1], run)
    stamps = _stamps(run, FIRST_SHARE)
    assert main(["--run", str(run), "--config", str(recipe), *CLI_ARGS]) == 0
    assert _stamps(run, FIRST_SHARE) == stamps
    assert {task: d["collected_by"]["world_size"] for task, d in _done(run).items()} == {
        "add_numbers": 2, "parity_tf": 2, "largest_number_mc": 1, "uppercase": 1}
    _assert_same_checkpoints(run, reference)


def test_ranks_come_from_the_launcher_environment(monkeypatch):
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    assert Ranks.from_environment() == Ranks(rank=0, local_rank=0, world_size=1)
    monkeypatch.setenv("RANK", "3")
    with pytest.raises(RuntimeError, match="RANK=3 but not both RANK and WORLD_SIZE"):
        Ranks.from_environment()
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(RuntimeError, match=r"RANK must be in \[0, WORLD_SIZE\)"):
        Ranks.from_environment()
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert Ranks.from_environment() == Ranks(rank=3, local_rank=1, world_size=4)
    assert Ranks(3, 1, 4).device("cpu") == "cpu"
    # Round robin over the order given: every task to exactly one rank, shares differ by one at most.
    shares = [deal_tasks(list("abcdefghij"), Ranks(r, r, 4)) for r in range(4)]
    assert shares == [list("aei"), list("bfj"), list("cg"), list("dh")]
    # Several ranks meet at MASTER_ADDR:MASTER_PORT; without them collect stops before any work.
    config = CollectConfig(base_model="unused.json", device="cpu")
    with pytest.raises(RuntimeError, match="rank 3 of 4: MASTER_ADDR and MASTER_PORT not set"):
        collect(config, [], "unused")


def test_rank_zero_prepares_the_folder_like_one_process(reference, recipe, tmp_path, monkeypatch):
    """Rank 0's side in a gloo world of one, in this process: a finished run is left as it is, and
    what one process refuses (a held lock, a changed config) rank 0 refuses too, with the same error."""
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    config = load_recipe(recipe).collect
    tasks = load_tasks(TASK_SPECS, num_records=16, seed=config.seed)
    stamps = _stamps(run, TASKS)
    assert collect_as_rank(config, tasks, run, Ranks()) == read_manifest(reference)
    assert _stamps(run, TASKS) == stamps and _manifest_text(run) == _manifest_text(reference)
    with pytest.raises(ValueError, match=r"another config \(steps: 8 -> 9"):
        collect_as_rank(replace(config, steps=9), tasks, run, Ranks())
    with open(run / "checkpoints" / ".lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(RuntimeError, match="another `dnd collect` is writing to"):
            collect_as_rank(config, tasks, run, Ranks())
