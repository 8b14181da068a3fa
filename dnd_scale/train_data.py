"""What a rank of `dnd train` trains on: the run's checked inputs, its stream of micro-batches, and
their conditions.

`TrainingData` opens and verifies the packed targets, the shard set and its prompt pools (every
rank, the same verdict everywhere). `PairStream` turns a rank's `PairLoader` into an endless,
resumable stream of full micro-batches. `ConditionSource` gives a batch's conditions from the
memory-mapped prompt-pool caches (built once by `condition_source`; no encoder work per step) or
from the encoder on the fly.
"""

from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Mapping, Protocol

import torch
from torch import Tensor
from tqdm import tqdm

from dnd_scale.encoder import (
    CACHE_DTYPES,
    ConditionCache,
    ConditionEncoder,
    EncoderConfig,
    condition_cache_bound,
    encoder_weights_sha256,
    resolve_encoder_path,
)
from dnd_scale.io import ArtifactError, sha256_text, write_json
from dnd_scale.loader import LoaderConfig, PairLoader
from dnd_scale.resident import ResidentData
from dnd_scale.rundir import RunDir
from dnd_scale.shards import load_prompt_pools, read_shard_index, verify_shards
from dnd_scale.targets import PackedTargets
from dnd_scale.train_config import TrainConfig, TrainError


class BatchStream(Protocol):
    """A rank's endless, resumable sequence of micro-batches (dicts as `loader.collate_pairs` makes).

    A stream that skips damaged data also has `skipped`: {kind: count} of `loader.SKIP_KINDS` so far;
    the trainer logs it (a stream without it skips nothing)."""

    def __next__(self) -> dict: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: Mapping) -> None: ...


@dataclass
class TrainingData:
    """The inputs of a run every rank opens: packed targets, shard set, prompt pools."""

    targets: PackedTargets
    shards_dir: Path
    shard_index: dict
    pools: dict[str, list[str]]
    resident: ResidentData | None = None
    """The targets and conditions on the device (train.resident); its batches then carry indices only."""

    @classmethod
    def open(cls, run_dir: Path) -> "TrainingData":
        """Open and check the run's inputs. Every file is hashed against its index on every rank
        (the same verdict everywhere, so no rank waits on one that stopped): an edited or corrupt
        file that still parses would otherwise train silently. Cost: the data's size at sha256
        speed, ~1 GB/s per core from the page cache, which the ranks of one node share (10M pairs
        of shards ~1.5 s; targets of several GB a few seconds more)."""
        run = RunDir(run_dir)
        targets = PackedTargets(run.targets)
        targets.verify()
        index = read_shard_index(run.shards)
        verify_shards(run.shards, index)
        return cls(targets, run.shards, index, load_prompt_pools(run.shards, index))

    @property
    def num_prompts(self) -> int:
        return int(self.shard_index["num_prompts"])


class PairStream:
    """Endless micro-batches of one rank from a `PairLoader`: epochs chained, short batches dropped.

    A worker's last batch of an epoch can be short; training only on full micro-batches keeps every
    rank's share of the global batch equal, so the loss is the plain mean over the global batch.
    """

    def __init__(self, loader: PairLoader) -> None:
        self.loader = loader
        self.batch_size = loader.config.batch_size
        self.dropped = 0
        self._batches: Iterator[dict] | None = None

    def _start_epoch(self) -> dict | None:
        """Begin an epoch and return its first batch. The loader's workers ignore a job-wide SIGTERM
        (`loader._start_workers`): this process checkpoints on it, then stops them."""
        self._batches = iter(self.loader)
        return next(self._batches, None)  # the workers start here

    def __next__(self) -> dict:
        for _ in range(2):  # a fresh epoch must yield a full batch, else the shard set is too small
            batch = self._start_epoch() if self._batches is None else next(self._batches, None)
            while batch is not None:
                if len(batch["task"]) == self.batch_size:
                    return batch
                self.dropped += 1
                batch = next(self._batches, None)
            self._batches = None
        skipped = self.loader.skipped
        if any(skipped.values()):
            raise TrainError(
                f"rank {self.loader.rank} got no full micro-batch of {self.batch_size} pairs in a whole epoch: its "
                f"shards are damaged ({', '.join(f'{n} {kind}' for kind, n in skipped.items())}; see the warnings "
                "above), changed or cut since the run checked them. Restore the shard files and continue with "
                "--resume, or re-run `dnd shard` and train into a new train.output_dir (a checkpoint is bound to "
                "the shards it trained on)"
            )
        raise TrainError(
            f"rank {self.loader.rank} got no full micro-batch of {self.batch_size} pairs in a whole epoch; "
            "lower train.micro_batch_size, write more pairs (`dnd shard`), or use fewer ranks"
        )

    @property
    def skipped(self) -> dict[str, int]:
        """Damaged data skipped behind the batches served so far (`PairLoader.skipped`)."""
        return self.loader.skipped

    def state_dict(self) -> dict:
        return {"loader": self.loader.state_dict(), "dropped": self.dropped}

    def load_state_dict(self, state: Mapping) -> None:
        self.loader.load_state_dict(state["loader"])
        self.dropped = int(state["dropped"])
        self._batches = None


