"""`detokenize`: tokens -> flat PEFT buffer through the Triton kernel on GPU, the reference elsewhere."""

from __future__ import annotations

import torch
from torch import Tensor

from .reference import detokenize_reference

IMPLS = ("auto", "torch", "triton")


def detokenize(
    tokens: Tensor,  # (T, r+2, c+2)
    table: Tensor,  # (T, 4) int64
    numel: int,
    rank: int,
    chunk: int,
    mean_scale: float,
    std_shift: float,
    dtype: torch.dtype = torch.float32,
    impl: str = "auto",
    out: Tensor | None = None,
    facts: tuple[int, int] | None = None,
) -> Tensor:  # (numel,)
    """Detokenize with `impl` ("auto": Triton when `tokens` is on CUDA, else the PyTorch reference).

    `out` (triton only) is a preallocated (numel,) buffer, e.g. the storage of an adapter's tensors;
    `facts` (triton only) = ``reference.table_facts(table, rank)``, computed per call when not given.
    """
    if impl not in IMPLS:
        raise ValueError(f"detokenize impl must be one of {IMPLS}, got {impl!r}")
    if impl == "torch" or (impl == "auto" and tokens.device.type != "cuda"):
        if out is not None:
            raise ValueError("detokenize: `out` is only supported by the Triton path (impl='triton' or a CUDA input)")
        return detokenize_reference(tokens, table, numel, rank, chunk, mean_scale, std_shift, dtype)
    from .kernel import detokenize_triton  # imported here: triton is optional on CPU-only installs

    return detokenize_triton(tokens, table.to(tokens.device), numel, rank, chunk, mean_scale, std_shift, dtype, out, facts)
