"""`dnd shard`: pair prompt batches with checkpoints and write them as WebDataset tar shards.

A pair is (task, checkpoint index, N prompt indices). It references the checkpoint's tokens in the
packed targets and the prompts in the task's prompt pool, so a pair costs about N x log2(pool size)
bits however large the model or the prompts are. Output, under `<run>/shards/`:

    prompts/<task>.jsonl    the task's prompt pool, one {"prompt": ...} per line (no answers), stored once
    pairs-000000.tar ...    WebDataset shards of blocks: one tar member `<key>.safetensors` holds
                            `block_size` consecutive pairs as arrays (see `encode_block`); key = the
                            global index of the block's first pair, so pair i of the set has id i
    index.json              format, the block encoding, shards with their pair counts, first pair
                            id and sha256, tasks with pool size, pool sha256 and checkpoint count, N,
                            seed, and the config that made them

Format 1 stored one JSON tar member per pair (~1.5 KB each: a 512-byte tar header plus a padded
payload); a block of 1024 pairs shares one header, and N prompt indices below a pool of M cost
N x ceil(log2 M) bits (160 bytes for N = 128, M = 1000). A format-1 set is refused with a message
to re-run `dnd shard`.

Pairs of all tasks are interleaved in a seeded random order before they are cut into shards, so
every shard mixes tasks and a loader that shuffles shards sees a mixed stream.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import safetensors.numpy
import webdataset as wds
from tqdm import tqdm

from dnd_scale.io import (
    LOCK_FILE,
    ArtifactError,
    atomic_folder,
    exclusive_folder,
    sha256_file,
    write_json,
)
from dnd_scale.rundir import RunDir
from dnd_scale.targets import PackedTargets, canonical_json_sha256, check_task_name

log = logging.getLogger(__name__)

FORMAT_VERSION = 2
INDEX_FILE = "index.json"
PROMPTS_DIR = "prompts"
SHARD_PATTERN = "pairs-%06d.tar"
BLOCK_SUFFIX = "safetensors"  # tar member `<key>.safetensors`


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
    """Pairs per tar shard. Use enough shards that every rank and DataLoader worker gets several: at
    least world_size × num_workers."""
    block_size: int = 1024
    """Pairs per tar member (a block of arrays). Larger blocks spread the 512-byte tar header and the
    safetensors header over more pairs; a damaged member loses its whole block."""
    seed: int = 0
    """Seed for prompt sampling, checkpoint assignment and the interleaving of tasks."""


def _task_seed(seed: int, task: str) -> np.random.SeedSequence:
    # Keyed by the task's name, not its position, so adding a task leaves the others' pairs alone.
    name_key = int.from_bytes(hashlib.sha256(task.encode("utf-8")).digest()[:8], "little")
    return np.random.SeedSequence([seed, name_key])


class _TaskPairs:
    """The pairs of one task, deterministically, taken in chunks: `take(count)` gives the next
    `count` (checkpoint indices (count,), prompt indices (count, N)).

    Checkpoints come from consecutive random permutations of range(K), so they are used equally
    often (±1). Prompt indices come from consecutive N-wide groups of fresh random permutations of
    the pool: each group is a uniform N-subset without replacement and every prompt is used equally
    often. Both streams are drawn in fixed-size refills from their own generators, so what a task
    gets does not depend on how its pairs are interleaved with other tasks'.
    """

    _REFILL_ELEMENTS = 1 << 18  # ~ numbers permuted per refill: few numpy calls, small memory

    def __init__(self, task: str, num_checkpoints: int, pool_size: int, num_prompts: int, seed: int):
        checkpoint_seed, prompt_seed = _task_seed(seed, task).spawn(2)
        self._checkpoint_rng = np.random.default_rng(checkpoint_seed)
        self._prompt_rng = np.random.default_rng(prompt_seed)
        self._k, self._m, self._n = num_checkpoints, pool_size, num_prompts
        self._checkpoints = np.empty(0, dtype=np.int64)
        self._groups = np.empty((0, num_prompts), dtype=np.int64)

    def _checkpoint_refill(self) -> np.ndarray:
        rows = max(1, self._REFILL_ELEMENTS // self._k)
        return self._checkpoint_rng.permuted(np.tile(np.arange(self._k, dtype=np.int64), (rows, 1)), axis=1).reshape(-1)

    def _group_refill(self) -> np.ndarray:
        rows = max(1, self._REFILL_ELEMENTS // self._m)
        groups_per_perm = self._m // self._n
        perms = self._prompt_rng.permuted(np.tile(np.arange(self._m, dtype=np.int64), (rows, 1)), axis=1)
        return perms[:, : groups_per_perm * self._n].reshape(rows * groups_per_perm, self._n)

    @staticmethod
    def _take(buffer: np.ndarray, count: int, refill) -> tuple[np.ndarray, np.ndarray]:
        parts, have = [buffer], len(buffer)
        while have < count:
            parts.append(refill())
            have += len(parts[-1])
        joined = np.concatenate(parts) if len(parts) > 1 else buffer
        return joined[:count], joined[count:]

    def take(self, count: int) -> tuple[np.ndarray, np.ndarray]:
        checkpoints, self._checkpoints = self._take(self._checkpoints, count, self._checkpoint_refill)
        groups, self._groups = self._take(self._groups, count, self._group_refill)
        return checkpoints, groups


def prompt_bits(pool_sizes: Iterable[int]) -> int:
    """Bits per stored prompt index: enough for the largest pool (at least 1)."""
    return max(1, (max(pool_sizes) - 1).bit_length())


def _uint_dtype(limit: int) -> type:
    """The smallest unsigned dtype holding values below `limit`."""
    return next(d for d in (np.uint8, np.uint16, np.uint32, np.uint64) if limit <= np.iinfo(d).max + 1)


@dataclass
class PairBlock:
    """Consecutive pairs of a shard set as arrays (what one tar member holds)."""

    pair_id: np.ndarray
    """(B,) int64: the pairs' positions in the order `dnd shard` wrote them (unique in the set)."""
    task: np.ndarray
    """(B,) int64: index into the shard set's sorted task names."""
    checkpoint: np.ndarray
    """(B,) int64: checkpoint index within the task."""
    prompt_ids: np.ndarray
    """(B, N) int64: prompt indices into the task's pool."""


