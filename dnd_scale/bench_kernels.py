"""Kernel benchmarks: fused Triton hyper-conv stage and detokenization vs PyTorch, on one GPU.

Every section times the candidate and its references in the same process on the same GPU and
reports ratios; results go to one JSON file (rewritten atomically after each section, so a run cut
short keeps what it measured). Sections:

- ``ceilings``: bf16 matmul peak (8192³, random data) and device-to-device copy bandwidth.
- ``stages``: every stage of a preset at batch B: forward, forward+backward (and backward as their
  difference) for ``triton`` (dnd_kernels), ``eager`` (the reference) and ``compile``
  (torch.compile of the reference), bf16 autocast over fp32 parameters, cuDNN autotuning on,
  TF32 allowed; TFLOP/s and % of the measured matmul peak; the error of each impl's output and
  gradients against the fp32 reference (batch 1, first two samples of the same inputs).
- ``detokenize``: tokens -> flat PEFT buffer for a model layout, Triton vs the PyTorch reference on
  the GPU, GB/s beside a device-to-device copy of the same number of bytes.
- ``train_step``: the whole generator, one optimizer step at batch B (AdamW, bf16 autocast).
- ``generate``: one prompt set -> PEFT folder on disk (random conditions of the encoder's shape;
  the encoder itself is timed as a random-init model of the same architecture).
- ``convergence``: N training steps with impl=triton and impl=torch from the same seed.

Usage: dnd bench kernels --preset qwen2.5-0.5b --batch 16 \\
           --out benchmarks/results/kernels_h100.json --git-rev $(git rev-parse HEAD)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
import triton

from dnd_scale.bench import git_revision
from dnd_scale.io import write_json

_COMPILED: dict = {}
SECTIONS = ("ceilings", "stages", "detokenize", "train_step", "generate", "convergence")
IMPLS = ("triton", "eager", "compile")
REPO = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------------------------------
# Timing


def median_ms(fn: Callable[[], object], reps: int, warmup: int, params: tuple = ()) -> tuple[float, list[float]]:
    """Median and all times (ms) of `fn` with CUDA events; `params`' grads are dropped before each run."""
    for _ in range(warmup):
        for p in params:
            p.grad = None
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        for p in params:
            p.grad = None
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times), times


@contextlib.contextmanager
def no_autotune():
    """Run the hyper-conv kernels with their first candidate tile (no timing of candidates)."""
    old = os.environ.get("DND_KERNELS_AUTOTUNE")
    os.environ["DND_KERNELS_AUTOTUNE"] = "0"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("DND_KERNELS_AUTOTUNE")
        else:
            os.environ["DND_KERNELS_AUTOTUNE"] = old


def _write(out: Path | None, result: dict) -> None:
    if out is not None:
        write_json(out, result)


