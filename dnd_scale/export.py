"""Export: generator tokens → a PEFT adapter folder that `PeftModel.from_pretrained` loads as is.

The folder holds ``adapter_config.json`` (written by peft's own LoraConfig), ``adapter_model.safetensors``
(exact PEFT keys, chosen dtype) and ``provenance.json`` (what made it: generator and prompt hashes,
layout fingerprint). The folder is assembled under a temporary name and renamed into place, so a
reader never sees half an adapter; it is as readable as any file the user writes (the umask), and an
existing folder is replaced only when asked (`overwrite=True`, `dnd generate --overwrite`).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import Tensor

from dnd_scale.io import (
    _UMASK,
    building,
    remove_stale_staging,
    reporting_full_disk,
    save_flat_safetensors,
    save_safetensors,
    write_json,
)
from dnd_scale.layout import LayoutError, LoraLayout
from dnd_scale.tokenizer import WeightTokenizer

ADAPTER_WEIGHTS = "adapter_model.safetensors"
_METADATA = {"format": "pt"}  # what peft's own save_pretrained records
ADAPTER_CONFIG = "adapter_config.json"
PROVENANCE = "provenance.json"

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise ValueError(f"unknown adapter dtype {name!r}; choose one of {sorted(DTYPES)}")
    return DTYPES[name]


def refuse_existing(out_dir: str | os.PathLike, overwrite: bool) -> None:
    """An existing adapter folder is replaced only with `overwrite`; otherwise say how to proceed."""
    if not overwrite and os.path.lexists(out_dir):
        raise FileExistsError(
            f"{out_dir} already exists; nothing was written. Choose another output folder, or replace it "
            "with `dnd generate --overwrite` (overwrite=True from Python)"
        )


def _write_folder(
    layout: LoraLayout,
    out_dir: str | os.PathLike,
    write_weights: Callable[[Path], None],
    dtype: torch.dtype,
    base_model: str | None,
    provenance: Mapping[str, Any] | None,
    overwrite: bool,
) -> Path:
    """Assemble an adapter folder under a temporary name (config, weights via `write_weights`,
    provenance) and rename it into place (replacing an existing one only with `overwrite`)."""
    out_dir = Path(out_dir)
    refuse_existing(out_dir, overwrite)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(out_dir.parent, [f".{out_dir.name}.*"])  # this adapter's, left by a killed run
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        os.chmod(staging, 0o777 & ~_UMASK)  # mkdtemp makes 0700; others and servers must read adapters
        with building(staging), reporting_full_disk(out_dir):
            config = layout.to_peft_config(base_model_name_or_path=base_model)
            config.save_pretrained(str(staging))
            write_weights(staging / ADAPTER_WEIGHTS)
            write_json(staging / PROVENANCE, {
                "layout_fingerprint": layout.fingerprint(),
                "dtype": str(dtype).removeprefix("torch."),
                "base_model": base_model,
                **(provenance or {}),
            })
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(staging, out_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return out_dir


def write_adapter(
    state_dict: Mapping[str, Tensor],
    layout: LoraLayout,
    out_dir: str | os.PathLike,
    *,
    dtype: torch.dtype | str = torch.float32,
    base_model: str | None = None,
    provenance: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a PEFT adapter folder from a LoRA state dict with PEFT keys (validated against the layout)."""
    dtype = parse_dtype(dtype)
    layout.check_state_dict(state_dict, "adapter")
    tensors = {m.key: state_dict[m.key].to(dtype) for m in layout.matrices}
    return _write_folder(layout, out_dir, lambda path: save_safetensors(tensors, path, metadata=_METADATA),
                         dtype, base_model, provenance, overwrite)  # fmt: skip


def export_tokens(
    tokens: Tensor,
    tokenizer: WeightTokenizer,
    out_dir: str | os.PathLike,
    *,
    dtype: torch.dtype | str = torch.float32,
    base_model: str | None = None,
    provenance: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    impl: str = "auto",
) -> Path:
    """Generator output tokens (T, r+2, c+2) → detokenize on the tokens' device (`impl` as in
    ``WeightTokenizer.detokenize_flat``: "auto" runs the Triton kernel on a GPU) → PEFT adapter folder
    (``write_flat_adapter``)."""
    dtype = parse_dtype(dtype)
    flat = tokenizer.detokenize_flat(tokens.detach().float(), dtype=dtype, impl=impl)
    return write_flat_adapter(flat, tokenizer, out_dir, base_model=base_model, provenance=provenance,
                              overwrite=overwrite)


def write_flat_adapter(
    flat: Tensor,
    tokenizer: WeightTokenizer,
    out_dir: str | os.PathLike,
    *,
    base_model: str | None = None,
    provenance: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """A detokenized flat buffer (``WeightTokenizer.detokenize_flat``, any device) → PEFT adapter folder
    in the buffer's dtype. The buffer already is the adapter's tensors back to back in layout order,
    so it crosses to the host in one copy and becomes the safetensors file's data as it is."""
    if flat.shape != (tokenizer.flat_numel,):
        raise LayoutError(f"flat buffer of shape {tuple(flat.shape)} does not fit this layout ({tokenizer.flat_numel},)")
    if flat.device.type == "cuda":
        # Page-locked staging (cached by torch's host allocator across calls): the copy runs at the
        # link's speed, and the finiteness check waits on the same sync as the copy.
        host = torch.empty(flat.shape, dtype=flat.dtype, pin_memory=True)
        host.copy_(flat, non_blocking=True)
        finite = torch.isfinite(flat).all()
    else:
        host, finite = flat.cpu().contiguous(), torch.isfinite(flat).all()
    if not bool(finite):
        raise LayoutError("the detokenized adapter contains NaN/Inf (a statistics code out of range); "
                          "the generator output is unusable (check its training)")  # fmt: skip
    entries = tokenizer.flat_entries()
    return _write_folder(
        tokenizer.layout, out_dir, lambda path: save_flat_safetensors(host, entries, path, metadata=_METADATA),
        flat.dtype, base_model, {**(provenance or {}), "tokenizer": tokenizer.state_dict_config()}, overwrite,
    )  # fmt: skip
