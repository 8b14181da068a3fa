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


def table_facts(table: Tensor, rank: int) -> tuple[int, int]:
    """(values the table covers, the largest of 16, 8, 4, 2, 1 that divides every offset, width and
    lora_A row stride of the table); a lora_B row must have column stride `rank`. One device sync."""
    offset, row_stride, col_stride, width = table.unbind(dim=1)
    is_b = row_stride == 1
    facts = [width.sum() * rank, torch.where(is_b, col_stride != rank, col_stride != 1).sum()]
    for a in (16, 8, 4, 2):
        facts.append(((offset % a) + (width % a) + torch.where(is_b, 0, row_stride % a)).sum())
    covered, bad_b, *misaligned = torch.stack(facts).tolist()
    if bad_b:
        raise ValueError(
            f"detokenize: {bad_b} rows of the token table have a column stride other than 1 (lora_A) or the "
            f"rank {rank} (lora_B); the table must come from the WeightTokenizer of this layout"
        )
    return covered, next((a for a, m in zip((16, 8, 4, 2), misaligned) if m == 0), 1)


def check_token_shapes(tokens: Tensor, table: Tensor, rank: int, chunk: int) -> None:
    """Tokens (T, r+2, c+2) and a token table (T, 4), or a ValueError that says which shapes came."""
    T = tokens.shape[0] if tokens.dim() else 0
    if tokens.dim() != 3 or tuple(tokens.shape[1:]) != (rank + 2, chunk + 2) or tuple(table.shape) != (T, 4):
        raise ValueError(
            f"detokenize expects tokens (T, {rank + 2}, {chunk + 2}) and table (T, 4); "
            f"got {tuple(tokens.shape)} and {tuple(table.shape)}"
        )


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
    check_token_shapes(tokens, table, rank, chunk)
    T = tokens.shape[0]
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
