"""`dnd plan`: size a run from a model config alone — layout, tokens, generator, memory per GPU.

Memory per GPU is the model states DeepSpeed's own estimators give (bf16 weights and gradients,
fp32 master weights, fp32 gradient copy and Adam moments: 2 + 2 + 16 bytes per parameter, of which
ZeRO-1 partitions the 16 optimizer bytes, ZeRO-2 also the gradients, ZeRO-3 everything; ZeRO-3 with
CPU offload keeps only the gathered largest stage on the GPU), plus an activation estimate: the
tensors every hyper-convolution stage keeps for its backward pass, in bf16, and the loss's fp32
working set on the generator's output, times the micro-batch.
These are estimates: the CUDA context, communication buckets and allocator fragmentation are not in
them, so a configuration "fits" a GPU when the estimate stays under USABLE_FRACTION of its memory.
`check_gpu_memory` applies the same numbers to a training config before `dnd train` builds anything.

What is sized comes from a recipe (--config, or a run folder's saved one with --run): its model, LoRA,
generator, N, L, c and micro-batch; without one, from RunConfig's defaults (the same dataclasses, no
copy of their numbers here), which the output lists above the plan. A flag overrides one number.

Given the prompts of all training tasks (`--pool-prompts`), the plan also bounds the condition cache
`dnd train` writes under `<run>/conditions/` before its first step (prompts × L × D × the cache
dtype's bytes), built by one encoder pass over all prompts.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import typing
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dnd_scale.encoder import CACHE_DTYPES, condition_cache_bound
from dnd_scale.generator import (
    DEFAULT_KERNEL_SIZE, PRESETS, GeneratorConfig, count_parameters, resolve_features, stage_flops, stage_parameters,
)
from dnd_scale.layout import HF_CONFIG, LoraLayout, LoraSpec
from dnd_scale.tokenizer import TokenizerConfig, WeightTokenizer

if TYPE_CHECKING:  # the recipe imports every stage; plan imports it for --config only
    from dnd_scale.recipe import RunConfig

WORLD_SIZES = (1, 8, 64)
ZERO_STAGES = (0, 1, 2, 3)
# Memory columns, cheapest in communication first (the verdict picks the first that fits).
MEMORY_CONFIGS = ("zero0", "zero1", "zero2", "zero3", "zero3+offload")
GPU_SIZES_GIB = (80, 141)  # A100/H100 80 GB, H200 141 GB
USABLE_FRACTION = 0.9  # of a GPU's memory left to the estimate (a margin, not a measurement)
GIB = 1024**3


class PlanError(ValueError):
    """A configuration does not fit the GPU memory; the message gives the plan's numbers and what to do."""


@dataclass
class PlanConfig:
    """What `dnd plan` sizes. A field left None is the recipe's (`recipe_plan_config`; without a
    recipe, RunConfig's defaults: one source of truth for both)."""

    num_prompts: int | None = None
    """Prompts per condition (N of the condition); None: the recipe's shard.num_prompts."""
    max_tokens: int | None = None
    """Encoder tokens per prompt (L of the condition); None: the recipe's condition length
    (train.encoder.max_length, else the generator's own)."""
    embed_dim: int = 384
    """Encoder width (D; 384 for all-MiniLM-L6-v2, the default encoder: a recipe names the encoder,
    not its width)."""
    chunk: int | None = None
    """Token chunk width c; None: the recipe's pack.chunk."""
    preset: str | None = None
    """None: the recipe's train.generator as it is; "match": a paper preset whose first and last
    shapes fit this geometry, else "auto"; or any GeneratorConfig preset name."""
    kernel_size: int | None = None
    """Generator kernel size; None: the recipe's train.generator.kernel_size (None there: the
    preset's own, 9 for auto)."""
    micro_batch: int | None = None
    """Samples per GPU per step, for the activation estimate; None: the recipe's train.micro_batch_size."""
    pool_prompts: int | None = None
    """Prompts of all training tasks together (each task's whole pool), which `dnd train` encodes once
    into the condition cache; None leaves the cache out of the plan."""
    cache_dtype: str | None = None
    """Storage dtype of the condition cache, "float32" or "float16"; None: the recipe's
    train.encoder.cache_dtype."""

    def __post_init__(self) -> None:
        if self.pool_prompts is not None and self.pool_prompts < 1:
            raise ValueError(f"pool_prompts must be >= 1 (the prompts of all training tasks), got {self.pool_prompts}")
        if self.cache_dtype is not None and self.cache_dtype not in CACHE_DTYPES:
            raise ValueError(f"cache_dtype must be one of {sorted(CACHE_DTYPES)}, got {self.cache_dtype!r}")


