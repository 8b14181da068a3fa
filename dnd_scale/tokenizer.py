"""WeightTokenizer: a LoRA state dict ⇄ a stack of fixed-shape weight tokens (the DnD scheme).

Geometry is derived from the LoraLayout and the chunk width ``c`` alone. Every ``lora_A`` (r × in)
and every *transposed* ``lora_B`` (r × out) is cut along its long axis into ``r × c`` chunks (the last
chunk of a matrix may be narrower: the rest is padding). One chunk becomes one ``(r + 2, c + 2)``
token:

    ┌──────────── c ───────────┬──┬──┐
    │ standardized chunk │ pad │ m│ s│   rows 0..r-1
    ├────────────────────┴─────┼──┼──┤
    │ m s m s m s …            │ m│ s│   rows r, r+1: the border
    └──────────────────────────┴──┴──┘

The chunk is standardized by its own mean/std (computed in float64, stored as float32); the border
encodes them — even columns ``mean · mean_scale``, odd columns ``log(std) + std_shift`` — so the
generator predicts the statistics along with the values and a token alone detokenizes. For
Qwen2.5-0.5B, r = 8, all seven linear modules, c = 128 this gives the paper's 4296 tokens of 8 × 128
values, token shape (10, 130).

A routed-experts matrix (MoE, ``LoraMatrix.experts = E``) stacks E rank-r LoRAs on its rank axis;
each expert's r × n view is chunked on its own, expert after expert, so a token never mixes experts.
peft keeps lora_A expert-major (rows e·r … e·r + r - 1) but lora_B rank-major (column j·E + e), so an
expert's B^T chunk has row stride E and column stride r·E, which the fused detokenize kernel does not
write: such layouts detokenize through the PyTorch reference on every device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import torch
from torch import Tensor

from dnd_kernels.detokenize.function import detokenize
from dnd_kernels.detokenize.reference import border_masks, table_facts
from dnd_scale.layout import LayoutError, LoraLayout, LoraMatrix


@dataclass(frozen=True)
class TokenizerConfig:
    """Parameters of the weight-token scheme (saved with packed targets and generators)."""

    chunk: int = 128
    """Chunk width c: each token holds an r × c chunk; the token shape is (r + 2, c + 2)."""
    mean_scale: float = 8.0
    """Border code of a chunk mean: mean · mean_scale (chunk means are small; this lifts them)."""
    std_shift: float = 6.0
    """Border code of a chunk std: log(std) + std_shift (LoRA stds are ~1e-4..1e-1)."""


@dataclass(frozen=True)
class _Segment:
    """The tokens of one matrix: its view as r × n, cut into `count` chunks."""

    matrix: LoraMatrix
    first_token: int
    count: int
    width: int  # n: columns of the r × n view
    flat_offset: int  # offset of the matrix in the flat PEFT buffer
    expert: int = 0  # which of the matrix's E experts this segment holds (0 for a plain matrix)


class WeightTokenizer:
    """Tokenize / detokenize LoRA state dicts of one layout."""

    def __init__(self, layout: LoraLayout, config: TokenizerConfig | None = None, **overrides: float) -> None:
        config = config or TokenizerConfig()
        if overrides:
            config = TokenizerConfig(**{**config.__dict__, **overrides})
        if config.chunk < 1:
            raise LayoutError(f"token chunk width must be >= 1, got {config.chunk}")
        self.layout = layout
        self.config = config
        self.rank = layout.rank
        self.chunk = config.chunk
        segments, token, offset = [], 0, 0
        for matrix in layout.matrices:
            n = matrix.shape[1] if matrix.kind == "A" else matrix.shape[0]
            count = math.ceil(n / self.chunk)
            for expert in range(matrix.experts):
                segments.append(_Segment(matrix, token, count, n, offset, expert))
                token += count
            offset += matrix.numel
        # the fused kernel writes lora_A chunks and plain lora_B chunks (column stride r), not expert B's
        self._kernel_writes_all = not any(m.experts > 1 and m.kind == "B" for m in layout.matrices)
        self.segments: list[_Segment] = segments
        self.num_tokens = token
        self.flat_numel = offset
        self._mask: Tensor | None = None
        self._table: Tensor | None = None
        self._device_tables: dict[torch.device, tuple[Tensor, tuple[int, int]]] = {}

    @property
    def token_shape(self) -> tuple[int, int]:
        return (self.rank + 2, self.chunk + 2)

    # ---- geometry ----------------------------------------------------------------------------
    def token_table(self) -> Tensor:
        """(T, 4) int64: flat offset of chunk element [0, 0], row stride, column stride, valid width."""
        if self._table is None:
            rows = []
            r = self.rank
            for seg in self.segments:
                e, experts = seg.expert, seg.matrix.experts
                for j in range(seg.count):
                    start = j * self.chunk
                    width = min(self.chunk, seg.width - start)
                    if seg.matrix.kind == "A":  # A is (E·r, in), expert-major: chunk columns are contiguous
                        rows.append((seg.flat_offset + e * r * seg.width + start, seg.width, 1, width))
                    else:  # B is (out, r·E), rank-major: the view B^T walks rows of B
                        rows.append((seg.flat_offset + start * r * experts + e, experts, r * experts, width))
            self._table = torch.tensor(rows, dtype=torch.int64)
        return self._table

    def mask(self) -> Tensor:
        """(T, r+2, c+2) bool: True on every cell the generator must predict, False on padding."""
        if self._mask is None:
            width = self.token_table()[:, 3]
            cols = torch.arange(self.chunk + 2)
            padding = (cols[None, :] >= width[:, None]) & (cols[None, :] < self.chunk)  # (T, c+2)
            mask = torch.ones(self.num_tokens, *self.token_shape, dtype=torch.bool)
            mask[:, : self.rank, :] &= ~padding[:, None, :]
            self._mask = mask
        return self._mask

    # ---- forward -----------------------------------------------------------------------------
    def tokenize(
        self, state_dict: Mapping[str, Tensor], source: str = "state dict", device: str | torch.device = "cpu"
    ) -> tuple[Tensor, Tensor]:
        """A PEFT LoRA state dict → (tokens float32 (T, r+2, c+2), mask bool (T, r+2, c+2)), on the CPU.

        The arithmetic (float64) runs on `device`: a GPU does a 0.5B checkpoint's few thousand small
        operations in a fraction of the CPU's time; the result is the same up to float64 rounding.
        """
        self.layout.check_state_dict(state_dict, source)
        r, c = self.rank, self.chunk
        device = torch.device(device)
        mean_cells, std_cells = border_masks(r, c, device)
        out, w, key = [], None, None
        for seg in self.segments:
            if seg.matrix.key != key:  # an experts matrix has E consecutive segments: convert it once
                key = seg.matrix.key
                w = state_dict[key].detach().to(device, torch.float64)
            experts, e = seg.matrix.experts, seg.expert
            if seg.matrix.kind == "A":
                view = w.view(experts, r, -1)[e]  # (E·r, in) -> expert e's (r, in)
            else:
                view = w.view(-1, r, experts)[:, :, e].t()  # (out, r·E) -> expert e's (r, out)
            padded = torch.zeros(r, seg.count * c, dtype=torch.float64, device=device)
            padded[:, : seg.width] = view
            chunks = padded.view(r, seg.count, c).permute(1, 0, 2)  # (J, r, c)
            columns = torch.arange(c, device=w.device)
            starts = torch.arange(seg.count, device=w.device) * c
            valid = columns[None, :] < (seg.width - starts)[:, None]  # (J, c)
            valid = valid[:, None, :].expand_as(chunks)
            n_valid = valid.sum(dim=(1, 2)).to(torch.float64)  # (J,)
            mean = chunks.sum(dim=(1, 2)) / n_valid
            centered = (chunks - mean[:, None, None]) * valid
            std = torch.sqrt((centered**2).sum(dim=(1, 2)) / n_valid)
            # a constant chunk (e.g. lora_B at initialization) standardizes to zeros with std 1
            std = torch.where(std > 0, std, torch.ones_like(std))
            mean, std = mean.float().double(), std.float().double()  # statistics are stored in fp32
            tokens = torch.zeros(seg.count, r + 2, c + 2, dtype=torch.float64, device=w.device)
            tokens[:, :r, :c] = centered / std[:, None, None]
            tokens[:, mean_cells] = (mean * self.config.mean_scale)[:, None]
            tokens[:, std_cells] = (torch.log(std) + self.config.std_shift)[:, None]
            out.append(tokens.float())
        return torch.cat(out, dim=0).cpu(), self.mask().clone()

    def detokenize_flat(self, tokens: Tensor, dtype: torch.dtype = torch.float32, impl: str = "auto") -> Tensor:
        """Tokens (T, r+2, c+2) → the flat PEFT buffer (every tensor concatenated in layout order), on
        the tokens' device.

        `impl`: "auto" (the fused kernel writes the buffer in one pass on a GPU, the PyTorch reference
        elsewhere), "torch" (always the reference) or "triton" (always the kernel). A layout whose
        routed-expert lora_B the kernel cannot write detokenizes through the reference whatever `impl`.
        """
        self._check_tokens(tokens)
        table, facts = self._table_on(tokens.device)
        return detokenize(
            tokens.contiguous(), table, self.flat_numel, self.rank, self.chunk,
            self.config.mean_scale, self.config.std_shift, dtype, facts=facts,
            impl=impl if self._kernel_writes_all else "torch",
        )

    def _table_on(self, device: torch.device) -> tuple[Tensor, tuple[int, int] | None]:
        """The token table on `device` (copied there once) and its ``table_facts`` (read once, on the
        host; None where the reference detokenizes, which needs none)."""
        if device not in self._device_tables:
            facts = table_facts(self.token_table(), self.rank) if self._kernel_writes_all else None
            self._device_tables[device] = (self.token_table().to(device), facts)
        return self._device_tables[device]

    def flat_entries(self) -> list[tuple[str, tuple[int, int], int]]:
        """(PEFT key, shape, offset in the flat buffer) of every matrix, in layout order."""
        return [(seg.matrix.key, seg.matrix.shape, seg.flat_offset) for seg in self.segments if seg.expert == 0]

    def unflatten(self, flat: Tensor) -> dict[str, Tensor]:
        """Views of the flat buffer as the PEFT state dict (layout order)."""
        if flat.numel() != self.flat_numel:
            raise LayoutError(f"flat buffer has {flat.numel()} values, the layout needs {self.flat_numel}")
        return {
            key: flat[offset : offset + shape[0] * shape[1]].view(shape) for key, shape, offset in self.flat_entries()
        }

    def detokenize(self, tokens: Tensor, dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
        """Tokens (T, r+2, c+2) → PEFT state dict with exact key names, in ``dtype``."""
        return self.unflatten(self.detokenize_flat(tokens, dtype))

    def _check_tokens(self, tokens: Tensor) -> None:
        expected = (self.num_tokens, *self.token_shape)
        if tuple(tokens.shape) != expected:
            raise LayoutError(
                f"tokens of shape {tuple(tokens.shape)} do not fit this layout, which needs {expected} "
                f"(rank {self.rank}, chunk {self.chunk}); the generator was trained for another layout"
            )
        if not torch.isfinite(tokens).all():
            raise LayoutError("tokens contain NaN/Inf; the generator output is unusable (check its training)")

    def state_dict_config(self) -> dict:
        return {"chunk": self.chunk, "mean_scale": self.config.mean_scale, "std_shift": self.config.std_shift}


def criterion_weights(tokens: Tensor, mask: Tensor) -> Tensor:
    """Per-token loss weights from one task's checkpoints.

    tokens (K, T, H, W): the task's checkpoints tokenized. The per-element std across the K
    checkpoints says which values the trajectory moves; it is averaged over each token's valid cells
    and normalized to mean 1 over tokens. With one checkpoint (no spread) every weight is 1.
    """
    if tokens.dim() != 4 or tuple(tokens.shape[1:]) != tuple(mask.shape):
        raise LayoutError(f"criterion weights need tokens (K, T, H, W) and mask (T, H, W); got "
                          f"{tuple(tokens.shape)} and {tuple(mask.shape)}")
    K, T = tokens.shape[:2]
    if K < 2:
        return torch.ones(T)
    spread = tokens.double().std(dim=0, unbiased=False) * mask  # (T, H, W)
    per_token = spread.sum(dim=(1, 2)) / mask.sum(dim=(1, 2)).clamp(min=1)
    if per_token.mean() <= 0:
        return torch.ones(T)
    return (per_token / per_token.mean()).float()
