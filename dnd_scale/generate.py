"""`dnd generate`: prompts of a new task → a PEFT adapter folder, in one generator forward pass.

`AdapterGenerator` loads an exported generator once (weights, config, layout, condition encoder) and
serves any number of prompt sets. Each adapter folder gets a provenance file (`export.PROVENANCE`)
with the generator's hash, the prompts' hash and the layout fingerprint, so an adapter can always be
traced to what made it.

Settings: the recipe's `generate:` section (`GenerateConfig`) from --config or the run folder's saved
recipe (--run), `--generate.field=value` overrides and the flags below. With neither --config nor
--run, the section's defaults (the export carries everything else the generator needs).
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

import torch

from dnd_scale.basemodel import resolve_device
from dnd_scale.config import from_dict
from dnd_scale.encoder import ConditionEncoder, prompts_fingerprint
from dnd_scale.export import VllmContractError, check_vllm_contract, export_tokens, parse_dtype, refuse_existing
from dnd_scale.generator import GeneratorConfig, HyperConvGenerator
from dnd_scale.generator_export import export_folder, load_export_weights, read_export_config, weights_misfit
from dnd_scale.io import ArtifactError, read_json, read_text
from dnd_scale.layout import LayoutError, LoraLayout
from dnd_scale.rundir import RunDir
from dnd_scale.tokenizer import TokenizerConfig, WeightTokenizer


@dataclass
class GenerateConfig:
    """How `dnd generate` turns prompt files into adapters (the recipe's `generate:` section)."""

    samples: int = 1
    """Adapters per prompt file, each from another seeded sample of the file's prompts (folders
    `<stem>-<i>` when more than one, `<stem>` for one)."""
    seed: int = 0
    """Seed of the first sample's prompt draw; sample i draws with seed + i (recorded in provenance)."""
    dtype: str = "float32"
    """Adapter tensor dtype: "float32", "bfloat16" or "float16" (also "fp32", "bf16", "fp16")."""
    device: str = "auto"
    """Where the generator runs: "auto" (cuda when available, else cpu), "cpu", "cuda", "cuda:1", ..."""
    impl: Literal["auto", "torch", "triton"] | None = None
    """Generator stages and detokenization: the fused Triton kernels ("triton"), the PyTorch
    references ("torch"), or Triton on a GPU only ("auto"); None: the exported config's."""

    def __post_init__(self) -> None:
        if self.samples < 1:
            raise ValueError(f"samples must be >= 1 adapter per prompt file, got {self.samples}")
        parse_dtype(self.dtype)  # an unknown dtype is refused here, before the generator loads


class AdapterGenerator:
    """An exported generator, loaded once, turning prompt sets into adapters."""

    def __init__(self, export_dir: str | Path, device: str | torch.device = "cpu", impl: str | None = None) -> None:
        export_dir = Path(export_dir)
        config = read_export_config(export_dir)
        self.export_dir = export_dir
        self.device = torch.device(device)
        self.layout = LoraLayout.from_dict(config["layout"])
        self.tokenizer = WeightTokenizer(self.layout, TokenizerConfig(**config["tokenizer"]))
        gen_config = from_dict(GeneratorConfig, config["generator"])
        if impl is not None:
            gen_config.impl = impl
        # One switch for both fused paths: "torch" runs no Triton at all, "triton" both kernels.
        self.impl = gen_config.impl
        self.generator = HyperConvGenerator(gen_config).to(self.device).eval()
        # Hashed once per load (a loaded generator serves many prompt sets): provenance.json names
        # this hash, so weights replaced after the export must not pass for the exported ones.
        state, self.generator_sha256 = load_export_weights(export_dir, config)
        missing, unexpected = self.generator.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise weights_misfit(export_dir, missing, unexpected)
        n, length, _ = self.generator.features[0]
        self.num_prompts = n
        self.encoder = ConditionEncoder(config["encoder"]["name"], length=length, device=self.device)
        if self.encoder.dim != self.generator.features[0][2]:
            raise ArtifactError(f"encoder width {self.encoder.dim} does not match the generator's condition "
                                f"width {self.generator.features[0][2]}")
        self.base_model = config.get("base_model")
        self.base_identity = config.get("base_identity")  # recorded by collect; None for older exports

    def check_base(self, base_config) -> None:
        """Refuse a base model whose LoRA layout differs from the generator's."""
        other = LoraLayout.from_config(base_config, self.layout.spec)
        if other.fingerprint() != self.layout.fingerprint():
            raise LayoutError(
                f"the generator writes adapters for layout {self.layout.fingerprint()[:12]} "
                f"({self.layout.geometry.model_type}, hidden {self.layout.geometry.hidden}, "
                f"{self.layout.geometry.num_layers} layers) but the base model gives {other.fingerprint()[:12]} "
                f"({other.geometry.model_type}, hidden {other.geometry.hidden}, {other.geometry.num_layers} layers); "
                "use the base model the generator was trained for"
            )

    def pick_prompts(self, prompts: Sequence[str], seed: int = 0) -> list[str]:
        """Exactly `num_prompts` prompts: a seeded sample of a larger pool; a smaller pool is an error."""
        prompts = [p for p in prompts if isinstance(p, str)]
        if not prompts:
            raise ArtifactError("the prompt set is empty; give at least one prompt of the new task")
        if len(prompts) < self.num_prompts:
            raise ArtifactError(
                f"the generator was trained on conditions of {self.num_prompts} prompts but only "
                f"{len(prompts)} were given; provide at least {self.num_prompts} prompts of the task"
            )
        if len(prompts) == self.num_prompts:
            return list(prompts)
        return random.Random(seed).sample(list(prompts), self.num_prompts)

    @torch.inference_mode()
    def tokens(self, prompts: Sequence[str]) -> torch.Tensor:
        """Exactly num_prompts prompts → generator tokens (T, r+2, c+2), float32 on the generator's device."""
        cond = self.encoder.encode(list(prompts)).to(self.device)[None]  # (1, N, L, D)
        return self.generator(cond)[0].float()

    def generate(self, prompts: Sequence[str], out_dir: str | Path, *, dtype: str = "float32", seed: int = 0,
                 extra: dict | None = None, overwrite: bool = False) -> Path:
        """An adapter folder at `out_dir` from a sample of `prompts`; an existing folder is refused
        unless `overwrite`."""
        refuse_existing(out_dir, overwrite)
        chosen = self.pick_prompts(prompts, seed)
        tokens = self.tokens(chosen)
        return export_tokens(tokens, self.tokenizer, out_dir, dtype=parse_dtype(dtype), base_model=self.base_model,
                             overwrite=overwrite, impl=self.impl, provenance={
                                 "generator_sha256": self.generator_sha256,
                                 "generator_dir": str(self.export_dir),
                                 "prompts_sha256": prompts_fingerprint(chosen),
                                 "num_prompts": len(chosen),
                                 "seed": seed,
                                 "base_identity": self.base_identity,
                                 **(extra or {}),
                             })


def read_prompts(path: str | Path) -> list[str]:
    """Prompts from a JSON list (strings or {prompt: ...} records), a JSONL file or a text file (one per line)."""
    from dnd_scale.tasks import load_task

    path = Path(path)
    if path.suffix == ".txt":
        return [line for line in read_text(path, "prompt file").splitlines() if line.strip()]
    if path.suffix == ".json":
        data = read_json(path, "prompt file")
        if isinstance(data, list) and data and all(isinstance(x, str) for x in data):
            return data
    return load_task(str(path)).prompts


# `dnd generate` flags that set a field of the recipe's `generate:` section (as --generate.<field>=value does).
GENERATE_FLAGS = ("samples", "seed", "dtype", "device", "impl")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dnd generate", description=__doc__.splitlines()[0] + " Settings: the "
                                     "recipe's `generate:` section; overrides: --generate.field=value or the flags below.")
    parser.add_argument("--config", help="YAML recipe; its `generate:` section is read (default: the recipe saved in "
                                         "the --run folder, else the section's defaults)")
    parser.add_argument("--run", help="run folder: its saved recipe is read when --config is not given; --generator "
                                      "defaults to its exported generator and --out to its adapters/ folder")
    parser.add_argument("--generator", help="exported generator folder (<run>/generator/export)")
    parser.add_argument("--prompts", nargs="+", required=True,
                        help="one prompt file per adapter: .txt (one prompt a line), .json/.jsonl records")
    parser.add_argument("--out", help="folder for the adapters (one sub-folder per prompt file)")
    parser.add_argument("--samples", type=int, help="adapters per prompt file, each from another prompt sample "
                                                    "(default: generate.samples)")
    parser.add_argument("--dtype", help="adapter dtype: float32, bfloat16 or float16 (default: generate.dtype)")
    parser.add_argument("--device", help="auto, cpu, cuda, cuda:1, ... (default: generate.device)")
    parser.add_argument("--impl", choices=["auto", "torch", "triton"], default=None,
                        help="generator stages and detokenization: the fused Triton kernels (triton), the PyTorch "
                             "references (torch), or Triton on a GPU only (auto; default: generate.impl, else the "
                             "exported config's)")
    parser.add_argument("--seed", type=int, help="seed of the first sample's prompt draw (default: generate.seed)")
    parser.add_argument("--overwrite", action="store_true", help="replace adapter folders that already exist")
    from dnd_scale.recipe import parse_stage_args  # imports every stage's config: for the command line only

    args, run = parse_stage_args(parser, argv, "generate",
                                 lambda args: {f"generate.{name}": getattr(args, name) for name in GENERATE_FLAGS},
                                 needs_recipe=False)
    config = run.generate
    generator_dir = args.generator or (export_folder(RunDir(args.run).train_output(run.train.output_dir))
                                       if args.run else None)
    out_dir = args.out or (RunDir(args.run).adapters if args.run else None)
    if generator_dir is None or out_dir is None:
        parser.error("give --generator EXPORT and --out FOLDER, or --run RUN (its export and its adapters/ folder)")
    jobs = [(path, sample, Path(out_dir) / (Path(path).stem if config.samples == 1 else f"{Path(path).stem}-{sample}"))
            for path in args.prompts for sample in range(config.samples)]
    existing = [str(out) for _, _, out in jobs if out.exists()]
    if existing and not args.overwrite:  # before the generator loads: nothing is written at all
        parser.error(f"these adapter folders already exist: {', '.join(existing)}; pass --overwrite to replace "
                     "them, or choose another --out")
    generator = AdapterGenerator(generator_dir, resolve_device(config.device), config.impl)
    for path, sample, out in jobs:
        start = time.perf_counter()
        generator.generate(read_prompts(path), out, dtype=config.dtype, seed=config.seed + sample,
                           overwrite=args.overwrite)
        elapsed = time.perf_counter() - start
        # The format vLLM's loader takes (config and tensor names, read back from what was written).
        try:
            vllm = f"vLLM's LoRA contract met: serve with --max-lora-rank {check_vllm_contract(out)} or more"
        except VllmContractError as error:  # still a PEFT adapter: say so, keep it
            vllm = "a PEFT adapter, but not one vLLM loads"
            print(f"dnd generate: warning: {error}", file=sys.stderr)
        print(f"{out}  ({elapsed:.2f} s; {vllm})")
    return 0
