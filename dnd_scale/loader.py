"""Streaming loader: pair shards in, batches of (prompts, target tokens, mask, weights) out.

Each rank builds a `PairLoader`. Per epoch the shard list is shuffled with a seed shared by all
ranks, split by rank, then by DataLoader worker; with `resampled=True` every worker instead draws
shards with replacement forever. Every worker reads whole shards (a few MB), decodes their blocks
of pairs (`dnd_scale.shards.decode_block`), checks every pair, shuffles all pairs of the shard,
gathers target tokens from the memory-mapped packed targets and batches; the training process then
looks the prompt strings up in its own copy of the pools (sending B x N strings from a worker costs
more than reading the shard). All randomness derives from (seed, epoch, rank, worker, shard
ordinal), so the stream is a pure function of the configuration.

Damaged data is logged, counted and skipped, counted in pairs ("samples"): an unreadable or
truncated shard (read error, or fewer pairs than index.json lists) counts in `corrupt_shards` and
the pairs it lost in `lost_samples`; a tar member that is not a valid block counts all its pairs in
`bad_samples`, as does a single pair with an index out of range or repeated prompts. Workers send
their counts along with their batches, so `PairLoader.skipped` holds exactly the skips behind the batches
handed out so far, summed over workers, and survives save/restore without double counting.

Position: after each batch the loader records, per worker, the next (shard ordinal, sample) and
which worker the DataLoader serves next. `load_state_dict` restores it; the workers then skip the
shards before their position without opening them, skip the consumed samples of the current one,
and worker roles are rotated so the DataLoader's round robin resumes with the worker that was
next: the resumed stream is batch for batch the rest of the uninterrupted one.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import math
import os
import random
import signal
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from dnd_scale.shards import (
    BLOCK_SUFFIX,
    INDEX_FILE,
    PairBlock,
    ShardsError,
    decode_block,
    load_prompt_pools,
    parse_block_key,
    read_shard_index,
    shard_set_id,
)
from dnd_scale.targets import PackedTargets

log = logging.getLogger(__name__)

SKIP_KINDS = ("corrupt_shards", "lost_samples", "bad_samples")

Pair = tuple[str, int, list[int]]  # (task, checkpoint index, N prompt indices)


@dataclass
class LoaderConfig:
    """How a rank streams pairs from the shards."""

    batch_size: int = 4
    """Pairs per batch on each rank (the micro-batch). Each worker's last batch of an epoch may be smaller."""
    num_workers: int = 2
    """DataLoader worker processes per rank; 0 reads in the calling process. Part of the stream's
    definition: a saved position resumes only with the same value."""
    seed: int = 0
    """Base seed; shard order, order within shards and resampling derive from (seed, epoch, rank, worker)."""
    resampled: bool = False
    """Endless stream: each worker draws shards with replacement instead of one pass over its share
    (no epochs; use it when ranks must never run out at different times)."""
    prefetch_factor: int = 2
    """Batches each worker prepares ahead."""


def derive_seed(*parts: int) -> int:
    """A well-mixed 32-bit seed from non-negative integers (seed, epoch, rank, worker, ...)."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


def epoch_shard_order(num_shards: int, seed: int, epoch: int) -> list[int]:
    """The shard permutation of an epoch; the same on every rank, so the rank split is a partition."""
    order = list(range(num_shards))
    random.Random(derive_seed(seed, epoch)).shuffle(order)
    return order


def worker_share(order: Sequence[int], rank: int, world_size: int, worker: int, num_workers: int) -> list[int]:
    """Shards of one (rank, worker): every world_size-th from `rank`, then every num_workers-th.

    Same rule as webdataset's split_by_node / split_by_worker, which read the rank from the
    environment and the worker from torch; here both are explicit, because a resumed run maps
    DataLoader workers to rotated roles.
    """
    return list(order)[rank::world_size][worker::num_workers]


def check_pairs(block: PairBlock, num_checkpoints: np.ndarray, pool_sizes: np.ndarray) -> np.ndarray:
    """Which pairs of a decoded block are valid: (B,) bool.

    num_checkpoints, pool_sizes: (num_tasks,) K and M of each task, in the set's task order. A pair
    is valid if its task exists, its checkpoint is below K, and its N prompt indices are distinct
    and below M (indices decode as non-negative).
    """
    known = block.task < len(num_checkpoints)
    task = np.where(known, block.task, 0)
    ids = np.sort(block.prompt_ids, axis=1)  # (B, N)
    return (
        known
        & (block.checkpoint < num_checkpoints[task])
        & (ids[:, -1] < pool_sizes[task])
        & (ids[:, 1:] != ids[:, :-1]).all(axis=1)
    )


def collate_pairs(pairs: Sequence[Pair], targets: PackedTargets) -> dict:
    """Batch B pairs: {"prompt_ids": (B, N) long, "task": B names, "checkpoint": (B,) long,
    "tokens": (B, T, H, W) float32}. The loader's batches hold the same, plus "pair_id"."""
    tasks = [task for task, _, _ in pairs]
    checkpoints = [checkpoint for _, checkpoint, _ in pairs]
    return {
        "prompt_ids": torch.tensor([ids for _, _, ids in pairs], dtype=torch.long),  # (B, N)
        "task": tasks,
        "checkpoint": torch.tensor(checkpoints, dtype=torch.long),  # (B,)
        "tokens": targets.gather(tasks, checkpoints),  # (B, T, H, W)
    }


