"""`dnd bench data`: pairs/s written by `dnd shard` and read by the loader, bytes per pair on disk.

Builds a synthetic run (random packed targets, procedurally generated prompt pools), writes
`pairs` pairs with `build_shards`, then reads one full epoch through `PairLoader` with `workers`
DataLoader workers, and a part of it with one worker, gathering prompts and target tokens exactly
as training does. Results go to `<results_dir>/data_bench.json` and a markdown summary beside it.

    dnd bench data --pairs 1000000 --workers 2   (or python benchmarks/bench_data.py ...)
"""

from __future__ import annotations

import argparse
import itertools
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

import torch
import webdataset as wds

from dnd_scale.io import atomic_path, write_json
from dnd_scale.loader import LoaderConfig, PairLoader
from dnd_scale.shards import ShardConfig, build_shards
from dnd_scale.targets import PackedTargets, write_common, write_task_targets

RESULTS_DIR = Path("benchmarks") / "results"  # relative to the working directory (the repository root)


def machine_info() -> dict:
    """What the numbers were measured on (the load average matters: the machine may be shared)."""
    try:
        revision = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        revision = None
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
        write_task_targets(root / "targets", task, torch.randn(num_checkpoints, num_tokens, *token_shape, generator=gen))
        pools[task] = [
            f"Task {t}, question {i}: given the numbers {i}, {i * 7 % 101} and {i * 13 % 97}, which of the "
            f"options A: {i % 5}, B: {i % 7}, C: {i % 11} is the remainder?"
            for i in range(pool_size)
        ]
    mask = torch.ones(num_tokens, *token_shape, dtype=torch.bool)
    write_common(root / "targets", mask, torch.ones(num_tokens), {"synthetic": True, "tasks": tasks})
    return PackedTargets(root / "targets"), pools


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
    try:
        targets, pools = synthetic_run(scratch, tasks, pool_size, num_checkpoints, num_tokens, token_shape, seed)
        shard_config = ShardConfig(num_prompts=num_prompts, pairs_per_task=pairs_per_task, shard_size=shard_size, seed=seed)
        start = time.perf_counter()
        index = build_shards(targets, pools, scratch / "shards", shard_config)
        write_seconds = time.perf_counter() - start
        written = index["num_samples"]
        shard_bytes = sum((scratch / "shards" / s["file"]).stat().st_size for s in index["shards"])
        pool_bytes = sum((scratch / "shards" / t["prompts"]).stat().st_size for t in index["tasks"].values())

        config = LoaderConfig(batch_size=batch_size, num_workers=workers, seed=seed)
        read_pairs, read_seconds, skipped = _read(scratch / "shards", targets, config, None)
        one = LoaderConfig(batch_size=batch_size, num_workers=1, seed=seed)
        one_pairs, one_seconds, _ = _read(scratch / "shards", targets, one, min(single_worker_pairs, written))
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
        write_json(results_dir / "data_bench.json", result)
        with atomic_path(results_dir / "data_bench.md") as tmp:
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
        f"(a 512-byte tar header plus the JSON payload padded to 512 bytes); prompt pools stored once: "
        f"{w['prompt_pool_bytes'] / 1e6:,.2f} MB. Skipped while reading: {r['skipped']}.",
        "",
    ])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="dnd bench data", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=None, help="build the synthetic run here and keep it (default: a temp folder)")
    parser.add_argument("--pairs", type=int, default=1_000_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--num-prompts", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--single-worker-pairs", type=int, default=100_000)
    parser.add_argument("--results-dir", default=str(RESULTS_DIR))
    args = parser.parse_args(argv)
    result = bench_data(
        args.out, pairs=args.pairs, workers=args.workers, num_prompts=args.num_prompts, batch_size=args.batch_size,
        single_worker_pairs=args.single_worker_pairs, results_dir=args.results_dir,
    )
    print(report(result))


if __name__ == "__main__":
    main()
