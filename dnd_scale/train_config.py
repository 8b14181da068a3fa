"""The training config of `dnd train` and what derives from it: the DeepSpeed JSON, the LR schedule
and the condition's length.

`TrainConfig` is a recipe's `train:` section. `deepspeed_config` turns it into the JSON DeepSpeed
reads (global batch = micro batch × gradient accumulation × world size), saved beside the run and
never edited by hand; `WarmupCosine` is the schedule every rank steps identically.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from dnd_scale.encoder import EncoderConfig
from dnd_scale.generator import PRESETS, GeneratorConfig

DEFAULT_CONDITION_LENGTH = 128


class TrainError(RuntimeError):
    """Training cannot start or continue as asked; the message says what to do."""


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
    """DeepSpeed ZeRO stage: 0 (replicated), 1 (optimizer states sharded), 2 (+ gradients), 3 (+ parameters).
    With bf16 prefer 1-3 even on one GPU: DeepSpeed runs bf16 at stage 0 through its fp16-style
    optimizer, whose loss curve departs from fp32's (`dnd train` warns)."""
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
    of its free memory, the conditions are cached and the generator still fits beside them (`dnd
    plan`'s estimate), else host. The values are the same either way."""
    cudnn_benchmark: bool = False
    """On a GPU, let cuDNN time its algorithms on the first use of each convolution shape (training
    shapes are fixed) instead of taking its heuristic pick. `impl: torch` runs every convolution
    through cuDNN; the Triton path some weight gradients, where its autotuner timed cuDNN faster.
    Off by default: at the 7B-target generator (k = 11, 1.94 B parameters) the search made the first
    forward outlast 200 s on an H200, where the heuristic pick trains at 7.5 s a step
    (benchmarks/results/cudnn_benchmark_on_probe_h200.txt, scale_h200.json). Small generators
    (k <= 5) pay seconds for it and may gain."""
    gpu_memory_gib: float | None = None
    """Memory of one GPU in GiB (80 for an 80 GB A100/H100, 141 for an H200): `dnd train` refuses, before
    building anything, a configuration whose `dnd plan` estimate, plus the data `resident` puts on the
    GPU, does not fit it. None: the GPU's own total memory on CUDA, no check on CPU."""

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
        # The optimizer is torch's AdamW (see train_engine.build_engine): allowed under ZeRO and with offload,
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


def load_train_config(recipe: str | None, overrides: Sequence[str]) -> TrainConfig:
    """TrainConfig from a recipe's `train:` section (None: the defaults) and `--train.field=value` overrides."""
    from dnd_scale.recipe import check_stage_overrides, load_recipe

    check_stage_overrides("train", overrides)
    return load_recipe(recipe, overrides).train
