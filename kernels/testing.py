"""Inputs, error metrics and checks shared by the kernel tests and the kernel benchmarks.

Without CUDA the kernel tests run every kernel under ``TRITON_INTERPRET=1`` (tests/conftest.py sets it
before any kernel is defined) on CPU tensors, at small shapes; on a GPU they run compiled, at real
shapes.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .compile_check import Launch, NoCudaCompiler, compile_launches

HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
"""Where the kernel tests put their tensors: the GPU, else the CPU (for the interpreter)."""


def dtype_name(dtype: torch.dtype) -> str:
    """"bfloat16" for torch.bfloat16: test ids and result keys."""
    return str(dtype).removeprefix("torch.")


# --------------------------------------------------------------------------------------------------
# Hyper-convolution stage

PARAM_NAMES = ("ln_weight", "ln_bias", "w_w1", "w_h1", "w_h2", "w_w2", "bias", "mix_weight", "mix_bias")


def stage_inputs(
    batch: int,
    in_shape: tuple[int, int, int],
    out_shape: tuple[int, int, int],
    kernel_size: int,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> tuple[Tensor, list[Tensor]]:
    """Fresh random (x, params) for one stage, scaled like a trained-from-init generator.

    Convolution weights ~ U(±1/sqrt(fan_in)) (nn.Conv2d's default), so activations stay O(1) through
    the stage; LayerNorm affine and biases are random too (never the identity or zeros, which would
    hide indexing errors).
    """
    gen = torch.Generator().manual_seed(seed)
    N, H, W = in_shape
    N2, H2, W2 = out_shape
    k = kernel_size

    def randn(*shape: int, scale: float = 1.0, shift: float = 0.0) -> Tensor:
        return (torch.randn(*shape, generator=gen) * scale + shift).to(device=device, dtype=dtype)

    def conv(c_out: int, c_in: int) -> Tensor:
        bound = 1.0 / math.sqrt(c_in * k * k)
        return ((torch.rand(c_out, c_in, k, k, generator=gen) * 2 - 1) * bound).to(device=device, dtype=dtype)

    x = randn(batch, N, H, W)
    params = [
        randn(H, W, scale=0.1, shift=1.0),  # ln_weight
        randn(H, W, scale=0.1),  # ln_bias
        conv(W2, W),  # w_w1
        conv(H2, H),  # w_h1
        conv(H2, H),  # w_h2
        conv(W2, W),  # w_w2
        randn(H2, W2, scale=0.1),  # bias
        conv(N2, N),  # mix_weight
        randn(N2, scale=1.0 / math.sqrt(N * k * k)),  # mix_bias
    ]
    return x, params


def stage_outputs(fn, x: Tensor, params: list[Tensor], grad_out: Tensor, autocast: bool = False, **kwargs) -> tuple[Tensor, list[Tensor]]:
    """(output, gradients of x and of every param) of one stage function under the upstream gradient
    `grad_out`, on fresh leaf copies of the inputs (bf16 autocast on CUDA if `autocast`)."""
    leaves = [t.detach().clone().requires_grad_() for t in [x, *params]]
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        out = fn(*leaves, **kwargs)
    out.backward(grad_out.to(out.dtype))
    return out.detach(), [t.grad for t in leaves]


# --------------------------------------------------------------------------------------------------
# Detokenization


def token_table(widths_a: list[int], widths_b: list[int], rank: int, chunk: int) -> tuple[Tensor, int]:
    """(token table (T, 4) int64, values it covers) laid out like WeightTokenizer's: lora_A matrices
    (r × n) then lora_B matrices (n × r), each cut into chunks of at most `chunk` columns."""
    rows, offset = [], 0
    for n in widths_a:
        rows += [(offset + j, n, 1, min(chunk, n - j)) for j in range(0, n, chunk)]
        offset += rank * n
    for n in widths_b:
        rows += [(offset + j * rank, 1, rank, min(chunk, n - j)) for j in range(0, n, chunk)]
        offset += rank * n
    return torch.tensor(rows, dtype=torch.int64), offset


def random_tokens(num_tokens: int, rank: int, chunk: int, device: str | torch.device = "cpu", seed: int = 0) -> Tensor:
    """Fresh random tokens (T, r+2, c+2): an N(0, 1) interior and border codes ~ N(-3, 0.1²), so that
    every token de-standardizes to small, nonzero values (mean -3 / mean_scale, std e^(-3 - std_shift))."""
    gen = torch.Generator(device).manual_seed(seed)
    tokens = torch.randn(num_tokens, rank + 2, chunk + 2, device=device, generator=gen)
    tokens[:, rank:, :] = tokens[:, rank:, :] * 0.1 - 3.0
    tokens[:, :rank, chunk:] = tokens[:, :rank, chunk:] * 0.1 - 3.0
    return tokens


# --------------------------------------------------------------------------------------------------
# Checks


def error_report(actual: Tensor, expected: Tensor) -> dict:
    """max |a - e|, the RMS ratio ‖a - e‖ / ‖e‖, max |e|, and the index of the largest error."""
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    if a.shape != e.shape:
        raise AssertionError(f"shape {tuple(a.shape)} != expected {tuple(e.shape)}")
    diff = (a - e).abs()
    finite = bool(torch.isfinite(a).all())
    flat = int(torch.nan_to_num(diff, nan=math.inf).argmax()) if diff.numel() else 0
    where = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), diff.shape)) if diff.numel() else ()
    norm_e = float(e.norm())
    return {
        "finite": finite,
        "max_abs": float(diff.max()) if diff.numel() else 0.0,
        "rms_ratio": float((a - e).norm()) / norm_e if norm_e > 0 else float((a - e).norm()),
        "max_ref": float(e.abs().max()) if e.numel() else 0.0,
        "where": where,
    }


def assert_close(name: str, actual: Tensor, expected: Tensor, rms_tol: float, max_tol: float) -> dict:
    """Fail unless ‖a - e‖/‖e‖ <= rms_tol and max|a - e| <= max_tol · max|e| (and a is finite)."""
    r = error_report(actual, expected)
    ok = r["finite"] and r["rms_ratio"] <= rms_tol and r["max_abs"] <= max_tol * max(r["max_ref"], 1e-30)
    if not ok:
        raise AssertionError(
            f"{name}: rms ratio {r['rms_ratio']:.3e} (tol {rms_tol:.1e}), max error {r['max_abs']:.3e} at "
            f"{r['where']} (tol {max_tol:.1e} x max|ref| {r['max_ref']:.3e}), finite={r['finite']}"
        )
    return r


def compile_or_skip(launches: list[Launch]) -> list[str]:
    """PTX of each launch compiled for an H100 (``compile_check.compile_launches``); the calling test
    is skipped where this triton build cannot compile for CUDA."""
    try:
        return compile_launches(launches)
    except NoCudaCompiler as err:
        import pytest  # a test helper: only tests call it

        pytest.skip(f"triton cannot compile for CUDA here: {err}")
