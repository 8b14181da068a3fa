"""`dnd train`: fit the hyper-convolutional generator with DeepSpeed on (prompts → checkpoint) pairs.

The whole flow, top to bottom:

1. `TrainConfig` → the DeepSpeed JSON (`deepspeed_config`), saved beside the run, never hand-edited:
   global batch = micro batch × gradient accumulation × world size.
2. Data: the packed targets and the shard set of `<run>/`; each rank streams its own micro-batches
   (`PairStream` around `dnd_scale.loader.PairLoader`), conditions come from the memory-mapped
   prompt-pool caches (`ConditionSource`; no encoder work per step) or from the encoder on the fly.
3. Engine: `HyperConvGenerator` (built under `deepspeed.zero.Init` for ZeRO-3, so no rank ever holds
   the whole generator), torch AdamW (no JIT-compiled ops, so CPU ranks with gloo work), linear
   warmup + cosine as a `LambdaLR` that the engine steps identically on every rank.
4. Loop: masked, per-token-weighted MSE; one collective per step averages the loss over ranks and
   tells every rank whether any of them received SIGTERM.
5. Checkpoints every K steps and on SIGTERM (at the step boundary, then a clean exit): the engine's
   full state plus, per rank, the data-stream position and RNG states, and the run they belong to
   (resolved train config, data identity), checked on resume; loaded with `weights_only=True`.
   `resume=True` continues the same trajectory; logs are cut back to the checkpoint so they read
   like one uninterrupted run.
6. Export: every parameter's fp32 master copy gathered (ZeRO-3 shards included) into one
   `export/model.safetensors` + `export/config.json` (generator, layout, tokenizer, encoder) on rank 0.

Outputs, under `<run>/<output_dir>/` (default `<run>/generator/`):
    train_config.yaml  deepspeed_config.json  train_info.json  metrics.jsonl  tensorboard/
    checkpoints/<tag>/ + checkpoints/latest   export/{model.safetensors, config.json}

Launch: `dnd train --run RUN` runs one process; `deepspeed [--hostfile H] --no_local_rank $(which dnd)
train --run RUN` runs one rank per GPU (see launchers/).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import pickle
import random
import shutil
import signal
import socket
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Protocol, Sequence

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from dnd_scale.config import flatten, read_yaml, save_config, to_dict
from dnd_scale.encoder import (
    CACHE_DTYPES,
    ConditionCache,
    ConditionEncoder,
    EncoderConfig,
    condition_cache_bound,
    encoder_weights_sha256,
    resolve_encoder_path,
)
from dnd_scale.generator import PRESETS, GeneratorConfig, HyperConvGenerator, generator_loss, resolve_features, resolve_impl
from dnd_scale.generator_export import export_folder, write_export
from dnd_scale.io import (
    ArtifactError,
    DiskFullError,
    FolderBusyError,
    append_jsonl,
    atomic_path,
    exclusive_folder,
    read_json,
    read_jsonl,
    reporting_full_disk,
    sha256_text,
    write_json,
)
from dnd_scale.loader import SKIP_KINDS, LoaderConfig, PairLoader
from dnd_scale.plan import check_gpu_memory
from dnd_scale.resident import ResidentData, resident_bytes, resolve_resident
from dnd_scale.rundir import RunDir
from dnd_scale.shards import load_prompt_pools, read_shard_index, verify_shards
from dnd_scale.store import collected_base, store_dir
from dnd_scale.targets import PackedTargets, canonical_json_sha256

CHECKPOINTS_DIR = "checkpoints"
LATEST = "latest"
METRICS = "metrics.jsonl"
TRAIN_INFO = "train_info.json"  # world size, batch, device, parameters, features; read by experiment and bench
DEFAULT_CONDITION_LENGTH = 128


class TrainError(RuntimeError):
    """Training cannot start or continue as asked; the message says what to do."""


# --------------------------------------------------------------------------------------------------
# 1. Configuration


@dataclass
class TrainConfig:
    """Everything `dnd train` needs besides the run folder (the `train:` section of a recipe)."""

    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    """The generator to build; preset "auto" sizes it from the condition and token geometry."""
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    """The frozen condition encoder and its prompt-pool cache."""
    micro_batch_size: int = 4
    """Pairs per forward/backward pass on each rank."""
    grad_accum_steps: int = 1
    """Micro-batches accumulated per optimizer step; global batch = micro × accumulation × world size."""
    global_batch_size: int | None = None
    """Pairs per optimizer step over all ranks. When set, the accumulation is derived from it at
    launch: global / (micro_batch_size × world size), so the same recipe keeps its batch on any
    number of GPUs (grad_accum_steps must then stay 1); a world size that does not divide it is
    refused. None: the global batch is micro × grad_accum_steps × world size."""
    steps: int = 1000
    """Optimizer steps of the whole run (the cosine schedule ends here). Raise it with `--resume` to
    continue a run past its end: the schedule stays the one the run started with, so the added steps
    train at its final LR (lr × min_lr_ratio)."""
    lr: float = 1e-4
    """Peak learning rate of AdamW, reached at the end of warmup."""
    min_lr_ratio: float = 0.1
    """The cosine decays to lr × min_lr_ratio at the last step."""
    warmup_steps: int = 100
    """Optimizer steps of linear warmup from lr / warmup_steps to lr."""
    weight_decay: float = 0.01
    """AdamW weight decay, applied to the convolution kernels only (not to LayerNorm affines or biases)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    adam_eps: float = 1e-8
    """AdamW epsilon."""
    grad_clip: float = 1.0
    """Clip the global gradient 2-norm to this value; 0 disables clipping."""
    zero_stage: int = 2
    """DeepSpeed ZeRO stage: 0 (replicated), 1 (optimizer states sharded), 2 (+ gradients), 3 (+ parameters)."""
    offload_optimizer: bool = False
    """Keep optimizer states in CPU memory (ZeRO 1-3)."""
    offload_params: bool = False
    """Keep parameters in CPU memory between uses (ZeRO-3 only)."""
    bf16: bool = False
    """Train in bfloat16 with fp32 master weights (meant for GPUs; fp32 on CPU is exact and faster)."""
    seed: int = 0
    """Seed of the generator's initialization and of the data stream."""
    checkpoint_every: int = 500
    """Save a full-state checkpoint every this many optimizer steps (and at the end, and on SIGTERM)."""
    keep_checkpoints: int = 2
    """Checkpoints kept on disk; older ones are deleted after a newer one is complete."""
    log_every: int = 10
    """Write a metrics line (JSONL and TensorBoard) every this many steps."""
    output_dir: str = "generator"
    """Output folder, relative to the run folder (absolute paths are used as they are)."""
    num_workers: int = 2
    """DataLoader worker processes per rank reading shards (0: read in the training process)."""
    resampled: bool = False
    """Draw shards with replacement (an endless stream) instead of epoch after epoch."""
    resident: str = "auto"
    """Where a step's targets and conditions come from. "device": the packed targets and condition
    caches are copied to the GPU once (`dnd_scale.resident`) and each step gathers its pairs there,
    the loader's workers passing indices only; "host": the workers gather them from the memory maps
    and each batch is copied to the GPU; "auto": device on a GPU when they take at most a quarter
    of its free memory and the conditions are cached, else host. The values are the same either way."""
    cudnn_benchmark: bool = True
    """On a GPU, let cuDNN time its algorithms on the first use of each convolution shape (training
    shapes are fixed) instead of taking its heuristic pick. `impl: torch` runs every convolution
    through cuDNN; the Triton path some weight gradients, where its autotuner timed cuDNN faster."""
    gpu_memory_gib: float | None = None
    """Memory of one GPU in GiB (80 for an 80 GB A100/H100, 141 for an H200): `dnd train` refuses, before
    building anything, a configuration whose `dnd plan` estimate does not fit it. None: the GPU's own
    total memory on CUDA, no check on CPU."""

    def __post_init__(self) -> None:
        positive = {"micro_batch_size": self.micro_batch_size, "grad_accum_steps": self.grad_accum_steps,
                    "steps": self.steps, "checkpoint_every": self.checkpoint_every,
                    "keep_checkpoints": self.keep_checkpoints, "log_every": self.log_every}
        bad = {k: v for k, v in positive.items() if v < 1}
        if bad:
            raise ValueError(f"these train fields must be >= 1: {bad}")
        if self.global_batch_size is not None:
            if self.grad_accum_steps != 1:
                raise ValueError(
                    f"set either grad_accum_steps ({self.grad_accum_steps}) or global_batch_size "
                    f"({self.global_batch_size}), not both: the accumulation is derived from global_batch_size"
                )
            if self.global_batch_size < 1 or self.global_batch_size % self.micro_batch_size:
                raise ValueError(
                    f"global_batch_size must be a positive multiple of micro_batch_size {self.micro_batch_size}; "
                    f"got {self.global_batch_size}"
                )
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}")
        if self.offload_params and self.zero_stage != 3:
            raise ValueError(f"offload_params needs zero_stage 3 (parameters are only partitioned there), got {self.zero_stage}")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("offload_optimizer needs zero_stage 1, 2 or 3")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        # Optimizer numbers: a NaN or inf here (`--train.lr=.inf`) would train to an all-NaN export.
        # Every comparison below is False for NaN, so each range is written as "value in range".
        ranges = {
            "lr": (self.lr, 0 < self.lr <= 1, "0 < lr <= 1"),
            "min_lr_ratio": (self.min_lr_ratio, 0 <= self.min_lr_ratio <= 1, "0 <= min_lr_ratio <= 1"),
            "weight_decay": (self.weight_decay, 0 <= self.weight_decay <= 1, "0 <= weight_decay <= 1"),
            "betas": (self.betas, len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "two, each 0 <= beta < 1"),
            "adam_eps": (self.adam_eps, 0 < self.adam_eps <= 1, "0 < adam_eps <= 1"),
            "grad_clip": (self.grad_clip, math.isfinite(self.grad_clip) and self.grad_clip >= 0,
                          "a finite grad_clip >= 0 (0 disables clipping)"),
        }
        bad = {name: (value, rule) for name, (value, ok, rule) in ranges.items() if not ok}
        if bad:
            raise ValueError(
                "these train fields are out of range: "
                + ", ".join(f"{name}={value!r} (need {rule})" for name, (value, rule) in bad.items())
                + "; fix them in the recipe or the --train.field=value override"
            )

    def accumulation_steps(self, world_size: int) -> int:
        """Micro-batches per optimizer step on each rank: grad_accum_steps, or derived from
        global_batch_size (refusing a world size that does not divide it)."""
        if self.global_batch_size is None:
            return self.grad_accum_steps
        per_pass = self.micro_batch_size * world_size
        if self.global_batch_size % per_pass == 0:
            return self.global_batch_size // per_pass
        micro_batches = self.global_batch_size // self.micro_batch_size
        worlds = [w for w in range(1, micro_batches + 1) if micro_batches % w == 0]
        below = self.global_batch_size // per_pass * per_pass
        batches = [b for b in (below, below + per_pass) if b > 0]
        raise TrainError(
            f"train.global_batch_size={self.global_batch_size} cannot be split over {world_size} ranks: it must "
            f"be a multiple of micro_batch_size {self.micro_batch_size} x world size {world_size} = {per_pass}. "
            f"Launch on a world size that divides {micro_batches} micro-batches ({', '.join(map(str, worlds))} "
            f"ranks), or set train.global_batch_size to a multiple of {per_pass} (e.g. "
            f"{' or '.join(map(str, batches))}), or change train.micro_batch_size"
        )