# The recipe field each PlanConfig field left None comes from (`recipe_plan_config`).
RECIPE_SOURCES = {
    "num_prompts": "shard.num_prompts",
    "max_tokens": "train.encoder.max_length (else the generator's)",
    "chunk": "pack.chunk",
    "preset": "train.generator",
    "kernel_size": "train.generator.kernel_size",
    "micro_batch": "train.micro_batch_size",
    "cache_dtype": "train.encoder.cache_dtype",
}


def recipe_plan_config(run: RunConfig, given: PlanConfig | None = None) -> PlanConfig:
    """`given` with every field it leaves None (but the preset and pool_prompts) taken from the
    recipe `run` (RECIPE_SOURCES): N from `shard`, L, the micro-batch, the generator's kernel size
    and the cache dtype from `train`, c from `pack`."""
    from dnd_scale.train_config import condition_length

    given = given or PlanConfig()
    recipe = {"num_prompts": run.shard.num_prompts, "max_tokens": condition_length(run.train), "chunk": run.pack.chunk,
              "kernel_size": run.train.generator.kernel_size, "micro_batch": run.train.micro_batch_size,
              "cache_dtype": run.train.encoder.cache_dtype}
    return replace(given, **{name: value for name, value in recipe.items() if getattr(given, name) is None})


def _default_run() -> RunConfig:
    """RunConfig's defaults: what `dnd plan` sizes without a recipe."""
    from dnd_scale.recipe import RunConfig  # the recipe imports every stage, the trainer (which imports this) too

    return RunConfig()


def _kernel_of(gen: GeneratorConfig) -> int:
    """The k a generator config builds: its own, else its preset's, else the sizing rule's."""
    return gen.kernel_size or (PRESETS[gen.preset].kernel_size if gen.preset in PRESETS else DEFAULT_KERNEL_SIZE)


def _preset_for(config: PlanConfig, condition: tuple[int, int, int], token_shape, num_tokens) -> GeneratorConfig:
    if config.preset != "match":
        return GeneratorConfig(preset=config.preset, kernel_size=config.kernel_size)
    for name, preset in PRESETS.items():
        if preset.features[0] == condition and preset.features[-1] == (num_tokens, *token_shape):
            return GeneratorConfig(preset=name, kernel_size=config.kernel_size)
    return GeneratorConfig(preset="auto", kernel_size=config.kernel_size)


# fp32 bytes per output value that the training loss (generator_loss) holds at its backward: the
# target batch, the masked difference it keeps for backward, and two fp32 gradients of the output's
# size while that backward runs. On an H200 the estimate without them fell 7-10% short of the
# measured peak (benchmarks/results/scale_h200.json).
LOSS_BYTES_PER_OUTPUT_VALUE = 16


def stage_activation_bytes_per_sample(features: list[tuple[int, int, int]], bytes_per_value: int = 2) -> int:
    """Tensors kept for backward by each stage (input, normalized input, both branches' intermediates
    and outputs, the average and the stage output), summed over stages."""
    total = 0
    for (n, h, w), (n2, h2, w2) in zip(features, features[1:]):
        total += 2 * n * h * w + n * h * w2 + n * h2 * w + 3 * n * h2 * w2 + n2 * h2 * w2
    return total * bytes_per_value


def activation_bytes_per_sample(features: list[tuple[int, int, int]], bytes_per_value: int = 2) -> int:
    """Activation bytes of one sample: the stages' (`stage_activation_bytes_per_sample`, in
    `bytes_per_value`) and the loss's fp32 working set on the generator's output (always fp32)."""
    n, h, w = features[-1]
    return stage_activation_bytes_per_sample(features, bytes_per_value) + LOSS_BYTES_PER_OUTPUT_VALUE * n * h * w


