"""`dnd shard`: pair prompt batches with checkpoints and write them as WebDataset tar shards.

A pair is (task, checkpoint index, N prompt indices). It references the checkpoint's tokens in the
packed targets and the prompts in the task's prompt pool, so a sample is a few hundred bytes of
JSON however large the model or the prompts are. Output, under `<run>/shards/`:

    prompts/<task>.jsonl    the task's prompt pool, one {"prompt": ...} per line (no answers), stored once
    pairs-000000.tar ...    WebDataset shards; sample key = global pair index, one file `<key>.json`:
                            {"task": str, "checkpoint": int, "prompt_ids": [N ints]}
    index.json              shards with their sample counts and sha256, tasks with pool size, pool
                            sha256 and checkpoint count, N, seed, and the config that made them

Pairs of all tasks are interleaved in a seeded random order before they are cut into shards, so
every shard mixes tasks and a loader that shuffles shards sees a mixed stream.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import webdataset as wds
from tqdm import tqdm

from dnd_scale.io import ArtifactError, read_json, sha256_file, write_json
from dnd_scale.targets import INDEX_FILE, PackedTargets, canonical_json_sha256, check_task_name

FORMAT_VERSION = 1
PROMPTS_DIR = "prompts"
SHARD_PATTERN = "pairs-%06d.tar"


class ShardsError(ArtifactError):
    """Shards cannot be built from these inputs, or a shard folder is missing or inconsistent."""


@dataclass
class ShardConfig:
    """How `dnd shard` samples pairs and cuts them into shards."""

    num_prompts: int = 128
    """N, prompts per pair: the condition the generator sees for one checkpoint."""
    pairs_per_task: int = 1000
    """Pairs written for every task; checkpoints of a task are used equally often (±1)."""
    shard_size: int = 10000
    """Pairs per tar shard (webdataset.ShardWriter maxcount). Use enough shards that every rank and
    DataLoader worker gets several: at least world_size × num_workers."""
    seed: int = 0
    """Seed for prompt sampling, checkpoint assignment and the interleaving of tasks."""


def _task_seed(seed: int, task: str) -> np.random.SeedSequence:
    # Keyed by the task's name, not its position, so adding a task leaves the others' pairs alone.
    name_key = int.from_bytes(hashlib.sha256(task.encode("utf-8")).digest()[:8], "little")
    return np.random.SeedSequence([seed, name_key])


def _task_pairs(
    task: str, num_checkpoints: int, pool_size: int, config: ShardConfig
) -> Iterator[tuple[int, list[int]]]:
    """Yield `pairs_per_task` (checkpoint index, N prompt indices) for one task, deterministically.

    Prompt indices come from consecutive N-wide groups of a fresh random permutation of the pool:
    each group is a uniform N-subset without replacement, every prompt is used equally often, and
    the cost is O(N) per pair whatever the pool size.
    """
    rng = np.random.default_rng(_task_seed(config.seed, task))
    n = config.num_prompts
    groups_per_perm = pool_size // n
    ckpt_order: np.ndarray = np.empty(0, dtype=np.int64)
    groups: np.ndarray = np.empty((0, n), dtype=np.int64)
    for _ in range(config.pairs_per_task):
        if len(ckpt_order) == 0:
            ckpt_order = rng.permutation(num_checkpoints)
        if len(groups) == 0:
            groups = rng.permutation(pool_size)[: groups_per_perm * n].reshape(groups_per_perm, n)
        yield int(ckpt_order[0]), groups[0].tolist()
        ckpt_order, groups = ckpt_order[1:], groups[1:]


def _validate(num_checkpoints: Mapping[str, int], prompt_pools: Mapping[str, list[str]], config: ShardConfig) -> None:
    if config.num_prompts < 1 or config.pairs_per_task < 1 or config.shard_size < 1:
        raise ShardsError(
            f"num_prompts, pairs_per_task and shard_size must be >= 1; found {config.num_prompts}, "
            f"{config.pairs_per_task}, {config.shard_size}"
        )
    if not prompt_pools:
        raise ShardsError("no tasks given: pass at least one task's prompt pool")
    unpacked = sorted(set(prompt_pools) - set(num_checkpoints))
    if unpacked:
        raise ShardsError(
            f"tasks {unpacked} have prompts but no packed checkpoints (packed: {sorted(num_checkpoints)}); "
            f"run `dnd collect` and `dnd pack` for them, or leave them out"
        )
    for task, pool in prompt_pools.items():
        check_task_name(task)
        if num_checkpoints[task] < 1:
            raise ShardsError(f"task {task!r} has no checkpoints; run `dnd collect` and `dnd pack` for it")
        if len(pool) == 0:
            raise ShardsError(f"the prompt pool of task {task!r} is empty; its task file has no prompts")
        bad = [i for i, p in enumerate(pool) if not isinstance(p, str) or not p.strip()]
        if bad:
            raise ShardsError(
                f"task {task!r}: prompts at positions {bad[:5]} are empty or not strings; fix the task file"
            )
        if len(pool) < config.num_prompts:
            raise ShardsError(
                f"task {task!r} has {len(pool)} prompts but each pair needs num_prompts="
                f"{config.num_prompts} distinct ones; lower num_prompts or add prompts to the task"
            )


def _write_pool(path: Path, pool: list[str]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for prompt in pool:
            f.write(json.dumps({"prompt": prompt}, ensure_ascii=False) + "\n")


def build_shards(
    checkpoints: PackedTargets | Mapping[str, int],
    prompt_pools: Mapping[str, list[str]],
    out_dir: str | os.PathLike,
    config: ShardConfig,
    progress: bool = True,
) -> dict:
    """Sample pairs for every task, write shards, prompt pools and index.json to `out_dir`.

    checkpoints: the packed targets (their layout fingerprint is recorded so the loader can refuse
    shards made for other targets) or a mapping task -> number of checkpoints.
    prompt_pools: task -> prompt strings (prompts only: answers must never be passed here). The
    shards cover these tasks; packed tasks without a pool are left out.
    Files are written in a staging folder and moved into place; index.json is removed first and
    written last, so an interrupted run leaves a folder the loader refuses rather than a mixed one.
    Returns the index.
    """
    fingerprint = checkpoints.layout_fingerprint if isinstance(checkpoints, PackedTargets) else None
    num_checkpoints = dict(checkpoints.num_checkpoints if isinstance(checkpoints, PackedTargets) else checkpoints)
    _validate(num_checkpoints, prompt_pools, config)
    tasks = sorted(prompt_pools)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".shard-staging-", dir=out_dir))
    try:
        (staging / PROMPTS_DIR).mkdir()
        task_index = {}
        for task in tasks:
            rel = f"{PROMPTS_DIR}/{task}.jsonl"
            _write_pool(staging / rel, prompt_pools[task])
            task_index[task] = {
                "prompts": rel,
                "pool_size": len(prompt_pools[task]),
                "pool_sha256": sha256_file(staging / rel),
                "num_checkpoints": num_checkpoints[task],
                "pairs": config.pairs_per_task,
            }

        # Interleave: position i of the stream takes the next pair of task order[i].
        order = np.repeat(np.arange(len(tasks)), config.pairs_per_task)
        np.random.default_rng(config.seed).shuffle(order)
        streams = [_task_pairs(t, num_checkpoints[t], len(prompt_pools[t]), config) for t in tasks]

        shards: list[dict] = []

        def finish_shard(fname: str) -> None:
            shards.append({"file": Path(fname).name, "samples": writer.count, "sha256": sha256_file(fname)})

        # mtime=0 makes the tar bytes a function of the content only: same seed, same shards.
        writer = wds.ShardWriter(
            str(staging / SHARD_PATTERN), maxcount=config.shard_size, maxsize=float("inf"),
            post=finish_shard, verbose=0, mtime=0,
        )
        with writer:
            for key, task_id in enumerate(tqdm(order.tolist(), desc="dnd shard", unit="pair", disable=not progress)):
                checkpoint, prompt_ids = next(streams[task_id])
                payload = {"task": tasks[task_id], "checkpoint": checkpoint, "prompt_ids": prompt_ids}
                writer.write({"__key__": f"{key:09d}", "json": json.dumps(payload, separators=(",", ":")).encode()})

        index = {
            "format": FORMAT_VERSION,
            "shards": shards,
            "num_samples": int(len(order)),
            "num_prompts": config.num_prompts,
            "seed": config.seed,
            "tasks": task_index,
            "targets_fingerprint": fingerprint,
            "config": asdict(config),
        }
        _replace_shard_set(staging, out_dir, index)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return index


def _replace_shard_set(staging: Path, out_dir: Path, index: dict) -> None:
    """Swap the staged files in for any previous shard set; index.json last."""
    (out_dir / INDEX_FILE).unlink(missing_ok=True)
    for old in list(out_dir.glob("pairs-*.tar")) + list((out_dir / PROMPTS_DIR).glob("*.jsonl")):
        old.unlink()
    (out_dir / PROMPTS_DIR).mkdir(exist_ok=True)
    for rel in [s["file"] for s in index["shards"]] + [t["prompts"] for t in index["tasks"].values()]:
        os.replace(staging / rel, out_dir / rel)
    write_json(out_dir / INDEX_FILE, index)


def read_shard_index(shards_dir: str | os.PathLike) -> dict:
    """Load and check `<shards_dir>/index.json`: format, and every listed file present."""
    shards_dir = Path(shards_dir)
    path = shards_dir / INDEX_FILE
    if not path.exists():
        raise ShardsError(f"no shard set at {shards_dir} (no {INDEX_FILE}); run `dnd shard`")
    with open(path, encoding="utf-8") as f:
        index = json.load(f)
    if index.get("format") != FORMAT_VERSION:
        raise ShardsError(
            f"{path} has format {index.get('format')!r}, this code reads format {FORMAT_VERSION}; re-run `dnd shard`"
        )
    missing = [s["file"] for s in index["shards"] if not (shards_dir / s["file"]).exists()]
    missing += [t["prompts"] for t in index["tasks"].values() if not (shards_dir / t["prompts"]).exists()]
    if missing:
        raise ShardsError(f"shard set at {shards_dir} is missing {missing[:5]} ({len(missing)} files); re-run `dnd shard`")
    return index


def load_prompt_pools(shards_dir: str | os.PathLike, index: dict) -> dict[str, list[str]]:
    """Read every task's prompt pool, checking its sha256 and size against the index."""
    shards_dir = Path(shards_dir)
    pools = {}
    for task, entry in index["tasks"].items():
        path = shards_dir / entry["prompts"]
        if sha256_file(path) != entry["pool_sha256"]:
            raise ShardsError(f"{path} changed since `dnd shard` wrote it (sha256 differs); re-run `dnd shard`")
        with open(path, encoding="utf-8") as f:
            pools[task] = [json.loads(line)["prompt"] for line in f]
        if len(pools[task]) != entry["pool_size"]:
            raise ShardsError(
                f"{path} has {len(pools[task])} prompts, index.json says {entry['pool_size']}; re-run `dnd shard`"
            )
    return pools