def deepspeed_config(config: TrainConfig, world_size: int) -> dict[str, Any]:
    """The DeepSpeed JSON of a run: derived from `config` only, never edited by hand."""
    accumulation = config.accumulation_steps(world_size)
    zero: dict[str, Any] = {"stage": config.zero_stage}
    pin = torch.cuda.is_available()  # pinned host memory only helps host<->GPU copies
    if config.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": pin}
    if config.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": pin}
    return {
        "train_batch_size": config.micro_batch_size * accumulation * world_size,
        "train_micro_batch_size_per_gpu": config.micro_batch_size,
        "gradient_accumulation_steps": accumulation,
        "gradient_clipping": config.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": config.bf16},
        # The optimizer is torch's AdamW (see build_engine): allowed under ZeRO and with offload,
        # so nothing needs DeepSpeed's JIT-compiled CPU Adam.
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        # Metrics are logged by the trainer (rank 0, JSONL + TensorBoard), not by DeepSpeed.
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


@dataclass
class WarmupCosine:
    """LR multiplier after `step` optimizer steps: linear warmup, then cosine down to `min_ratio`.

    A callable object rather than a lambda so `LambdaLR.state_dict()` saves its numbers.
    """

    warmup: int
    total: int
    min_ratio: float

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def condition_length(config: TrainConfig) -> int:
    """L of the condition: the encoder's max_length if set, else the generator's own, else 128."""
    if config.encoder.max_length is not None:
        return config.encoder.max_length
    if config.generator.features is not None:
        return config.generator.features[0][1]
    if config.generator.preset in PRESETS:
        return PRESETS[config.generator.preset].features[0][1]
    return DEFAULT_CONDITION_LENGTH


# --------------------------------------------------------------------------------------------------
# 2. Data: a rank's micro-batches and their conditions


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


# --------------------------------------------------------------------------------------------------
# 3. Distributed setup and engine


# The launcher variables of a world of one that this process made itself. DeepSpeed reads them while
# a run lasts; afterwards they are removed, or subprocesses started later (another launch, the demo)
# would take themselves for rank 0 of a launch on this port.
_STANDALONE_ENV: dict[str, str] = {}


def _drop_standalone_env() -> None:
    for key in _STANDALONE_ENV:
        os.environ.pop(key, None)


def init_distributed() -> tuple[int, int, int]:
    """(rank, local rank, world size), initializing DeepSpeed's process group.

    Without a launcher (no RANK in the environment) this process is a world of one.
    """
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    if torch.distributed.is_initialized():  # a second run in the same process (tests, notebooks)
        import deepspeed.comm as dist

        os.environ.update(_STANDALONE_ENV)

        if not dist.is_initialized():
            deepspeed.init_distributed(dist_backend=accelerator.communication_backend_name())
        return dist.get_rank(), int(os.environ.get("LOCAL_RANK", 0)), dist.get_world_size()
    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        _STANDALONE_ENV.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        os.environ.update(_STANDALONE_ENV)
    if accelerator.device_name() == "cpu":
        # DeepSpeed's TorchBackend JIT-compiles a shared-memory all-reduce on CPU at its first
        # init (~55 s, a C++ toolchain needed) when the op counts as compatible. Only inference
        # all-reduce uses it; training collectives go through gloo. `deepspeed.ops.__compatible_ops__`
        # is the probed table `comm.torch.build_shm_op` consults (its module keeps edits), so
        # marking the op incompatible skips the build.
        import deepspeed.ops
        from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder

        deepspeed.ops.__compatible_ops__[ShareMemCommBuilder.NAME] = False
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if accelerator.device_name() != "cpu":
        accelerator.set_device(local_rank)
    deepspeed.init_distributed(dist_backend=accelerator.communication_backend_name())
    import deepspeed.comm as dist

    return dist.get_rank(), local_rank, dist.get_world_size()


def _decays(param: torch.nn.Parameter) -> bool:
    # Only the k×k convolution kernels (4-D) decay; LayerNorm affines and biases do not.
    # Under ZeRO-3 a parameter's local tensor is a 1-D shard: its true shape is ds_shape.
    return len(getattr(param, "ds_shape", param.shape)) == 4


def build_engine(config: TrainConfig, ds_config: dict, condition_shape, token_shape, num_tokens):
    """(engine, generator module) with torch AdamW and the warmup-cosine LambdaLR inside."""
    import deepspeed

    torch.manual_seed(config.seed)  # same initial weights on every rank (and in every run of this seed)
    with deepspeed.zero.Init(config_dict_or_path=ds_config, enabled=config.zero_stage == 3):
        model = HyperConvGenerator(config.generator, condition_shape, token_shape, num_tokens)
    params = list(model.parameters())
    groups = [
        {"params": [p for p in params if _decays(p)], "weight_decay": config.weight_decay},
        {"params": [p for p in params if not _decays(p)], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=config.lr, betas=config.betas, eps=config.adam_eps)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, WarmupCosine(config.warmup_steps, config.steps, config.min_lr_ratio)
    )
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=schedule, config=ds_config)
    engine.checkpoint_engine = weights_only_checkpoint_engine(engine)
    return engine, model