def gather_prompts(tasks: Sequence[str], prompt_ids: torch.Tensor, pools: Mapping[str, list[str]]) -> list[list[str]]:
    """The prompt strings of a batch: B lists of N, looked up in each pair's own task pool."""
    return [[pools[task][i] for i in ids] for task, ids in zip(tasks, prompt_ids.tolist(), strict=True)]


@dataclass
class _Position:
    """Where a worker's stream continues: the next sample is `sample` of its `shard`-th shard."""

    shard: int = 0
    sample: int = 0
    done: bool = False


class _PairStream(IterableDataset):
    """One rank's batches for one run of the DataLoader, produced inside its workers.

    Each worker yields messages: the batch's pairs (`_pairs`, see `_message`) and tokens, plus
    `_worker`, `_next` (position after the batch), `_done` and `_skipped` (counts since the worker's
    previous message). The last message
    of a worker has `_done` and may carry no pairs, only the counts of trailing skips.
    """

    def __init__(self, loader: PairLoader, positions: list[_Position], first_worker: int):
        self.shards_dir = loader.shards_dir
        self.shards = loader.index["shards"]
        self.targets = loader.targets if loader.gather_tokens else None
        self.config = loader.config
        self.rank, self.world_size, self.epoch = loader.rank, loader.world_size, loader.epoch
        self.num_prompts = loader.index["num_prompts"]
        encoding = loader.index["encoding"]
        self.block_size, self.bits = encoding["block_size"], encoding["prompt_bits"]
        self.task_names = encoding["task_names"]
        tasks = loader.index["tasks"]
        self.num_checkpoints = np.array([tasks[t]["num_checkpoints"] for t in self.task_names], dtype=np.int64)
        self.pool_sizes = np.array([tasks[t]["pool_size"] for t in self.task_names], dtype=np.int64)
        self.positions = positions
        self.first_worker = first_worker

    def _shard_stream(self, worker: int, num_workers: int, seed: int) -> Iterator[dict]:
        if self.config.resampled:
            urls = [s["file"] for s in self.shards]
            by_file = {s["file"]: s for s in self.shards}
            # Seeded per (seed, epoch, rank, worker) through worker_seed; deterministic=True keeps
            # pid and time out of it.
            shards = wds.ResampledShards(urls, seed=0, worker_seed=lambda: seed, deterministic=True)
            return (by_file[item["url"]] for item in shards)
        order = epoch_shard_order(len(self.shards), self.config.seed, self.epoch)
        return iter([self.shards[i] for i in worker_share(order, self.rank, self.world_size, worker, num_workers)])

    def _decode(self, sample: Mapping, shard: dict) -> PairBlock:
        """A member as a block of this shard, or ValueError; its expected pair count is checked."""
        if BLOCK_SUFFIX not in sample:
            found = sorted(k for k in sample if not k.startswith("__"))
            raise ValueError(f"no .{BLOCK_SUFFIX} member (found {found})")
        block = decode_block(sample[BLOCK_SUFFIX], parse_block_key(sample["__key__"]), self.bits, self.num_prompts)
        expected = self._block_pairs(sample["__key__"], shard)
        if len(block.pair_id) != expected:
            raise ValueError(f"block holds {len(block.pair_id)} pairs, this shard's layout says {expected}")
        return block

    def _block_pairs(self, key: str, shard: dict) -> int:
        """Pairs the member `key` must hold (blocks of block_size from the shard's first pair); 0
        for a key that is not a block start of this shard."""
        try:
            first = parse_block_key(key)
        except ValueError:
            return 0
        offset, end = first - shard["first_pair"], shard["first_pair"] + shard["samples"]
        if offset < 0 or first >= end or offset % self.block_size:
            return 0
        return min(self.block_size, end - first)

    def _read_shard(self, shard: dict, seed: int) -> tuple[PairBlock, list[int]]:
        """All valid pairs of a shard in a seeded order, and the skip counts found reading it."""
        url = str(self.shards_dir / shard["file"])
        errors: list[Exception] = []

        def on_error(exn: Exception) -> bool:
            # webdataset handler: a read error ends the shard; what was read before it is kept.
            log.warning("shard %s is damaged, skipping the rest of it: %r", url, exn)
            errors.append(exn)
            return True

        blocks, seen, bad = [], 0, 0
        for sample in wds.tarfile_samples([{"url": url}], handler=on_error):
            try:
                block = self._decode(sample, shard)
            except ValueError as exn:
                lost_here = self._block_pairs(sample.get("__key__", ""), shard)
                bad += lost_here
                seen += lost_here
                log.warning("skipping block %s of %s (%d pairs): %s", sample.get("__key__"), url, lost_here, exn)
                continue
            valid = check_pairs(block, self.num_checkpoints, self.pool_sizes)  # (B,) bool
            seen += len(valid)
            if not valid.all():
                bad += int((~valid).sum())
                log.warning("skipping %d pairs of block %s of %s: task, checkpoint or prompt index out of range, "
                            "or repeated prompts", int((~valid).sum()), sample["__key__"], url)
                block = PairBlock(*(getattr(block, f.name)[valid] for f in fields(PairBlock)))
            blocks.append(block)
        # A tar cut at a header boundary reads as a shorter, valid tar: only the count shows it.
        lost = max(shard["samples"] - seen, 0)
        if lost and not errors:
            log.warning("shard %s has %d pairs, %s lists %d: truncated", url, seen, INDEX_FILE, shard["samples"])
        pairs = _concat(blocks, self.num_prompts)
        order = np.random.default_rng(seed).permutation(len(pairs.pair_id))
        pairs = PairBlock(*(getattr(pairs, f.name)[order] for f in fields(PairBlock)))
        return pairs, [int(bool(errors) or lost > 0), lost, bad]

    def _message(self, pending: list[PairBlock], worker: int, position: tuple[int, int], done: bool, skipped: list[int]) -> dict:
        message = {"_worker": worker, "_next": position, "_done": done, "_skipped": skipped}
        if pending:
            rows = _concat(pending, self.num_prompts)
            # The indices travel as one bytes object: pickled through the worker's pipe, it costs
            # less than a tensor per field (each would go through its own shared-memory segment),
            # and the DataLoader passes bytes on untouched. See `_unpack_pairs`.
            columns = [rows.pair_id[:, None], rows.task[:, None], rows.checkpoint[:, None], rows.prompt_ids]
            message["_pairs"] = np.concatenate(columns, axis=1).astype(np.int64).tobytes()  # (B, 3 + N) int64
            if self.targets is not None:
                tasks = [self.task_names[t] for t in rows.task.tolist()]
                message["tokens"] = self.targets.gather(tasks, rows.checkpoint.tolist())  # (B, T, H, W)
        return message

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        physical, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        worker = (physical + self.first_worker) % num_workers
        start = self.positions[worker]
        if start.done:
            return
        seed = derive_seed(self.config.seed, self.epoch, self.rank, worker)
        batch_size = self.config.batch_size
        pending: list[PairBlock] = []
        pending_pairs = 0
        skipped = [0] * len(SKIP_KINDS)
        position = (start.shard, start.sample)
        for ordinal, shard in enumerate(self._shard_stream(worker, num_workers, seed)):
            if ordinal < start.shard:
                continue  # consumed before the restore: not even opened
            log.info("rank %d of %d, worker %d, epoch %d: reading shard %s",
                     self.rank, self.world_size, worker, self.epoch, shard["file"])
            pairs, counts = self._read_shard(shard, derive_seed(seed, ordinal))
            j = start.sample if ordinal == start.shard else 0
            if j == 0:
                # The skips of a partly consumed shard went out with its first batch, before the save.
                skipped = [a + b for a, b in zip(skipped, counts)]
            n = len(pairs.pair_id)
            while j < n:
                take = min(batch_size - pending_pairs, n - j)
                pending.append(PairBlock(*(getattr(pairs, f.name)[j : j + take] for f in fields(PairBlock))))
                pending_pairs += take
                j += take
                position = (ordinal, j)
                if pending_pairs == batch_size:
                    yield self._message(pending, worker, position, False, skipped)
                    pending, pending_pairs, skipped = [], 0, [0] * len(SKIP_KINDS)
        yield self._message(pending, worker, position, True, skipped)


