"""The kernels benchmark's convergence section: training curves of the fused Triton generator, of
PyTorch's bf16 autocast and of the exact fp32 reference from the same seed and data, the criterion
that compares them, and their plot (`dnd bench kernels --sections convergence`)."""

from __future__ import annotations

import os
import statistics
import time
from typing import Callable

import torch

from dnd_scale.bench_kernels import no_autotune, random_generator, random_train_batch


def _train_curve(impl: str, preset: str, batch: int, steps: int, pairs: int, lr: float) -> dict:
    """Losses of `steps` AdamW steps over `pairs` fixed random (condition, target) pairs.

    impl "fp32" is the reference without autocast and with TF32 off: the exact trajectory that the
    bf16 runs approximate.
    """
    from dnd_scale.generator import generator_loss

    exact = impl == "fp32"
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    if exact:
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with no_autotune():  # the tile changes speed, not the math; timing candidates would only cost time
            module, model = random_generator(preset, "eager" if exact else impl, seed=0)
            opt = torch.optim.AdamW(module.parameters(), lr=lr, fused=True)
            data = [random_train_batch(module, batch, seed=100 + i) for i in range(pairs)]
            mask = torch.ones(data[0][1].shape[1:], dtype=torch.bool, device="cuda")
            losses = []
            t0 = time.perf_counter()
            for step in range(steps):
                cond, target = data[step % pairs]
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=not exact):
                    pred = model(cond)
                loss = generator_loss(pred, target, mask)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                losses.append(loss.item())
            seconds = time.perf_counter() - t0
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
    del module, model, opt, data
    torch.cuda.empty_cache()
    return {"losses": losses, "seconds": seconds}


def _moving_average(v: list[float], window: int) -> list[float]:
    return [sum(v[max(0, i - window + 1) : i + 1]) / len(v[max(0, i - window + 1) : i + 1]) for i in range(len(v))]


def bench_convergence(preset: str, batch: int, steps: int, pairs: int = 8, lr: float = 1e-4,
                      window: int = 10, factor: float = 1.25, slack: float = 0.01, result: dict | None = None,
                      on_curve: Callable[[], None] = lambda: None) -> dict:  # fmt: skip
    """Training curves of impl=triton and impl=torch (bf16 autocast) and of the exact fp32 reference,
    from the same seed and data, compared.

    Criterion (stated before the run, independent of how chaotic the regime is): the Triton run may
    stray from the exact fp32 trajectory at most as far as PyTorch's own bf16 run does. With
    d(run) = mean over steps of |MA(run) - MA(fp32)| / MA(fp32) (MA = moving average over `window`
    steps), pass when d(triton) <= factor * d(torch) + slack. The per-step gap between triton and
    torch is reported beside it. Each curve lands in `result` (filled in place) as soon as it is
    done, and `on_curve` is called, so a run cut short keeps the curves it finished.
    """
    result = {} if result is None else result
    result.update({"preset": preset, "batch": batch, "steps": steps, "pairs": pairs, "lr": lr, "curves": {}})
    curves = result["curves"]
    for impl in ("triton", "eager", "fp32"):
        curves[impl] = _train_curve(impl, preset, batch, steps, pairs, lr)
        print(f"convergence curve {impl}: {steps} steps in {curves[impl]['seconds']:.1f} s", flush=True)
        on_curve()
    judge_convergence(result, window, factor, slack)
    print(f"convergence: distance to fp32 triton {result['distance_to_fp32']['triton']:.4f} torch "
          f"{result['distance_to_fp32']['torch']:.4f} -> passed={result['passed']}; max per-step gap triton vs "
          f"torch {result['max_step_rel_gap_triton_vs_torch']:.4f}", flush=True)  # fmt: skip
    return result


def judge_convergence(result: dict, window: int = 10, factor: float = 1.25, slack: float = 0.01) -> dict:
    """Add the criterion of ``bench_convergence`` and its verdict to `result`, which holds the three
    curves (also usable on a results file whose run stopped after its curves)."""
    curves = result["curves"]
    ma = {impl: _moving_average(c["losses"], window) for impl, c in curves.items()}

    def distance(run: str) -> float:
        return statistics.fmean(abs(a - e) / abs(e) for a, e in zip(ma[run], ma["fp32"]))

    d_triton, d_torch = distance("triton"), distance("eager")
    step_gap = max(abs(a - b) / abs(b) for a, b in zip(ma["triton"], ma["eager"]))
    result.update({
        "criterion": f"d(triton) <= {factor} * d(torch) + {slack}, d = mean over steps of "
                     f"|MA{window}(run) - MA{window}(fp32)| / MA{window}(fp32)",
        "distance_to_fp32": {"triton": d_triton, "torch": d_torch},
        "passed": d_triton <= factor * d_torch + slack,
        "max_step_rel_gap_triton_vs_torch": step_gap,
        "first_loss": {k: c["losses"][0] for k, c in curves.items()},
        "last_loss": {k: c["losses"][-1] for k, c in curves.items()},
    })  # fmt: skip
    return result


def plot_convergence(convergence: dict, path: str | os.PathLike) -> None:
    """PNG of a convergence result (``bench_convergence``): every curve's losses, faint, and their MA."""
    # Figure + the Agg canvas directly: no pyplot global state, no display needed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from dnd_scale.io import atomic_path

    window = 10
    labels = {"triton": "Triton (bf16 autocast)", "eager": "PyTorch (bf16 autocast)", "fp32": "fp32 exact (TF32 off)"}
    figure = Figure(figsize=(7.0, 3.8), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for impl, curve in convergence["curves"].items():
        steps = range(1, len(curve["losses"]) + 1)
        (line,) = axes.plot(steps, _moving_average(curve["losses"], window), label=f"{labels.get(impl, impl)}, MA{window}")
        axes.plot(steps, curve["losses"], color=line.get_color(), alpha=0.25, linewidth=0.8)
    axes.set_yscale("log")
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    verdict = ""
    if "distance_to_fp32" in convergence:
        d = convergence["distance_to_fp32"]
        verdict = f": d(triton) {d['triton']:.3f}, d(torch) {d['torch']:.3f}, passed={convergence['passed']}"
    axes.set_title(f"{convergence['preset']}, batch {convergence['batch']}, lr {convergence['lr']:g}{verdict}", fontsize="medium")
    axes.legend(fontsize="small")
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=120)