def encode_block(task: np.ndarray, checkpoint: np.ndarray, prompt_ids: np.ndarray, bits: int,
                 num_tasks: int, num_checkpoints: int) -> bytes:
    """One tar member: the pairs as safetensors arrays (no pickle anywhere).

    task (B,) and checkpoint (B,) in the smallest unsigned dtype below num_tasks / num_checkpoints
    (the largest task's count); prompt_ids (B, N) cut into `bits`-bit little-endian numbers stored as
    `prompt_bytes` (B, bits // 8, N) uint8, one plane per whole byte, and `prompt_bits`
    (B, bits % 8, ceil(N / 8)) uint8, the remaining bit planes packed 8 indices to a byte.
    """
    ids = prompt_ids.astype(np.uint64)[:, None, :]  # (B, 1, N)
    whole, rest = divmod(bits, 8)
    byte_shifts = (8 * np.arange(whole, dtype=np.uint64))[None, :, None]  # (1, bits // 8, 1)
    bit_shifts = (8 * whole + np.arange(rest, dtype=np.uint64))[None, :, None]  # (1, bits % 8, 1)
    byte_planes = ((ids >> byte_shifts) & np.uint64(0xFF)).astype(np.uint8)  # (B, bits // 8, N)
    bit_planes = ((ids >> bit_shifts) & np.uint64(1)).astype(np.uint8)  # (B, bits % 8, N)
    return safetensors.numpy.save({
        "task": task.astype(_uint_dtype(num_tasks)),
        "checkpoint": checkpoint.astype(_uint_dtype(num_checkpoints)),
        "prompt_bytes": byte_planes,
        "prompt_bits": np.packbits(bit_planes, axis=2, bitorder="little"),  # (B, bits % 8, ceil(N / 8))
    })