def _unpack_pairs(data: bytes, num_prompts: int, task_names: Sequence[str]) -> dict:
    """A worker's `_pairs` bytes as batch fields: {"prompt_ids": (B, N) long, "task": B names,
    "checkpoint": (B,) long, "pair_id": (B,) long}."""
    rows = torch.from_numpy(np.frombuffer(data, dtype=np.int64).reshape(-1, 3 + num_prompts).copy())  # (B, 3 + N)
    return {
        "prompt_ids": rows[:, 3:],  # (B, N)
        "task": [task_names[t] for t in rows[:, 1].tolist()],
        "checkpoint": rows[:, 2],  # (B,)
        "pair_id": rows[:, 0],  # (B,)
    }


def _as_is(message: dict) -> dict:
    return message


def _start_workers(loader: DataLoader) -> Iterator[dict]:
    """The DataLoader's iterator, its workers forked with SIGTERM blocked.

    torch gives each worker a SIGTERM handler that kills it, and SLURM and the deepspeed launcher
    signal every process of a job: the workers would die before the trainer saves its checkpoint.
    A blocked signal stays blocked across fork, so the workers never act on a job-wide SIGTERM
    (`_obey_parent_sigterm` lets them obey their parent's); the calling process unblocks it at once
    and gets any SIGTERM that arrived meanwhile.
    """
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        iterator = iter(loader)  # the workers start here
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
    _STARTED[:] = [process for process in _STARTED if process.exitcode is None]  # forget finished ones
    _STARTED.extend(getattr(iterator, "_workers", []))
    return iterator