def pair_stream(data: TrainingData, config: TrainConfig, rank: int, world_size: int) -> PairStream:
    """The production stream: this rank's share of the shard set, seeded by (seed, epoch, rank, worker)."""
    loader_config = LoaderConfig(
        batch_size=config.micro_batch_size,
        num_workers=config.num_workers,
        seed=config.seed,
        resampled=config.resampled,
    )
    loader = PairLoader(data.shards_dir, data.targets, loader_config, rank, world_size,
                        gather_tokens=data.resident is None)
    return PairStream(loader)


StreamFactory = Callable[[TrainingData, TrainConfig, int, int], BatchStream]


class ConditionSource:
    """A batch's conditions (B, N, L, D): gathered from prompt-pool caches, or encoded on the spot."""

    def __init__(self, caches: dict[str, ConditionCache] | None = None, encoder: ConditionEncoder | None = None):
        if (caches is None) == (encoder is None):
            raise ValueError("a condition source needs exactly one of caches and encoder")
        self.caches, self.encoder = caches, encoder
        self.dim = encoder.dim if encoder is not None else next(iter(caches.values())).dim

    def __call__(self, batch: Mapping) -> Tensor:  # (B, N, L, D) float32 on the CPU
        if self.encoder is not None:
            return self.encoder.encode_batch(batch["prompts"]).cpu()
        rows = [self.caches[task].gather(ids) for task, ids in zip(batch["task"], batch["prompt_ids"])]
        return torch.stack(rows)  # each row (N, L, D)


def condition_cache_dir(run_dir: Path, encoder_name: str, length: int, cache_dtype: str) -> Path:
    """The folder of a run's prompt-pool caches for one (encoder, L, dtype): runs that share a run
    folder and encoder share the cache."""
    return RunDir(run_dir).conditions / sha256_text(encoder_name, str(length), cache_dtype)[:16]


def condition_source(
    config: EncoderConfig, length: int, pools: Mapping[str, list[str]], run_dir: Path, rank: int, device: torch.device
) -> ConditionSource:
    """Open (rank 0 first builds or refreshes) the caches of every pool, or load the encoder."""
    import deepspeed.comm as dist

    if not config.cache:
        return ConditionSource(encoder=ConditionEncoder(config.name, length, device, config.batch_size))
    name, path = resolve_encoder_path(config.name)
    folder = condition_cache_dir(run_dir, name, length, config.cache_dtype)
    paths = {task: folder / f"{task}.safetensors" for task in pools}
    if rank == 0:
        # Keyed by the encoder's content: new weights saved at the same path make every cache stale.
        weights = encoder_weights_sha256(path, memo=RunDir(run_dir).conditions / "encoder-sha256.json")
        stale = []
        for task, pool in pools.items():
            if paths[task].is_file():
                try:
                    cache = ConditionCache(paths[task])  # checks size and offsets
                    if cache.matches(name, length, pool, weights):
                        cache.verify()  # its data as built: the cache's size at sha256 speed, once a run
                        continue
                except ArtifactError as exn:
                    warnings.warn(f"{exn}. Rebuilding it.", stacklevel=2)
            stale.append(task)
        if stale:
            encoder = ConditionEncoder(config.name, length, device, config.batch_size)
            prompts = sum(len(pools[task]) for task in stale)
            bound = condition_cache_bound(prompts, length, encoder.dim, config.cache_dtype)
            # The one encoder pass of the run, and its largest file write: say so before it starts.
            print(f"dnd train: encoding {prompts} prompts of {len(stale)} tasks once into the condition cache "
                  f"{folder} (at most {bound / 2**20:.0f} MiB; later runs and --resume reuse it; --no-cache "
                  "encodes on the fly instead)", file=sys.stderr, flush=True)
            for task in tqdm(stale, desc="condition cache", unit="task"):
                ConditionCache.build(encoder, pools[task], paths[task], CACHE_DTYPES[config.cache_dtype],
                                     encoder_sha256=weights)
        write_json(folder / "encoder.json", {"encoder": name, "length": length, "dtype": config.cache_dtype})
    dist.barrier()
    return ConditionSource(caches={task: ConditionCache(path) for task, path in paths.items()})