def _checkpoint_globals() -> list:
    """The only non-builtin types DeepSpeed writes into our checkpoints' `.pt` files (ZeRO 0-3, fp32):
    plain data holders, rebuilt from their saved fields without running any method of theirs beyond
    an Enum lookup. Everything else a pickle may name (functions, `os.system`, ...) stays refused."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def weights_only_checkpoint_engine(engine):
    """DeepSpeed's torch checkpoint engine, but loading every `.pt` file with `weights_only=True`.

    `engine.load_checkpoint` reads the model, optimizer and ZeRO files through
    `engine.checkpoint_engine.load`, whose stock version unpickles with `weights_only=False`: a
    crafted `mp_rank_00_model_states.pt` would run its code on `--resume` or `--export-only`.
    Saving is unchanged (the stock engine's `torch.save`).
    """
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    if type(engine.checkpoint_engine) is not TorchCheckpointEngine:  # decoupled/fast writers: not configured here
        raise TrainError(f"unexpected DeepSpeed checkpoint engine {type(engine.checkpoint_engine).__name__}; "
                         "dnd train only loads checkpoints through the torch engine with weights_only=True")

    class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location=None):
            with torch.serialization.safe_globals(_checkpoint_globals()):
                try:
                    return torch.load(path, map_location=map_location, weights_only=True)
                except pickle.UnpicklingError as err:
                    reason = str(err).split("WeightsUnpickler error: ")[-1].split(". ")[0]
                    raise TrainError(
                        f"checkpoint file {path} holds more than tensors and plain data ({reason}); dnd train "
                        "loads checkpoints with torch.load(weights_only=True) and never runs code from them. A "
                        "checkpoint dnd train wrote never needs more: this file was altered or comes from "
                        "elsewhere. Delete that checkpoint folder (and point checkpoints/latest at an older "
                        "one), or train into a new train.output_dir"
                    ) from None

    return WeightsOnlyCheckpointEngine(engine._config)


def _local_numel(param: torch.nn.Parameter) -> int:
    """Elements this rank stores of a parameter (its ZeRO-3 shard, or all of it)."""
    return param.ds_tensor.numel() if hasattr(param, "ds_tensor") else param.numel()


def _full_numel(param: torch.nn.Parameter) -> int:
    return param.ds_numel if hasattr(param, "ds_numel") else param.numel()


# --------------------------------------------------------------------------------------------------
# 4./5. Run state: SIGTERM, RNG, checkpoints, logs


class StopRequest:
    """SIGTERM sets a flag; the loop checks it at the step boundary (never mid-step)."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def __enter__(self) -> "StopRequest":
        self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        signal.signal(signal.SIGTERM, self._previous)


def rng_state() -> dict:
    """Every RNG a step may draw from, as JSON-friendly values."""
    np_state = np.random.get_state()
    state = {
        "python": [list(x) if isinstance(x, tuple) else x for x in random.getstate()],
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state().tolist()
    return state


def set_rng_state(state: Mapping) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8))


