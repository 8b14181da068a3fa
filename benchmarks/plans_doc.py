"""Render the tables of docs/scaling.md from committed JSON files: the `dnd plan` tables (from the
plan files the commands in COMMANDS write) and the measurements on one H200 (from the `dnd bench
scale` files the commands in MEASURED_COMMANDS wrote).

Run from the repository root after regenerating the JSON:

    python benchmarks/plans_doc.py           # rewrites the blocks between the markers of docs/scaling.md
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

# The measurements on one H200 at 7b32c32 (the first command of each file wrote it, the later ones
# added to it; scale_h200.json joins three calls, as its "note" says), and the prediction of the
# plan as the code makes it now, added afterwards to every file by --repredict.
_BENCH = "python -m dnd_scale.bench_scale --git-rev 7b32c32 --cudnn-benchmark off --impl"
MEASURED_COMMANDS = (
    f"{_BENCH} torch --sections zero --configs zero0 zero2 zero3 zero3_offload_opt --timeout 200 --tune-timeout 90 --out scale_h200.json",
    f"{_BENCH} torch --sections generate70b --generate-timeout 235 --generate-warmup 1 --generate-repeats 3 --out scale_h200.json",
    f"{_BENCH} torch --sections largest --largest-models configs/models/qwen2.5-72b.json --largest-configs zero3 zero3_offload_opt "
    "--steps 3 --warmup-steps 1 --timeout 270 --tune-timeout 60 --out scale_h200.json",
    f"{_BENCH} torch --sections zero --configs zero3_offload_all --timeout 210 --tune-timeout 60 --out scale_h200.json",
    f"{_BENCH} triton --sections zero --configs zero0 zero3 --timeout 90 --tune-timeout 300 --tune-file scale_h200_triton_tiles.json "
    "--out scale_h200_triton_a.json",
    f"{_BENCH} triton --sections zero --configs zero2 zero3_offload_opt zero3_offload_all --timeout 75 --tune-timeout 150 "
    "--tune-file scale_h200_triton_tiles.json --out scale_h200_triton_b.json",
    "python -m dnd_scale.bench_scale --repredict scale_h200.json   # and the two triton files, at b4dced5",
)
MEASURED_FILES = ("scale_h200.json", "scale_h200_triton_a.json", "scale_h200_triton_b.json")
MEASURED_BEGIN, MEASURED_END = "<!-- measured:begin (made by benchmarks/plans_doc.py) -->", "<!-- measured:end -->"


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


def _g(value: int | None) -> str:
    return "-" if value is None else f"{value / GIB:.1f}"


def _with_error(prediction: dict | None, error: float | None) -> str:
    return "-" if prediction is None else f"{prediction['gpu_bytes'] / GIB:.1f} ({error:+.0%})"


def _memory_cells(r: dict) -> str:
    """A training record's peak GPU memory (allocated, reserved) and the plan then and now, with errors."""
    now = r.get("predicted_now")
    return (f"{_g(r['gpu_max_allocated_bytes'])} | {_g(r['gpu_max_reserved_bytes'])} "
            f"| {_with_error(r['predicted'], r['predicted_error'])} | {_with_error(now, now and now['error'])}")


def _training_row(name: str, impl: str, r: dict) -> str:
    return (f"| {name} | {impl} | {_memory_cells(r)} | {_g(r['host_peak_rss_bytes'])} "
            f"| {_g(r['predicted']['model_states_cpu_bytes'])} | {r['median_step_s']:.2f} |")


def _tuning(t: dict, impl: str) -> str:
    tiles = (f"; {t['tiles_tuned_here']} shapes autotuned, {t['tiles_from_file']} read from the tile file"
             if "tiles_tuned_here" in t else "")
    return f"impl {impl}: first call {t['first_call_s']:.1f} s, second {t['second_call_s']:.2f} s{tiles}"


