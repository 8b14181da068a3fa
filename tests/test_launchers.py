"""launchers/*.sh as a user runs them, on CPU ranks (gloo).

- Two nodes through the deepspeed launcher, one launcher per node without ssh
  (`HOSTFILE=... NODE_RANK=n launchers/train_multinode.sh`), one rank each, ZeRO-3: one world of
  two, parameters partitioned, each node reading its own half of the shards, per-step losses
  equal to a single process replaying both ranks' streams with the same global batch.
- SLURM: `launchers/slurm_train.sh` under stand-in `srun` / `scontrol` (tests/slurm/): the tasks get
  SIGTERM as at a time limit, save and exit, the job requeues itself; the requeued job resumes and
  finishes.
- The errors the launcher gives before any rank starts.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from launching import LAUNCH_TIMEOUT_S, REPO, RESUME_STEPS, STEPS, free_port, launch_env, step_losses, wait_for_step

pytestmark = pytest.mark.distributed

LAUNCHERS = REPO / "launchers"
SLURM_STANDINS = REPO / "tests" / "slurm"
SHARD_READ = re.compile(r"rank (\d+) of (\d+), worker \d+, epoch (\d+): reading shard (\S+)")


def _tail(path: Path) -> str:
    return path.read_text()[-4000:]


@pytest.fixture(scope="module")
def two_nodes(launch_run, tmp_path_factory):
    """Two "nodes" on this machine, each started by its own launcher with its own NODE_RANK."""
    run, recipe = launch_run
    root = tmp_path_factory.mktemp("two_nodes")
    # deepspeed refuses a hostfile that names a host twice: the two nodes are two names of this machine.
    hostfile = root / "hostfile"
    hostfile.write_text("localhost slots=1\n127.0.0.1 slots=1\n")
    port = str(free_port())
    logs = [root / f"node{node}.log" for node in (0, 1)]
    nodes = []
    for node, log in enumerate(logs):
        env = launch_env(HOSTFILE=str(hostfile), NODE_RANK=str(node), MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                         DND_LOG_LEVEL="INFO")  # the loader logs every shard it reads
        cmd = [str(LAUNCHERS / "train_multinode.sh"), str(run), str(recipe), "--train.output_dir=two_nodes",
               "--train.zero_stage=3", "--train.grad_accum_steps=1", "--train.global_batch_size=8"]
        with open(log, "w") as out:
            nodes.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                          start_new_session=True))
    try:
        codes = [node.wait(timeout=LAUNCH_TIMEOUT_S) for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:
                os.killpg(node.pid, signal.SIGKILL)
    assert codes == [0, 0], "\n".join(f"node {n} (rc {c}):\n{_tail(log)}" for n, (c, log) in enumerate(zip(codes, logs)))
    return run / "two_nodes", logs


def test_two_nodes_form_one_world_with_partitioned_parameters(two_nodes):
    out, _ = two_nodes
    info = json.loads((out / "train_info.json").read_text())
    assert info["world_size"] == 2 and info["global_batch"] == 8
    # ZeRO-3: each rank stores its shard of every parameter, about half of them.
    total, per_rank = info["parameters"], info["parameters_per_rank"]
    assert len(per_rank) == 2 and all(local < total for local in per_rank) and sum(per_rank) >= total, info
    # global_batch_size 8 over 2 ranks of micro-batch 2: the accumulation is derived as 2.
    assert json.loads((out / "deepspeed_config.json").read_text())["gradient_accumulation_steps"] == 2


def test_each_node_reads_its_own_half_of_the_shards(launch_run, two_nodes):
    run, _ = launch_run
    _, logs = two_nodes
    shards = {s["file"] for s in json.loads((run / "shards" / "index.json").read_text())["shards"]}
    first_epoch = []
    for node, log in enumerate(logs):
        reads = [(int(r), int(w), int(e), f) for r, w, e, f in SHARD_READ.findall(log.read_text())]
        assert reads and {(r, w) for r, w, _, _ in reads} == {(node, 2)}, f"node {node} read as {reads}"
        first_epoch.append({f for _, _, e, f in reads if e == 0})
    assert first_epoch[0] and first_epoch[1] and not first_epoch[0] & first_epoch[1], first_epoch
    assert first_epoch[0] | first_epoch[1] == shards, "one epoch of both nodes covers the shard set"


def test_two_node_losses_equal_a_single_process(two_nodes, single_process):
    out, _ = two_nodes
    reference, two = step_losses(single_process / "two_node_reference"), step_losses(out)
    assert sorted(reference) == sorted(two) == list(range(1, STEPS + 1))
    errors = {step: abs(two[step] - reference[step]) for step in reference}
    assert max(errors.values()) <= 1e-5, f"per-step |loss difference| vs the single process: {errors}"
    assert two[STEPS] < 0.6 * two[1], "the tiny generator should learn in 12 steps"


def _alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def test_sigterm_to_the_launcher_reaches_every_rank(launch_run, tmp_path):
    """`kill PID` of train_multinode.sh on one node (two CPU ranks, two loader workers each): every
    rank saves a checkpoint at its next step boundary and exits 0, the launcher last, nothing left."""
    run, recipe = launch_run
    out, log = run / "killed_launcher", tmp_path / "launch.log"
    cmd = [str(LAUNCHERS / "train_multinode.sh"), str(run), str(recipe), "--train.output_dir=killed_launcher",
           f"--train.steps={RESUME_STEPS}", "--train.checkpoint_every=1000", "--train.num_workers=2"]
    with open(log, "w") as output:
        launcher = subprocess.Popen(cmd, cwd=REPO, env=launch_env(NUM_GPUS="2", MASTER_PORT=str(free_port())),
                                    stdout=output, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        signalled = wait_for_step(launcher, out / "metrics.jsonl", 3)
        launcher.send_signal(signal.SIGTERM)  # the launcher's pid only, as `kill` does
        assert launcher.wait(timeout=120) == 0, _tail(log)
        for _ in range(100):  # the ranks' DataLoader workers end a moment after their rank
            if not _alive(launcher.pid):
                break
            time.sleep(0.1)
        assert not _alive(launcher.pid), "processes of the launch outlived it"
    finally:
        if _alive(launcher.pid):
            os.killpg(launcher.pid, signal.SIGKILL)
    stopped = int((out / "checkpoints" / "latest").read_text().strip()[4:])
    assert signalled <= stopped < RESUME_STEPS, "SIGTERM must save a checkpoint where the run stopped"
    assert not (out / "export").exists(), "a stopped run must not export"
    assert "SIGTERM received; checkpoint" in log.read_text()


def _calls(log: Path, command: str) -> list[dict]:
    lines = log.read_text().splitlines() if log.exists() else []
    return [c for c in map(json.loads, lines) if c["command"] == command]


def _sbatch(run: Path, recipe: Path, calls: Path, log: Path, restart: int) -> subprocess.Popen:
    """What SLURM does for `sbatch launchers/slurm_train.sh ...` on one node with two tasks."""
    env = launch_env(SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="localhost", SLURM_NTASKS="2", SLURM_CPUS_PER_TASK="1",
                     SLURM_RESTART_COUNT=str(restart), SLURM_STANDIN_LOG=str(calls), MASTER_PORT=str(free_port()))
    env["PATH"] = f"{SLURM_STANDINS}{os.pathsep}{env['PATH']}"
    cmd = ["bash", str(LAUNCHERS / "slurm_train.sh"), str(run), str(recipe), "--train.output_dir=preempted",
           f"--train.steps={RESUME_STEPS}", "--train.checkpoint_every=1000"]  # only SIGTERM and the end save
    with open(log, "w") as out:
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def test_slurm_job_saves_requeues_and_resumes_after_sigterm(launch_run, tmp_path):
    run, recipe = launch_run
    out, calls = run / "preempted", tmp_path / "slurm_calls.jsonl"

    job = _sbatch(run, recipe, calls, tmp_path / "job.log", restart=0)
    try:
        signalled = wait_for_step(job, out / "metrics.jsonl", 3)
        # SLURM signals every task (and the processes under it), not the batch script.
        tasks = _calls(calls, "srun")[0]["task_pids"]
        for pid in tasks:
            os.killpg(pid, signal.SIGTERM)
        assert job.wait(timeout=120) == 0, _tail(tmp_path / "job.log")
    finally:
        for pid in [job.pid] + [p for c in _calls(calls, "srun") for p in c["task_pids"]]:
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    stopped = int((out / "checkpoints" / "latest").read_text().strip()[4:])
    assert signalled <= stopped < RESUME_STEPS, "SIGTERM must save a checkpoint where the run stopped"
    assert not (out / "export").exists(), "a stopped run must not export"
    assert [c["argv"] for c in _calls(calls, "scontrol") if c["argv"][0] == "requeue"] == [["requeue", "4242"]]

    requeued = _sbatch(run, recipe, calls, tmp_path / "requeued.log", restart=1)
    assert requeued.wait(timeout=LAUNCH_TIMEOUT_S) == 0, _tail(tmp_path / "requeued.log")
    first, second = _calls(calls, "srun")
    assert "--resume" not in first["argv"] and "--resume" in second["argv"]
    assert len([c for c in _calls(calls, "scontrol") if c["argv"][0] == "requeue"]) == 1, "a finished job is not requeued"
    info = json.loads((out / "train_info.json").read_text())
    assert info["world_size"] == 2 and info["resumed_from"] == stopped
    assert json.loads((out / "export" / "config.json").read_text())["step"] == RESUME_STEPS
    assert sorted(step_losses(out)) == list(range(1, RESUME_STEPS + 1))


def _launch_fails(tmp_path: Path, hosts: str | None, **env: str) -> str:
    """Run train_multinode.sh with a hostfile of `hosts`; it must refuse before starting deepspeed."""
    if hosts is not None:
        (tmp_path / "hostfile").write_text(hosts)
        env["HOSTFILE"] = str(tmp_path / "hostfile")
    proc = subprocess.run([str(LAUNCHERS / "train_multinode.sh"), str(tmp_path / "run"), "recipe.yaml"], cwd=REPO,
                          env=launch_env(**env), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stdout == "", (proc.returncode, proc.stdout, proc.stderr)
    *_, message = proc.stderr.splitlines()  # above it, what a failed check printed itself (ssh's reason)
    assert message.startswith("train_multinode.sh: "), proc.stderr
    return message.replace(str(tmp_path / "hostfile"), "HOSTFILE")


def test_a_host_that_does_not_resolve_is_named_before_launching(tmp_path):
    # .invalid never resolves (RFC 2606).
    message = _launch_fails(tmp_path, "localhost slots=1\nnode-b.invalid slots=1\n", NODE_RANK="0")
    assert "host 'node-b.invalid' in HOSTFILE does not resolve to an address: write the name or IP" in message


def test_a_host_not_reachable_by_ssh_is_named_before_launching(tmp_path):
    port = free_port()  # nothing listens there
    message = _launch_fails(tmp_path, "localhost slots=1\n", SSH_PORT=str(port))
    assert f"host 'localhost' in HOSTFILE is not reachable by passwordless ssh on port {port}: set up ssh keys" in message
    assert "or start one launcher per node with NODE_RANK=0..0 (no ssh)" in message


@pytest.mark.parametrize("node_rank", ["2", "-1", "one"])
def test_a_node_rank_out_of_range_is_refused(tmp_path, node_rank):
    message = _launch_fails(tmp_path, "# two nodes\nlocalhost slots=1\n\n127.0.0.1 slots=1\n", NODE_RANK=node_rank)
    assert f"NODE_RANK={node_rank} is out of range: HOSTFILE names 2 nodes, so NODE_RANK is 0 to 1" in message


@pytest.mark.parametrize("hosts, env, expected", [
    (None, {"HOSTFILE": "no-such-hostfile"}, "HOSTFILE=no-such-hostfile is not a file"),
    ("# only a comment\n", {"NODE_RANK": "0"}, "names no node"),
    (None, {"NODE_RANK": "1"}, "NODE_RANK=1 needs HOSTFILE"),
    ("localhost slots=1\nlocalhost slots=1\n", {"NODE_RANK": "0"}, "host 'localhost' is named twice in HOSTFILE"),
], ids=["missing-hostfile", "empty-hostfile", "rank-without-hostfile", "host-twice"])
def test_other_hostfile_mistakes_are_refused(tmp_path, hosts, env, expected):
    assert expected in _launch_fails(tmp_path, hosts, **env)