def _tag(step: int) -> str:
    return f"step{step:08d}"


def latest_checkpoint(checkpoint_dir: Path) -> str | None:
    """Tag of the newest complete checkpoint (the `latest` file is written only after all ranks finish)."""
    path = checkpoint_dir / LATEST
    return path.read_text().strip() if path.is_file() else None


def run_identity(config: TrainConfig, data: TrainingData) -> dict:
    """What a checkpoint belongs to: the resolved train config and the data it was trained on (the
    packed targets' and the shard set's index.json, which list every file with its sha256).

    Stored inside every checkpoint, so a resumption compares against the checkpoint itself, not
    against a train_config.yaml that may have been deleted or a generator/ copied from another run.
    """
    return {
        "train_config": to_dict(config),
        "data": {
            "targets_index_sha256": canonical_json_sha256(data.targets.index),
            "shards_index_sha256": canonical_json_sha256(data.shard_index),
        },
    }


def check_checkpoint_run(saved: Mapping | None, current: Mapping, where: Path) -> None:
    """Refuse to continue (or export) a checkpoint of another run: a different train config (beyond
    RESUME_MAY_CHANGE) or different data. Checkpoints written before run binding (no record) pass."""
    if saved is None:
        return
    flat_saved, flat_now = flatten(saved), flatten(current)
    changed = {
        key: (flat_saved.get(key), flat_now.get(key))
        for key in sorted(set(flat_saved) | set(flat_now))
        if flat_saved.get(key) != flat_now.get(key) and key.removeprefix("train_config.") not in RESUME_MAY_CHANGE
    }
    if changed:
        raise TrainError(
            f"checkpoint {where} belongs to another run: these differ (checkpoint -> now): "
            + ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items())
            + ". Restore the train fields it was trained with (train.* above) and the run folder's targets/ "
            "and shards/ it was trained on (data.* above), or train into a new train.output_dir"
        )


