"""Triton kernel of weight detokenization: generator tokens -> the flat PEFT buffer, one pass.

Each program takes a few consecutive tokens (`default_tokens_per_program`) and, per token, averages
the border codes (even columns: mean · mean_scale, odd columns: log(std) + std_shift),
de-standardizes the r × w interior, casts, and scatters it through the token table (offset, row
stride, column stride, width) straight into the preallocated flat buffer laid out as the PEFT state
dict; a lora_B chunk (row stride 1) is stored from the transposed tile so the writes stay
coalesced. Statistics in fp32 (the reference uses fp64; the difference is ~1e-7 relative, far below
the bf16/fp16 outputs' rounding).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .reference import table_facts


@triton.jit
def _detokenize_kernel(
    tok_ptr, table_ptr, out_ptr, n_tokens, mean_scale, std_shift,
    RANK: tl.constexpr, CHUNK: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
    BLOCK_B: tl.constexpr, ALIGN: tl.constexpr, TOKENS: tl.constexpr,
):  # fmt: skip
    TW: tl.constexpr = CHUNK + 2
    t = tl.program_id(0) * TOKENS + tl.arange(0, TOKENS)
    live = t < n_tokens
    tok = (tok_ptr + t * (RANK + 2) * TW)[:, None, None]  # (TOKENS, 1, 1)
    rows = tl.arange(0, BLOCK_R)  # BLOCK_R >= r
    cols = tl.arange(0, BLOCK_C)  # BLOCK_C >= c
    # Every load of the program is issued before any arithmetic: the interior (padding columns
    # included: they are in the token, only the stores skip them) and the border do not depend on
    # each other or on the table, so their latencies overlap.
    in_tile = live[:, None, None] & ((rows < RANK)[:, None] & (cols < CHUNK)[None, :])[None, :, :]
    vals = tl.load(tok + rows[None, :, None] * TW + cols[None, None, :], mask=in_tile, other=0.0)
    # Statistics from the border alone: rows r, r+1 (every column) and columns c, c+1 of rows 0..r-1.
    bc = tl.arange(0, BLOCK_B)  # BLOCK_B >= c + 2
    br = tl.arange(0, 2)
    brow = tl.load(tok + (RANK + br)[None, :, None] * TW + bc[None, None, :],
                   mask=live[:, None, None] & (bc < TW)[None, None, :], other=0.0).to(tl.float32)  # fmt: skip
    bcol = tl.load(tok + rows[None, :, None] * TW + (CHUNK + br)[None, None, :],
                   mask=live[:, None, None] & (rows < RANK)[None, :, None], other=0.0).to(tl.float32)  # fmt: skip
    offset = tl.load(table_ptr + t * 4, mask=live, other=0)
    row_stride = tl.load(table_ptr + t * 4 + 1, mask=live, other=0)
    width = tl.load(table_ptr + t * 4 + 3, mask=live, other=0)

    row_even = ((bc % 2 == 0) & (bc < TW))[None, None, :]
    row_odd = ((bc % 2 == 1) & (bc < TW))[None, None, :]
    col_even = (((CHUNK + br) % 2 == 0)[None, :] & (rows < RANK)[:, None])[None, :, :]
    col_odd = (((CHUNK + br) % 2 == 1)[None, :] & (rows < RANK)[:, None])[None, :, :]
    mean_code = tl.sum(tl.sum(tl.where(row_even, brow, 0.0), axis=2), axis=1)
    mean_code += tl.sum(tl.sum(tl.where(col_even, bcol, 0.0), axis=2), axis=1)
    std_code = tl.sum(tl.sum(tl.where(row_odd, brow, 0.0), axis=2), axis=1)
    std_code += tl.sum(tl.sum(tl.where(col_odd, bcol, 0.0), axis=2), axis=1)
    # Cell counts: each border row has ceil(TW/2) even and floor(TW/2) odd columns; of columns c and
    # c+1 one is even and one odd, r cells each.
    N_MEAN: tl.constexpr = 2 * ((TW + 1) // 2) + RANK
    N_STD: tl.constexpr = 2 * (TW // 2) + RANK
    mean = (mean_code / N_MEAN / mean_scale)[:, None, None]
    std = tl.exp(std_code / N_STD - std_shift)[:, None, None]
    vals = (vals.to(tl.float32) * std + mean).to(out_ptr.dtype.element_ty)  # (TOKENS, BLOCK_R, BLOCK_C)

    # ALIGN divides every offset, lora_A row stride and width of the table (checked by the launcher):
    # with it the compiler proves that runs of ALIGN output elements are contiguous and aligned, and
    # stores them as vectors instead of one element at a time.
    offset = tl.multiple_of(offset, ALIGN)[:, None, None]
    width = tl.multiple_of(width, ALIGN)[:, None, None]
    is_b = row_stride == 1  # a lora_B chunk (column stride RANK); lora_A chunks have column stride 1
    stored = live[:, None, None] & (rows < RANK)[None, :, None] & (cols[None, None, :] < width)
    if tl.max((live & ~is_b).to(tl.int32), axis=0) > 0:
        # lora_A chunks: each row is a contiguous run of the flat buffer (row stride 0 for the
        # masked-off lora_B chunks keeps the alignment hint true).
        a_stride = tl.multiple_of(tl.where(is_b, 0, row_stride), ALIGN)[:, None, None]
        tl.store(out_ptr + offset + rows[None, :, None] * a_stride + cols[None, None, :], vals,
                 mask=stored & ~is_b[:, None, None])  # fmt: skip
    if tl.max((live & is_b).to(tl.int32), axis=0) > 0:
        # lora_B chunks (B^T rows are B's columns): written transposed, so that each of B's rows
        # (RANK contiguous values) is one store.
        tl.store(out_ptr + offset + cols[None, :, None] * RANK + rows[None, None, :], tl.permute(vals, (0, 2, 1)),
                 mask=tl.permute(stored & is_b[:, None, None], (0, 2, 1)))  # fmt: skip


def default_tokens_per_program(rank: int, chunk: int) -> int:
    """Tokens per program: enough for ~4096 values per program (small tokens are latency-bound, one
    program each left the 0.5B layout at half the copy bandwidth), one for large tokens."""
    per_token = triton.next_power_of_2(rank) * triton.next_power_of_2(chunk)
    return max(1, min(8, 4096 // per_token))


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
    tokens_per_program: int | None = None,
) -> Tensor:  # (numel,)
    """Same result as ``reference.detokenize_reference`` (up to fp32 vs fp64 statistics).

    `facts` = ``table_facts(table, rank)``: computed here when not given (one device sync); a caller
    that detokenizes many times with one table computes it once. `tokens_per_program` (a power of
    two; default ``default_tokens_per_program``) trades programs for work per program.
    """
    T = tokens.shape[0]
    if tokens.dim() != 3 or tuple(tokens.shape[1:]) != (rank + 2, chunk + 2) or tuple(table.shape) != (T, 4):
        raise ValueError(
            f"detokenize expects tokens (T, {rank + 2}, {chunk + 2}) and table (T, 4); "
            f"got {tuple(tokens.shape)} and {tuple(table.shape)}"
        )
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
    block_r, block_c = triton.next_power_of_2(rank), triton.next_power_of_2(chunk)
    if tokens_per_program is None:
        tokens_per_program = default_tokens_per_program(rank, chunk)
    if tokens_per_program < 1 or tokens_per_program & (tokens_per_program - 1):
        raise ValueError(f"detokenize: tokens_per_program must be a power of two >= 1, got {tokens_per_program}")
    if T:
        elements = tokens_per_program * block_r * block_c
        _detokenize_kernel[(triton.cdiv(T, tokens_per_program),)](
            tokens, table, out, T, float(mean_scale), float(std_shift),
            RANK=rank, CHUNK=chunk, BLOCK_R=block_r, BLOCK_C=block_c, BLOCK_B=triton.next_power_of_2(chunk + 2),
            ALIGN=align, TOKENS=tokens_per_program, num_warps=4 if elements <= 2048 else 8,
        )  # fmt: skip
    return out
