"""Triton LayerNorm over (H, W) of the hyper-convolution stage: the forward pass writes its output
once per channels-last layout a branch reads, the backward pass returns the data and affine
gradients (see `kernel`'s docstring for the layouts)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .buffers import ChannelsLast, check_int32, empty_channels_last, interpreted


@triton.jit
def _ln_fwd_kernel(
    x_ptr, g_ptr, beta_ptr, yw_ptr, yh_ptr, mean_ptr, rstd_ptr,
    H, W, HP, WP, eps,
    BLOCK: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
):  # fmt: skip
    """One (b, n) row: statistics in fp32, then y = (x - mean)·rstd·g + beta written W-major
    (B, N, H, WP) and H-major (B, N, W, HP), zeros in the padding of each."""
    row = tl.program_id(0)
    HW = H * W
    x_row = x_ptr + row * HW
    # Shift by the row's first element: the sums of (x - x0) keep the variance accurate when
    # |mean| >> std.
    x0 = tl.load(x_row).to(tl.float32)
    acc1 = tl.zeros((BLOCK,), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK,), dtype=tl.float32)
    for i in range(0, HW, BLOCK):
        offs = i + tl.arange(0, BLOCK)
        v = tl.where(offs < HW, tl.load(x_row + offs, mask=offs < HW, other=0.0).to(tl.float32) - x0, 0.0)
        acc1 += v
        acc2 += v * v
    shifted_mean = tl.sum(acc1, axis=0) / HW
    var = tl.maximum(tl.sum(acc2, axis=0) / HW - shifted_mean * shifted_mean, 0.0)
    mean = shifted_mean + x0
    rstd = 1.0 / tl.sqrt(var + eps)
    tl.store(mean_ptr + row, mean)
    tl.store(rstd_ptr + row, rstd)

    yw_row = yw_ptr + row * H * WP
    yh_row = yh_ptr + row * W * HP
    for h0 in range(0, HP, BLOCK_H):
        h = h0 + tl.arange(0, BLOCK_H)
        for w0 in range(0, WP, BLOCK_W):
            w = w0 + tl.arange(0, BLOCK_W)
            valid = (h < H)[:, None] & (w < W)[None, :]
            hw = h[:, None] * W + w[None, :]
            xv = tl.load(x_row + hw, mask=valid, other=0.0).to(tl.float32)
            gv = tl.load(g_ptr + hw, mask=valid, other=0.0)
            bv = tl.load(beta_ptr + hw, mask=valid, other=0.0)
            y = tl.where(valid, (xv - mean) * rstd * gv + bv, 0.0)
            tl.store(yw_row + h[:, None] * WP + w[None, :], y.to(yw_ptr.dtype.element_ty), mask=(h < H)[:, None] & (w < WP)[None, :])
            tl.store(yh_row + w[None, :] * HP + h[:, None], y.to(yh_ptr.dtype.element_ty), mask=(h < HP)[:, None] & (w < W)[None, :])


def layer_norm_channels_last(
    x: Tensor,  # (B, N, H, W) contiguous
    weight: Tensor,  # (H, W)
    bias: Tensor,  # (H, W)
    eps: float,
    dtype: torch.dtype,
) -> tuple[ChannelsLast, ChannelsLast, Tensor, Tensor]:
    """LayerNorm over (H, W) -> (y W-major, y H-major, mean (B·N,), rstd (B·N,)); stats in fp32."""
    if x.dim() != 4 or not x.is_contiguous():
        raise ValueError(f"layer_norm_channels_last: x must be a contiguous (B, N, H, W) tensor, got {tuple(x.shape)}")
    B, N, H, W = x.shape
    if tuple(weight.shape) != (H, W) or tuple(bias.shape) != (H, W):
        raise ValueError(
            f"layer_norm_channels_last: weight and bias must be ({H}, {W}), got {tuple(weight.shape)} and {tuple(bias.shape)}"
        )
    check_int32(x)
    y_w = empty_channels_last((B, N, H, W), 3, dtype, x.device, zero_pad=False)
    y_h = empty_channels_last((B, N, H, W), 2, dtype, x.device, zero_pad=False)
    mean = torch.empty(B * N, dtype=torch.float32, device=x.device)
    rstd = torch.empty_like(mean)
    _ln_fwd_kernel[(B * N,)](
        x, weight.float().contiguous(), bias.float().contiguous(), y_w.view, y_h.view, mean, rstd,
        H, W, y_h.padded, y_w.padded, float(eps),
        BLOCK=1024 if not interpreted() else 64, BLOCK_H=32, BLOCK_W=32 if not interpreted() else 16,
        num_warps=4,
    )  # fmt: skip
    return y_w, y_h, mean, rstd


@triton.jit
def _ln_bwd_kernel(
    dy_ptr, x_ptr, g_ptr, mean_ptr, rstd_ptr, res_ptr, dx_ptr, HW,
    HAS_RES: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """One (b, n) row: dx = rstd·(g·dy - mean(g·dy) - xhat·mean(g·dy·xhat)) (+ residual grad)."""
    row = tl.program_id(0)
    base = row * HW
    mean = tl.load(mean_ptr + row)
    rstd = tl.load(rstd_ptr + row)
    c1 = tl.zeros((BLOCK,), dtype=tl.float32)
    c2 = tl.zeros((BLOCK,), dtype=tl.float32)
    for i in range(0, HW, BLOCK):
        offs = i + tl.arange(0, BLOCK)
        ok = offs < HW
        gdy = tl.load(dy_ptr + base + offs, mask=ok, other=0.0).to(tl.float32) * tl.load(g_ptr + offs, mask=ok, other=0.0)
        xhat = (tl.load(x_ptr + base + offs, mask=ok, other=0.0).to(tl.float32) - mean) * rstd
        c1 += gdy * xhat
        c2 += gdy
    m1 = tl.sum(c1, axis=0) / HW
    m2 = tl.sum(c2, axis=0) / HW
    for i in range(0, HW, BLOCK):
        offs = i + tl.arange(0, BLOCK)
        ok = offs < HW
        gdy = tl.load(dy_ptr + base + offs, mask=ok, other=0.0).to(tl.float32) * tl.load(g_ptr + offs, mask=ok, other=0.0)
        xhat = (tl.load(x_ptr + base + offs, mask=ok, other=0.0).to(tl.float32) - mean) * rstd
        dx = rstd * (gdy - m2 - xhat * m1)
        if HAS_RES:
            dx += tl.load(res_ptr + base + offs, mask=ok, other=0.0).to(tl.float32)
        tl.store(dx_ptr + base + offs, dx.to(dx_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _ln_param_grad_kernel(
    dy_ptr, x_ptr, mean_ptr, rstd_ptr, dg_ptr, db_ptr, ROWS, HW, ROWS_PER_PROG,
    BLOCK: tl.constexpr,
):  # fmt: skip
    """Partial sums over a group of rows of dy·xhat and dy, per (h, w) column -> (groups, HW)."""
    pid_c = tl.program_id(0)
    pid_g = tl.program_id(1)
    cols = pid_c * BLOCK + tl.arange(0, BLOCK)
    ok = cols < HW
    acc_g = tl.zeros((BLOCK,), dtype=tl.float32)
    acc_b = tl.zeros((BLOCK,), dtype=tl.float32)
    row_hi = tl.minimum((pid_g + 1) * ROWS_PER_PROG, ROWS)
    for row in range(pid_g * ROWS_PER_PROG, row_hi):
        base = row * HW
        dy = tl.load(dy_ptr + base + cols, mask=ok, other=0.0).to(tl.float32)
        xhat = (tl.load(x_ptr + base + cols, mask=ok, other=0.0).to(tl.float32) - tl.load(mean_ptr + row)) * tl.load(rstd_ptr + row)
        acc_g += dy * xhat
        acc_b += dy
    tl.store(dg_ptr + pid_g * HW + cols, acc_g, mask=ok)
    tl.store(db_ptr + pid_g * HW + cols, acc_b, mask=ok)


def layer_norm_backward(
    dy: Tensor,  # (B, N, H, W) contiguous, dL/d(LayerNorm output)
    x: Tensor,  # (B, N, H, W) contiguous, the LayerNorm input
    weight: Tensor,  # (H, W)
    mean: Tensor,  # (B·N,) fp32
    rstd: Tensor,  # (B·N,) fp32
    residual_grad: Tensor | None = None,  # (B, N, H, W) contiguous, added to dx
    need_dx: bool = True,
) -> tuple[Tensor | None, Tensor, Tensor]:
    """(dx in x.dtype or None when not `need_dx`, d weight (H, W) fp32, d bias (H, W) fp32)."""
    for name, t in (("dy", dy), ("residual_grad", residual_grad)):
        if t is not None and (t.shape != x.shape or not t.is_contiguous()):
            raise ValueError(f"layer_norm_backward: {name} must be contiguous {tuple(x.shape)}, got {tuple(t.shape)}")
    if not x.is_contiguous():
        raise ValueError("layer_norm_backward: x must be contiguous")
    B, N, H, W = x.shape
    rows, hw = B * N, H * W
    check_int32(x)
    block = 1024 if not interpreted() else 64
    dx = None
    if need_dx:
        dx = torch.empty_like(x)
        _ln_bwd_kernel[(rows,)](
            dy, x, weight.float().contiguous(), mean, rstd, residual_grad if residual_grad is not None else dy, dx, hw,
            HAS_RES=residual_grad is not None, BLOCK=block, num_warps=4,
        )  # fmt: skip
    col_blocks = triton.cdiv(hw, block)
    groups = min(rows, max(1, triton.cdiv(1024, col_blocks)))  # ~1k programs in flight
    per = triton.cdiv(rows, groups)
    groups = triton.cdiv(rows, per)
    dg = torch.empty(groups, hw, dtype=torch.float32, device=x.device)
    db = torch.empty_like(dg)
    _ln_param_grad_kernel[(col_blocks, groups)](dy, x, mean, rstd, dg, db, rows, hw, per, BLOCK=block, num_warps=4)
    return dx, dg.sum(0).view(H, W), db.sum(0).view(H, W)