def save_checkpoint(engine, checkpoint_dir: Path, step: int, stream: BatchStream, keep: int, run: Mapping) -> None:
    """Full state of every rank at a step boundary, bound to `run` (`run_identity`); collective."""
    import deepspeed.comm as dist

    world = dist.get_world_size()
    mine = {"data": stream.state_dict(), "rng": rng_state()}
    ranks: list = [None] * world
    dist.all_gather_object(ranks, mine)  # rank 0's model-states file carries every rank's position
    client = {"step": step, "world_size": world, "ranks": ranks, "run": run}
    try:
        # torch.save reports a full disk as "unexpected pos ...": reporting_full_disk says what it is.
        with reporting_full_disk(checkpoint_dir / _tag(step)):
            engine.save_checkpoint(str(checkpoint_dir), tag=_tag(step), client_state=client, save_latest=False)
    except DiskFullError as err:
        shutil.rmtree(checkpoint_dir / _tag(step), ignore_errors=True)  # incomplete, and `latest` never named it
        previous = latest_checkpoint(checkpoint_dir)
        then = f"`latest` still names {previous}: continue with --resume" if previous else "train again"
        raise TrainError(f"{err}. The incomplete checkpoint {_tag(step)} was removed; {then} once there is space") from err
    dist.barrier()  # every rank's shard is on disk before `latest` may point at it
    if dist.get_rank() == 0:
        with atomic_path(checkpoint_dir / LATEST) as tmp:
            tmp.write_text(_tag(step))
        tags = sorted(p.name for p in checkpoint_dir.iterdir() if p.is_dir() and p.name.startswith("step"))
        for old in tags[: -keep] if keep < len(tags) else []:
            if old != _tag(step):
                shutil.rmtree(checkpoint_dir / old, ignore_errors=True)
    dist.barrier()


def load_checkpoint(engine, checkpoint_dir: Path, stream: BatchStream, run: Mapping | None = None) -> int:
    """Restore the newest checkpoint on every rank, refusing one of another run than `run`
    (`run_identity`); returns its step."""
    import deepspeed.comm as dist

    tag = latest_checkpoint(checkpoint_dir)
    if tag is None:
        raise TrainError(
            f"no checkpoint to resume from or export in {checkpoint_dir} (no '{LATEST}' file); run without "
            "--resume to start training, or point --run / --train.output_dir at the run to continue"
        )
    path, client = engine.load_checkpoint(str(checkpoint_dir), tag=tag)
    if path is None:
        raise TrainError(f"--resume: checkpoint {checkpoint_dir / tag} could not be loaded (files missing?)")
    if run is not None:
        check_checkpoint_run(client.get("run"), run, checkpoint_dir / tag)
    world = dist.get_world_size()
    if client["world_size"] != world:
        raise TrainError(
            f"checkpoint {tag} was written by {client['world_size']} ranks, this run has {world}: every rank's "
            f"data position is part of the state; resume with {client['world_size']} ranks"
        )
    mine = client["ranks"][dist.get_rank()]
    stream.load_state_dict(mine["data"])
    set_rng_state(mine["rng"])
    return int(client["step"])


# Fields that may change between a run and its resumption: they do not alter the trajectory up to
# the checkpoint. `steps` continues a run past its end (`--resume --train.steps=MORE`, never below
# the checkpoint's step): the LR schedule comes back from the checkpoint as the run started it.
RESUME_MAY_CHANGE = {"log_every", "checkpoint_every", "keep_checkpoints", "encoder.batch_size", "generator.impl",
                     "cudnn_benchmark", "steps", "resident"}  # fmt: skip


def check_resume_config(config: TrainConfig, saved_path: Path) -> None:
    """Refuse to resume with a config that would not continue the same trajectory."""
    if not saved_path.is_file():
        return  # nothing recorded: the checkpoint lookup reports the real problem
    saved = flatten(read_yaml(saved_path, "saved train config") or {})
    current = flatten(to_dict(config))
    changed = {k: (saved.get(k), v) for k, v in current.items() if saved.get(k) != v and k not in RESUME_MAY_CHANGE}
    if changed:
        raise TrainError(
            "--resume continues the run recorded in " + str(saved_path) + ", but these train fields differ "
            "(saved -> now): " + ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in sorted(changed.items()))
            + "; restore them, or train into a new train.output_dir"
        )


