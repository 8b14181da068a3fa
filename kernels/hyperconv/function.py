"""`hyperconv_stage`: the fused Triton hyper-convolution stage as an autograd function.

Same signature and math as ``reference.hyperconv_stage_reference``. The GEMM operands run in the
compute dtype: the autocast dtype when autocast is on for the input's device (bf16 in training),
else the input's dtype; accumulation, LayerNorm statistics and weight gradients are fp32, and every
gradient is returned in its input's dtype. The forward pass, with each tensor's layout (channel
axis innermost, see ``kernel``):

    x (B, N, H, W) ── LayerNorm ──> y_w [W inner]  ─ conv W→W' ─> a1 [H inner]  ─ conv H→H' ─> a2
                               └──> y_h [H inner]  ─ conv H→H' ─> b1 [W inner]  ─ conv W→W', epilogue
                                                     t = tanh(.), z = (a2 + t + bias)/3 ─> z [N inner]
    z ─ conv N→N', epilogue + mix_bias (+ x if residual) ─> out (B, N', H', W')

The backward pass mirrors it; the mixing convolution's data gradient splits into the two branches
in its epilogue (g/3 for branch A, g/3·(1 - t²) for branch B).
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import kernel as K
from .buffers import (
    _MAX_INT32, EPILOGUE_GATE, EPILOGUE_TANH_AVG, ChannelsLast, channel_pad, channels_last_copy, empty_channels_last,
)
from .layernorm import layer_norm_backward, layer_norm_channels_last
from .kernel import pack_forward_weights  # noqa: F401 - part of this module's API (generation)


def index_fits(batch: int, in_shape: tuple[int, int, int], out_shape: tuple[int, int, int], kernel_size: int) -> bool:
    """Whether one stage at this batch keeps every buffer within the kernels' 32-bit offsets (2**31 - 1
    elements): the packed convolution weights, (k², padded C_in, padded C_out) for the forward and the
    data gradients alike, and the activations, each counted with its largest padded axis (an upper
    bound). A stage past it must run elsewhere: the PyTorch reference splits its convolutions."""
    (n, h, w), (n2, h2, w2) = in_shape, out_shape
    taps = kernel_size * kernel_size
    weights = [taps * channel_pad(a) * channel_pad(b) for a, b in ((w, w2), (h, h2), (n, n2))]
    activations = [batch * max(channel_pad(a) * b * c, a * channel_pad(b) * c, a * b * channel_pad(c))
                   for a, b, c in ((n, h, w), (n, h, w2), (n, h2, w), (n, h2, w2), (n2, h2, w2))]  # fmt: skip
    return max(weights + activations) <= _MAX_INT32


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype of the GEMM operands for input `x`: the autocast dtype when autocast is on for its
    device, else its own dtype."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


def _check_shapes(x: Tensor, ln_weight, ln_bias, w_w1, w_h1, w_h2, w_w2, bias, mix_weight, mix_bias) -> None:
    if x.dim() != 4:
        raise ValueError(f"hyperconv_stage expects x of shape (B, N, H, W), got {tuple(x.shape)}")
    _, N, H, W = x.shape
    N2, _, k, _ = mix_weight.shape
    W2, H2 = w_w1.shape[0], w_h1.shape[0]
    expected = {
        "ln_weight": (ln_weight, (H, W)),
        "ln_bias": (ln_bias, (H, W)),
        "w_w1": (w_w1, (W2, W, k, k)),
        "w_h1": (w_h1, (H2, H, k, k)),
        "w_h2": (w_h2, (H2, H, k, k)),
        "w_w2": (w_w2, (W2, W, k, k)),
        "bias": (bias, (H2, W2)),
        "mix_weight": (mix_weight, (N2, N, k, k)),
        "mix_bias": (mix_bias, (N2,)),
    }
    for name, (t, shape) in expected.items():
        if tuple(t.shape) != shape:
            raise ValueError(
                f"hyperconv_stage: {name} must be {shape} for x of shape {tuple(x.shape)} and mixing weight "
                f"{tuple(mix_weight.shape)}, got {tuple(t.shape)}"
            )
        if t.device != x.device:
            raise ValueError(f"hyperconv_stage: {name} is on {t.device} but x is on {x.device}")
    if k % 2 != 1:
        raise ValueError(f"hyperconv kernel size must be odd for 'same' padding, got {k}")


class HyperConvStageFunction(torch.autograd.Function):
    """Forward and backward of one stage through the Triton kernels of ``kernel``."""

    @staticmethod
    def forward(ctx, x, ln_weight, ln_bias, w_w1, w_h1, w_h2, w_w2, bias, mix_weight, mix_bias, eps, packed):
        _check_shapes(x, ln_weight, ln_bias, w_w1, w_h1, w_h2, w_w2, bias, mix_weight, mix_bias)
        cdt = compute_dtype(x)
        if packed is None:
            packed = K.pack_forward_weights(w_w1, w_h1, w_h2, w_w2, mix_weight, cdt)
        elif len(packed) != 5 or any(p.dtype != cdt for p in packed):
            raise ValueError(
                f"hyperconv_stage: `packed` must be pack_forward_weights(...) of this stage's weights in {cdt}, "
                f"got {len(packed)} tensors of {sorted({str(p.dtype) for p in packed})}"
            )
        p_w1, p_h1, p_h2, p_w2, p_mix = packed
        B, N, H, W = x.shape
        N2, k = mix_weight.shape[0], mix_weight.shape[-1]
        W2, H2 = w_w1.shape[0], w_h1.shape[0]
        residual = (N2, H2, W2) == (N, H, W)
        x = x.contiguous()
        dev = x.device

        y_w, y_h, mean, rstd = layer_norm_channels_last(x, ln_weight, ln_bias, eps, cdt)
        # Branch A: W -> W' over (H, N), then H -> H' over (N, W').
        a1 = empty_channels_last((B, N, H, W2), 2, cdt, dev)
        K.channel_conv(y_w, p_w1, a1.view)
        a2 = empty_channels_last((B, N, H2, W2), 1, cdt, dev, zero_pad=False)  # z's layout
        K.channel_conv(a1, p_h1, a2.view)
        # Branch B: H -> H' over (N, W), then W -> W' over (H', N) with the tanh-average epilogue.
        b1 = empty_channels_last((B, N, H2, W), 3, cdt, dev)
        K.channel_conv(y_h, p_h2, b1.view)
        z = empty_channels_last((B, N, H2, W2), 1, cdt, dev)
        t = empty_channels_last((B, N, H2, W2), 1, cdt, dev, zero_pad=False)
        bias_b = bias.float().contiguous()[None, None].expand(B, N, H2, W2)
        K.channel_conv(
            b1, p_w2, z.view,
            epilogue=EPILOGUE_TANH_AVG, aux=a2.view, vec=bias_b, out2=t.view, scale=1.0 / 3.0,
        )  # fmt: skip
        # Mixing: N -> N' over (H', W'), + mix_bias (+ x).
        out_dtype = torch.promote_types(cdt, x.dtype) if residual else cdt
        out = torch.empty(B, N2, H2, W2, dtype=out_dtype, device=dev)
        mix_b = mix_bias.float().contiguous()[None, :, None, None].expand(B, N2, H2, W2)
        K.channel_conv(z, p_mix, out, vec=mix_b, aux=x if residual else None)

        ctx.save_for_backward(
            x, ln_weight, w_w1, w_h1, w_h2, w_w2, mix_weight, mean, rstd,
            y_w.view, y_h.view, a1.view, b1.view, t.view, z.view,
        )  # fmt: skip
        ctx.pads = (y_w.padded, y_h.padded, a1.padded, b1.padded, z.padded)
        ctx.cdt, ctx.residual, ctx.k = cdt, residual, k
        ctx.param_dtypes = tuple(p.dtype for p in (ln_weight, ln_bias, w_w1, w_h1, w_h2, w_w2, bias, mix_weight, mix_bias))
        return out

    @staticmethod
    def backward(ctx, dout):
        (x, ln_weight, w_w1, w_h1, w_h2, w_w2, mix_weight, mean, rstd,
         y_w, y_h, a1, b1, t, z) = ctx.saved_tensors  # fmt: skip
        p_yw, p_yh, p_a1, p_b1, p_z = ctx.pads
        y_w, y_h = ChannelsLast(y_w, 3, p_yw), ChannelsLast(y_h, 2, p_yh)
        a1, b1, z = ChannelsLast(a1, 2, p_a1), ChannelsLast(b1, 3, p_b1), ChannelsLast(z, 1, p_z)
        cdt, k = ctx.cdt, ctx.k
        B, N, H, W = x.shape
        _, N2, H2, W2 = dout.shape
        dev = x.device

        # Mixing conv: the upstream gradient is copied once into the N'-innermost layout.
        g_out = channels_last_copy(dout, 1, cdt)
        d_mix_bias = dout.sum(dim=(0, 2, 3), dtype=torch.float32)
        ga = empty_channels_last((B, N, H2, W2), 2, cdt, dev)  # branch A's dL/da2, H' inner
        gb = empty_channels_last((B, N, H2, W2), 3, cdt, dev)  # branch B's dL/d(pre-tanh), W' inner
        K.channel_conv(
            g_out, K.conv_weight(mix_weight, g_out.padded, cdt, data_grad=True), ga.view,
            epilogue=EPILOGUE_GATE, aux=t, out2=gb.view, scale=1.0 / 3.0,
        )  # fmt: skip
        d_mix_weight = K.conv_wgrad(g_out, z, k)
        d_bias = ga.view.sum(dim=(0, 1), dtype=torch.float32)  # dL/dbias = sum over (B, N) of dL/dz / 3

        # Branch A backward.
        da1 = empty_channels_last((B, N, H, W2), 3, cdt, dev)
        K.channel_conv(ga, K.conv_weight(w_h1, ga.padded, cdt, data_grad=True), da1.view)
        d_w_h1 = K.conv_wgrad(ga, a1, k)
        dy_a = torch.empty(B, N, H, W, dtype=cdt, device=dev)
        K.channel_conv(da1, K.conv_weight(w_w1, da1.padded, cdt, data_grad=True), dy_a)
        d_w_w1 = K.conv_wgrad(da1, y_w, k)
        # Branch B backward; its last data gradient adds branch A's: dy = dy_a + dy_b (fp32).
        db1 = empty_channels_last((B, N, H2, W), 2, cdt, dev)
        K.channel_conv(gb, K.conv_weight(w_w2, gb.padded, cdt, data_grad=True), db1.view)
        d_w_w2 = K.conv_wgrad(gb, b1, k)
        dy = torch.empty(B, N, H, W, dtype=torch.float32, device=dev)
        K.channel_conv(db1, K.conv_weight(w_h2, db1.padded, cdt, data_grad=True), dy, aux=dy_a)
        d_w_h2 = K.conv_wgrad(db1, y_h, k)

        dx, d_ln_weight, d_ln_bias = layer_norm_backward(
            dy, x, ln_weight, mean, rstd, dout.contiguous() if ctx.residual else None, need_dx=ctx.needs_input_grad[0]
        )
        grads = (d_ln_weight, d_ln_bias, d_w_w1, d_w_h1, d_w_h2, d_w_w2, d_bias, d_mix_weight, d_mix_bias)
        grads = tuple(g.to(dt).contiguous() for g, dt in zip(grads, ctx.param_dtypes))
        return (dx, *grads, None, None)


def hyperconv_stage(
    x: Tensor,  # (B, N, H, W)
    ln_weight: Tensor,  # (H, W)
    ln_bias: Tensor,  # (H, W)
    w_w1: Tensor,  # (W', W, k, k)  branch A, first
    w_h1: Tensor,  # (H', H, k, k)  branch A, second
    w_h2: Tensor,  # (H', H, k, k)  branch B, first
    w_w2: Tensor,  # (W', W, k, k)  branch B, second
    bias: Tensor,  # (H', W')
    mix_weight: Tensor,  # (N', N, k, k)
    mix_bias: Tensor,  # (N',)
    eps: float = 1e-5,
    packed: tuple[Tensor, ...] | None = None,
) -> Tensor:  # (B, N', H', W')
    """One hyper-convolution stage through the fused Triton kernels (autograd-capable).

    `packed`: the convolution weights already in the kernels' layout
    (``kernel.pack_forward_weights`` in the compute dtype), for callers that run one set of weights
    many times without changing them (generation); packed from the weights on every call otherwise.
    Gradients always flow to the weights themselves.
    """
    return HyperConvStageFunction.apply(
        x, ln_weight, ln_bias, w_w1, w_h1, w_h2, w_w2, bias, mix_weight, mix_bias, eps, packed
    )
