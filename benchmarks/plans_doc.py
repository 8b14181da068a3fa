"""Render the `dnd plan` tables of docs/scaling.md from the committed plan JSON files.

Run from the repository root after regenerating the JSON with the commands in COMMANDS:

    python benchmarks/plans_doc.py           # rewrites the block between the markers of docs/scaling.md
    python benchmarks/plans_doc.py --check   # exit 1 if the document's tables differ from the JSON

Every number in the tables comes from the JSON; nothing here computes a size.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "scaling.md"
RESULTS = ROOT / "benchmarks" / "results"
DENSE = ("qwen2.5-7b", "qwen2.5-14b", "qwen2.5-32b", "qwen2.5-72b", "llama-3.1-70b", "mixtral-8x7b", "qwen3-30b-a3b")
EXPERTS = ("mixtral-8x7b", "qwen3-30b-a3b")
# The commands that made the JSON files (also printed in docs/scaling.md).
COMMANDS = (
    "dnd plan --model " + " ".join(f"configs/models/{m}.json" for m in DENSE)
    + " --lora r=16,alpha=32,modules=all-linear --chunk 512 --max-tokens 384 --micro-batch 8 --preset match --out benchmarks/results/plans.json",
    "dnd plan --model " + " ".join(f"configs/models/{m}.json" for m in EXPERTS)
    + " --lora r=16,alpha=32,modules=attention --lora-experts --chunk 512 --max-tokens 384 --micro-batch 8 --preset match --out benchmarks/results/plans_moe_experts.json",
)
FILES = ("plans.json", "plans_moe_experts.json")
BEGIN, END = "<!-- plans:begin (made by benchmarks/plans_doc.py) -->", "<!-- plans:end -->"
GIB = 1024**3


def _name(path: str) -> str:
    return Path(path).name.removesuffix(".json")


def _summary(plans: dict, title: str) -> list[str]:
    lines = [
        f"### {title}", "",
        "| target | base params | LoRA modules | LoRA params | tokens (r+2, c+2) | generator preset | generator params "
        "| fwd TFLOP / sample | train-step TFLOP / sample | fits 80 GB (1 / 8 / 64 GPUs) | fits 141 GB (1 / 8 / 64 GPUs) |",
        "|---|---:|---|---:|---:|---|---:|---:|---:|---|---|",
    ]
    for path, plan in plans.items():
        m, lora, tok, gen, fits = plan["model"], plan["lora"], plan["tokens"], plan["generator"], plan["fits_gpu_gib"]
        verdict = {size: " / ".join(v or "none" for v in per_world.values()) for size, per_world in fits.items()}
        lines.append(
            f"| {_name(path)} | {m['base_params'] / 1e9:.2f} B | {'+'.join(lora['modules'])} | {lora['params']:,} "
            f"| {tok['count']:,} x {tuple(tok['shape'])} | {gen['preset']} | {gen['params'] / 1e9:.2f} B "
            f"| {gen['forward_tflop_per_sample']:.1f} | {gen['train_step_tflop_per_sample']:.1f} "
            f"| {verdict['80']} | {verdict['141']} |"
        )
    return lines + [""]


def _memory(plans: dict, title: str) -> list[str]:
    worlds = list(next(iter(plans.values()))["memory_per_gpu_bytes"]["zero0"])
    columns = list(next(iter(plans.values()))["memory_per_gpu_bytes"])
    header = "| target | GPUs | " + " | ".join(columns) + " | CPU per node, zero3+offload |"
    lines = [f"### {title}", "", header, "|---|---:|" + "---:|" * (len(columns) + 1)]
    for path, plan in plans.items():
        mem, cpu = plan["memory_per_gpu_bytes"], plan["offload_cpu_bytes_per_node"]
        for w in worlds:
            cells = " | ".join(f"{mem[c][w] / GIB:.1f}" for c in columns)
            lines.append(f"| {_name(path)} | {w} | {cells} | {cpu[w] / GIB:.0f} |")
    return lines + [""]


def render() -> str:
    dense, experts = (json.loads((RESULTS / f).read_text()) for f in FILES)
    lines = [BEGIN, "", "Made by (from the repository root, then `python benchmarks/plans_doc.py`):", "", "```bash"]
    lines += [*COMMANDS, "```", ""]
    lines += _summary(dense, "All-linear LoRA (MoE models: attention only, their experts are not linear modules)")
    lines += _summary(experts, "MoE models, attention + routed-expert LoRAs (`experts=true`)")
    lines += _memory(dense, "Memory per GPU (GiB), all-linear LoRA, micro-batch 8")
    lines += _memory(experts, "Memory per GPU (GiB), MoE attention + expert LoRAs, micro-batch 8")
    return "\n".join(lines + [END])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/scaling.md is out of date")
    args = parser.parse_args(argv)
    text = DOC.read_text()
    if BEGIN not in text or END not in text:
        print(f"{DOC} lacks the markers {BEGIN!r} ... {END!r}; put them where the tables go", file=sys.stderr)
        return 2
    head, rest = text.split(BEGIN, 1)
    new = head + render() + rest.split(END, 1)[1]
    if args.check:
        if new != text:
            print(f"{DOC} is out of date with {', '.join(FILES)}; run python benchmarks/plans_doc.py", file=sys.stderr)
            return 1
        return 0
    DOC.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