class MetricsLog:
    """Per-step metrics from rank 0: JSONL (the record tests compare) and TensorBoard."""

    def __init__(self, out_dir: Path, start_step: int, enabled: bool) -> None:
        self.enabled = enabled
        self.path = out_dir / METRICS
        self.tb = None
        if not enabled:
            return
        if start_step > 0:
            # Drop what was logged after the checkpoint (a killed run's lost steps) so the log
            # reads like one uninterrupted run.
            kept = [r for r in read_jsonl(self.path) if r["step"] <= start_step]
            with atomic_path(self.path) as tmp:
                tmp.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in kept))
        elif self.path.exists():
            self.path.unlink()
        from torch.utils.tensorboard import SummaryWriter

        self.tb = SummaryWriter(str(out_dir / "tensorboard"), purge_step=start_step + 1 if start_step else None)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        append_jsonl(self.path, record)
        with reporting_full_disk(self.path.parent / "tensorboard"):  # its writer thread's error surfaces here
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tb.add_scalar(f"train/{key}", value, record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


# --------------------------------------------------------------------------------------------------
# 6. Export


def gather_fp32_state(model: torch.nn.Module, keep: bool) -> dict[str, Tensor]:
    """Every parameter's fp32 master value, whole: ZeRO shards gathered. Collective: every rank
    calls it (parameter by parameter, so peak memory is one parameter); only `keep` ranks return it."""
    from deepspeed.utils import safe_get_full_fp32_param

    state = {}
    for name, param in model.named_parameters():
        full = safe_get_full_fp32_param(param)  # ZeRO 1/2/3 and bf16: gathered master weights
        if full is None:
            full = param.detach()  # ZeRO-0 in fp32: the parameter is the master copy
        if keep:
            state[name] = full.float().cpu().reshape(getattr(param, "ds_shape", param.shape)).clone()
    return state


def export_generator(model: torch.nn.Module, out_dir: Path, meta: dict, rank: int) -> Path | None:
    """Write the generator export under `out_dir` (rank 0; `generator_export`); returns the folder there."""
    import deepspeed.comm as dist

    state = gather_fp32_state(model, keep=rank == 0)
    folder = export_folder(out_dir)
    if rank == 0:
        write_export(folder, state, meta)
    dist.barrier()
    return folder if rank == 0 else None


def _base_model(run_dir: Path) -> dict[str, Any]:
    """What `dnd collect` trained on, so adapters name their base model and carry its identity
    (`basemodel.base_identity`, checked by `dnd eval`): {"base_model": path or None, "base_identity": ... or None}."""
    collected = collected_base(store_dir(run_dir))
    base = collected.get("base_model", {})
    source = str((run_dir / base["saved_to"]).resolve()) if base.get("saved_to") else base.get("source")
    return {"base_model": source, "base_identity": collected.get("base_identity")}


# --------------------------------------------------------------------------------------------------
# The run


def train(
    config: TrainConfig,
    run_dir: str | os.PathLike,
    resume: bool = False,
    *,
    export_only: bool = False,
    make_stream: StreamFactory = pair_stream,
) -> Path:
    """Train (or continue, or only export) the generator of `run_dir`; returns the output folder.

    Reads `<run>/targets` and `<run>/shards`; writes `<run>/<config.output_dir>`. Every rank of a
    launch calls it. `make_stream` builds each rank's micro-batch stream (default: the shard loader).
    """
    try:
        with contextlib.ExitStack() as held:
            return _train(config, run_dir, resume, export_only, make_stream, held)
    finally:
        _drop_standalone_env()


def _train(
    config: TrainConfig,
    run_dir: str | os.PathLike,
    resume: bool,
    export_only: bool,
    make_stream: StreamFactory,
    held: contextlib.ExitStack,
) -> Path:
    """The body of `train` (which removes a world-of-one's launcher variables afterwards and releases
    what `held` holds: the output folder's lock)."""
    import deepspeed.comm as dist
    from deepspeed.accelerator import get_accelerator

    run_dir = Path(run_dir)
    out_dir = RunDir(run_dir).train_output(config.output_dir)
    checkpoint_dir = out_dir / CHECKPOINTS_DIR
    rank, _, world = init_distributed()
    ds_config = deepspeed_config(config, world)  # first: a world size the global batch refuses stops here
    device = torch.device(get_accelerator().current_device_name())
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = config.cudnn_benchmark

    held.enter_context(_own_output(out_dir, rank, device))  # released when train() returns or raises
    if resume or export_only:
        check_resume_config(config, out_dir / "train_config.yaml")
    elif latest_checkpoint(checkpoint_dir) is not None:
        raise TrainError(
            f"{out_dir} already holds checkpoints ({latest_checkpoint(checkpoint_dir)}); pass --resume to "
            "continue that run, or set train.output_dir to a new folder (nothing was overwritten)"
        )
    data = TrainingData.open(run_dir)
    length = condition_length(config)
    conditions = condition_source(config.encoder, length, data.pools, run_dir, rank, device)
    condition_shape = (data.num_prompts, length, conditions.dim)
    features = resolve_features(config.generator, condition_shape, data.targets.token_shape, data.targets.num_tokens)
    check_gpu_memory(config, features, world, device)  # fail before, not during: dnd plan's estimate
    resident_size = resident_bytes(data.targets, conditions.caches)
    try:
        on_device = resolve_resident(config.resident, device, resident_size, conditions.caches is not None)
    except ValueError as exn:
        raise TrainError(str(exn)) from None
    if on_device:
        data.resident = ResidentData(data.targets, conditions.caches, device)
    engine, model = build_engine(config, ds_config, condition_shape, data.targets.token_shape, data.targets.num_tokens)
    stream = make_stream(data, config, rank, world)

    run = run_identity(config, data)
    start_step = load_checkpoint(engine, checkpoint_dir, stream, run) if (resume or export_only) else 0
    if resume and start_step > config.steps:
        raise TrainError(
            f"--resume: the newest checkpoint of {out_dir} is at step {start_step}, past train.steps={config.steps}; "
            f"set train.steps to {start_step} or more (more steps continue the run), or export it with --export-only"
        )
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, out_dir / "train_config.yaml")
        write_json(out_dir / "deepspeed_config.json", ds_config)
    local = torch.tensor([sum(_local_numel(p) for p in model.parameters())], dtype=torch.long, device=device)
    per_rank = [torch.zeros_like(local) for _ in range(world)]  # NCCL gathers into device tensors
    dist.all_gather(per_rank, local)
    if rank == 0:
        write_json(out_dir / TRAIN_INFO, {
            "world_size": world,
            "global_batch": ds_config["train_batch_size"],
            "device": str(device),
            "impl": resolve_impl(config.generator.impl, device),  # the stages' implementation that ran
            "cudnn_benchmark": torch.backends.cudnn.benchmark if device.type == "cuda" else None,
            "parameters": sum(_full_numel(p) for p in model.parameters()),
            "parameters_per_rank": [int(t.item()) for t in per_rank],
            "features": [list(s) for s in model.features],
            "conditions": "cache" if conditions.caches is not None else "encoder",
            "resident": {"on_device": on_device, "bytes": resident_size},
            "resumed_from": start_step if resume else None,
        })

    step = start_step
    if not export_only:
        step = _fit(config, engine, stream, conditions, data, out_dir, start_step, run)
    if step >= config.steps or export_only:
        meta = {
            "generator": to_dict(model.config),
            "layout": data.targets.layout_json(),
            "tokenizer": data.targets.extra["tokenizer"],
            "encoder": {"name": resolve_encoder_path(config.encoder.name)[0], "length": length, "dim": conditions.dim},
            "num_prompts": data.num_prompts,
            **_base_model(run_dir),
            "step": step,
            "train_config": to_dict(config),
        }
        export_generator(model, out_dir, meta, rank)
    dist.barrier()
    return out_dir


