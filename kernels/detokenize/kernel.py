"""Triton kernel of weight detokenization: generator tokens -> the flat PEFT buffer, one pass.

One program per token: average the border codes (even columns: mean · mean_scale, odd columns:
log(std) + std_shift), de-standardize the r × w interior, cast, and scatter it through the token
table (offset, row stride, column stride, width) straight into the preallocated flat buffer laid
out as the PEFT state dict; a lora_B chunk (row stride 1) is stored from the transposed tile so the
writes stay coalesced. Statistics in fp32 (the reference uses
fp64; the difference is ~1e-7 relative, far below the bf16/fp16 outputs' rounding).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .reference import check_token_shapes, table_facts


@triton.jit
def _detokenize_kernel(
    tok_ptr, table_ptr, out_ptr, mean_scale, std_shift,
    RANK: tl.constexpr, CHUNK: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
    BLOCK_B: tl.constexpr, ALIGN: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0)
    TW: tl.constexpr = CHUNK + 2
    tok = tok_ptr + t * (RANK + 2) * TW
    # Statistics from the border alone: rows r, r+1 (every column) and columns c, c+1 of rows 0..r-1.
    bc = tl.arange(0, BLOCK_B)  # BLOCK_B >= c + 2
    br = tl.arange(0, 2)
    brow = tl.load(tok + (RANK + br)[:, None] * TW + bc[None, :], mask=(bc < TW)[None, :], other=0.0).to(tl.float32)
    rows = tl.arange(0, BLOCK_R)  # BLOCK_R >= r
    bcol = tl.load(tok + rows[:, None] * TW + (CHUNK + br)[None, :], mask=(rows < RANK)[:, None], other=0.0).to(tl.float32)
    row_even = ((bc % 2 == 0) & (bc < TW))[None, :]
    row_odd = ((bc % 2 == 1) & (bc < TW))[None, :]
    col_even = ((CHUNK + br) % 2 == 0)[None, :] & (rows < RANK)[:, None]
    col_odd = ((CHUNK + br) % 2 == 1)[None, :] & (rows < RANK)[:, None]
    mean_code = tl.sum(tl.sum(tl.where(row_even, brow, 0.0), axis=1), axis=0)
    mean_code += tl.sum(tl.sum(tl.where(col_even, bcol, 0.0), axis=1), axis=0)
    std_code = tl.sum(tl.sum(tl.where(row_odd, brow, 0.0), axis=1), axis=0)
    std_code += tl.sum(tl.sum(tl.where(col_odd, bcol, 0.0), axis=1), axis=0)
    # Cell counts: each border row has ceil(TW/2) even and floor(TW/2) odd columns; of columns c and
    # c+1 one is even and one odd, r cells each.
    N_MEAN: tl.constexpr = 2 * ((TW + 1) // 2) + RANK
    N_STD: tl.constexpr = 2 * (TW // 2) + RANK
    mean = mean_code / N_MEAN / mean_scale
    std = tl.exp(std_code / N_STD - std_shift)

    # ALIGN divides every offset, lora_A row stride and width of the table (checked by the launcher):
    # with it the compiler proves that runs of ALIGN output elements are contiguous and aligned, and
    # stores them as vectors instead of one element at a time.
    offset = tl.multiple_of(tl.load(table_ptr + t * 4), ALIGN)
    row_stride = tl.load(table_ptr + t * 4 + 1)
    width = tl.multiple_of(tl.load(table_ptr + t * 4 + 3), ALIGN)
    cols = tl.arange(0, BLOCK_C)  # BLOCK_C >= c
    interior = (rows < RANK)[:, None] & (cols < width)[None, :]
    vals = tl.load(tok + rows[:, None] * TW + cols[None, :], mask=interior, other=0.0).to(tl.float32)
    vals = (vals * std + mean).to(out_ptr.dtype.element_ty)  # (BLOCK_R, BLOCK_C)
    if row_stride == 1:
        # A lora_B chunk (B^T rows are B's columns, column stride = RANK): write it transposed so
        # that each of B's rows (RANK contiguous values) is one store.
        dst = offset + cols[:, None] * RANK + rows[None, :]
        tl.store(out_ptr + dst, tl.trans(vals), mask=tl.trans(interior))
    else:
        row_stride = tl.multiple_of(row_stride, ALIGN)
        tl.store(out_ptr + offset + rows[:, None] * row_stride + cols[None, :], vals, mask=interior)


def detokenize_triton(
    tokens: Tensor,  # (T, r+2, c+2)
    table: Tensor,  # (T, 4) int64: offset, row stride, column stride, width
    numel: int,
    rank: int,
    chunk: int,
    mean_scale: float,
    std_shift: float,
    dtype: torch.dtype = torch.float32,
    out: Tensor | None = None,  # (numel,) preallocated flat buffer of `dtype`
    facts: tuple[int, int] | None = None,
) -> Tensor:  # (numel,)
    """Same result as ``reference.detokenize_reference`` (up to fp32 vs fp64 statistics).

    `facts` = ``table_facts(table, rank)``: computed here when not given (one device sync); a caller
    that detokenizes many times with one table computes it once.
    """
    check_token_shapes(tokens, table, rank, chunk)
    T = tokens.shape[0]
    if table.dtype != torch.int64 or table.device != tokens.device:
        raise ValueError(
            f"detokenize: the token table must be int64 on {tokens.device}, got {table.dtype} on {table.device}"
        )
    if not tokens.is_contiguous():
        raise ValueError("detokenize: tokens must be contiguous")
    # Every flat element is written by exactly one token (the tokenizer's table tiles the buffer),
    # so the buffer needs no zero fill; check the count so a foreign table cannot leave holes.
    covered, align = table_facts(table, rank) if facts is None else facts
    if covered != numel:
        raise ValueError(
            f"detokenize: the token table covers {covered} values but the flat buffer has {numel}; "
            "the table must come from the WeightTokenizer of this layout"
        )
    if out is None:
        out = torch.empty(numel, dtype=dtype, device=tokens.device)
    elif tuple(out.shape) != (numel,) or out.dtype != dtype or not out.is_contiguous() or out.device != tokens.device:
        raise ValueError(
            f"detokenize: out must be a contiguous ({numel},) {dtype} tensor on {tokens.device}, "
            f"got {tuple(out.shape)} {out.dtype} on {out.device}"
        )
    if T:
        _detokenize_kernel[(T,)](
            tokens, table, out, float(mean_scale), float(std_shift),
            RANK=rank, CHUNK=chunk, BLOCK_R=triton.next_power_of_2(rank), BLOCK_C=triton.next_power_of_2(chunk),
            BLOCK_B=triton.next_power_of_2(chunk + 2), ALIGN=align, num_warps=4 if rank * chunk <= 2048 else 8,
        )  # fmt: skip
    return out