def shard_set_id(index: dict) -> str:
    """Identity of a shard set (file names, counts and hashes): a saved data position is only
    valid for the set it was taken on."""
    return canonical_json_sha256(index["shards"])


def collected_prompt_pools(run_dir: Path, specs: list[str], synthetic_records: int) -> dict[str, list[str]]:
    """Prompt pools of the tasks `dnd collect` trained on, reloaded from their specs.

    Synthetic families are regenerated with the seed recorded in collect.json, and every task must
    give the records its checkpoints were trained on (the fingerprint in its completion marker).
    """
    # collect imports the model stack; only the command line needs it.
    from dnd_scale.collect import CHECKPOINTS, COMPLETE
    from dnd_scale.tasks import load_tasks

    collect_meta = read_json(run_dir / CHECKPOINTS / "collect.json", "collect metadata (run `dnd collect` first)")
    tasks = load_tasks(specs, num_records=synthetic_records, seed=collect_meta["config"]["seed"])
    for task in tasks:
        marker = run_dir / CHECKPOINTS / task.name / COMPLETE
        if not marker.is_file():
            raise ShardsError(f"task {task.name!r} has not been collected in {run_dir}; run `dnd collect` for it")
        if read_json(marker, "task completion marker")["task_fingerprint"] != task.fingerprint():
            raise ShardsError(
                f"task {task.name!r} from {task.source!r} gives other records than its checkpoints were "
                f"trained on; pass the task specs and --synthetic-records given to `dnd collect`"
            )
    return {task.name: task.prompts for task in tasks}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="dnd shard",
        description="Pair N-prompt batches (prompts only) with checkpoints of their task in WebDataset shards "
                    "under <run>/shards. Overrides: --shard.field=value (e.g. --shard.num_prompts=64).",
    )
    parser.add_argument("--run", required=True, help="run folder holding targets/ from `dnd pack`")
    parser.add_argument("--config", help="YAML recipe; its `shard:` section and `tasks:` list are read")
    parser.add_argument("--tasks", nargs="+", metavar="SPEC", help="the task specs given to `dnd collect` "
                        "(default: the recipe's tasks)")
    parser.add_argument("--synthetic-records", type=int, default=256, help="records per synthetic task, as for collect")
    # Imported here: the config machinery is for the command line only.
    from dnd_scale.config import parse_stage_args

    args, config, recipe = parse_stage_args(parser, argv, ShardConfig, "shard")
    specs = args.tasks or list(recipe.get("tasks") or [])
    if not specs:
        parser.error("no tasks: pass --tasks SPEC ... or list them under `tasks:` in the recipe")
    run_dir = Path(args.run)
    pools = collected_prompt_pools(run_dir, specs, args.synthetic_records)
    index = build_shards(PackedTargets(run_dir / "targets"), pools, run_dir / "shards", config)
    print(f"dnd shard: {index['num_samples']} pairs of {len(pools)} tasks in {len(index['shards'])} shards "
          f"-> {run_dir / 'shards'}")
    return 0