@contextlib.contextmanager
def _own_output(out_dir: Path, rank: int, device: torch.device) -> Iterator[None]:
    """Rank 0 holds the output folder's exclusive lock for the whole run; collective.

    Two runs writing one folder would interleave their metrics and overwrite each other's config,
    checkpoints and export. Rank 0 takes the lock before anything is written (the other ranks never
    write before the barriers that follow), and every rank learns at once whether it got it.
    """
    import deepspeed.comm as dist

    with contextlib.ExitStack() as held:
        busy: FolderBusyError | None = None
        if rank == 0:
            try:
                held.enter_context(exclusive_folder(
                    out_dir, "dnd train",
                    "wait for that run to finish, or set train.output_dir to another folder (two runs in one "
                    "folder would mix their metrics, checkpoints and export)",
                ))
            except FolderBusyError as err:
                busy = err
        flag = torch.tensor([float(busy is not None)], device=device)
        dist.all_reduce(flag)  # only rank 0 adds to it
        if flag.item() > 0:
            raise TrainError(str(busy) if busy else f"rank 0 could not lock {out_dir}: another `dnd train` writes "
                             "there (see rank 0's error)")
        yield


def _fit(
    config: TrainConfig,
    engine,
    stream: BatchStream,
    conditions: ConditionSource,
    data: TrainingData,
    out_dir: Path,
    start_step: int,
    run: Mapping,
) -> int:
    """The training loop; returns the step it stopped at (config.steps, or earlier on SIGTERM)."""
    import deepspeed.comm as dist

    rank, world, device = dist.get_rank(), dist.get_world_size(), engine.device
    checkpoint_dir = out_dir / CHECKPOINTS_DIR
    dtype = torch.bfloat16 if config.bf16 else torch.float32
    mask = data.targets.mask.to(device)  # (T, H, W)
    weights = data.targets.weights.to(device)  # (T,)
    log = MetricsLog(out_dir, start_step, enabled=rank == 0)
    accumulation = config.accumulation_steps(world)
    samples_per_step = config.micro_batch_size * accumulation * world
    step = start_step
    bar = tqdm(total=config.steps, initial=start_step, desc="dnd train", unit="step", disable=rank != 0)
    with StopRequest() as stop:
        while step < config.steps:
            t0 = time.perf_counter()
            lr = engine.get_lr()[0]  # the LR this step's update uses
            loss_sum = torch.zeros((), device=device)
            for _ in range(accumulation):
                batch = next(stream)
                if "tokens" in batch:  # streamed from the host (a custom stream always is)
                    cond = conditions(batch).to(device, dtype)  # (B, N, L, D)
                    target = batch["tokens"].to(device)  # (B, T, H, W)
                else:  # indices only: the rows are gathered on the device
                    cond, target = data.resident.batch(batch)
                    cond = cond.to(dtype)
                loss = generator_loss(engine(cond), target, mask, weights)
                engine.backward(loss)
                engine.step()  # updates only at the accumulation boundary
                loss_sum += loss.detach().float()
            step += 1
            # One collective per step: the mean loss over ranks, and whether any rank got SIGTERM.
            stats = torch.stack([loss_sum / accumulation, torch.tensor(float(stop.requested), device=device)])
            dist.all_reduce(stats)
            loss_value, stopping = stats[0].item() / world, stats[1].item() > 0
            if not math.isfinite(loss_value):
                # Every rank holds the same all-reduced value, so every rank stops here, before this
                # step's diverged weights reach a checkpoint or the export.
                bar.close()
                log.close()
                last = latest_checkpoint(checkpoint_dir)
                raise TrainError(
                    f"the training loss became {loss_value} at step {step} (a finite loss was expected): the "
                    f"generator diverged; nothing of step {step} was saved (last checkpoint: {last or 'none'}). "
                    "Lower train.lr, raise train.warmup_steps or set train.grad_clip, and train into a new "
                    "train.output_dir; if the targets hold NaN/inf, re-run `dnd pack`"
                )
            bar.update(1)
            if step % config.log_every == 0 or step == config.steps or stopping:
                grad_norm = engine.get_global_grad_norm()
                elapsed = time.perf_counter() - t0
                log.write({
                    "step": step, "loss": loss_value, "lr": lr,
                    "grad_norm": float(grad_norm) if grad_norm is not None else None,
                    "samples": step * samples_per_step, "step_time_s": elapsed,
                    "samples_per_s": samples_per_step / elapsed,
                    **skip_totals(stream, device),  # collective: every rank logs at the same steps
                })
                bar.set_postfix(loss=f"{loss_value:.4g}")
            if step % config.checkpoint_every == 0 or step == config.steps or stopping:
                save_checkpoint(engine, checkpoint_dir, step, stream, config.keep_checkpoints, run)
            if stopping:
                if rank == 0:
                    print(f"dnd train: SIGTERM received; checkpoint {_tag(step)} saved, exiting (continue with --resume)",
                          file=sys.stderr)
                break
    bar.close()
    log.close()
    skipped = skip_totals(stream, device)
    if rank == 0:
        info = read_json(out_dir / TRAIN_INFO, TRAIN_INFO)
        write_json(out_dir / TRAIN_INFO, {**info, "skipped": skipped})
        print(f"dnd train: damaged data skipped over all ranks: {skipped['corrupt_shards']} corrupt shards "
              f"({skipped['lost_samples']} pairs lost), {skipped['bad_samples']} bad pairs", file=sys.stderr)
    return step


