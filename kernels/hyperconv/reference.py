"""Plain-PyTorch reference of one hyper-convolution stage (the math the Triton path must match).

A stage maps a feature map ``x`` of shape ``(B, N, H, W)`` to ``(B, N', H', W')``:

1. LayerNorm over the last two axes ``(H, W)`` with an elementwise affine of shape ``(H, W)``.
2. Branch A ("width first"): a k×k convolution whose *channels* are the W axis (W → W'), sliding
   over the (H, N) plane; then a k×k convolution whose channels are the H axis (H → H'), sliding
   over the (N, W') plane.
3. Branch B ("height first"): the H-channel convolution (H → H') over the (N, W) plane, then the
   W-channel convolution (W → W') over the (H', N) plane, then tanh.
4. ``(A + B + bias) / 3`` with a learned ``bias`` of shape ``(H', W')``.
5. A k×k convolution whose channels are the N axis (N → N', with bias), over the (H', W') plane.
6. If the output shape equals the input shape, the stage is residual: ``x + stage(x)``.

The transposes below exist only to present each axis to ``conv2d`` as its channel axis; the fused
kernels index the axes directly instead of materializing these copies.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


INDEX_LIMIT = 2**31 - 1
"""Largest element count one convolution call gets for its weight and for its output. GPU
convolution kernels index with 32-bit integers: the Llama-70B generator's last mixing weight
(25280 x 2048 x 9 x 9, 4.19 G elements) ended its generation in an illegal memory access."""


def conv2d_same(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """k×k 'same' convolution, split over output channels where one call would pass `INDEX_LIMIT`
    elements of weight or output (the pieces' outputs are concatenated: the same result)."""
    k = weight.shape[-1]
    per_channel = max(weight[0].numel(), x.shape[0] * x.shape[2] * x.shape[3])
    step = max(1, INDEX_LIMIT // per_channel)
    if step >= weight.shape[0]:
        return F.conv2d(x, weight, bias, padding=k // 2)
    return torch.cat([F.conv2d(x, weight[i:i + step], None if bias is None else bias[i:i + step], padding=k // 2)
                      for i in range(0, weight.shape[0], step)], dim=1)


def _conv_channels(x: Tensor, weight: Tensor, channel_axis: int) -> Tensor:
    """k×k 'same' convolution of a (B, d1, d2, d3) tensor whose channel axis is ``channel_axis``.

    The two other axes form the convolved plane, kept in their original order.
    """
    perm = {1: (0, 1, 2, 3), 2: (0, 2, 1, 3), 3: (0, 3, 2, 1)}[channel_axis]
    y = conv2d_same(x.permute(perm), weight)
    return y.permute(perm)  # every permutation above is its own inverse


def hyperconv_stage_reference(
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
) -> Tensor:  # (B, N', H', W')
    """One hyper-convolution stage; residual when the output shape equals the input shape."""
    if x.dim() != 4:
        raise ValueError(f"hyperconv stage expects x of shape (B, N, H, W), got {tuple(x.shape)}")
    k = mix_weight.shape[-1]
    if k % 2 != 1:
        raise ValueError(f"hyperconv kernel size must be odd for 'same' padding, got {k}")
    B, N, H, W = x.shape
    y = F.layer_norm(x, (H, W), ln_weight, ln_bias, eps)
    a = _conv_channels(y, w_w1, channel_axis=3)  # (B, N, H, W')
    a = _conv_channels(a, w_h1, channel_axis=2)  # (B, N, H', W')
    b = _conv_channels(y, w_h2, channel_axis=2)  # (B, N, H', W)
    b = torch.tanh(_conv_channels(b, w_w2, channel_axis=3))  # (B, N, H', W')
    z = (a + b + bias) / 3
    out = conv2d_same(z, mix_weight, mix_bias)  # (B, N', H', W')
    return x + out if out.shape == x.shape else out
