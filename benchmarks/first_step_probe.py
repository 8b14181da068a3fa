"""Per-stage wall time of the Qwen2.5-7B-target generator's first and second forward + backward at
micro-batch 4 in bf16, in a plain process (no DeepSpeed, no worker): for each of impl torch with
cuDNN benchmark off, impl triton (autotuning on first use) and impl torch with cuDNN benchmark on.

Run on a GPU from the repository root: `python benchmarks/first_step_probe.py`. It was run as an
inline script with exactly this body (results/first_step_probe_h200.txt)."""

import time

import torch

from dnd_scale.bench_scale_targets import TargetSpec
from dnd_scale.generator import HyperConvGenerator

t = TargetSpec(model="configs/models/qwen2.5-7b.json", preset="qwen2.5-7b")
tok = t.tokenizer()
for impl, bench in (("torch", False), ("triton", True), ("torch", True)):
    torch.backends.cudnn.benchmark = bench
    with torch.device("cuda"):
        m = HyperConvGenerator(t.generator_config(impl), t.condition, tok.token_shape, tok.num_tokens).to(torch.bfloat16)
    x = torch.randn(4, *t.condition, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    for call in range(2):
        h = x
        for i, s in enumerate(m.stages):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            h = s(h)
            torch.cuda.synchronize()
            print(f"{impl} bench={bench} call{call} stage{i} fwd {time.perf_counter() - t0:.2f}s {tuple(h.shape)}", flush=True)
        t0 = time.perf_counter()
        h.float().square().mean().backward()
        torch.cuda.synchronize()
        print(f"{impl} bench={bench} call{call} bwd {time.perf_counter() - t0:.2f}s "
              f"peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB", flush=True)
    del m, x, h
    torch.cuda.empty_cache()