_STARTED: list = []
"""Every worker process `_start_workers` started (multiprocessing.Process objects)."""


@atexit.register
def _kill_lingering_workers() -> None:
    """At exit, SIGKILL any worker still alive. Python's own exit handler (registered earlier, so it
    runs after this one) SIGTERMs its daemonic children and then waits for each without a limit: a
    worker that does not act on SIGTERM (it is blocked until `_obey_parent_sigterm` runs) must not
    hold the process after an error or a Ctrl-C. A safety net: the interrupt test passes without it."""
    for process in _STARTED:
        with contextlib.suppress(AssertionError, ValueError, ProcessLookupError):  # not our child, or gone
            if process.is_alive():
                os.kill(process.pid, signal.SIGKILL)
    _STARTED.clear()


def _obey_parent_sigterm(worker_id: int) -> None:
    """In a worker started with SIGTERM blocked: exit on a SIGTERM from the parent, ignore others.

    The parent sends SIGTERM to stop a worker that did not exit when asked (torch's shutdown, and
    Python's at exit for every daemonic child, which then waits for it): a worker that never acted on
    it kept the process from exiting after an error or a Ctrl-C. A job-wide SIGTERM comes from
    another process and is left to the trainer, which checkpoints and then stops its workers.
    """
    if signal.SIGTERM not in signal.pthread_sigmask(signal.SIG_BLOCK, set()):
        return  # not started by _start_workers: torch's own handler acts
    parent = os.getppid()

    def wait() -> None:
        while signal.sigwaitinfo({signal.SIGTERM}).si_pid != parent:
            pass
        os._exit(0)

    threading.Thread(target=wait, name="sigterm-from-parent", daemon=True).start()


