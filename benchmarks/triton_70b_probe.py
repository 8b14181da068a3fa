"""The Llama-3.1-70B-layout generator (auto-sized, 4.79 B parameters, random init) forward on a GPU
with the default impl (Triton stages; the last stage, past the kernels' 32-bit offsets, on the
PyTorch path) beside impl torch on the same weights: which stages fell back, the time of each call,
and the relative error of the output. Run from the repository root: `python benchmarks/triton_70b_probe.py`."""

import time
import warnings

import torch

from dnd_scale.bench_scale_targets import TargetSpec
from dnd_scale.generator import HyperConvGenerator

t = TargetSpec(model="configs/models/llama-3.1-70b.json", preset="auto")
tok = t.tokenizer()
torch.manual_seed(0)
with torch.device("cuda"):
    fused = HyperConvGenerator(t.generator_config("auto"), t.condition, tok.token_shape, tok.num_tokens)
    reference = HyperConvGenerator(t.generator_config("torch"), t.condition, tok.token_shape, tok.num_tokens)
reference.load_state_dict(fused.state_dict())
cond = torch.randn(1, *t.condition, device="cuda")
outs = {}
with torch.no_grad():
    for name, model in (("auto", fused), ("torch", reference)):
        for call in range(2):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                outs[name] = model(cond)
                torch.cuda.synchronize()
            print(f"{name} call{call} {time.perf_counter() - t0:.2f}s fallbacks={[str(w.message)[:60] for w in caught]}",
                  flush=True)
err = ((outs["auto"] - outs["torch"]).norm() / outs["torch"].norm()).item()
print(f"relative error auto vs torch: {err:.3e}; peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB", flush=True)
