"""What `dnd bench scale` trains: a target (a LoRA layout from a model config and the generator that
writes it), the training configurations it is measured under, the synthetic run folder it trains on
(real writers, random contents), the micro-batch stream that ends the measured run, and `dnd plan`'s
memory prediction for one configuration."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

# The synthetic run's one task, and the encoder name its condition cache is filed under.
TASK = "synthetic"
SYNTHETIC_ENCODER = "synthetic-random"

# The training configurations of the zero section: TrainConfig fields per name.
CONFIGS: dict[str, dict[str, Any]] = {
    "zero0": {"zero_stage": 0},
    "zero2": {"zero_stage": 2},
    "zero3": {"zero_stage": 3},
    "zero3_offload_opt": {"zero_stage": 3, "offload_optimizer": True},
    "zero3_offload_all": {"zero_stage": 3, "offload_optimizer": True, "offload_params": True},
}


# --------------------------------------------------------------------------------------------------
# What is trained: a target layout and its generator


@dataclass
class TargetSpec:
    """A LoRA layout (from a model config) and the generator that writes it."""

    model: str
    """config.json of the base model (shapes only), e.g. configs/models/qwen2.5-7b.json."""
    rank: int = 16
    """LoRA rank r."""
    modules: str = "all-linear"
    """LoRA target modules ("all-linear" or names joined by '+')."""
    chunk: int = 512
    """Token chunk width c."""
    condition: tuple[int, int, int] = (16, 1000, 384)
    """(N prompts, L tokens, D dims) of the condition."""
    preset: str = "auto"
    """Generator preset name, or "auto" (the sizing rule `features_for`)."""
    max_channels: int = 2048
    """Cap on the hidden N of an auto-sized generator (GeneratorConfig.max_channels)."""
    num_stages: int = 8
    """Stages of an auto-sized generator (GeneratorConfig.num_stages)."""

    def __post_init__(self) -> None:
        self.condition = tuple(int(v) for v in self.condition)

    def lora_spec(self):
        from dnd_scale.layout import LoraSpec

        modules = "all-linear" if self.modules == "all-linear" else tuple(self.modules.split("+"))
        return LoraSpec(rank=self.rank, alpha=2.0 * self.rank, target_modules=modules)

    def layout(self):
        from dnd_scale.layout import LoraLayout

        return LoraLayout.from_config(self.model, self.lora_spec())

    def tokenizer(self):
        from dnd_scale.tokenizer import WeightTokenizer

        return WeightTokenizer(self.layout(), chunk=self.chunk)

    def generator_config(self, impl: str = "auto"):
        from dnd_scale.generator import GeneratorConfig

        return GeneratorConfig(preset=self.preset, max_channels=self.max_channels, num_stages=self.num_stages,
                               impl=impl)  # fmt: skip

    def sizes(self) -> dict[str, Any]:
        """Geometry and generator size, computed without building anything."""
        from dnd_scale.generator import DEFAULT_KERNEL_SIZE, PRESETS, count_parameters, resolve_features

        tok = self.tokenizer()
        features = resolve_features(self.generator_config(), self.condition, tok.token_shape, tok.num_tokens)
        kernel = PRESETS[self.preset].kernel_size if self.preset in PRESETS else DEFAULT_KERNEL_SIZE
        return {
            "model": Path(self.model).stem,
            "lora_params": tok.layout.num_params,
            "tokens": tok.num_tokens,
            "token_shape": list(tok.token_shape),
            "features": [list(f) for f in features],
            "kernel_size": kernel,
            "generator_params": count_parameters(features, kernel),
        }


# --------------------------------------------------------------------------------------------------
# A synthetic run folder: real writers, random contents


class RandomConditionEncoder:
    """Stands in for the frozen encoder when building condition caches: every prompt's L tokens are
    a fixed N(0, 1) draw seeded by the prompt's position in the pool. It offers what
    `ConditionCache.build` calls, so the cache file is the real format and training reads it as any."""

    def __init__(self, length: int, dim: int, seed: int = 0) -> None:
        self.name, self.length, self.max_tokens, self.dim, self.seed = SYNTHETIC_ENCODER, length, length, dim, seed

    def _check_prompts(self, prompts: Sequence[str]) -> list[str]:
        return list(prompts)

    def token_counts(self, prompts: Sequence[str]) -> list[int]:
        return [self.length] * len(prompts)

    def encode_ragged(self, prompts: Sequence[str]) -> list[torch.Tensor]:
        out = []
        for i, _ in enumerate(prompts):
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
            out.append(torch.randn(self.length, self.dim, generator=gen))  # (L, D)
        return out


def build_synthetic_run(run_dir: Path, target: TargetSpec, seed: int = 0) -> dict[str, Any]:
    """targets/ (one task, one checkpoint of random tokens), shards/ and the condition cache of a run
    for `target`, all through the pipeline's own writers; returns the target's sizes."""
    from dnd_scale.encoder import ConditionCache
    from dnd_scale.shards import ShardConfig, build_shards
    from dnd_scale.targets import PackedTargets, write_common, write_task_targets
    from dnd_scale.rundir import RunDir
    from dnd_scale.train_data import condition_cache_dir

    run_dir = Path(run_dir)
    shutil.rmtree(run_dir, ignore_errors=True)  # the writers add to a folder; start from an empty one
    tok = target.tokenizer()
    layout = tok.layout
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randn((1, tok.num_tokens, *tok.token_shape), generator=gen)  # (K=1, T, H, W)
    write_task_targets(RunDir(run_dir).targets, TASK, tokens)
    del tokens
    write_common(  # one checkpoint has no spread across a trajectory: every criterion weight is 1
        RunDir(run_dir).targets, tok.mask(), torch.ones(tok.num_tokens),
        {**layout.to_dict(), "fingerprint": layout.fingerprint()},
        extra={"tokenizer": tok.state_dict_config()}, fingerprint=layout.fingerprint(),
    )  # fmt: skip
    n, length, dim = target.condition
    pool = [f"synthetic prompt {i}" for i in range(n)]
    build_shards(PackedTargets(RunDir(run_dir).targets), {TASK: pool}, RunDir(run_dir).shards,
                 ShardConfig(num_prompts=n, pairs_per_task=4, shard_size=4, seed=seed), progress=False)  # fmt: skip
    cache_dir = condition_cache_dir(run_dir, SYNTHETIC_ENCODER, length, "float32")
    ConditionCache.build(RandomConditionEncoder(length, dim, seed), pool, cache_dir / f"{TASK}.safetensors")
    return target.sizes()


class BenchStream:
    """Every step the same full micro-batch (the run's one checkpoint, a fixed prompt set), so step
    times measure the engine, not the data path; after `steps` optimizer steps it raises
    `BenchmarkDone`, which ends `train()` before its final checkpoint and export."""

    def __init__(self, data, config, steps: int) -> None:
        n = data.num_prompts
        task = data.targets.tasks[0]
        b = config.micro_batch_size
        self.batch = {
            "prompt_ids": torch.arange(n).repeat(b, 1),  # (B, N)
            "task": [task] * b,
            "checkpoint": torch.zeros(b, dtype=torch.long),  # (B,)
            "tokens": data.targets.gather([task] * b, [0] * b),  # (B, T, H, W)
        }
        self.limit = steps * config.grad_accum_steps
        self.served = 0

    def __next__(self) -> dict:
        if self.served == self.limit:
            raise BenchmarkDone(self.served)
        self.served += 1
        return self.batch

    def state_dict(self) -> dict:
        return {"served": self.served}

    def load_state_dict(self, state) -> None:
        self.served = int(state["served"])


class BenchmarkDone(Exception):
    """The measured steps are done (raised by BenchStream inside train())."""


# --------------------------------------------------------------------------------------------------
# Predictions (dnd plan's functions)


def predicted_memory(features: list, kernel_size: int, micro_batch: int, zero_stage: int,
                     offload_optimizer: bool = False, offload_params: bool = False) -> dict[str, Any]:
    """`dnd plan`'s memory per GPU for one configuration on one GPU: model states + stage activations
    (bf16, as plan assumes); with offload, DeepSpeed's estimators' GPU and CPU parts."""
    from dnd_scale.generator import count_parameters, stage_parameters
    from dnd_scale.plan import activation_bytes_per_sample, model_state_bytes, offload_model_state_bytes

    features = [tuple(f) for f in features]
    params = count_parameters(features, kernel_size)
    largest = max(stage_parameters(a, b, kernel_size) for a, b in zip(features, features[1:]))
    activations = activation_bytes_per_sample(features) * micro_batch
    if offload_optimizer or offload_params:
        gpu, cpu = offload_model_state_bytes(params, largest, zero_stage, 1, offload_params=offload_params)
    else:
        gpu, cpu = model_state_bytes(params, largest, zero_stage, 1), None
    return {"gpu_bytes": gpu + activations, "model_states_gpu_bytes": gpu, "activation_bytes": activations,
            "model_states_cpu_bytes": cpu, "generator_params": params}  # fmt: skip


def config_prediction(sizes: dict, config: str, micro_batch: int) -> dict[str, Any]:
    """`predicted_memory` for the generator of `sizes` (TargetSpec.sizes) trained under `config` (a
    CONFIGS name) at `micro_batch`."""
    fields = CONFIGS[config]
    return predicted_memory(sizes["features"], sizes["kernel_size"], micro_batch, fields["zero_stage"],
                            fields.get("offload_optimizer", False), fields.get("offload_params", False))