def _concat(blocks: list[PairBlock], num_prompts: int) -> PairBlock:
    """One block of the pairs of several, in order (an empty one for none)."""
    if len(blocks) == 1:
        return blocks[0]
    if not blocks:
        empty = np.empty(0, dtype=np.int64)
        return PairBlock(empty, empty, empty, np.empty((0, num_prompts), dtype=np.int64))
    return PairBlock(*(np.concatenate([getattr(b, f.name) for b in blocks]) for f in fields(PairBlock)))


class PairLoader:
    """Batches of pairs for one rank, resumable; iterate it once per epoch.

    Iteration yields {"prompts": B lists of N strings, "prompt_ids": (B, N) long, "task": B names,
    "checkpoint": (B,) long, "pair_id": (B,) long, "tokens": (B, T, H, W) float32, "mask": (T, H, W)
    bool, "weights": (T,) float32}; mask and weights are the same tensors in every batch. pair_id is
    the pair's position in the order `dnd shard` wrote the set: unique, so an epoch can be audited.
    A full pass advances `epoch`; breaking out keeps the position, and the next iteration (or a
    restored `state_dict`) continues there. With `resampled=True` iteration never ends.
    """

    def __init__(
        self,
        shards_dir: str | os.PathLike,
        targets: PackedTargets | str | os.PathLike,
        config: LoaderConfig,
        rank: int | None = None,
        world_size: int | None = None,
        gather_tokens: bool = True,
    ):
        """rank / world_size default to torch.distributed's when it is initialized, else 0 / 1.

        gather_tokens=False: batches hold the indices only (prompt_ids, task, checkpoint, pair_id;
        no tokens, mask, weights or prompt strings), for audits and benchmarks of the index path.
        The stream (order, positions, skips) is the same either way.
        """
        if rank is None or world_size is None:
            dist = torch.distributed.is_available() and torch.distributed.is_initialized()
            rank = torch.distributed.get_rank() if dist else 0
            world_size = torch.distributed.get_world_size() if dist else 1
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}); found {rank}")
        if config.batch_size < 1 or config.num_workers < 0:
            raise ValueError(
                f"batch_size must be >= 1 and num_workers >= 0; found {config.batch_size}, {config.num_workers}"
            )
        self.shards_dir = Path(shards_dir)
        self.config = config
        self.rank, self.world_size = rank, world_size
        self.gather_tokens = gather_tokens
        self.index = read_shard_index(self.shards_dir)
        self.targets = targets if isinstance(targets, PackedTargets) else PackedTargets(targets)
        self._check_targets()
        num_shards = len(self.index["shards"])
        if not config.resampled and num_shards < world_size:
            raise ShardsError(
                f"{num_shards} shards cannot feed {world_size} ranks (a rank would get no data); "
                f"re-run `dnd shard` with a smaller shard_size, or use resampled=True"
            )
        if not config.resampled and num_shards < world_size * max(config.num_workers, 1):
            log.warning(
                "%d shards for %d ranks x %d workers: some workers get no shards; a smaller "
                "shard_size spreads the work", num_shards, world_size, config.num_workers,
            )
        self.pools = load_prompt_pools(self.shards_dir, self.index)
        # The pools as object arrays: a batch's B x N strings are then B fancy-index calls, not B x N
        # Python lookups (these run in the training process, for every batch).
        self._pool_arrays = {task: np.array(pool, dtype=object) for task, pool in self.pools.items()}
        self._num_workers = max(config.num_workers, 1)  # the number of worker roles in the stream
        self.epoch = 0
        self._positions = [_Position() for _ in range(self._num_workers)]
        self._first_worker = 0
        self._skipped = dict.fromkeys(SKIP_KINDS, 0)

    def _check_targets(self) -> None:
        fingerprint = self.index.get("targets_fingerprint")
        if fingerprint is not None and fingerprint != self.targets.layout_fingerprint:
            raise ShardsError(
                f"shards at {self.shards_dir} were made for targets of layout {fingerprint[:12]}, "
                f"the targets given are layout {self.targets.layout_fingerprint[:12]}; re-run `dnd shard`"
            )
        have = self.targets.num_checkpoints
        wrong = {t: e["num_checkpoints"] for t, e in self.index["tasks"].items() if have.get(t) != e["num_checkpoints"]}
        if wrong:
            raise ShardsError(
                f"shards reference checkpoints {wrong} (task: count) but the packed targets hold "
                f"{ {t: have.get(t) for t in wrong} }; re-run `dnd shard` after `dnd pack`"
            )

    @property
    def skipped(self) -> dict[str, int]:
        """Skips behind the batches handed out so far, summed over workers and epochs."""
        return dict(self._skipped)

    def batches_per_rank(self, epoch: int) -> list[int]:
        """Batches each rank yields in `epoch` if no shard is damaged (ranks may differ by a few:
        a trainer that needs equal step counts stops every rank at the minimum)."""
        if self.config.resampled:
            raise ValueError("a resampled stream is endless: it has no batches per epoch")
        counts = [s["samples"] for s in self.index["shards"]]
        order = epoch_shard_order(len(counts), self.config.seed, epoch)

        def batches(rank: int, worker: int) -> int:
            share = worker_share(order, rank, self.world_size, worker, self._num_workers)
            return math.ceil(sum(counts[i] for i in share) / self.config.batch_size)

        return [sum(batches(r, w) for w in range(self._num_workers)) for r in range(self.world_size)]

    def __iter__(self) -> Iterator[dict]:
        stream = _PairStream(self, [_Position(**vars(p)) for p in self._positions], self._first_worker)
        workers = self.config.num_workers
        loader = DataLoader(
            stream,
            batch_size=None,  # the workers batch: a batch never mixes workers, so positions stay per worker
            collate_fn=_as_is,  # messages are ready: default_convert would walk every field of every one
            num_workers=workers,
            prefetch_factor=self.config.prefetch_factor if workers > 0 else None,
            worker_init_fn=_obey_parent_sigterm,
        )  # in order (the default): the round robin over workers is part of the stream's definition
        for message in _start_workers(loader):
            worker = message.pop("_worker")
            shard, sample = message.pop("_next")
            self._positions[worker] = _Position(shard, sample, message.pop("_done"))
            self._first_worker = (worker + 1) % self._num_workers
            for kind, count in zip(SKIP_KINDS, message.pop("_skipped")):
                self._skipped[kind] += count
            if "_pairs" in message:
                pairs = _unpack_pairs(message.pop("_pairs"), self.index["num_prompts"], self.index["encoding"]["task_names"])
                message = {**pairs, **message}
            if message and self.gather_tokens:
                prompt_ids = message["prompt_ids"].numpy()  # (B, N)
                message["prompts"] = [self._pool_arrays[t][ids].tolist() for t, ids in zip(message["task"], prompt_ids)]
                message["mask"] = self.targets.mask  # (T, H, W)
                message["weights"] = self.targets.weights  # (T,)
            if message:
                yield message
        self.epoch += 1
        self._positions = [_Position() for _ in range(self._num_workers)]
        self._first_worker = 0

    def state_dict(self) -> dict:
        """The stream position (JSON-serializable): epoch, per-worker positions, next worker, skip counts."""
        return {
            "epoch": self.epoch,
            "positions": [[p.shard, p.sample, p.done] for p in self._positions],
            "first_worker": self._first_worker,
            "skipped": dict(self._skipped),
            "stream": self._stream_identity(),
        }

    def load_state_dict(self, state: Mapping) -> None:
        """Continue from a saved position; the stream must be defined the same way (shard set,
        seed, batch size, workers, rank, world size, resampling)."""
        if state["stream"] != self._stream_identity():
            raise ValueError(
                f"the saved data position belongs to stream {state['stream']}, this loader is "
                f"{self._stream_identity()}; resume with the same shards, seed, batch_size, "
                f"num_workers, rank and world size, or start a fresh epoch without loading the position"
            )
        self.epoch = int(state["epoch"])
        self._positions = [_Position(int(s), int(j), bool(d)) for s, j, d in state["positions"]]
        self._first_worker = int(state["first_worker"])
        self._skipped = {kind: int(state["skipped"][kind]) for kind in SKIP_KINDS}

    def _stream_identity(self) -> dict:
        return {
            "shard_set": shard_set_id(self.index),
            "seed": self.config.seed,
            "batch_size": self.config.batch_size,
            "num_workers": self._num_workers,
            "rank": self.rank,
            "world_size": self.world_size,
            "resampled": self.config.resampled,
        }