def environment(git_rev: str | None) -> dict:
    if git_rev is None:
        git_rev = git_revision() or "unknown"
    props = torch.cuda.get_device_properties(0)
    return {
        "gpu": props.name,
        "sms": props.multi_processor_count,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "git_rev": git_rev,
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "tf32": torch.backends.cuda.matmul.allow_tf32,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


# --------------------------------------------------------------------------------------------------
# Sections


def bench_ceilings() -> dict:
    """bf16 matmul TFLOP/s (8192³ on random data) and device-to-device copy GB/s (read + write)."""
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    ms, _ = median_ms(lambda: a @ b, reps=20, warmup=5)
    src = torch.randn(256 * 2**20, device="cuda")  # 1 GiB
    dst = torch.empty_like(src)
    copy_ms, _ = median_ms(lambda: dst.copy_(src), reps=20, warmup=3)
    return {
        "matmul_bf16_tflops": 2 * n**3 / ms / 1e9,
        "copy_gbps": 2 * src.numel() * 4 / copy_ms / 1e6,
        "method": "median of 20 CUDA-event timings after warm-up; copy counts bytes read + written",
    }


def _stage_fns(impl: str):
    from dnd_kernels.hyperconv.function import hyperconv_stage
    from dnd_kernels.hyperconv.reference import hyperconv_stage_reference

    if impl == "triton":
        return hyperconv_stage
    if impl == "eager":
        return hyperconv_stage_reference
    # One graph with dynamic sizes for every stage (a static graph per stage shape costs ~1 min of
    # compilation each); the convolutions are cuDNN calls either way, autotuned per shape.
    return _COMPILED.setdefault("stage", torch.compile(hyperconv_stage_reference, dynamic=True))


def _stage_errors(fn, x, params, grad_out) -> dict:
    """RMS ratio of output and each gradient vs the fp32 reference (TF32 off) on the same inputs."""
    from dnd_kernels.hyperconv.reference import hyperconv_stage_reference
    from dnd_kernels.testing import PARAM_NAMES, error_report, stage_outputs

    def run(f, autocast, x):
        out, grads = stage_outputs(f, x, params, grad_out, autocast)
        return [out, *grads]

    # TF32 off for the exact reference; cuDNN's autotuning off too: it times fp32 algorithms for every
    # new shape (suspected, not measured apart, in a 7B stage 4 that did not finish in 270 s), and
    # the algorithm changes no result beyond summation order.
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark
    torch.backends.cudnn.allow_tf32 = torch.backends.cudnn.benchmark = False
    try:
        ref = run(hyperconv_stage_reference, False, x.float())
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark = saved
    with no_autotune():  # checks the default tile; timing batch-1 tiles would only cost time
        got = run(fn, True, x)
    names = ("out", "x", *PARAM_NAMES)
    return {n: error_report(g, r)["rms_ratio"] for n, g, r in zip(names, got, ref)}


def bench_stages(features, kernel_size: int, batch: int, impls, reps: int, warmup: int, peak: float | None,
                 stages=None, rows: list | None = None, on_row: Callable[[], None] = lambda: None) -> list[dict]:  # fmt: skip
    """Time every stage (or `stages`) of a feature list; rows are appended to `rows` as they finish."""
    from dnd_kernels.hyperconv import tiling
    from dnd_kernels.testing import stage_inputs
    from dnd_scale.generator import stage_flops

    rows = [] if rows is None else rows
    for i, (a, b) in enumerate(zip(features, features[1:])):
        if stages is not None and i not in stages:
            continue
        flops = stage_flops(a, b, kernel_size) * batch
        tiles_before = set(tiling.tuned_configs())
        row = {"stage": i, "in": list(a), "out": list(b), "batch": batch, "fwd_tflop": flops / 1e12, "impls": {}}
        x, params = stage_inputs(batch, a, b, kernel_size, torch.float32, "cuda", seed=i)
        if i > 0:
            x = x.to(torch.bfloat16)  # under autocast every stage after the first receives bf16
        params = [p.requires_grad_() for p in params]
        x.requires_grad_(i > 0)  # the condition needs no gradient; later stages' inputs do
        leaves = (x, *params)
        grad_out = torch.randn(batch, *b, device="cuda", dtype=torch.bfloat16)
        for impl in impls:
            fn = _stage_fns(impl)
            try:
                def fwd():
                    with torch.autocast("cuda", dtype=torch.bfloat16):
                        return fn(x, *params)

                def fwd_bwd():
                    fwd().backward(grad_out)

                t0 = time.perf_counter()
                fwd_bwd()  # compile / autotune outside the timings
                torch.cuda.synchronize()
                first_s = time.perf_counter() - t0
                torch.cuda.reset_peak_memory_stats()
                f_ms, f_all = median_ms(fwd, reps, warmup, leaves)
                fb_ms, fb_all = median_ms(fwd_bwd, reps, warmup, leaves)
                r = {
                    "fwd_ms": f_ms, "fwd_bwd_ms": fb_ms, "bwd_ms": fb_ms - f_ms,
                    "fwd_tflops": flops / f_ms / 1e9, "fwd_bwd_tflops": 3 * flops / fb_ms / 1e9,
                    "fwd_all_ms": f_all, "fwd_bwd_all_ms": fb_all, "first_call_s": first_s,
                    "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30,
                }  # fmt: skip
                if peak:
                    r["fwd_bwd_pct_peak"] = 100 * r["fwd_bwd_tflops"] / peak
                if impl != "compile":  # same math as eager; a batch-1 call would recompile
                    r["rms_vs_fp32"] = _stage_errors(fn, x[:1].detach(), [p.detach() for p in params], grad_out[:1].float())
            except Exception as err:  # noqa: BLE001 - recorded in the results, the other impls still run
                r = {"error": f"{type(err).__name__}: {err}"[:500]}
            row["impls"][impl] = r
            for t in leaves:
                t.grad = None
            torch.cuda.empty_cache()
        for impl in impls:
            if impl != "triton" and "fwd_bwd_ms" in row["impls"].get(impl, {}) and "fwd_bwd_ms" in row["impls"].get("triton", {}):
                row[f"speedup_vs_{impl}"] = {m: row["impls"][impl][m] / row["impls"]["triton"][m]
                                             for m in ("fwd_ms", "fwd_bwd_ms", "bwd_ms")}  # fmt: skip
        row["tuned_tiles"] = {k: v for k, v in tiling.tuned_configs().items() if k not in tiles_before}
        rows.append(row)
        _print_stage(row)
        on_row()
    return rows


def _print_stage(row: dict) -> None:
    parts = [f"stage {row['stage']} {tuple(row['in'])}->{tuple(row['out'])} {row['fwd_tflop']:.2f} TF fwd"]
    for impl, r in row["impls"].items():
        if "fwd_bwd_ms" in r:
            parts.append(f"{impl}: fwd {r['fwd_ms']:.1f} ms, fwd+bwd {r['fwd_bwd_ms']:.1f} ms ({r['fwd_bwd_tflops']:.0f} TF/s)")
        else:
            parts.append(f"{impl}: {r.get('error')}")
    print(" | ".join(parts), flush=True)


def model_tokenizer(model: str, rank: int, chunk: int):
    """The WeightTokenizer of a shipped model config (configs/models/<model>.json), every linear module."""
    from dnd_scale.layout import LoraLayout, LoraSpec
    from dnd_scale.tokenizer import WeightTokenizer

    config = json.loads((REPO / "configs" / "models" / f"{model}.json").read_text())
    layout = LoraLayout.from_config(config, LoraSpec(rank=rank))
    return WeightTokenizer(layout, chunk=chunk)


def bench_detokenize(models=(("qwen2.5-0.5b", 8, 128), ("qwen2.5-7b", 16, 512))) -> list[dict]:
    from dnd_kernels.detokenize.kernel import detokenize_triton
    from dnd_kernels.detokenize.reference import detokenize_reference, table_facts
    from dnd_kernels.testing import dtype_name, random_tokens

    rows = []
    for model, rank, chunk in models:
        tok = model_tokenizer(model, rank, chunk)
        tokens = random_tokens(tok.num_tokens, rank, chunk, "cuda")
        table = tok.token_table().cuda()
        args = (tok.flat_numel, tok.rank, tok.chunk, tok.config.mean_scale, tok.config.std_shift)
        facts = table_facts(table, rank)
        row = {"model": model, "rank": rank, "chunk": chunk, "tokens": tok.num_tokens, "numel": tok.flat_numel,
               "store_alignment": facts[1]}  # fmt: skip
        for dtype in (torch.bfloat16, torch.float32):
            out = torch.empty(tok.flat_numel, dtype=dtype, device="cuda")
            ref = detokenize_reference(tokens, table, *args, dtype)
            got = detokenize_triton(tokens, table, *args, dtype, out=out)
            nbytes = tokens.numel() * 4 + table.numel() * 8 + tok.flat_numel * out.element_size()
            loop = 50  # back-to-back launches per timing: per-launch gaps stay out of the numbers
            t_ms, _ = median_ms(
                lambda: [detokenize_triton(tokens, table, *args, dtype, out=out, facts=facts) for _ in range(loop)], 10, 2
            )
            r_ms, _ = median_ms(lambda: detokenize_reference(tokens, table, *args, dtype), 10, 2)
            src = torch.empty(nbytes // 2, dtype=torch.uint8, device="cuda")
            dst = torch.empty_like(src)
            c_ms, _ = median_ms(lambda: [dst.copy_(src) for _ in range(loop)], 10, 2)
            row[dtype_name(dtype)] = {
                "bytes": nbytes, "triton_us": 1e3 * t_ms / loop, "reference_us": 1e3 * r_ms,
                "copy_same_bytes_us": 1e3 * c_ms / loop,
                "triton_gbps": nbytes / (t_ms / loop) / 1e6, "copy_gbps": nbytes / (c_ms / loop) / 1e6,
                "pct_of_copy": 100 * (c_ms / t_ms), "speedup_vs_reference": r_ms / (t_ms / loop),
                "max_abs_err_vs_reference": float((got.float() - ref.float()).abs().max()),
            }  # fmt: skip
        rows.append(row)
        print(f"detokenize {model}: " + ", ".join(f"{k}: {v['triton_us']:.1f} us ({v['pct_of_copy']:.0f}% of copy)"
                                                  for k, v in row.items() if isinstance(v, dict)), flush=True)  # fmt: skip
    return rows


def random_generator(preset: str, impl: str, seed: int = 0):
    from dnd_scale.generator import GeneratorConfig, HyperConvGenerator

    torch.manual_seed(seed)
    model = HyperConvGenerator(GeneratorConfig(preset=preset, impl="triton" if impl == "triton" else "torch")).cuda()
    return model, (torch.compile(model) if impl == "compile" else model)


def random_train_batch(model, batch: int, seed: int):
    gen = torch.Generator("cuda").manual_seed(seed)
    n, l, d = model.features[0]
    t, h, w = model.features[-1]
    cond = torch.randn(batch, n, l, d, device="cuda", generator=gen) * 0.1  # MiniLM token embeddings ~0.1
    target = torch.randn(batch, t, h, w, device="cuda", generator=gen)
    return cond, target


def bench_train_step(preset: str, batch: int, impls, reps: int, warmup: int, result: dict | None = None,
                     on_impl: Callable[[], None] = lambda: None) -> dict:  # fmt: skip
    """Median AdamW step per impl; each impl's entry lands in `result` (filled in place) when it is
    done and `on_impl` is called, so a run cut short keeps the impls it finished."""
    from dnd_scale.generator import PRESETS, count_parameters, generator_loss, stage_flops

    p = PRESETS[preset]
    out = {} if result is None else result
    out["parameters"] = count_parameters(list(p.features), p.kernel_size)
    out["step_tflop"] = 3 * batch * sum(stage_flops(a, b, p.kernel_size) for a, b in zip(p.features, p.features[1:])) / 1e12
    for impl in impls:
        module, model = random_generator(preset, impl)
        opt = torch.optim.AdamW(module.parameters(), lr=1e-4, fused=True)
        cond, target = random_train_batch(module, batch, seed=1)
        mask = torch.ones(target.shape[1:], dtype=torch.bool, device="cuda")

        def step():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                pred = model(cond)
            generator_loss(pred, target, mask).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        try:
            t0 = time.perf_counter()
            step()
            torch.cuda.synchronize()
            first = time.perf_counter() - t0
            torch.cuda.reset_peak_memory_stats()
            ms, all_ms = median_ms(step, reps, warmup)
            out[impl] = {"step_ms": ms, "all_ms": all_ms, "first_step_s": first,
                         "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30}  # fmt: skip
        except torch.cuda.OutOfMemoryError as err:
            out[impl] = {"error": f"out of memory: {err}"[:300]}
        del module, model, opt
        torch.cuda.empty_cache()
        print(f"train step {preset} B={batch} {impl}: {out[impl]}", flush=True)
        on_impl()
    return out


def bench_generate(preset: str, impls, reps: int, warmup: int) -> dict:
    """Prompt set -> PEFT folder: encoder + generator forward + detokenize + write, per impl.

    triton: fused stages, Triton detokenization; eager/compile: the reference stages and the
    PyTorch detokenization reference, both on the GPU. Both write through ``export_tokens``.
    """
    import transformers

    from dnd_scale.export import export_tokens

    tok = model_tokenizer("qwen2.5-0.5b", 8, 128)
    out = {}
    # The condition encoder's cost: all-MiniLM-L6-v2's architecture, random weights (no downloads
    # on the benchmark machine), N prompts x L tokens.
    bert = transformers.BertModel(transformers.BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                                                          intermediate_size=1536)).cuda().eval()  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        for impl in impls:
            module, model = random_generator(preset, impl)
            module.eval()
            n, l, d = module.features[0]
            ids = torch.randint(0, 30000, (n, l), device="cuda")
            cond = torch.randn(1, n, l, d, device="cuda") * 0.1

            def encode():
                with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
                    return bert(input_ids=ids).last_hidden_state

            def forward():
                with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
                    return model(cond)[0]

            def write(tokens):
                export_tokens(tokens, tok, Path(tmp) / impl, dtype=torch.bfloat16, overwrite=True,
                              impl="triton" if impl == "triton" else "torch")  # fmt: skip

            tokens = forward()

            def to_folder():
                encode()
                write(forward())

            try:
                to_folder()
                fwd_ms, _ = median_ms(forward, reps, warmup)
                enc_ms, _ = median_ms(encode, reps, warmup)
                write_ms, _ = median_ms(lambda: write(tokens), reps, warmup)
                total_ms, all_ms = median_ms(to_folder, reps, warmup)
                out[impl] = {"forward_ms": fwd_ms, "encoder_ms": enc_ms, "detokenize_and_write_ms": write_ms,
                             "prompts_to_folder_ms": total_ms, "all_ms": all_ms}  # fmt: skip
            except torch.cuda.OutOfMemoryError as err:
                out[impl] = {"error": f"out of memory: {err}"[:300]}
            del module, model, tokens
            torch.cuda.empty_cache()
            print(f"generate {preset} {impl}: {out[impl]}", flush=True)
    return out


# --------------------------------------------------------------------------------------------------


def bench_kernels(
    preset: str = "qwen2.5-0.5b",
    batch: int = 16,
    sections=SECTIONS,
    impls=IMPLS,
    stages=None,
    extra_presets=(),
    extra_batch: int = 4,
    reps: int = 5,
    warmup: int = 2,
    convergence_steps: int = 200,
    convergence_batch: int = 1,
    convergence_lr: float = 1e-4,
    out: str | os.PathLike | None = None,
    git_rev: str | None = None,
) -> dict:
    """Run the chosen sections and return (and write to `out`) the results dict."""
    from dnd_scale.bench_convergence import bench_convergence, plot_convergence  # it builds on this module

    if not torch.cuda.is_available():
        raise RuntimeError("bench_kernels needs a CUDA GPU: the benchmarks time GPU kernels")
    from dnd_kernels.hyperconv import tiling
    from dnd_scale.generator import PRESETS

    unknown = set(sections) - set(SECTIONS)
    if unknown:
        raise ValueError(f"unknown benchmark sections {sorted(unknown)}; choose from {SECTIONS}")
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch._dynamo.config.cache_size_limit = 64  # one compiled graph per stage shape
    out = Path(out) if out else None
    result = {"environment": environment(git_rev), "preset": preset, "batch": batch,
              "command": " ".join(sys.argv)}  # fmt: skip
    peak = None

    def _save_tiles() -> None:
        if os.environ.get(tiling.TUNE_FILE_ENV):
            tiling.save_tuned(os.environ[tiling.TUNE_FILE_ENV])

    for section in sections:
        t0 = time.perf_counter()
        if section == "ceilings":
            result["ceilings"] = bench_ceilings()
            peak = result["ceilings"]["matmul_bf16_tflops"]
            print(f"ceilings: {result['ceilings']}", flush=True)
        elif section == "stages":
            result["stages"] = {}
            for name, b in [(preset, batch)] + [(extra, extra_batch) for extra in extra_presets]:
                p = PRESETS[name]
                rows = result["stages"].setdefault(f"{name}@B{b}", [])
                bench_stages(p.features, p.kernel_size, b, impls, reps, warmup, peak, stages, rows,
                             on_row=lambda: (_write(out, result), _save_tiles()))  # fmt: skip
        elif section == "detokenize":
            result["detokenize"] = bench_detokenize()
        elif section == "train_step":
            bench_train_step(preset, batch, impls, reps, warmup, result=result.setdefault("train_step", {}),
                             on_impl=lambda: _write(out, result))  # fmt: skip
        elif section == "generate":
            result["generate"] = bench_generate(preset, impls, reps=max(reps, 10), warmup=warmup)
        elif section == "convergence":
            bench_convergence(preset, convergence_batch, convergence_steps, lr=convergence_lr,
                              result=result.setdefault("convergence", {}), on_curve=lambda: _write(out, result))  # fmt: skip
        result.setdefault("section_seconds", {})[section] = time.perf_counter() - t0
        _write(out, result)
        _save_tiles()
        print(f"section {section}: {time.perf_counter() - t0:.1f} s", flush=True)
        if section == "convergence" and out:  # after the results are on disk (a first matplotlib import can be slow)
            plot_convergence(result["convergence"], out.with_name(f"{out.stem}.png"))
    return result


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="dnd bench kernels", description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="qwen2.5-0.5b")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS)
    ap.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
    ap.add_argument("--stages", nargs="+", type=int, default=None, help="stage indices (default: all)")
    ap.add_argument("--extra-presets", nargs="*", default=[], help="more presets for the stage section")
    ap.add_argument("--extra-batch", type=int, default=4, help="batch of the extra presets' stages")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--convergence-steps", type=int, default=200)
    ap.add_argument("--convergence-batch", type=int, default=1)
    ap.add_argument("--convergence-lr", type=float, default=1e-4)
    ap.add_argument("--out", default=None, help="JSON file (e.g. benchmarks/results/kernels_h100.json)")
    ap.add_argument("--git-rev", default=None, help="revision to record (default: git rev-parse HEAD)")
    a = ap.parse_args(argv)
    bench_kernels(a.preset, a.batch, a.sections, a.impls, a.stages, a.extra_presets, a.extra_batch, a.reps,
                  a.warmup, a.convergence_steps, a.convergence_batch, a.convergence_lr, a.out, a.git_rev)  # fmt: skip


if __name__ == "__main__":
    main()