def skip_totals(stream: BatchStream, device: torch.device) -> dict[str, int]:
    """The damaged data every rank's stream skipped so far, summed over ranks ({kind: count} of
    SKIP_KINDS); collective. Each rank's counts are part of its data position, so they survive a resume."""
    import deepspeed.comm as dist

    mine = getattr(stream, "skipped", None) or {}
    counts = torch.tensor([float(mine.get(kind, 0)) for kind in SKIP_KINDS], dtype=torch.float64, device=device)
    dist.all_reduce(counts)
    return {kind: int(n) for kind, n in zip(SKIP_KINDS, counts.tolist())}


# --------------------------------------------------------------------------------------------------
# Command line


def load_train_config(recipe: str | None, overrides: Sequence[str]) -> TrainConfig:
    """TrainConfig from a recipe's `train:` section (None: the defaults) and `--train.field=value` overrides."""
    from dnd_scale.recipe import check_stage_overrides, load_recipe

    check_stage_overrides("train", overrides)
    return load_recipe(recipe, overrides).train


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="dnd train",
        description="Train the parameter generator with DeepSpeed. Overrides: --train.field=value "
                    "(e.g. --train.zero_stage=3 --train.generator.preset=auto).",
    )
    parser.add_argument("--run", required=True, help="run folder holding targets/ (dnd pack) and shards/ (dnd shard)")
    parser.add_argument("--config", help="YAML recipe; its `train:` section is read (default: the recipe saved in "
                                         "the run folder)")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint of the output folder")
    parser.add_argument("--export-only", action="store_true", help="load the newest checkpoint and only export it")
    parser.add_argument("--no-cache", action="store_true",
                        help="encode prompts on the fly instead of caching each pool's embeddings once under "
                             "<run>/conditions/ (= --train.encoder.cache=false; for pools too large to cache)")
    # The deepspeed launcher appends --local_rank unless given --no_local_rank; the rank comes from
    # the environment either way.
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    from dnd_scale.recipe import parse_stage_args

    args, run = parse_stage_args(parser, argv, "train",
                                 lambda args: {"train.encoder.cache": False if args.no_cache else None})
    config = run.train
    launched = "RANK" in os.environ
    out = train(config, args.run, resume=args.resume, export_only=args.export_only)
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"dnd train: outputs in {out}")
    if launched:  # the process ends here; NCCL wants an orderly shutdown of a launched group
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
