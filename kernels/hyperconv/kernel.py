"""Triton channel convolutions of the hyper-convolution stage (forward, data and weight gradients), and
launchers that check what they are given. The LayerNorm is in `layernorm`, the tiles and their
autotuner in `tiling`, the channels-last buffers in `buffers`.

Every convolution of a stage is a k×k "channel convolution": one axis of a (B, N, H, W) tensor is the
channel axis and the two others form the convolved plane (``reference._conv_channels``). As an
implicit GEMM it is ``out[position, c_out] = sum over (tap, c_in) of x[position + tap, c_in] ·
w[tap, c_in, c_out]``: M = B × plane positions, N = C_out, K = k² × C_in. One kernel
(``_conv_kernel``) runs all of them, the backward data gradients included (a data gradient is the
same convolution with the kernel flipped and its two channel axes swapped); ``_wgrad_kernel`` runs
the weight gradients (M = C_out, N = C_in per tap, K = B × plane positions), or cuDNN does, on the
same buffers or on NCHW copies of them, for the shapes where the autotuner timed it faster
(``conv_wgrad``).

Layout: no activation is transposed by a copy. Each one is *written* by the kernel that produces it
directly in the layout in which its consumer reads it: the consumer's channel axis innermost (stride
1), zero-padded to 16 or a multiple of 32 (``channel_pad``). A GEMM tile of the input is then a block
of rows of contiguous, 16-byte-aligned channel vectors for every tap, so the loads vectorize and
pipeline (``cp.async``) whatever the axis; the epilogue's stores go to any strides. Tensors travel as
``ChannelsLast``: a logical ``(B, N, H, W)`` view of the padded storage plus the channel axis. The
one copy is the stage's upstream gradient in the backward pass, which arrives in the layout of
whatever consumed the stage's output (``channels_last_copy``; one pass over a tensor that the
following GEMMs read k²·C times); cuDNN's weight gradient on NCHW copies, where the autotuner
picks it, is the other.

Fusions: the LayerNorm writes its normalized, affine-transformed output once per layout that a
branch reads (W-major for branch A, H-major for branch B); the second convolution of branch B ends
with ``(a + tanh(acc) + bias) / 3`` (and keeps tanh for the backward pass); the mixing convolution
ends with its bias and the residual; the mixing convolution's data gradient ends with the split
into the two branches' gradients, ``g / 3`` and ``g / 3 · (1 - tanh²)``, each in the layout its
consumer reads. The LayerNorm is not fused into the convolution's inner loop: every input element is
read k² times there (once per tap), so normalizing on load would redo the affine k² times per
element, while writing it once costs one pass over the tensor, and the backward pass needs it
stored anyway (the weight gradient of the branches' first convolutions reads it).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .buffers import (
    EPILOGUE_GATE,
    EPILOGUE_STORE,
    EPILOGUE_TANH_AVG,
    PLANE_AXES,
    ChannelsLast,
    channel_pad,
    check_int32,
    interpreted,
)
from .tiling import CUDNN, CUDNN_NCHW, TileConfig, largest_block, pick, tile_candidates


# --------------------------------------------------------------------------------------------------
# Channel convolution: forward and data gradient


@triton.jit
def _tanh(x):
    # tanh from exp of a non-positive argument: no overflow for any x.
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


# Sizes and output strides are not specialized (one binary serves every stage shape); the input
# strides and channel counts are multiples of 16 by construction, which the vectorized loads need.
@triton.jit(
    do_not_specialize=["M", "R", "S", "C_OUT", "o_sb", "o_sr", "o_ss", "o_sc", "a_sb", "a_sr", "a_ss", "a_sc",
                       "v_sb", "v_sr", "v_ss", "v_sc", "t_sb", "t_sr", "t_ss", "t_sc", "r_is_p"]
)  # fmt: skip
def _conv_kernel(
    x_ptr, w_ptr, out_ptr, aux_ptr, vec_ptr, out2_ptr,
    M, R, S, C_IN, C_OUT, W_LD,
    x_sb, x_sr, x_ss,
    o_sb, o_sr, o_ss, o_sc,
    a_sb, a_sr, a_ss, a_sc,
    v_sb, v_sr, v_ss, v_sc,
    t_sb, t_sr, t_ss, t_sc,
    r_is_p, scale,
    KSIZE: tl.constexpr, EPILOGUE: tl.constexpr, HAS_AUX: tl.constexpr, HAS_VEC: tl.constexpr,
    IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, EPI_SPLIT: tl.constexpr,
):  # fmt: skip
    """out[b, r, s, co] = epilogue(sum_{tap, ci} x[b, r + dr, s + ds, ci] · w[tap, ci, co]).

    Positions m = (b, r, s), s fastest; (r, s) is the plane (p, q) or (q, p) (`r_is_p`), chosen by the
    launcher so that the output's smallest position stride runs along s. x: channel stride 1 and
    C_IN (padded, zero past the real channels) a multiple of BLOCK_K. w: (k², C_IN, W_LD), zero past
    the real output channels. Epilogues: STORE out = scale·acc (+ vec) (+ aux); TANH_AVG t = tanh(acc)
    -> out2, out = scale·(aux + t + vec); GATE g = scale·acc -> out, g·(1 - aux²) -> out2.
    """
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(C_OUT, BLOCK_N)
    # Grouped order: GROUP_M row-tiles share each weight column-tile while it is in L2.
    width = GROUP_M * num_n
    first_m = (pid // width) * GROUP_M
    group_size = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % group_size
    pid_n = (pid % width) // group_size

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    s = offs_m % S
    r = (offs_m // S) % R
    b = offs_m // (S * R)
    x_row = b * x_sb + r * x_sr + s * x_ss  # (BLOCK_M,)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # W_LD is a multiple of 16: masking on it (not on C_OUT) keeps the weight loads vectorized.
    w_ok = offs_n < W_LD
    offs_k = tl.arange(0, BLOCK_K)
    PAD: tl.constexpr = KSIZE // 2
    n_cb = C_IN // BLOCK_K

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for it in range(0, KSIZE * KSIZE * n_cb):
        tap = it // n_cb
        c0 = (it - tap * n_cb) * BLOCK_K
        du = tap // KSIZE - PAD
        dv = tap % KSIZE - PAD
        dr = du * r_is_p + dv * (1 - r_is_p)
        ds = du + dv - dr
        rr = r + dr
        ss = s + ds
        ok = m_ok & (rr >= 0) & (rr < R) & (ss >= 0) & (ss < S)
        a = tl.load(x_ptr + (x_row + dr * x_sr + ds * x_ss)[:, None] + (c0 + offs_k)[None, :], mask=ok[:, None], other=0.0)
        wt = tl.load(w_ptr + ((tap * C_IN + c0 + offs_k) * W_LD)[:, None] + offs_n[None, :], mask=w_ok[None, :], other=0.0)
        if IEEE:
            acc = tl.dot(a, wt, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, wt, acc)

    # The epilogue runs on column slices of the tile: its per-element offsets and pointers (the
    # strides are run-time values) would otherwise hold ~2x the accumulator in registers and spill.
    if EPI_SPLIT == 1:
        _conv_epilogue_cols(acc, pid_n * BLOCK_N, b, r, s, m_ok, out_ptr, aux_ptr, vec_ptr, out2_ptr, C_OUT,
                            o_sb, o_sr, o_ss, o_sc, a_sb, a_sr, a_ss, a_sc, v_sb, v_sr, v_ss, v_sc,
                            t_sb, t_sr, t_ss, t_sc, scale, EPILOGUE, HAS_AUX, HAS_VEC)
    else:
        HALF: tl.constexpr = BLOCK_N // 2
        acc0, acc1 = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, HALF)), (0, 2, 1)))
        _conv_epilogue_half(acc0, pid_n * BLOCK_N, b, r, s, m_ok, out_ptr, aux_ptr, vec_ptr, out2_ptr, C_OUT,
                            o_sb, o_sr, o_ss, o_sc, a_sb, a_sr, a_ss, a_sc, v_sb, v_sr, v_ss, v_sc,
                            t_sb, t_sr, t_ss, t_sc, scale, EPILOGUE, HAS_AUX, HAS_VEC, EPI_SPLIT // 2)
        _conv_epilogue_half(acc1, pid_n * BLOCK_N + HALF, b, r, s, m_ok, out_ptr, aux_ptr, vec_ptr, out2_ptr,
                            C_OUT, o_sb, o_sr, o_ss, o_sc, a_sb, a_sr, a_ss, a_sc, v_sb, v_sr, v_ss, v_sc,
                            t_sb, t_sr, t_ss, t_sc, scale, EPILOGUE, HAS_AUX, HAS_VEC, EPI_SPLIT // 2)


@triton.jit
def _conv_epilogue_half(
    acc, n_start, b, r, s, m_ok, out_ptr, aux_ptr, vec_ptr, out2_ptr, C_OUT,
    o_sb, o_sr, o_ss, o_sc, a_sb, a_sr, a_ss, a_sc, v_sb, v_sr, v_ss, v_sc, t_sb, t_sr, t_ss, t_sc,
    scale, EPILOGUE: tl.constexpr, HAS_AUX: tl.constexpr, HAS_VEC: tl.constexpr, SPLIT: tl.constexpr,
):  # fmt: skip
    """The epilogue of columns [n_start, n_start + acc.shape[1]), in SPLIT (1 or 2) slices."""
    if SPLIT == 1:
        _conv_epilogue_cols(acc, n_start, b, r, s, m_ok, out_ptr, aux_ptr, vec_ptr, out2_ptr, C_OUT,
                            o_sb, o_sr, o_ss, o_sc, a_sb, a_sr, a_ss, a_sc, v_sb, v_sr, v_ss, v_sc,
                            t_sb, t_sr, t_ss, t_sc, scale, EPILOGUE, HAS_AUX, HAS_VEC)
    else:
        BM: tl.constexpr = acc.shape[0]
        HALF: tl.constexpr = acc.shape[1] // 2
        acc0, acc1 = tl.split(tl.permute(tl.reshape(acc, (BM, 2, HALF)), (0, 2, 1)))
        _conv_epilogue_cols(acc0, n_start, b, r, s, m_ok, out_ptr, aux_ptr, vec_ptr, out2_ptr, C_OUT,
                            o_sb, o_sr, o_ss, o_sc, a_sb, a_sr, a_ss, a_sc, v_sb, v_sr, v_ss, v_sc,
                            t_sb, t_sr, t_ss, t_sc, scale, EPILOGUE, HAS_AUX, HAS_VEC)
        _conv_epilogue_cols(acc1, n_start + HALF, b, r, s, m_ok, out_ptr, aux_ptr, vec_ptr, out2_ptr, C_OUT,
                            o_sb, o_sr, o_ss, o_sc, a_sb, a_sr, a_ss, a_sc, v_sb, v_sr, v_ss, v_sc,
                            t_sb, t_sr, t_ss, t_sc, scale, EPILOGUE, HAS_AUX, HAS_VEC)


@triton.jit
def _conv_epilogue_cols(
    acc, n_start, b, r, s, m_ok, out_ptr, aux_ptr, vec_ptr, out2_ptr, C_OUT,
    o_sb, o_sr, o_ss, o_sc, a_sb, a_sr, a_ss, a_sc, v_sb, v_sr, v_ss, v_sc, t_sb, t_sr, t_ss, t_sc,
    scale, EPILOGUE: tl.constexpr, HAS_AUX: tl.constexpr, HAS_VEC: tl.constexpr,
):  # fmt: skip
    """Epilogue (see _conv_kernel) of output columns [n_start, n_start + acc.shape[1])."""
    offs_n = n_start + tl.arange(0, acc.shape[1])
    mask = m_ok[:, None] & (offs_n < C_OUT)[None, :]
    o_off = (b * o_sb + r * o_sr + s * o_ss)[:, None] + (offs_n * o_sc)[None, :]
    if EPILOGUE == 0:
        val = acc * scale
        if HAS_VEC:
            v_off = (b * v_sb + r * v_sr + s * v_ss)[:, None] + (offs_n * v_sc)[None, :]
            val += tl.load(vec_ptr + v_off, mask=mask, other=0.0).to(tl.float32)
        if HAS_AUX:
            a_off = (b * a_sb + r * a_sr + s * a_ss)[:, None] + (offs_n * a_sc)[None, :]
            val += tl.load(aux_ptr + a_off, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + o_off, val.to(out_ptr.dtype.element_ty), mask=mask)
    elif EPILOGUE == 1:
        t = _tanh(acc)
        t_off = (b * t_sb + r * t_sr + s * t_ss)[:, None] + (offs_n * t_sc)[None, :]
        tl.store(out2_ptr + t_off, t.to(out2_ptr.dtype.element_ty), mask=mask)
        a_off = (b * a_sb + r * a_sr + s * a_ss)[:, None] + (offs_n * a_sc)[None, :]
        v_off = (b * v_sb + r * v_sr + s * v_ss)[:, None] + (offs_n * v_sc)[None, :]
        val = t + tl.load(aux_ptr + a_off, mask=mask, other=0.0).to(tl.float32)
        val += tl.load(vec_ptr + v_off, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + o_off, (val * scale).to(out_ptr.dtype.element_ty), mask=mask)
    else:
        g = acc * scale
        tl.store(out_ptr + o_off, g.to(out_ptr.dtype.element_ty), mask=mask)
        a_off = (b * a_sb + r * a_sr + s * a_ss)[:, None] + (offs_n * a_sc)[None, :]
        th = tl.load(aux_ptr + a_off, mask=mask, other=0.0).to(tl.float32)
        t_off = (b * t_sb + r * t_sr + s * t_ss)[:, None] + (offs_n * t_sc)[None, :]
        tl.store(out2_ptr + t_off, (g * (1.0 - th * th)).to(out2_ptr.dtype.element_ty), mask=mask)


def _position_strides(t: Tensor, axis: int, r_axis: int, s_axis: int) -> tuple[int, int, int, int]:
    """(b, r, s, channel) strides of a logical (B, N, H, W) view (0 where broadcast)."""
    st = t.stride()
    return st[0], st[r_axis], st[s_axis], st[axis]


@triton.jit
def _pack_weight_kernel(
    w_ptr, out_ptr, C_IN, C_OUT, IN_PAD, LD, s_in, s_out,
    KK: tl.constexpr, FLIP: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_T: tl.constexpr,
):  # fmt: skip
    """out[tap, i, o] = w[.., .., tap'] for one input channel i and a block of output channels o.

    `s_in` / `s_out` are the strides of w (a contiguous (C_out, C_in, k, k) conv2d weight) along the
    roles i and o play here; tap' = KK - 1 - tap with FLIP (the data gradient's flipped kernel).
    Rows i >= C_IN and columns o >= C_OUT of `out` are the zero padding.
    """
    i = tl.program_id(0)
    o = tl.program_id(1) * BLOCK_O + tl.arange(0, BLOCK_O)
    tap = tl.arange(0, BLOCK_T)
    src_tap = KK - 1 - tap if FLIP else tap
    o_lim = tl.where(i < C_IN, C_OUT, 0)  # padding rows (i >= C_IN) load nothing: zeros
    ok = (o < o_lim)[:, None] & (tap < KK)[None, :]
    # Each row o reads KK consecutive values of w: whole sectors whichever role o plays.
    vals = tl.load(w_ptr + i * s_in + (o * s_out)[:, None] + src_tap[None, :], mask=ok, other=0.0)
    dst = out_ptr + (tap * IN_PAD * LD)[None, :] + i * LD + o[:, None]
    tl.store(dst, vals.to(out_ptr.dtype.element_ty), mask=(o < LD)[:, None] & (tap < KK)[None, :])


def conv_weight(weight: Tensor, in_padded: int, dtype: torch.dtype, data_grad: bool = False) -> Tensor:
    """A (C_out, C_in, k, k) conv2d weight as the kernel reads it: a (k², in_padded, C_out) view of a
    zero-padded (k², in_padded, ld) buffer, ld = C_out rounded up to 16 (the kernel reads whole
    16-column groups; the extra columns are zero).

    With `data_grad`, the weight of the data-gradient convolution: flipped taps, channels swapped
    (its input channels are the forward's output channels). One kernel pass: the weight is read
    once and the packed buffer, padding included, written once.
    """
    c_out, c_in, k, _ = weight.shape
    cin, cout = (c_out, c_in) if data_grad else (c_in, c_out)
    if not weight.is_cuda and not interpreted():
        raise ValueError(
            f"conv_weight: the weight is on {weight.device}; the Triton kernels take CUDA tensors "
            "(or CPU tensors under TRITON_INTERPRET=1)"
        )
    if in_padded < cin:
        raise ValueError(f"conv_weight: input channels padded to {in_padded} < {cin} channels")
    ld = channel_pad(cout)
    out = torch.empty(k * k, in_padded, ld, dtype=dtype, device=weight.device)
    check_int32(out, weight)
    w = weight.contiguous()
    s_in, s_out = (c_in * k * k, k * k) if data_grad else (k * k, c_in * k * k)
    block_o = 64 if not interpreted() else 16  # not tuned: one pass over the weights per step
    _pack_weight_kernel[(in_padded, triton.cdiv(ld, block_o))](
        w, out, cin, cout, in_padded, ld, s_in, s_out,
        KK=k * k, FLIP=data_grad, BLOCK_O=block_o, BLOCK_T=triton.next_power_of_2(k * k), num_warps=4,
    )  # fmt: skip
    return out[:, :, :cout]


def pack_forward_weights(
    w_w1: Tensor, w_h1: Tensor, w_h2: Tensor, w_w2: Tensor, mix_weight: Tensor, dtype: torch.dtype
) -> tuple[Tensor, ...]:
    """The five convolution weights of a stage packed for the forward pass (``conv_weight``), each
    with its input channels padded as the stage stores the activation it reads. A caller that runs
    the same weights many times (generation) packs once and passes the result to the stage."""
    return tuple(conv_weight(w, channel_pad(w.shape[1]), dtype) for w in (w_w1, w_h1, w_h2, w_w2, mix_weight))


def channel_conv(
    x: ChannelsLast,
    weight: Tensor,  # (k², x.padded, C_out) from conv_weight
    out: Tensor,  # logical (B, N, H, W), channel axis = x.axis
    *,
    epilogue: int = EPILOGUE_STORE,
    aux: Tensor | None = None,  # logical like `out` (any strides)
    vec: Tensor | None = None,  # logical like `out`, broadcast (expand) allowed
    out2: Tensor | None = None,  # logical like `out`
    scale: float = 1.0,
) -> None:
    """Run one channel convolution (or data gradient) of `x` into `out` with a fused epilogue."""
    axis = x.axis
    kk, c_in, c_out = weight.shape
    k = int(round(kk**0.5))
    if k * k != kk or k % 2 != 1:
        raise ValueError(f"channel_conv: weight must be (k*k, C_in, C_out) with odd k, got {tuple(weight.shape)}")
    w_ld = weight.stride(1)
    if c_in != x.padded or x.view.stride(axis) != 1:
        raise ValueError(
            f"channel_conv: input must be channels-last along axis {axis} with {c_in} stored channels, "
            f"got {x.padded} stored channels and stride {x.view.stride(axis)}; build it with empty_channels_last"
        )
    shape = list(x.view.shape)
    shape[axis] = c_out
    if list(out.shape) != shape:
        raise ValueError(f"channel_conv: output must be {tuple(shape)} for this weight, got {tuple(out.shape)}")
    for name, t in (("aux", aux), ("vec", vec), ("out2", out2)):
        if t is not None and list(t.shape) != shape:
            raise ValueError(f"channel_conv: {name} must have the output's shape {tuple(shape)}, got {tuple(t.shape)}")
    if epilogue == EPILOGUE_TANH_AVG and (aux is None or vec is None or out2 is None):
        raise ValueError("channel_conv: the tanh-average epilogue needs aux (branch A), vec (bias) and out2 (tanh)")
    if epilogue == EPILOGUE_GATE and (aux is None or out2 is None):
        raise ValueError("channel_conv: the gate epilogue needs aux (tanh of branch B) and out2")
    dtypes = {x.view.dtype, weight.dtype}
    if len(dtypes) != 1 or x.view.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"channel_conv: x and weight must share one of fp32/fp16/bf16, got {dtypes}")
    if weight.stride(2) != 1 or w_ld % 16 or w_ld < c_out or weight.stride(0) != c_in * w_ld:
        raise ValueError(f"channel_conv: weight strides {weight.stride()} are not conv_weight's; build it with conv_weight")
    check_int32(x.view, out, aux, out2)

    p_axis, q_axis = PLANE_AXES[axis]
    # Positions run fastest along the plane axis where the output is densest (coalesced epilogue).
    r_is_p = int(abs(out.stride(p_axis)) > abs(out.stride(q_axis)))
    r_axis, s_axis = (p_axis, q_axis) if r_is_p else (q_axis, p_axis)
    B, R, S = shape[0], shape[r_axis], shape[s_axis]
    M = B * R * S
    xs = _position_strides(x.view, axis, r_axis, s_axis)[:3]
    os_ = _position_strides(out, axis, r_axis, s_axis)
    dummy = out
    as_ = _position_strides(aux, axis, r_axis, s_axis) if aux is not None else (0, 0, 0, 0)
    vs = _position_strides(vec, axis, r_axis, s_axis) if vec is not None else (0, 0, 0, 0)
    ts = _position_strides(out2, axis, r_axis, s_axis) if out2 is not None else (0, 0, 0, 0)
    ieee = x.view.dtype == torch.float32 and not torch.backends.cudnn.allow_tf32

    def launch(cfg: TileConfig) -> None:
        grid = (triton.cdiv(M, cfg.block_m) * triton.cdiv(c_out, cfg.block_n),)
        _conv_kernel[grid](
            x.view, weight, out,
            aux if aux is not None else dummy, vec if vec is not None else dummy,
            out2 if out2 is not None else dummy,
            M, R, S, c_in, c_out, w_ld, *xs, *os_, *as_, *vs, *ts, r_is_p, float(scale),
            KSIZE=k, EPILOGUE=epilogue, HAS_AUX=aux is not None, HAS_VEC=vec is not None, IEEE=ieee,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=8,
            EPI_SPLIT=min(4, cfg.block_n // 16),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )  # fmt: skip

    candidates = tile_candidates(M, c_out, largest_block(c_in))
    key = ("conv", axis, B, R, S, c_in, c_out, k, epilogue, x.view.dtype)
    launch(pick(key, candidates, launch))


# --------------------------------------------------------------------------------------------------
# Channel convolution: weight gradient


@triton.jit(do_not_specialize=["M", "R", "S", "C_OUT", "C_IN", "K_SPLIT", "r_is_p"])
def _wgrad_kernel(
    dy_ptr, x_ptr, dw_ptr,
    M, R, S, C_OUT, C_IN, CO_LD, CI_LD, K_SPLIT,
    d_sb, d_sr, d_ss, x_sb, x_sr, x_ss, r_is_p,
    KSIZE: tl.constexpr, ATOMIC: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """dw[tap, ci, co] (+)= sum over positions m of dy[m, co] · x[m + tap, ci] (fp32).

    Program (tap, co-tile, ci-tile) along axis 0, a K_SPLIT-long slice of the positions along axis 1;
    with several slices they add atomically into a zeroed dw. dy and x are channels-last (stride 1)
    with CO_LD / CI_LD stored channels (multiples of 16).
    """
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_co = tl.cdiv(C_OUT, BLOCK_M)
    num_ci = tl.cdiv(C_IN, BLOCK_N)
    tap = pid // (num_co * num_ci)
    rest = pid % (num_co * num_ci)
    pid_co = rest // num_ci
    pid_ci = rest % num_ci
    PAD: tl.constexpr = KSIZE // 2
    du = tap // KSIZE - PAD
    dv = tap % KSIZE - PAD
    dr = du * r_is_p + dv * (1 - r_is_p)
    ds = du + dv - dr

    co = pid_co * BLOCK_M + tl.arange(0, BLOCK_M)
    ci = pid_ci * BLOCK_N + tl.arange(0, BLOCK_N)
    # Rows/columns past the real channels read the padding (masks on the stored lengths, multiples
    # of 16, keep the loads vectorized) and are never stored: an output element depends only on
    # its own row and column.
    co_ok = co < CO_LD
    ci_ok = ci < CI_LD
    offs_k = tl.arange(0, BLOCK_K)
    k_lo = pid_k * K_SPLIT
    k_hi = tl.minimum(k_lo + K_SPLIT, M)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        m = k0 + offs_k
        m_ok = m < k_hi
        s = m % S
        r = (m // S) % R
        b = m // (S * R)
        a = tl.load(dy_ptr + co[:, None] + (b * d_sb + r * d_sr + s * d_ss)[None, :], mask=co_ok[:, None] & m_ok[None, :], other=0.0)
        rr = r + dr
        ss = s + ds
        ok = m_ok & (rr >= 0) & (rr < R) & (ss >= 0) & (ss < S)
        xt = tl.load(x_ptr + (b * x_sb + rr * x_sr + ss * x_ss)[:, None] + ci[None, :], mask=ok[:, None] & ci_ok[None, :], other=0.0)
        if IEEE:
            acc = tl.dot(a, xt, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, xt, acc)

    # Stored in column halves: a full tile of per-element 64-bit pointers would spill registers.
    HALF: tl.constexpr = BLOCK_N // 2
    acc0, acc1 = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, HALF)), (0, 2, 1)))
    ci0 = pid_ci * BLOCK_N + tl.arange(0, HALF)
    _wgrad_store(dw_ptr, acc0, co, ci0, tap, C_OUT, C_IN, ATOMIC)
    _wgrad_store(dw_ptr, acc1, co, ci0 + HALF, tap, C_OUT, C_IN, ATOMIC)


@triton.jit
def _wgrad_store(dw_ptr, acc, co, ci, tap, C_OUT, C_IN, ATOMIC: tl.constexpr):
    dst = dw_ptr + ((tap * C_IN + ci) * C_OUT)[None, :] + co[:, None]
    mask = (co < C_OUT)[:, None] & (ci < C_IN)[None, :]
    if ATOMIC:
        tl.atomic_add(dst, acc, mask=mask, sem="relaxed")
    else:
        tl.store(dst, acc, mask=mask)


def _dense_nchw(t: ChannelsLast) -> tuple[Tensor, tuple[int, int]] | None:
    """The padded storage of `t` as a channels_last (B, padded, A1, A2) tensor with the plane axes
    (A1, A2) in memory order, or None when `t` is not a dense channels-last buffer."""
    view, axis = t.view, t.axis
    plane = sorted((a for a in (1, 2, 3) if a != axis), key=lambda a: -view.stride(a))
    a1, a2 = plane
    sizes = (view.shape[0], t.padded, view.shape[a1], view.shape[a2])
    strides = (view.stride(0), 1, view.stride(a1), view.stride(a2))
    if strides[3] != t.padded or strides[2] != sizes[3] * t.padded or strides[0] != sizes[2] * strides[2]:
        return None
    return view.as_strided(sizes, strides), (a1, a2)


def _wgrad_cudnn(dy: ChannelsLast, x: ChannelsLast, k: int, plane: tuple[int, int], dense=None,
                 nchw: bool = False) -> Tensor:  # fmt: skip
    """cuDNN's weight gradient on the padded channels-last buffers themselves, or (`nchw`) on
    contiguous NCHW copies of them: the padded channels are zero or ignored (their rows and columns
    of the result are dropped). Returns (C_out, C_in, k, k) fp32 with kernel axes along
    PLANE_AXES[axis] (p, q). `dense`: the ``_dense_nchw`` views of (dy, x) when the caller already
    made them."""
    (dy4, order), (x4, _) = dense if dense is not None else (_dense_nchw(dy), _dense_nchw(x))
    co_pad, ci_pad = dy4.shape[1], x4.shape[1]
    if nchw:  # one pass over dy and x (0.5 GB moved at the largest 7B shape); cuDNN is faster on NCHW there
        dy4, x4 = dy4.contiguous(), x4.contiguous()
    fmt = torch.contiguous_format if nchw else torch.channels_last
    # Only the weight's sizes, dtype and memory format are read by the weight-gradient path.
    weight = torch.empty((co_pad, ci_pad, k, k), dtype=x4.dtype, device=x4.device, memory_format=fmt)
    # On the channels-last buffers cuDNN's heuristic algorithm: there its benchmark mode took the
    # same algorithm at every weight-gradient shape timed on an H100, only later
    # (benchmarks/results/kernels_h100_run7_wgrad_cudnn_benchmark_*.json). On the NCHW copies its
    # benchmark mode when torch.backends.cudnn.benchmark is on (train.cudnn_benchmark).
    benchmark = nchw and torch.backends.cudnn.benchmark
    with torch.backends.cudnn.flags(enabled=True, benchmark=benchmark, deterministic=torch.backends.cudnn.deterministic,
                                    allow_tf32=torch.backends.cudnn.allow_tf32):  # fmt: skip
        _, dw, _ = torch.ops.aten.convolution_backward(
            dy4, x4, weight, None, [1, 1], [k // 2, k // 2], [1, 1], False, [0, 0], 1, [False, True, False]
        )
    dw = dw[: dy.view.shape[dy.axis], : x.view.shape[x.axis]].float()
    return dw if order == plane else dw.transpose(2, 3)


def conv_wgrad(dy: ChannelsLast, x: ChannelsLast, kernel_size: int) -> Tensor:
    """Weight gradient (C_out, C_in, k, k) in fp32 of the channel convolution x -> y, from dy = dL/dy.

    On a GPU the candidates timed per shape are the Triton tiles and cuDNN's weight gradient on the
    same buffers or on NCHW copies of them (``_wgrad_cudnn``); the fastest is kept.
    """
    axis = dy.axis
    if x.axis != axis or dy.view.stride(axis) != 1 or x.view.stride(axis) != 1:
        raise ValueError(
            f"conv_wgrad: dy and x must be channels-last along the same axis, got axes {dy.axis} and {x.axis}"
        )
    if dy.view.dtype != x.view.dtype:
        raise ValueError(f"conv_wgrad: dy and x must share a dtype, got {dy.view.dtype} and {x.view.dtype}")
    shape_dy, shape_x = list(dy.view.shape), list(x.view.shape)
    c_out, c_in = shape_dy[axis], shape_x[axis]
    shape_dy[axis] = shape_x[axis] = 0
    if shape_dy != shape_x:
        raise ValueError(f"conv_wgrad: dy {tuple(dy.view.shape)} and x {tuple(x.view.shape)} differ off the channel axis")
    check_int32(dy.view, x.view)
    k = kernel_size
    p_axis, q_axis = PLANE_AXES[axis]
    r_is_p = int(abs(dy.view.stride(p_axis)) > abs(dy.view.stride(q_axis)))
    r_axis, s_axis = (p_axis, q_axis) if r_is_p else (q_axis, p_axis)
    B, R, S = dy.view.shape[0], dy.view.shape[r_axis], dy.view.shape[s_axis]
    M = B * R * S
    ds_ = _position_strides(dy.view, axis, r_axis, s_axis)[:3]
    xs = _position_strides(x.view, axis, r_axis, s_axis)[:3]
    ieee = x.view.dtype == torch.float32 and not torch.backends.cudnn.allow_tf32
    device = x.view.device
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
    result = {}
    dense = (_dense_nchw(dy), _dense_nchw(x)) if device.type == "cuda" else (None, None)

    def launch(cfg: TileConfig | str) -> None:
        if cfg in (CUDNN, CUDNN_NCHW):
            result["dw"] = _wgrad_cudnn(dy, x, k, (p_axis, q_axis), dense, nchw=cfg == CUDNN_NCHW)
            return
        # Allocated only for a Triton candidate: the last mixing convolution's fp32 gradient is GBs.
        if "buffer" not in result:
            result["buffer"] = torch.empty(k * k, c_in, c_out, dtype=torch.float32, device=device)
        dw = result["buffer"]
        tiles = k * k * triton.cdiv(c_out, cfg.block_m) * triton.cdiv(c_in, cfg.block_n)
        # Split the positions until there are ~4 programs per SM, keeping >= 32 K steps per program.
        max_split = max(1, M // (32 * cfg.block_k))
        split = max(1, min(max_split, triton.cdiv(4 * sms, tiles)))
        k_split = cfg.block_k * triton.cdiv(triton.cdiv(M, split), cfg.block_k)
        split = triton.cdiv(M, k_split)
        if split > 1:
            dw.zero_()
        _wgrad_kernel[(tiles, split)](
            dy.view, x.view, dw, M, R, S, c_out, c_in, dy.padded, x.padded, k_split, *ds_, *xs, r_is_p,
            KSIZE=k, ATOMIC=split > 1, IEEE=ieee,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )  # fmt: skip
        result["dw"] = dw.view(k, k, c_in, c_out).permute(3, 2, 0, 1)

    candidates = tile_candidates(c_out, c_in, 64 if not interpreted() else 16)
    cudnn_ok = (device.type == "cuda" and torch.backends.cudnn.is_available() and x.view.dtype != torch.float32
                and None not in dense)  # fmt: skip
    if cudnn_ok:
        candidates += [CUDNN, CUDNN_NCHW]
    key = ("wgrad", axis, B, R, S, c_in, c_out, k, x.view.dtype)
    launch(pick(key, candidates, launch))
    return result["dw"]
