"""`dnd bench data`: pairs/s written by `dnd shard` and read by the loader, bytes per pair on disk.

Builds a synthetic run (random packed targets, procedurally generated prompt pools), writes
`pairs` pairs with `build_shards`, then reads one full epoch through `PairLoader` with `workers`
DataLoader workers, and a part of it with one worker, gathering prompts and target tokens exactly
as training does. Results go to `<results_dir>/data_bench.json` and a markdown summary beside it.

With `--ranks R` (R >= 2) it simulates R nodes instead: R rank processes started together, each
with its own loader and `workers` DataLoader workers, read one epoch of indices and count every
pair id (exactly once across all ranks and workers, and a content checksum against the written
set), then read part of an epoch with tokens and prompts as training does, and the resampled
stream (`bench_data_ranks`; results in `<results_dir>/data_bench_ranks.json` unless named).

    dnd bench data --pairs 1000000 --workers 2   (or python benchmarks/bench_data.py ...)
    dnd bench data --ranks 2 --workers 2 --pairs 10000000 --results-name data_bench_10m
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import webdataset as wds

from dnd_scale.bench import git_revision
from dnd_scale.io import atomic_path, write_json
from dnd_scale.loader import LoaderConfig, PairLoader
from dnd_scale.rundir import RunDir
from dnd_scale.shards import ShardConfig, build_shards, iter_blocks
from dnd_scale.targets import PackedTargets, write_common, write_task_targets

RESULTS_DIR = Path("benchmarks") / "results"  # relative to the working directory (the repository root)


def machine_info() -> dict:
    """What the numbers were measured on (the load average matters: the machine may be shared)."""
    revision = git_revision(short=True)
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "load_average_1_5_15_at_end": list(os.getloadavg()),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "webdataset": wds.__version__,
        "git_revision": revision,
    }


def synthetic_run(
    root: Path, tasks: int, pool_size: int, num_checkpoints: int, num_tokens: int, token_shape: tuple[int, int], seed: int
) -> tuple[PackedTargets, dict[str, list[str]]]:
    """Random packed targets and prompt pools of ~150 characters per prompt under `root`."""
    gen = torch.Generator().manual_seed(seed)
    pools = {}
    for t in range(tasks):
        task = f"task{t:03d}"
        write_task_targets(RunDir(root).targets, task, torch.randn(num_checkpoints, num_tokens, *token_shape, generator=gen))
        pools[task] = [
            f"Task {t}, question {i}: given the numbers {i}, {i * 7 % 101} and {i * 13 % 97}, which of the "
            f"options A: {i % 5}, B: {i % 7}, C: {i % 11} is the remainder?"
            for i in range(pool_size)
        ]
    mask = torch.ones(num_tokens, *token_shape, dtype=torch.bool)
    write_common(RunDir(root).targets, mask, torch.ones(num_tokens), {"synthetic": True, "tasks": tasks})
    return PackedTargets(RunDir(root).targets), pools


def _read(shards: Path, targets: PackedTargets, config: LoaderConfig, max_pairs: int | None) -> tuple[int, float, dict]:
    loader = PairLoader(shards, targets, config, rank=0, world_size=1)
    batches = iter(loader) if max_pairs is None else itertools.islice(loader, -(-max_pairs // config.batch_size))
    start, pairs = time.perf_counter(), 0
    for batch in batches:
        pairs += len(batch["task"])
    return pairs, time.perf_counter() - start, loader.skipped


def bench_data(
    out_dir: str | os.PathLike | None = None,
    pairs: int = 1_000_000,
    workers: int = 2,
    tasks: int = 8,
    pool_size: int = 1000,
    num_prompts: int = 128,
    num_checkpoints: int = 16,
    num_tokens: int = 16,
    token_shape: tuple[int, int] = (10, 34),
    batch_size: int = 64,
    shard_size: int = 10_000,
    single_worker_pairs: int = 100_000,
    seed: int = 0,
    results_dir: str | os.PathLike | None = RESULTS_DIR,
    results_name: str = "data_bench",
    command: str | None = None,
) -> dict:
    """Write and read `pairs` pairs; return (and save under results_dir unless None) the result.

    out_dir: where the synthetic run is built (a temporary folder, removed afterwards, by default).
    single_worker_pairs: pairs read with one worker, for the per-worker rate.
    token_shape: (H, W) of a target token, (rank + 2, chunk + 2); the bytes gathered per pair are
    num_tokens * H * W * 4.
    """
    load_at_start = list(os.getloadavg())
    pairs_per_task = -(-pairs // tasks)
    scratch = Path(out_dir) if out_dir is not None else Path(tempfile.mkdtemp(prefix="dnd-bench-data-"))
    shards_dir = RunDir(scratch).shards
    try:
        targets, pools = synthetic_run(scratch, tasks, pool_size, num_checkpoints, num_tokens, token_shape, seed)
        shard_config = ShardConfig(num_prompts=num_prompts, pairs_per_task=pairs_per_task, shard_size=shard_size, seed=seed)
        start = time.perf_counter()
        index = build_shards(targets, pools, shards_dir, shard_config)
        write_seconds = time.perf_counter() - start
        written = index["num_samples"]
        shard_bytes = sum((shards_dir / s["file"]).stat().st_size for s in index["shards"])
        pool_bytes = sum((shards_dir / t["prompts"]).stat().st_size for t in index["tasks"].values())

        config = LoaderConfig(batch_size=batch_size, num_workers=workers, seed=seed)
        read_pairs, read_seconds, skipped = _read(shards_dir, targets, config, None)
        one = LoaderConfig(batch_size=batch_size, num_workers=1, seed=seed)
        one_pairs, one_seconds, _ = _read(shards_dir, targets, one, min(single_worker_pairs, written))
    finally:
        if out_dir is None:
            shutil.rmtree(scratch, ignore_errors=True)

    result = {
        "command": command or shlex.join([Path(sys.executable).name, *sys.argv]),
        "machine": {**machine_info(), "load_average_1_5_15_at_start": load_at_start},
        "params": {
            "pairs": written, "tasks": tasks, "pool_size": pool_size, "num_prompts": num_prompts,
            "num_checkpoints": num_checkpoints, "num_tokens": num_tokens, "token_shape": list(token_shape),
            "batch_size": batch_size, "workers": workers, "shard_config": asdict(shard_config),
            "target_bytes_per_pair": num_tokens * token_shape[0] * token_shape[1] * 4,
        },
        "write": {
            "pairs": written,
            "seconds": write_seconds,
            "pairs_per_s": written / write_seconds,
            "num_shards": len(index["shards"]),
            "shard_bytes": shard_bytes,
            "bytes_per_pair": shard_bytes / written,
            "prompt_pool_bytes": pool_bytes,
        },
        "read": {
            "workers": workers,
            "pairs": read_pairs,
            "seconds": read_seconds,
            "pairs_per_s_total": read_pairs / read_seconds,
            "pairs_per_s_per_worker": read_pairs / read_seconds / max(workers, 1),
            "single_worker": {"pairs": one_pairs, "seconds": one_seconds, "pairs_per_s": one_pairs / one_seconds},
            "skipped": skipped,
        },
    }
    if results_dir is not None:
        results_dir = Path(results_dir)
        write_json(results_dir / f"{results_name}.json", result)
        with atomic_path(results_dir / f"{results_name}.md") as tmp:
            tmp.write_text(report(result), encoding="utf-8")
    return result


def report(result: dict) -> str:
    """Markdown summary of a `bench_data` result."""
    p, w, r, m = result["params"], result["write"], result["read"], result["machine"]
    return "\n".join([
        "# Data path benchmark (`dnd bench data`)",
        "",
        f"Command: `{result['command']}`  ",
        f"Machine: {m['platform']}, {m['cpu_count']} CPUs, shared with other jobs: load average (1, 5, 15 min) "
        f"{', '.join(f'{x:.1f}' for x in m['load_average_1_5_15_at_start'])} at the start, "
        f"{', '.join(f'{x:.1f}' for x in m['load_average_1_5_15_at_end'])} at the end; "
        f"torch {m['torch']}, webdataset {m['webdataset']}, revision {m['git_revision']}",
        "",
        f"Synthetic run: {p['tasks']} tasks, pools of {p['pool_size']} prompts, N = {p['num_prompts']} prompts per pair, "
        f"{p['num_checkpoints']} checkpoints per task, targets of {p['num_tokens']} tokens x {p['token_shape']} "
        f"({p['target_bytes_per_pair']} bytes gathered per pair), batch {p['batch_size']}.",
        "",
        "| stage | pairs | seconds | pairs/s |",
        "|---|---:|---:|---:|",
        f"| write (`dnd shard`, 1 process) | {w['pairs']:,} | {w['seconds']:.1f} | {w['pairs_per_s']:,.0f} |",
        f"| read, {r['workers']} workers, prompts + tokens (total) | {r['pairs']:,} | {r['seconds']:.1f} | {r['pairs_per_s_total']:,.0f} |",
        f"| read, per worker (total / {r['workers']}) | | | {r['pairs_per_s_per_worker']:,.0f} |",
        f"| read, 1 worker, prompts + tokens | {r['single_worker']['pairs']:,} | {r['single_worker']['seconds']:.1f} | {r['single_worker']['pairs_per_s']:,.0f} |",
        "",
        f"On disk: {w['num_shards']} shards, {w['shard_bytes'] / 1e6:,.1f} MB, **{w['bytes_per_pair']:,.0f} bytes per pair** "
        f"(blocks of {p['shard_config'].get('block_size', 1)} pairs per tar member, prompt indices bit-packed); prompt pools stored once: "
        f"{w['prompt_pool_bytes'] / 1e6:,.2f} MB. Skipped while reading: {r['skipped']}.",
        "",
    ])


# ---------------------------------------------------------------------------------------------
# Several simulated nodes: `--ranks R` (R >= 2)
# ---------------------------------------------------------------------------------------------

_CHECKSUM_SEED = 20251202  # any fixed value: the writer side and every rank use the same weights


@functools.cache
def _checksum_weights(num_prompts: int) -> np.ndarray:
    return np.random.default_rng(_CHECKSUM_SEED).integers(1, 2**63, num_prompts + 2, dtype=np.uint64) | np.uint64(1)


def pair_checksum(pair_id: np.ndarray, task: np.ndarray, checkpoint: np.ndarray, prompt_ids: np.ndarray) -> int:
    """Order-free checksum of a set of pairs: sum over pairs of (content hash x odd function of the
    pair id), mod 2^64. Equal sums over an epoch mean the same pairs with the same contents: a pair
    id that travelled with another pair's content, or a prompt order that changed, moves the sum.
    """
    n = prompt_ids.shape[1]
    weights = _checksum_weights(n)
    with np.errstate(over="ignore"):
        content = (prompt_ids.astype(np.uint64) * weights[:n]).sum(axis=1, dtype=np.uint64)
        content += checkpoint.astype(np.uint64) * weights[n] + task.astype(np.uint64) * weights[n + 1]
        ids = pair_id.astype(np.uint64)
        return int((content * (ids * np.uint64(2) + np.uint64(1)) + ids).sum(dtype=np.uint64))


def _rank_process(job: dict) -> None:
    """One simulated node, in its own interpreter as a launcher starts a rank: its own PairLoader
    and DataLoader workers (forked from it, as in training). Says "ready" on stdout once the loader
    is built, starts reading when a line arrives on stdin (all ranks start together), and writes
    what it measured to `<out>.json` (and the pair-id counts to `<out>.npy`)."""
    config = job["config"]
    loader = PairLoader(job["shards"], job["targets"], LoaderConfig(**config), rank=job["rank"],
                        world_size=job["world_size"], gather_tokens=job["gather_tokens"])
    task_index = {t: i for i, t in enumerate(loader.index["encoding"]["task_names"])}
    counts = np.zeros(loader.index["num_samples"], dtype=np.uint8) if job["count_pairs"] else None
    checksum, pairs = 0, 0
    stream = iter(loader)
    max_pairs = job["max_pairs"]
    batches = stream if max_pairs is None else itertools.islice(stream, -(-max_pairs // config["batch_size"]))
    print("ready", flush=True)
    sys.stdin.readline()
    start = time.perf_counter()
    for batch in batches:
        pair_id = batch["pair_id"].numpy()
        pairs += len(pair_id)
        if counts is not None:
            np.add.at(counts, pair_id, 1)
            task = np.array([task_index[t] for t in batch["task"]])
            checksum += pair_checksum(pair_id, task, batch["checkpoint"].numpy(), batch["prompt_ids"].numpy())
    seconds = time.perf_counter() - start
    stream.close()  # stops the DataLoader workers of a partial read
    if counts is not None:
        np.save(job["out"] + ".npy", counts)
    Path(job["out"] + ".json").write_text(json.dumps({
        "rank": job["rank"], "pairs": pairs, "seconds": seconds, "pairs_per_s": pairs / seconds,
        "skipped": loader.skipped, "checksum": checksum % 2**64, "epoch_after": loader.epoch,
    }))


def _read_ranks(scratch: Path, targets: Path, config: LoaderConfig, world_size: int, gather_tokens: bool,
                max_pairs_per_rank: int | None, count_pairs: bool, tag: str) -> dict:
    """Run `world_size` rank processes at once and gather what they measured. Timing starts when
    every rank has built its loader; worker start-up is inside it, as in an epoch of training."""
    outs = [str(scratch / f"{tag}-rank{r}") for r in range(world_size)]
    ranks = []
    for r in range(world_size):
        job = {"shards": str(RunDir(scratch).shards), "targets": str(targets), "config": asdict(config), "rank": r,
               "world_size": world_size, "gather_tokens": gather_tokens, "max_pairs": max_pairs_per_rank,
               "count_pairs": count_pairs, "out": outs[r]}
        code = "import json, sys; from dnd_scale.bench_data import _rank_process; _rank_process(json.loads(sys.argv[1]))"
        ranks.append(subprocess.Popen([sys.executable, "-c", code, json.dumps(job)],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True))
    for r, p in enumerate(ranks):
        if p.stdout.readline().strip() != "ready":
            for q in ranks:
                q.kill()
            raise RuntimeError(f"bench rank {r} failed before reading (exit code {p.wait()}); see its error above")
    start = time.perf_counter()
    for p in ranks:
        p.stdin.write("go\n")
        p.stdin.flush()
    codes = [p.wait() for p in ranks]
    wall = time.perf_counter() - start
    if any(codes):
        raise RuntimeError(f"bench rank processes exited with {codes}; see their errors above")
    per_rank = [json.loads(Path(o + ".json").read_text()) for o in outs]
    total = sum(r["pairs"] for r in per_rank)
    seconds = max(r["seconds"] for r in per_rank)  # the ranks start together: the slowest one ends the read
    result = {
        "gather_tokens": gather_tokens,
        "batch_size": config.batch_size,
        "workers_per_rank": config.num_workers,
        "resampled": config.resampled,
        "pairs": total,
        "seconds": seconds,
        "pairs_per_s_total": total / seconds,
        "wall_seconds_with_process_exit": wall,
        "per_rank": per_rank,
        "load_average_1_5_15_after": list(os.getloadavg()),
    }
    if count_pairs:
        counts = sum(np.load(o + ".npy").astype(np.int64) for o in outs)  # (num_samples,)
        result["counts"] = counts
        result["checksum"] = sum(r["checksum"] for r in per_rank) % 2**64
    return result


def bench_data_ranks(
    out_dir: str | os.PathLike | None = None,
    pairs: int = 10_000_000,
    ranks: int = 2,
    workers: int = 2,
    tasks: int = 8,
    pool_size: int = 1000,
    num_prompts: int = 128,
    num_checkpoints: int = 16,
    num_tokens: int = 16,
    token_shape: tuple[int, int] = (10, 34),
    batch_size: int = 64,
    shard_size: int = 10_000,
    block_size: int = 1024,
    gather_pairs_per_rank: int = 250_000,
    resampled_pairs_per_rank: int = 1_000_000,
    seed: int = 0,
    results_dir: str | os.PathLike | None = RESULTS_DIR,
    results_name: str = "data_bench_ranks",
    command: str | None = None,
) -> dict:
    """Write `pairs` pairs, then stream them with `ranks` simulated nodes x `workers` workers each.

    Measured: write pairs/s and bytes per pair; one epoch over all ranks reading indices only
    (decode, check, shuffle, batch: no target tokens, no prompt strings) with every pair id counted
    and a content checksum compared with the written set, the exactly-once check; part of an epoch
    read the way training reads (target tokens gathered, prompt strings looked up); the resampled
    mode, indices only. The shard set lives in a temporary folder removed afterwards unless out_dir.
    """
    load_at_start = list(os.getloadavg())
    scratch = Path(out_dir) if out_dir is not None else Path(tempfile.mkdtemp(prefix="dnd-bench-data-"))
    shards_dir = RunDir(scratch).shards
    try:
        targets, pools = synthetic_run(scratch, tasks, pool_size, num_checkpoints, num_tokens, token_shape, seed)
        shard_config = ShardConfig(num_prompts=num_prompts, pairs_per_task=-(-pairs // tasks), shard_size=shard_size,
                                   block_size=block_size, seed=seed)
        start = time.perf_counter()
        index = build_shards(targets, pools, shards_dir, shard_config, progress=False)
        write_seconds = time.perf_counter() - start
        written = index["num_samples"]
        shard_bytes = sum((shards_dir / s["file"]).stat().st_size for s in index["shards"])
        load_after_write = list(os.getloadavg())

        # What was written, decoded in one process straight from the files (no loader): the
        # reference for the exactly-once check, and the decode rate of the format on its own.
        start, expected_checksum, decoded = time.perf_counter(), 0, 0
        for _, block in iter_blocks(shards_dir, index):
            expected_checksum += pair_checksum(block.pair_id, block.task, block.checkpoint, block.prompt_ids)
            decoded += len(block.pair_id)
        decode_seconds = time.perf_counter() - start
        expected_checksum %= 2**64

        epoch_config = LoaderConfig(batch_size=batch_size, num_workers=workers, seed=seed)
        epoch = _read_ranks(scratch, RunDir(scratch).targets, epoch_config, ranks, False, None, True, "epoch")
        counts = epoch.pop("counts")
        exactly_once = {
            "pairs_written": written,
            "pairs_read": epoch["pairs"],
            "never_seen": int((counts == 0).sum()),
            "seen_more_than_once": int((counts > 1).sum()),
            "checksum_written": expected_checksum,
            "checksum_read": epoch.pop("checksum"),
        }
        exactly_once["passed"] = (
            exactly_once["never_seen"] == 0 and exactly_once["seen_more_than_once"] == 0
            and epoch["pairs"] == written and exactly_once["checksum_written"] == exactly_once["checksum_read"]
        )
        gather = _read_ranks(scratch, RunDir(scratch).targets, epoch_config, ranks, True,
                             min(gather_pairs_per_rank, written // ranks), False, "gather")
        resampled_config = LoaderConfig(batch_size=batch_size, num_workers=workers, seed=seed, resampled=True)
        resampled = _read_ranks(scratch, RunDir(scratch).targets, resampled_config, ranks, False,
                                resampled_pairs_per_rank, False, "resampled")
    finally:
        if out_dir is None:
            shutil.rmtree(scratch, ignore_errors=True)

    result = {
        "command": command or shlex.join([Path(sys.executable).name, *sys.argv]),
        "machine": {**machine_info(), "load_average_1_5_15_at_start": load_at_start},
        "params": {
            "pairs": written, "ranks": ranks, "workers_per_rank": workers, "tasks": tasks, "pool_size": pool_size,
            "num_prompts": num_prompts, "num_checkpoints": num_checkpoints, "num_tokens": num_tokens,
            "token_shape": list(token_shape), "batch_size": batch_size, "shard_config": asdict(shard_config),
            "target_bytes_per_pair": num_tokens * token_shape[0] * token_shape[1] * 4,
        },
        "write": {
            "pairs": written, "seconds": write_seconds, "pairs_per_s": written / write_seconds,
            "num_shards": len(index["shards"]), "shard_bytes": shard_bytes, "bytes_per_pair": shard_bytes / written,
            "prompt_bits": index["encoding"]["prompt_bits"],
            "load_average_1_5_15_after": load_after_write,
        },
        "decode_one_process": {"pairs": decoded, "seconds": decode_seconds, "pairs_per_s": decoded / decode_seconds},
        "epoch_index_only": epoch,
        "exactly_once": exactly_once,
        "partial_epoch_with_tokens_and_prompts": gather,
        "resampled_index_only": resampled,
    }
    if results_dir is not None:
        results_dir = Path(results_dir)
        write_json(results_dir / f"{results_name}.json", result)
        with atomic_path(results_dir / f"{results_name}.md") as tmp:
            tmp.write_text(report_ranks(result), encoding="utf-8")
    return result


def _load(values: list[float]) -> str:
    return ", ".join(f"{x:.1f}" for x in values)


def report_ranks(result: dict) -> str:
    """Markdown summary of a `bench_data_ranks` result."""
    p, w, m, once = result["params"], result["write"], result["machine"], result["exactly_once"]
    d, e, g, r = (result[k] for k in ("decode_one_process", "epoch_index_only",
                                      "partial_epoch_with_tokens_and_prompts", "resampled_index_only"))

    def rows(label: str, run: dict) -> list[str]:
        out = [f"| {label}, all {p['ranks']} ranks | {run['pairs']:,} | {run['seconds']:.1f} | "
               f"{run['pairs_per_s_total']:,.0f} | {_load(run['load_average_1_5_15_after'])} |"]
        out += [f"| {label}, rank {x['rank']} | {x['pairs']:,} | {x['seconds']:.1f} | {x['pairs_per_s']:,.0f} | |"
                for x in run["per_rank"]]
        return out

    return "\n".join([
        f"# Data path at {p['pairs'] / 1e6:,.0f}M pairs, {p['ranks']} simulated nodes (`dnd bench data --ranks {p['ranks']}`)",
        "",
        f"Command: `{result['command']}`  ",
        f"Machine: {m['platform']}, {m['cpu_count']} CPUs shared with other jobs: load average (1, 5, 15 min) "
        f"{_load(m['load_average_1_5_15_at_start'])} at the start, {_load(m['load_average_1_5_15_at_end'])} at the end; "
        f"python {m['python']}, torch {m['torch']}, webdataset {m['webdataset']}, revision {m['git_revision']}",
        "",
        f"Synthetic run: {p['tasks']} tasks, pools of {p['pool_size']} prompts, N = {p['num_prompts']} prompts per pair, "
        f"{p['num_checkpoints']} checkpoints per task, targets of {p['num_tokens']} tokens x {p['token_shape']} "
        f"({p['target_bytes_per_pair']} bytes gathered per pair); {w['num_shards']} shards of "
        f"{p['shard_config']['shard_size']:,} pairs in blocks of {p['shard_config']['block_size']}; "
        f"{p['ranks']} ranks (separate processes, started together) x {p['workers_per_rank']} DataLoader workers, "
        f"batch {p['batch_size']}.",
        "",
        "| stage | pairs | seconds | pairs/s | load average after |",
        "|---|---:|---:|---:|---|",
        f"| write (`dnd shard`, 1 process) | {w['pairs']:,} | {w['seconds']:.1f} | {w['pairs_per_s']:,.0f} | "
        f"{_load(w['load_average_1_5_15_after'])} |",
        f"| decode all blocks, 1 process, no loader | {d['pairs']:,} | {d['seconds']:.1f} | {d['pairs_per_s']:,.0f} | |",
        *rows("epoch, indices only", e),
        *rows("partial epoch, tokens + prompts", g),
        *rows("resampled, indices only", r),
        "",
        f"On disk: {w['shard_bytes'] / 1e9:,.3f} GB, **{w['bytes_per_pair']:,.1f} bytes per pair** ({p['num_prompts']} "
        f"prompt indices of {w['prompt_bits']} bits, 1-byte task and checkpoint, tar and safetensors headers shared "
        f"by a block). The shard set was deleted after measuring.",
        "",
        "All ranks: pairs of every rank over the slowest rank's seconds (the ranks start together, after "
        "building their loaders; DataLoader worker start-up is inside the time).",
        "",
        "\"Indices only\": shard read, block decode, range and distinctness checks, shuffle, batching and the "
        "transfer from the workers (what every epoch pays whatever the model); no target tokens, no prompt strings. "
        "\"Tokens + prompts\": as training reads, target tokens gathered from the memory-mapped packed targets in the "
        "workers and prompt strings looked up in the rank process.",
        "",
        f"Exactly once over one epoch: **{'passed' if once['passed'] else 'FAILED'}**: {once['pairs_read']:,} pairs "
        f"read of {once['pairs_written']:,} written; pair ids never seen {once['never_seen']:,}, seen more than "
        f"once {once['seen_more_than_once']:,}; content checksum of (pair id, task, checkpoint, prompt ids) read "
        f"{once['checksum_read']:#018x}, written {once['checksum_written']:#018x}. Skipped while reading: "
        f"{[x['skipped'] for x in e['per_rank']]}.",
        "",
    ])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="dnd bench data", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=None, help="build the synthetic run here and keep it (default: a temp folder)")
    parser.add_argument("--pairs", type=int, default=1_000_000)
    parser.add_argument("--ranks", type=int, default=1, help="simulated nodes; 2 or more: the multi-rank mode "
                        "(exactly-once epoch check, rate per rank, resampled rate)")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers (per rank)")
    parser.add_argument("--num-prompts", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--single-worker-pairs", type=int, default=100_000, help="one rank: pairs read with 1 worker")
    parser.add_argument("--gather-pairs-per-rank", type=int, default=250_000,
                        help="multi-rank: pairs each rank reads with tokens and prompts")
    parser.add_argument("--resampled-pairs-per-rank", type=int, default=1_000_000,
                        help="multi-rank: pairs each rank reads from the resampled stream")
    parser.add_argument("--results-dir", default=str(RESULTS_DIR))
    parser.add_argument("--results-name", default=None,
                        help="results file stem (default: data_bench, or data_bench_ranks with --ranks >= 2)")
    args = parser.parse_args(argv)
    if args.ranks >= 2:
        result = bench_data_ranks(
            args.out, pairs=args.pairs, ranks=args.ranks, workers=args.workers, num_prompts=args.num_prompts,
            batch_size=args.batch_size, gather_pairs_per_rank=args.gather_pairs_per_rank,
            resampled_pairs_per_rank=args.resampled_pairs_per_rank, results_dir=args.results_dir,
            results_name=args.results_name or "data_bench_ranks",
        )
        print(report_ranks(result))
        return
    result = bench_data(
        args.out, pairs=args.pairs, workers=args.workers, num_prompts=args.num_prompts, batch_size=args.batch_size,
        single_worker_pairs=args.single_worker_pairs, results_dir=args.results_dir,
        results_name=args.results_name or "data_bench",
    )
    print(report(result))


if __name__ == "__main__":
    main()
