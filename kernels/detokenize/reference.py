"""Plain-PyTorch reference of weight detokenization: tokens → the flat PEFT buffer.

A token is an ``(r + 2, c + 2)`` tile (see ``dnd_scale.tokenizer``): rows ``0..r-1`` × columns
``0..w-1`` hold one standardized ``r × w`` chunk of ``lora_A`` (r × in) or of ``lora_B^T`` (r × out);
columns ``w..c-1`` are padding; the border (rows r, r+1 and columns c, c+1) encodes the chunk's
statistics: cells in even columns hold ``mean · mean_scale``, cells in odd columns ``log(std) +
std_shift``. Detokenizing averages each code over its border cells (the generator's outputs are noisy
there, the average is its best estimate), inverts it, de-standardizes, and scatters the chunk into
the flat buffer through the token table ``(offset, row stride, column stride, width)``.
"""

from __future__ import annotations

import torch
from torch import Tensor


def border_masks(rank: int, chunk: int, device: torch.device | None = None) -> tuple[Tensor, Tensor]:
    """Boolean (r+2, c+2) masks of the border cells carrying the mean code and the std code."""
    rows = torch.arange(rank + 2, device=device)[:, None]
    cols = torch.arange(chunk + 2, device=device)[None, :]
    border = (rows >= rank) | (cols >= chunk)
    even = cols % 2 == 0
    return border & even, border & ~even


def decode_statistics(
    tokens: Tensor, rank: int, chunk: int, mean_scale: float, std_shift: float
) -> tuple[Tensor, Tensor]:
    """(mean, std) per token, each (T,), in float64: averaged border codes, inverted."""
    mean_cells, std_cells = border_masks(rank, chunk, tokens.device)
    t = tokens.double()
    mean_code = t[:, mean_cells].mean(dim=1)
    std_code = t[:, std_cells].mean(dim=1)
    return mean_code / mean_scale, torch.exp(std_code - std_shift)


def detokenize_reference(
    tokens: Tensor,  # (T, r+2, c+2)
    table: Tensor,  # (T, 4) int64: offset, row stride, column stride, width
    numel: int,
    rank: int,
    chunk: int,
    mean_scale: float,
    std_shift: float,
    dtype: torch.dtype = torch.float32,
) -> Tensor:  # (numel,)
    T = tokens.shape[0]
    if tokens.shape[1:] != (rank + 2, chunk + 2) or table.shape != (T, 4):
        raise ValueError(
            f"detokenize expects tokens (T, {rank + 2}, {chunk + 2}) and table (T, 4); "
            f"got {tuple(tokens.shape)} and {tuple(table.shape)}"
        )
    mean, std = decode_statistics(tokens, rank, chunk, mean_scale, std_shift)
    values = tokens[:, :rank, :chunk].double() * std[:, None, None] + mean[:, None, None]  # (T, r, c)
    offset, row_stride, col_stride, width = table.unbind(dim=1)
    rows = torch.arange(rank, device=tokens.device)[None, :, None]
    cols = torch.arange(chunk, device=tokens.device)[None, None, :]
    index = offset[:, None, None] + rows * row_stride[:, None, None] + cols * col_stride[:, None, None]
    valid = (cols < width[:, None, None]).expand(T, rank, chunk)
    flat = torch.zeros(numel, dtype=dtype, device=tokens.device)
    flat[index[valid]] = values[valid].to(dtype)
    return flat