def decode_block(data: bytes, first_pair: int, bits: int, num_prompts: int) -> PairBlock:
    """The pairs of one tar member; ValueError saying what is wrong if it is not a block of this set.

    Ranges (task, checkpoint, prompt indices against their pools) are the reader's to check.
    """
    try:
        arrays = safetensors.numpy.load(data)
    except Exception as exn:  # safetensors raises its own SafetensorError (an Exception) on bad bytes
        raise ValueError(f"not a safetensors block ({exn})") from None
    expected = {"task", "checkpoint", "prompt_bytes", "prompt_bits"}
    if set(arrays) != expected:
        raise ValueError(f"block holds arrays {sorted(arrays)}, expected {sorted(expected)}")
    task, checkpoint, byte_planes, packed = (arrays[k] for k in ("task", "checkpoint", "prompt_bytes", "prompt_bits"))
    size = len(task)
    whole, rest = divmod(bits, 8)
    shapes = {
        "task": (task.shape, (size,)),
        "checkpoint": (checkpoint.shape, (size,)),
        "prompt_bytes": (byte_planes.shape, (size, whole, num_prompts)),
        "prompt_bits": (packed.shape, (size, rest, -(-num_prompts // 8))),
    }
    wrong = {k: found for k, (found, want) in shapes.items() if found != want}
    if wrong or byte_planes.dtype != np.uint8 or packed.dtype != np.uint8 or size == 0:
        raise ValueError(f"block arrays have shapes {wrong or shapes} (dtypes {byte_planes.dtype}, {packed.dtype}); "
                         f"expected {size} > 0 pairs of N = {num_prompts} indices of {bits} bits")
    if task.dtype.kind != "u" or checkpoint.dtype.kind != "u":
        raise ValueError(f"task / checkpoint arrays are {task.dtype} / {checkpoint.dtype}, expected unsigned integers")
    out_dtype = np.int64
    ids = np.zeros((size, num_prompts), dtype=out_dtype)  # (B, N)
    for j in range(whole):
        ids |= byte_planes[:, j, :].astype(out_dtype) << (8 * j)
    if rest:
        planes = np.unpackbits(packed, axis=2, count=num_prompts, bitorder="little")  # (B, rest, N)
        for k in range(rest):
            ids |= planes[:, k, :].astype(out_dtype) << (8 * whole + k)
    return PairBlock(
        pair_id=np.arange(first_pair, first_pair + size, dtype=np.int64),
        task=task.astype(np.int64),
        checkpoint=checkpoint.astype(np.int64),
        prompt_ids=ids,
    )


def block_key(first_pair: int) -> str:
    return f"{first_pair:010d}"


def parse_block_key(key: str) -> int:
    """The first pair id of a member from its key; ValueError if the key is not one `dnd shard` writes."""
    if not (len(key) == 10 and key.isdigit()):
        raise ValueError(f"member key {key!r} is not a 10-digit pair id")
    return int(key)


def iter_blocks(shards_dir: str | os.PathLike, index: dict) -> Iterator[tuple[dict, PairBlock]]:
    """Every block of a shard set in the order written, with its shard's index entry (no
    shuffling, no range checks: for audits and tools; training reads through the loader)."""
    shards_dir = Path(shards_dir)
    encoding = index["encoding"]
    for shard in index["shards"]:
        for sample in wds.tarfile_samples([{"url": str(shards_dir / shard["file"])}]):
            first = parse_block_key(sample["__key__"])
            yield shard, decode_block(sample[BLOCK_SUFFIX], first, encoding["prompt_bits"], index["num_prompts"])


def _validate(num_checkpoints: Mapping[str, int], prompt_pools: Mapping[str, list[str]], config: ShardConfig) -> None:
    sizes = (config.num_prompts, config.pairs_per_task, config.shard_size, config.block_size)
    if min(sizes) < 1:
        raise ShardsError(f"num_prompts, pairs_per_task, shard_size and block_size must be >= 1; found {sizes}")
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


def writing_shard_set(out_dir: Path) -> contextlib.AbstractContextManager[None]:
    """Refuse a second `dnd shard` of one folder. The set is swapped in whole, so its lock is a file
    beside it: `.<name>.lock`."""
    return exclusive_folder(out_dir.parent, "dnd shard", "wait for it to finish", name=f".{out_dir.name}{LOCK_FILE}")


def build_shards(
    checkpoints: PackedTargets | Mapping[str, int],
    prompt_pools: Mapping[str, list[str]],
    out_dir: str | os.PathLike,
    config: ShardConfig,
    progress: bool = True,
) -> dict:
    """Sample pairs for every task, write shards, prompt pools and `INDEX_FILE` to `out_dir`.

    checkpoints: the packed targets (verified against their hashes first; their layout fingerprint
    is recorded so the loader can refuse shards made for other targets) or a mapping task -> number of checkpoints.
    prompt_pools: task -> prompt strings (prompts only: answers must never be passed here). The
    shards cover these tasks; packed tasks without a pool are left out.
    The set is built whole in a staging folder beside `out_dir` and swapped in for the previous one
    (`atomic_folder`), so an interrupted run leaves the previous set as it was. Returns the index.
    """
    if isinstance(checkpoints, PackedTargets):
        checkpoints.verify()  # pairs must not be cut for targets that changed since packing
    fingerprint = checkpoints.layout_fingerprint if isinstance(checkpoints, PackedTargets) else None
    num_checkpoints = dict(checkpoints.num_checkpoints if isinstance(checkpoints, PackedTargets) else checkpoints)
    _validate(num_checkpoints, prompt_pools, config)
    out_dir = Path(out_dir)
    with writing_shard_set(out_dir):
        with atomic_folder(out_dir, "dnd shard") as staging:
            index = _write_shard_set(staging, num_checkpoints, prompt_pools, config, fingerprint, progress)
    return index


def _write_shard_set(
    staging: Path,
    num_checkpoints: dict[str, int],
    prompt_pools: Mapping[str, list[str]],
    config: ShardConfig,
    fingerprint: str | None,
    progress: bool,
) -> dict:
    """The body of `build_shards`: every file of the set, in `staging`."""
    tasks = sorted(prompt_pools)
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
    streams = [_TaskPairs(t, num_checkpoints[t], len(prompt_pools[t]), config.num_prompts, config.seed) for t in tasks]
    bits = prompt_bits(len(prompt_pools[t]) for t in tasks)
    max_checkpoints = max(num_checkpoints[t] for t in tasks)

    shards: list[dict] = []
    with tqdm(total=len(order), desc="dnd shard", unit="pair", disable=not progress) as bar:
        for start in range(0, len(order), config.shard_size):
            task = order[start : start + config.shard_size]  # (S,)
            checkpoint = np.empty(len(task), dtype=np.int64)  # (S,)
            prompt_ids = np.empty((len(task), config.num_prompts), dtype=np.int64)  # (S, N)
            for t in np.unique(task):
                rows = np.flatnonzero(task == t)
                checkpoint[rows], prompt_ids[rows] = streams[t].take(len(rows))
            path = staging / (SHARD_PATTERN % len(shards))
            # mtime=0 makes the tar bytes a function of the content only: same seed, same shards.
            with wds.TarWriter(str(path), mtime=0, encoder=False) as writer:
                for a in range(0, len(task), config.block_size):
                    b = slice(a, a + config.block_size)
                    member = encode_block(task[b], checkpoint[b], prompt_ids[b], bits, len(tasks), max_checkpoints)
                    writer.write({"__key__": block_key(start + a), BLOCK_SUFFIX: member})
            shards.append({"file": path.name, "samples": len(task), "first_pair": start, "sha256": sha256_file(path)})
            bar.update(len(task))

    index = {
        "format": FORMAT_VERSION,
        "encoding": {
            "member": f"<10-digit first pair id>.{BLOCK_SUFFIX}",
            "block_size": config.block_size,
            "prompt_bits": bits,
            "task_names": tasks,
        },
        "shards": shards,
        "num_samples": int(len(order)),
        "num_prompts": config.num_prompts,
        "seed": config.seed,
        "tasks": task_index,
        "targets_fingerprint": fingerprint,
        "config": asdict(config),
    }
    write_json(staging / INDEX_FILE, index)
    return index


def is_shard_set(shards_dir: str | os.PathLike) -> bool:
    """Whether `shards_dir` holds a shard set (its index); nothing is checked."""
    return (Path(shards_dir) / INDEX_FILE).is_file()


def read_shard_index(shards_dir: str | os.PathLike) -> dict:
    """Load and check `<shards_dir>/INDEX_FILE`: format, and every listed file present."""
    shards_dir = Path(shards_dir)
    path = shards_dir / INDEX_FILE
    if not path.exists():
        raise ShardsError(f"no shard set at {shards_dir} (no {INDEX_FILE}); run `dnd shard`")
    with open(path, encoding="utf-8") as f:
        index = json.load(f)
    if index.get("format") != FORMAT_VERSION:
        found = index.get("format")
        what = " (one JSON tar member per pair)" if found == 1 else ""
        raise ShardsError(
            f"the shard set at {shards_dir} has format {found!r}{what}; this version reads format "
            f"{FORMAT_VERSION} (blocks of pairs as safetensors arrays); re-run `dnd shard` to rewrite it"
        )
    missing = [s["file"] for s in index["shards"] if not (shards_dir / s["file"]).exists()]
    missing += [t["prompts"] for t in index["tasks"].values() if not (shards_dir / t["prompts"]).exists()]
    if missing:
        raise ShardsError(f"shard set at {shards_dir} is missing {missing[:5]} ({len(missing)} files); re-run `dnd shard`")
    return index


def verify_shards(shards_dir: str | os.PathLike, index: dict) -> None:
    """Hash every shard file and compare with `INDEX_FILE`; raise naming each shard that differs.

    An edited shard can still decode (another checkpoint or prompt index in range) and would train
    silently on pairs `dnd shard` never wrote. Cost, once per process: the set's size at sha256
    speed. Measured on one CPU core, files in the page cache: 1M pairs of N = 128 over pools of
    1000 prompts (100 shards, 164 MB) in 0.15 s, so 10M pairs (~1.6 GB) in ~1.5 s.
    """
    shards_dir = Path(shards_dir)
    bad = [s["file"] for s in index["shards"] if sha256_file(shards_dir / s["file"]) != s["sha256"]]
    if bad:
        raise ShardsError(
            f"shard set at {shards_dir}: {len(bad)} shards ({bad[:5]}) do not match the sha256 in "
            f"{INDEX_FILE} (edited or corrupted since `dnd shard` wrote them); re-run `dnd shard`"
        )


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
                f"{path} has {len(pools[task])} prompts, {INDEX_FILE} says {entry['pool_size']}; re-run `dnd shard`"
            )
    return pools


def shard_set_id(index: dict) -> str:
    """Identity of a shard set (file names, counts and hashes): a saved data position is only
    valid for the set it was taken on."""
    return canonical_json_sha256(index["shards"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="dnd shard",
        description="Pair N-prompt batches (prompts only) with checkpoints of their task in WebDataset shards "
                    "under <run>/shards. Overrides: --shard.field=value (e.g. --shard.num_prompts=64).",
    )
    parser.add_argument("--run", required=True, help="run folder holding checkpoints/ (dnd collect: the prompt "
                                                     "pools) and targets/ (dnd pack)")
    parser.add_argument("--config", help="YAML recipe; its `shard:` section is read (default: the recipe saved in "
                                         "the run folder)")
    # Imported here: the recipe machinery and the checkpoint store are for the command line only.
    from dnd_scale.recipe import parse_stage_args
    from dnd_scale.store import read_prompt_pools

    args, run_config = parse_stage_args(parser, argv, "shard")
    run = RunDir(args.run)
    targets = PackedTargets(run.targets)
    pools = read_prompt_pools(run.root, targets.tasks)  # the prompts each packed task was collected with
    index = build_shards(targets, pools, run.shards, run_config.shard)
    print(f"dnd shard: {index['num_samples']} pairs of {len(pools)} tasks in {len(index['shards'])} shards "
          f"-> {run.shards}")
    return 0
