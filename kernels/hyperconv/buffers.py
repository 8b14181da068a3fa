"""Activations of the hyper-convolution kernels: the channels-last buffers every kernel reads and
writes (a logical (B, N, H, W) view whose channel axis is innermost and zero-padded), and the checks
their launchers share."""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
import triton
from torch import Tensor


# (p, q): the plane axes of a channel convolution, in the order in which conv2d sees them
# (reference._conv_channels): kernel index u runs along p, v along q.
PLANE_AXES = {1: (2, 3), 2: (1, 3), 3: (2, 1)}

EPILOGUE_STORE, EPILOGUE_TANH_AVG, EPILOGUE_GATE = 0, 1, 2
_MAX_INT32 = 2**31 - 1


def interpreted() -> bool:
    """True when Triton runs kernels on the CPU (TRITON_INTERPRET=1, read when kernels are defined)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def channel_pad(channels: int) -> int:
    """Stored length of a channel axis: 16 up to 16 channels, else a multiple of 32, so that every
    row of a GEMM tile is 32-byte aligned and the K loop runs unmasked blocks of 32 or 64 channels.
    (Multiples of 16 forced 16-channel K blocks for 200 and 300 channels, measured 35% slower than
    64-channel blocks on an H100 at the 0.5B preset's first stage; 32 costs at most 12% padding.)"""
    return 16 if channels <= 16 else 32 * triton.cdiv(channels, 32)


class ChannelsLast(NamedTuple):
    """An activation stored for a channel convolution along `axis`."""

    view: Tensor
    """Logical (B, N, H, W) view; stride 1 along `axis`; every other stride a multiple of `padded`."""
    axis: int
    """The channel axis (1 = N, 2 = H, 3 = W)."""
    padded: int
    """Stored length of the channel axis (``channel_pad``); the entries past ``view.shape[axis]`` are
    zero, because they enter the sums of the convolutions that read this tensor."""


def empty_channels_last(
    shape: tuple[int, int, int, int], axis: int, dtype: torch.dtype, device: torch.device, zero_pad: bool = True
) -> ChannelsLast:
    """Allocate a logical (B, N, H, W) tensor whose channel `axis` is innermost and padded.

    The other axes keep their logical order in memory. `zero_pad=False` for a tensor that no
    convolution reads (its padding is never looked at).
    """
    order = [a for a in range(4) if a != axis] + [axis]
    padded = channel_pad(shape[axis])
    storage = torch.empty([shape[a] for a in order[:3]] + [padded], dtype=dtype, device=device)
    if zero_pad and padded > shape[axis]:
        storage[..., shape[axis] :].zero_()
    inverse = [order.index(a) for a in range(4)]
    return ChannelsLast(storage[..., : shape[axis]].permute(inverse), axis, padded)


def channels_last_copy(x: Tensor, axis: int, dtype: torch.dtype) -> ChannelsLast:
    """`x` (B, N, H, W) copied into a ChannelsLast tensor (the stage boundary's upstream gradient
    arrives in whatever layout the next op produced; this is the one copy the backward pass makes)."""
    out = empty_channels_last(tuple(x.shape), axis, dtype, x.device)
    out.view.copy_(x)
    return out


def check_int32(*tensors: Tensor) -> None:
    for t in tensors:
        if t is not None and t.untyped_storage().nbytes() // max(t.element_size(), 1) > _MAX_INT32:
            raise ValueError(
                f"hyperconv kernels index with 32-bit offsets; a tensor of shape {tuple(t.shape)} has more "
                "than 2**31 elements: run the stage on a smaller batch (split it into chunks)"
            )
