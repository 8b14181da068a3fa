"""`dnd plan`: size a run from a model config alone — layout, tokens, generator, memory per GPU.

Memory per GPU is the model states DeepSpeed's own estimators give (bf16 weights and gradients,
fp32 master weights, fp32 gradient copy and Adam moments: 2 + 2 + 16 bytes per parameter, of which
ZeRO-1 partitions the 16 optimizer bytes, ZeRO-2 also the gradients, ZeRO-3 everything), plus an
activation estimate: the tensors one hyper-convolution stage keeps for its backward pass, in bf16,
times the micro-batch.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from dnd_scale.generator import PRESETS, GeneratorConfig, count_parameters, resolve_features, stage_flops, stage_parameters
from dnd_scale.layout import LoraLayout, LoraSpec
from dnd_scale.tokenizer import TokenizerConfig, WeightTokenizer

WORLD_SIZES = (1, 8, 64)
ZERO_STAGES = (0, 1, 2, 3)
GIB = 1024**3


@dataclass
class PlanConfig:
    """What `dnd plan` sizes."""

    num_prompts: int = 128
    """Prompts per condition (N of the condition)."""
    max_tokens: int = 384
    """Encoder tokens per prompt (L of the condition)."""
    embed_dim: int = 384
    """Encoder width (D; 384 for all-MiniLM-L6-v2)."""
    chunk: int = 128
    """Token chunk width c."""
    preset: str = "match"
    """"match": a paper preset whose first and last shapes fit this geometry, else "auto";
    or any GeneratorConfig preset name."""
    kernel_size: int | None = None
    """Generator kernel size (None: the preset's own, 9 for auto)."""
    micro_batch: int = 8
    """Samples per GPU per step, for the activation estimate."""


def _preset_for(config: PlanConfig, condition: tuple[int, int, int], token_shape, num_tokens) -> GeneratorConfig:
    if config.preset != "match":
        return GeneratorConfig(preset=config.preset, kernel_size=config.kernel_size)
    for name, preset in PRESETS.items():
        if preset.features[0] == condition and preset.features[-1] == (num_tokens, *token_shape):
            return GeneratorConfig(preset=name, kernel_size=config.kernel_size)
    return GeneratorConfig(preset="auto", kernel_size=config.kernel_size)


def activation_bytes_per_sample(features: list[tuple[int, int, int]], bytes_per_value: int = 2) -> int:
    """Tensors kept for backward by each stage (input, normalized input, both branches' intermediates
    and outputs, the average and the stage output), summed over stages."""
    total = 0
    for (n, h, w), (n2, h2, w2) in zip(features, features[1:]):
        total += 2 * n * h * w + n * h * w2 + n * h2 * w + 3 * n * h2 * w2 + n2 * h2 * w2
    return total * bytes_per_value


def model_state_bytes(params: int, largest_stage: int, stage: int, world: int) -> int:
    """Model-state bytes per GPU for ZeRO `stage` on `world` GPUs (no offload)."""
    gpus, nodes = min(world, 8), max(1, world // 8)  # 8 GPUs a node
    if stage == 0:
        return 20 * params
    if stage == 1:
        return 4 * params + 16 * params // world
    if stage == 2:
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

        return int(estimate_zero2_model_states_mem_needs(params, gpus, nodes, cpu_offload=False)[1])
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    return int(estimate_zero3_model_states_mem_needs(
        params, largest_stage, gpus, nodes, cpu_offload=False, cpu_offload_params=False
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


def make_plan(model_config: Any, spec: LoraSpec, config: PlanConfig | None = None) -> dict[str, Any]:
    config = config or PlanConfig()
    layout = LoraLayout.from_config(model_config, spec)
    tok = WeightTokenizer(layout, TokenizerConfig(chunk=config.chunk))
    condition = (config.num_prompts, config.max_tokens, config.embed_dim)
    gen = _preset_for(config, condition, tok.token_shape, tok.num_tokens)
    features = resolve_features(gen, condition, tok.token_shape, tok.num_tokens)
    kernel = gen.kernel_size or (PRESETS[gen.preset].kernel_size if gen.preset in PRESETS else 9)
    params = count_parameters(features, kernel)
    largest = max(stage_parameters(a, b, kernel) for a, b in zip(features, features[1:]))
    flops = sum(stage_flops(a, b, kernel) for a, b in zip(features, features[1:]))
    activations = activation_bytes_per_sample(features) * config.micro_batch
    memory = {
        f"zero{stage}": {str(world): model_state_bytes(params, largest, stage, world) + activations for world in WORLD_SIZES}
        for stage in ZERO_STAGES
    }
    per_module: dict[str, int] = {}
    for seg in tok.segments:
        per_module[seg.matrix.name] = per_module.get(seg.matrix.name, 0) + seg.count
    return {
        "model": {**asdict(layout.geometry), "base_params": layout.geometry.num_params},
        "lora": {
            "rank": spec.rank, "alpha": spec.alpha, "rslora": spec.use_rslora, "modules": list(spec.modules),
            "layers": len({m.layer for m in layout.matrices}), "matrices": len(layout.matrices),
            "params": layout.num_params,
            "bytes_per_checkpoint": {"fp32": layout.bytes_per_checkpoint(), "bf16": layout.num_params * 2},
            "fingerprint": layout.fingerprint(),
        },
        "tokens": {
            "count": tok.num_tokens, "shape": list(tok.token_shape), "chunk": config.chunk,
            "per_layer": tok.num_tokens / max(1, len({m.layer for m in layout.matrices})),
            "per_module": per_module,
            "padding_fraction": 1 - layout.num_params / (tok.num_tokens * spec.rank * config.chunk),
            "packed_bytes_per_checkpoint": tok.num_tokens * tok.token_shape[0] * tok.token_shape[1] * 4,
        },
        "generator": {
            "preset": gen.preset, "kernel_size": kernel, "features": [list(f) for f in features],
            "params": params, "forward_tflop_per_sample": flops / 1e12,
            "train_step_tflop_per_sample": 3 * flops / 1e12,
        },
        "memory_per_gpu_bytes": memory,
        "memory_notes": (
            f"model states per DeepSpeed's estimators (bf16 + fp32 Adam, no offload) plus ~"
            f"{activations / GIB:.1f} GiB of stage activations at micro-batch {config.micro_batch}"
        ),
    }


def format_plan(plan: dict[str, Any], name: str) -> str:
    m, lora, tok, gen = plan["model"], plan["lora"], plan["tokens"], plan["generator"]
    lines = [
        f"== {name}: {m['model_type']}, {m['num_layers']} layers, hidden {m['hidden']}, "
        f"intermediate {m['intermediate']}, heads {m['heads']}/{m['kv_heads']} (head_dim {m['head_dim']}), "
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
        "memory per GPU (GiB)   " + "".join(f"{'world ' + str(w):>12}" for w in WORLD_SIZES),
    ]
    for stage, per_world in plan["memory_per_gpu_bytes"].items():
        lines.append(f"  {stage:<21}" + "".join(f"{per_world[str(w)] / GIB:>12.1f}" for w in WORLD_SIZES))
    lines.append(f"  ({plan['memory_notes']})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dnd plan", description=__doc__.splitlines()[0])
    parser.add_argument("--model", nargs="+", required=True,
                        help="config.json files or model folders (shapes only), e.g. configs/models/*.json")
    parser.add_argument("--lora", default="r=8,alpha=16,modules=all-linear",
                        help="LoRA spec: r=8,alpha=16,modules=q_proj+v_proj|all-linear,layers=0-3,rslora")
    for field, default in asdict(PlanConfig()).items():
        parser.add_argument(f"--{field.replace('_', '-')}", type=type(default) if default is not None else int,
                            default=default)
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    args = parser.parse_args(argv)
    spec = LoraSpec.parse(args.lora)
    config = PlanConfig(**{k: getattr(args, k) for k in asdict(PlanConfig())})
    plans = {}
    for model in args.model:
        plans[model] = make_plan(model, spec, config)
        if not args.json:
            print(format_plan(plans[model], Path(model).stem), end="\n\n")
    if args.json:
        print(json.dumps(plans, indent=2))
    return 0