def model_state_bytes(params: int, largest_stage: int, stage: int, world: int, offload_optimizer: bool = False,
                      offload_params: bool = False) -> int:
    """Model-state bytes per GPU for ZeRO `stage` on `world` GPUs (8 GPUs a node), DeepSpeed's estimators.

    ZeRO-3 gathers a whole stage's bf16 weights and gradients for its forward and backward (4 bytes per
    parameter of the largest stage) on top of its partitions; where one stage holds more than half of the
    parameters (the last mixing convolution of large targets) that costs more than ZeRO-2's replicated
    2 bytes per parameter, so ZeRO-3 shows more memory than ZeRO-2 there. That is not a bug of the
    estimate: ZeRO-3 cannot split a stage it has to run whole.
    """
    gpus, nodes = min(world, 8), max(1, world // 8)
    if stage == 0:
        return 20 * params
    if stage in (1, 2) and offload_optimizer:
        return 2 * params  # bf16 weights only; DeepSpeed's ZeRO-2 offload estimate
    if stage == 1:
        return 4 * params + 16 * params // world
    if stage == 2:
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

        return int(estimate_zero2_model_states_mem_needs(params, gpus, nodes, cpu_offload=False)[1])
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    return int(estimate_zero3_model_states_mem_needs(
        params, largest_stage, gpus, nodes, cpu_offload=offload_optimizer or offload_params,
        cpu_offload_params=offload_params,
    )[1])


def offload_model_state_bytes(
    params: int, largest_stage: int, stage: int, world: int, offload_params: bool = False
) -> tuple[int, int]:
    """(GPU bytes per GPU, CPU bytes per node) of model states with the optimizer states offloaded to
    CPU (ZeRO 1-3) and, with `offload_params`, the parameters too (ZeRO-3 only), as DeepSpeed's own
    estimators give them (their CPU side includes DeepSpeed's 1.5x buffer factor)."""
    gpus, nodes = min(world, 8), max(1, world // 8)  # 8 GPUs a node
    if offload_params and stage != 3:
        raise ValueError(f"parameter offload needs ZeRO-3, got stage {stage}")
    if stage in (1, 2):
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

        cpu, gpu = estimate_zero2_model_states_mem_needs(params, gpus, nodes, cpu_offload=True)
        return int(gpu), int(cpu)
    if stage != 3:
        raise ValueError(f"optimizer offload needs ZeRO 1, 2 or 3, got stage {stage}")
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
        params, largest_stage, gpus, nodes, cpu_offload=True, cpu_offload_params=offload_params
    )
    return int(gpu), int(cpu)


def offload_cpu_bytes(params: int, largest_stage: int, world: int) -> int:
    """CPU memory per node that ZeRO-3 with optimizer and parameter offload needs (DeepSpeed's estimator)."""
    return offload_model_state_bytes(params, largest_stage, 3, world, offload_params=True)[1]


def gpu_memory_estimate(features: list[tuple[int, int, int]], kernel_size: int, zero_stage: int, world: int,
                        micro_batch: int, offload_optimizer: bool = False, offload_params: bool = False,
                        bf16: bool = True) -> dict[str, int]:
    """Bytes per GPU of one training configuration: {"model_states", "activations", "total"}.

    Model states are DeepSpeed's mixed-precision estimates either way (an fp32 run holds 16 rather
    than 20 B per parameter without ZeRO, so they err on the safe side); activations are 4 B per value
    without bf16."""
    params = count_parameters(features, kernel_size)
    largest = max(stage_parameters(a, b, kernel_size) for a, b in zip(features, features[1:]))
    states = model_state_bytes(params, largest, zero_stage, world, offload_optimizer, offload_params)
    activations = activation_bytes_per_sample(features, 2 if bf16 else 4) * micro_batch
    return {"model_states": states, "activations": activations, "total": states + activations}


_COLUMNS = ((0, False), (1, False), (2, False), (3, False), (3, True))  # MEMORY_CONFIGS as (stage, offload)


def _config_name(zero_stage: int, offload_optimizer: bool, offload_params: bool) -> str:
    return f"zero{zero_stage}" + ("+offload" if offload_params else "+optimizer-offload" if offload_optimizer else "")


def check_gpu_memory(config: Any, features: list[tuple[int, int, int]], world: int,
                     device: Any = None, resident_bytes: int = 0) -> int | None:
    """Refuse a training config whose memory estimate does not fit the GPU, before anything is built.

    `config` is a TrainConfig (generator, zero_stage, offload_*, micro_batch_size, gpu_memory_gib).
    The GPU's size is `config.gpu_memory_gib` when declared, else the total memory torch reports for a
    CUDA `device`; on any other device, undeclared, nothing is checked (returns None). `resident_bytes`
    is what `train.resident` holds on every GPU besides the generator (`resident.resident_bytes`; 0
    when the data streams from the host), added to every configuration's estimate. Returns the
    estimate in bytes when it fits, raises PlanError with the numbers of every configuration otherwise.
    """
    import torch

    declared = getattr(config, "gpu_memory_gib", None)
    if declared is not None:
        capacity, where = float(declared) * GIB, f"the declared train.gpu_memory_gib = {declared:g}"
    elif device is not None and torch.device(device).type == "cuda":
        capacity = torch.cuda.get_device_properties(torch.device(device)).total_memory
        where = f"this GPU's {capacity / GIB:.1f} GiB ({torch.cuda.get_device_name(torch.device(device))})"
    else:
        return None
    kernel = _kernel_of(config.generator)
    micro = config.micro_batch_size
    estimate = gpu_memory_estimate(features, kernel, config.zero_stage, world, micro,
                                   config.offload_optimizer, config.offload_params, config.bf16)
    total = estimate["total"] + resident_bytes
    usable = USABLE_FRACTION * capacity
    if total <= usable:
        return total
    name = _config_name(config.zero_stage, config.offload_optimizer, config.offload_params)
    others = {_config_name(stage, offload, offload): gpu_memory_estimate(
        features, kernel, stage, world, micro, offload, offload, config.bf16)["total"] + resident_bytes
        for stage, offload in _COLUMNS}
    options = [f"{key} {value / GIB:.1f}" for key, value in others.items()]
    fitting = [key for key, value in others.items() if value <= usable]
    per_sample = estimate["activations"] / micro / GIB
    resident = (f" + {resident_bytes / GIB:.1f} GiB of resident data, the packed targets and condition caches "
                "train.resident puts on the GPU" if resident_bytes else "")
    raise PlanError(
        f"train config needs ~{total / GIB:.1f} GiB per GPU ({name} on {world} GPU(s): model states "
        f"{estimate['model_states'] / GIB:.1f} GiB + activations {estimate['activations'] / GIB:.1f} GiB at "
        f"micro_batch_size {micro}, {'bf16' if config.bf16 else 'fp32'}{resident}), but {where} leaves {usable / GIB:.1f} GiB usable ({USABLE_FRACTION:.0%}). "
        f"Estimates per GPU at this world size{' with the resident data' if resident_bytes else ''} (GiB): "
        f"{', '.join(options)}. "
        + (f"Configurations that fit: {', '.join(fitting)}; " if fitting else "No ZeRO configuration fits; ")
        + ("(zero3+offload = zero_stage 3 with offload_optimizer and offload_params) " if "zero3+offload" in fitting else "")
        + ("set train.resident=host to stream the data from the host, " if resident_bytes else "")
        + f"or lower train.micro_batch_size (activations ~{per_sample:.2f} GiB per sample), train on more GPUs, "
        "or pick a smaller generator (generator.max_channels). `dnd plan` prints the same numbers"
        + (" except the resident data" if resident_bytes else "") + "; set train.gpu_memory_gib only to the memory the GPU really has."
    )


def make_plan(
    model_config: Any, spec: LoraSpec, config: PlanConfig | None = None, run: RunConfig | None = None
) -> dict[str, Any]:
    """The plan of `model_config` with LoRA `spec`: `config`'s numbers, those it leaves None from the
    recipe `run` (None: RunConfig's defaults), whose `train.generator` is sized as it is unless
    `config.preset` picks another."""
    run = run or _default_run()
    config = recipe_plan_config(run, config)
    layout = LoraLayout.from_config(model_config, spec)
    tok = WeightTokenizer(layout, TokenizerConfig(chunk=config.chunk))
    condition = (config.num_prompts, config.max_tokens, config.embed_dim)
    if config.preset is None:
        gen = replace(run.train.generator, kernel_size=config.kernel_size)
    else:
        gen = _preset_for(config, condition, tok.token_shape, tok.num_tokens)
    features = resolve_features(gen, condition, tok.token_shape, tok.num_tokens)
    kernel = _kernel_of(gen)
    params = count_parameters(features, kernel)
    largest = max(stage_parameters(a, b, kernel) for a, b in zip(features, features[1:]))
    flops = sum(stage_flops(a, b, kernel) for a, b in zip(features, features[1:]))
    activations = activation_bytes_per_sample(features) * config.micro_batch
    memory = {
        _config_name(stage, offload, offload): {
            str(world): model_state_bytes(params, largest, stage, world, offload, offload) + activations
            for world in WORLD_SIZES
        }
        for stage, offload in _COLUMNS
    }
    usable = {str(size): USABLE_FRACTION * size * GIB for size in GPU_SIZES_GIB}
    fits = {  # per GPU size and world size: the first configuration (least communication) that fits
        size: {w: next((name for name in MEMORY_CONFIGS if memory[name][w] <= limit), None) for w in map(str, WORLD_SIZES)}
        for size, limit in usable.items()
    }
    notes = [
        f"model states per DeepSpeed's estimators (bf16 + fp32 Adam) plus ~{activations / GIB:.1f} GiB of "
        f"activations (the stages' and the loss's) at micro-batch {config.micro_batch}; estimates, not measurements",
        f"zero3+offload: optimizer and parameters in CPU memory, which then needs "
        f"~{offload_cpu_bytes(params, largest, 8) / GIB:.0f} GiB per 8-GPU node",
        f"fits = the first configuration whose estimate is under {USABLE_FRACTION:.0%} of the GPU's memory",
    ]
    if any(memory["zero3"][w] > memory["zero2"][w] for w in memory["zero3"]):
        notes.append(
            f"zero3 > zero2: ZeRO-3 gathers each stage whole (bf16 weights + gradients, 4 B per parameter) and the "
            f"largest stage holds {largest / params:.0%} of the generator's parameters, more than the 2 B per "
            "parameter ZeRO-2 keeps replicated; ZeRO-3 pays off only with offload or where stages are balanced"
        )
    per_module: dict[str, int] = {}
    for seg in tok.segments:
        per_module[seg.matrix.name] = per_module.get(seg.matrix.name, 0) + seg.count
    layers = len({m.layer for m in layout.matrices})
    plan = {
        "model": {**asdict(layout.geometry), "base_params": layout.geometry.num_params},
        "lora": {
            "rank": spec.rank, "alpha": spec.alpha, "rslora": spec.use_rslora, "modules": layout.module_names,
            "experts": spec.experts, "layers": layers, "matrices": len(layout.matrices),
            "params": layout.num_params,
            "bytes_per_checkpoint": {"fp32": layout.bytes_per_checkpoint(), "bf16": layout.num_params * 2},
            "fingerprint": layout.fingerprint(),
        },
        "tokens": {
            "count": tok.num_tokens, "shape": list(tok.token_shape), "chunk": config.chunk,
            "per_layer": tok.num_tokens / max(1, layers),
            "per_module": per_module,
            "padding_fraction": 1 - layout.num_params / (tok.num_tokens * spec.rank * config.chunk),
            "packed_bytes_per_checkpoint": tok.num_tokens * tok.token_shape[0] * tok.token_shape[1] * 4,
        },
        "generator": {
            "preset": gen.preset, "kernel_size": kernel, "features": [list(f) for f in features],
            "params": params, "largest_stage_params": largest, "forward_tflop_per_sample": flops / 1e12,
            "train_step_tflop_per_sample": 3 * flops / 1e12,
        },
        "memory_per_gpu_bytes": memory,
        "offload_cpu_bytes_per_node": {str(w): offload_cpu_bytes(params, largest, w) for w in WORLD_SIZES},
        "fits_gpu_gib": fits,
        "memory_notes": notes,
    }
    if config.pool_prompts is not None:
        plan["condition_cache"] = {
            "prompts": config.pool_prompts, "length": config.max_tokens, "dim": config.embed_dim,
            "dtype": config.cache_dtype,
            "bytes_at_most": condition_cache_bound(config.pool_prompts, config.max_tokens, config.embed_dim,
                                                   config.cache_dtype),
            "time": "one encoder pass over all prompts, before the first training step",
        }
    return plan


def format_plan(plan: dict[str, Any], name: str) -> str:
    m, lora, tok, gen = plan["model"], plan["lora"], plan["tokens"], plan["generator"]
    moe = f", {m['num_experts']} experts of {m['moe_intermediate']}" if m.get("num_experts") else ""
    lines = [
        f"== {name}: {m['model_type']}, {m['num_layers']} layers, hidden {m['hidden']}, "
        f"intermediate {m['intermediate']}{moe}, heads {m['heads']}/{m['kv_heads']} (head_dim {m['head_dim']}), "
        f"~{m['base_params'] / 1e9:.2f} B base parameters",
        f"LoRA   r={lora['rank']} alpha={lora['alpha']:g}{' rsLoRA' if lora['rslora'] else ''} on "
        f"{'+'.join(lora['modules'])} x {lora['layers']} layers: {lora['matrices']} matrices, "
        f"{lora['params']:,} parameters, {lora['bytes_per_checkpoint']['fp32'] / 2**20:.1f} MiB fp32 / "
        f"{lora['bytes_per_checkpoint']['bf16'] / 2**20:.1f} MiB bf16 per checkpoint",
        f"tokens {tok['count']:,} of shape {tuple(tok['shape'])} ({tok['per_layer']:g} per layer, "
        f"{tok['padding_fraction']:.1%} padding); per module: "
        + ", ".join(f"{k} {v}" for k, v in tok["per_module"].items()),
        f"generator preset {gen['preset']} (k={gen['kernel_size']}): {gen['params']:,} parameters, "
        f"{gen['forward_tflop_per_sample']:.2f} TFLOP forward per sample",
        "  stages: " + " -> ".join(str(tuple(f)) for f in gen["features"]),
        "memory per GPU (GiB)   " + "".join(f"{'world ' + str(w):>14}" for w in WORLD_SIZES),
    ]
    for config, per_world in plan["memory_per_gpu_bytes"].items():
        lines.append(f"  {config:<21}" + "".join(f"{per_world[str(w)] / GIB:>14.1f}" for w in WORLD_SIZES))
    for size, per_world in plan["fits_gpu_gib"].items():
        lines.append(f"  {'fits ' + size + ' GB':<21}" + "".join(f"{per_world[str(w)] or 'none':>14}" for w in WORLD_SIZES))
    lines.extend(f"  ({note})" for note in plan["memory_notes"])
    cache = plan.get("condition_cache")
    if cache is None:
        lines.append("condition cache: give --pool-prompts (the prompts of all training tasks) for its size")
    else:
        size = cache["bytes_at_most"]
        lines.append(
            f"condition cache <= {size / GIB:.2f} GiB ({size / 1e9:.2f} GB: {cache['prompts']:,} prompts x L "
            f"{cache['length']} x D {cache['dim']} x {CACHE_DTYPES[cache['dtype']].itemsize} B {cache['dtype']}) in "
            f"RUN/conditions/; {cache['time']} (reused by later runs and --resume)"
        )
    return "\n".join(lines)


def display_name(model: str | Path) -> str:
    """The name a plan is printed under: a model folder's or config.json's folder name, or a .json file's
    name without the extension (never cut at a dot inside the name, e.g. Qwen2.5-0.5B-Instruct)."""
    path = Path(model)
    if path.name == HF_CONFIG:
        return path.parent.resolve().name
    if path.suffix == ".json":
        return path.name[: -len(".json")]
    return path.name


def defaults_note(given: PlanConfig, config: PlanConfig, lora_given: bool) -> str:
    """The line that says which numbers of a plan without a recipe are RunConfig's defaults."""
    used = [f"{RECIPE_SOURCES[name]} = {getattr(config, name)}" for name in RECIPE_SOURCES
            if getattr(given, name) is None and getattr(config, name) is not None
            and (name != "cache_dtype" or config.pool_prompts is not None)]
    defaults = _default_run()
    if given.preset is None:
        used.append(f"train.generator = preset {defaults.train.generator.preset}")
    if not lora_given:
        lora = defaults.collect.lora
        used.append(f"collect.lora = r={lora.rank},alpha={lora.alpha:g},modules={lora.target_modules}")
    return ("no recipe: these are RunConfig's defaults (pass --config R.yaml, e.g. configs/, or the flags to "
            "size another run): " + ", ".join(used))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="dnd plan", description=__doc__.splitlines()[0] + " With --config (or --run), the model, the LoRA, "
        "the generator and the numbers below come from the recipe, else from RunConfig's defaults (listed in the "
        "output); a flag given overrides its number.")
    parser.add_argument("--model", nargs="+",
                        help="config.json files or model folders (shapes only), e.g. configs/models/*.json "
                             "(default: the recipe's model_config, else its collect.base_model)")
    parser.add_argument("--config", help="YAML recipe to size")
    parser.add_argument("--run", help="run folder whose saved recipe is sized")
    parser.add_argument("--lora", help="LoRA spec: r=8,alpha=16,modules=q_proj+v_proj|all-linear,layers=0-3,rslora "
                                       "(default: the recipe's collect.lora)")
    hints = typing.get_type_hints(PlanConfig)
    for field in fields(PlanConfig):
        kind = next(t for t in typing.get_args(hints[field.name]) or (hints[field.name],) if t is not type(None))
        source = RECIPE_SOURCES.get(field.name)
        default = f"the recipe's {source}" if source else "no condition cache" if field.default is None else field.default
        parser.add_argument(f"--{field.name.replace('_', '-')}", type=kind, help=f"(default: {default})")
    parser.add_argument("--lora-experts", action="store_true", help="MoE models: also plan the routed experts' LoRAs")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    parser.add_argument("--out", help="also write the plans as JSON to this file (e.g. benchmarks/results/plans.json)")
    args = parser.parse_args(argv)
    if not (args.config or args.run or args.model):
        parser.error("give --model CONFIG.json ... (shapes only), or a recipe: --config R.yaml or --run RUN")
    with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed logs to stdout on import; stdout is for the plan
        import deepspeed.runtime.zero.stage3  # noqa: F401
    given = PlanConfig(**{f.name: getattr(args, f.name) for f in fields(PlanConfig) if getattr(args, f.name) is not None})
    if args.config or args.run:
        from dnd_scale.recipe import load_recipe, recipe_for

        run, note = load_recipe(recipe_for("plan", args.config, args.run)), None
        models = args.model or [run.model_config or run.collect.base_model]
    else:
        run, models = _default_run(), args.model
        note = defaults_note(given, recipe_plan_config(run, given), lora_given=args.lora is not None)
    spec = LoraSpec.parse(args.lora) if args.lora else run.collect.lora
    if args.lora_experts:
        spec = replace(spec, experts=True)
    if note is not None:  # beside the plan; with --json on stderr, so that stdout stays JSON
        print(note, end="\n\n", file=sys.stderr if args.json else sys.stdout)
    plans = {}
    for model in models:
        plans[model] = make_plan(model, spec, given, run)
        if not args.json:
            print(format_plan(plans[model], display_name(model)), end="\n\n")
    if args.json:
        print(json.dumps(plans, indent=2))
    if args.out:
        from dnd_scale.io import write_json

        write_json(args.out, plans)
    return 0