def render_measured() -> str:
    torch_run, triton_a, triton_b = (json.loads((RESULTS / f).read_text()) for f in MEASURED_FILES)
    zero = torch_run["sections"]["zero"]
    sizes = zero["sizes"]
    header = ("| config | impl | GPU peak allocated | GPU peak reserved | plan at 7b32c32 (error) | plan now (error) "
              "| host peak RSS | plan host (offload) | median step s |")
    rule = "|---|---|---:|---:|---:|---:|---:|---:|---:|"
    lines = [MEASURED_BEGIN, "", "Made by (from the repository root; files under `benchmarks/results/`, then "
             "`python benchmarks/plans_doc.py`):", "", "```bash", *MEASURED_COMMANDS, "```", ""]
    lines += [f"### Training the {sizes['model']}-target generator (memory in GiB)", "",
              f"Preset `{zero['target']['preset']}`: {sizes['generator_params'] / 1e9:.2f} B parameters, k = {sizes['kernel_size']}, "
              f"condition {tuple(zero['target']['condition'])} -> {sizes['tokens']:,} tokens of {tuple(sizes['token_shape'])}; "
              f"micro-batch {zero['micro_batch']}, bf16, {zero['steps']} steps, the median of the last "
              f"{zero['steps'] - zero['warmup_steps']}. \"plan now\" is the prediction of this revision's `dnd plan`; "
              "the error is (plan - measured) / measured, against the allocated peak.", "", header, rule]
    for name, r in zero["configs"].items():
        lines.append(_training_row(name, "torch", r))
    triton = {**triton_a["sections"]["zero"]["configs"], **triton_b["sections"]["zero"]["configs"]}
    for name in zero["configs"]:
        lines.append(_training_row(name, "triton", triton[name]))
    lines += ["", "The generator's forward + backward at the micro-batch outside DeepSpeed, before the configurations "
              "(the tuning pass): " + "; ".join([_tuning(zero["tuning"], "torch"),
                                                    _tuning(triton_a["sections"]["zero"]["tuning"], "triton (cold cache)"),
                                                    _tuning(triton_b["sections"]["zero"]["tuning"], "triton (tile file)")]) + ".", ""]
    largest = torch_run["sections"]["largest"]
    lines += ["### The largest target whose generator trains on one H200 (memory in GiB)", "",
              "| target | tokens | generator params | config | impl | GPU peak allocated | GPU peak reserved "
              "| plan at 7b32c32 (error) | plan now (error) | host peak RSS | median step s |",
              "|---|---:|---:|---|---|---:|---:|---:|---:|---:|---:|"]
    for t in largest["targets"]:
        for config, r in t["attempts"].items():
            lines.append(f"| {t['model']} | {t['sizes']['tokens']:,} | {t['sizes']['generator_params'] / 1e9:.2f} B | {config} "
                         f"| {r['impl']} | {_memory_cells(r)} | {_g(r['host_peak_rss_bytes'])} | {r['median_step_s']:.2f} |")
    fit = largest["largest_fit"]
    lines += ["", f"Largest that trains: {fit['model']} under {fit['config']} ({fit['generator_params'] / 1e9:.2f} B "
              f"generator parameters, {fit['tokens']:,} tokens), micro-batch {largest['targets'][-1]['attempts'][fit['config']]['micro_batch']}, "
              f"{len(largest['targets'][-1]['attempts'][fit['config']]['step_times_s'])} steps.", ""]
    g = torch_run["sections"]["generate70b"]
    check = g["peft_check"]
    lines += [f"### Generation for the {g['sizes']['model']} layout (random-init generator)", "",
              "| generator params | tokens | impl | GPU after load (4 B/param predicted) | GPU peak allocated | host peak RSS "
              "| encoder + generator | prompts -> PEFT folder | adapter file | peft keys and shapes |",
              "|---:|---:|---|---:|---:|---:|---:|---:|---:|---|"]
    lines.append(f"| {g['parameters'] / 1e9:.2f} B | {g['sizes']['tokens']:,} | {g['impl']} "
                 f"| {_g(g['gpu_after_load_bytes'])} GiB ({_g(g['predicted_weights_bytes'])}) | {_g(g['gpu_max_allocated_bytes'])} GiB "
                 f"| {_g(g['host_peak_rss_bytes'])} GiB | {g['median_tokens_s']:.2f} s | {g['median_generate_s']:.2f} s "
                 f"| {g['adapter_bytes'] / 1e6:.0f} MB ({g['adapter_dtype']}) "
                 f"| {'equal' if check['match'] else 'differ'} ({check['saved_keys']} saved, {check['expected_keys']} expected) |")
    lines += ["", f"Medians of {len(g['generate_s'])} calls after the command's warm-up call; the export took "
              f"{g['export_s']:.0f} s and the load {g['load_s']:.0f} s, once. \"prompts -> PEFT folder\" is "
              "`AdapterGenerator.generate`, encoder and generator included.", ""]
    return "\n".join(lines + [MEASURED_END])


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
    text = new = DOC.read_text()
    for begin, end, make in ((BEGIN, END, render), (MEASURED_BEGIN, MEASURED_END, render_measured)):
        if begin not in new or end not in new:
            print(f"{DOC} lacks the markers {begin!r} ... {end!r}; put them where the tables go", file=sys.stderr)
            return 2
        head, rest = new.split(begin, 1)
        new = head + make() + rest.split(end, 1)[1]
    if args.check:
        if new != text:
            print(f"{DOC} is out of date with {', '.join(FILES + MEASURED_FILES)}; run python benchmarks/plans_doc.py",
                  file=sys.stderr)
            return 1
        return 0
    DOC.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
