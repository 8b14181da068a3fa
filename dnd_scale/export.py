"""Export: generator tokens → a PEFT adapter folder that `PeftModel.from_pretrained` loads as is.

The folder holds ``adapter_config.json`` (written by peft's own LoraConfig), ``adapter_model.safetensors``
(exact PEFT keys, chosen dtype) and ``provenance.json`` (what made it: generator and prompt hashes,
layout fingerprint). The folder is assembled under a temporary name and renamed into place, so a
reader never sees half an adapter.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor

from dnd_scale.io import save_safetensors, write_json
from dnd_scale.layout import LoraLayout
from dnd_scale.tokenizer import WeightTokenizer

ADAPTER_WEIGHTS = "adapter_model.safetensors"
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


def write_adapter(
    state_dict: Mapping[str, Tensor],
    layout: LoraLayout,
    out_dir: str | os.PathLike,
    *,
    dtype: torch.dtype | str = torch.float32,
    base_model: str | None = None,
    provenance: Mapping[str, Any] | None = None,
) -> Path:
    """Write a PEFT adapter folder from a LoRA state dict with PEFT keys (validated against the layout)."""
    dtype = parse_dtype(dtype)
    layout.check_state_dict(state_dict, "adapter")
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        config = layout.to_peft_config(base_model_name_or_path=base_model)
        config.save_pretrained(str(staging))
        tensors = {m.key: state_dict[m.key].to(dtype) for m in layout.matrices}
        save_safetensors(tensors, staging / ADAPTER_WEIGHTS, metadata={"format": "pt"})
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


def export_tokens(
    tokens: Tensor,
    tokenizer: WeightTokenizer,
    out_dir: str | os.PathLike,
    *,
    dtype: torch.dtype | str = torch.float32,
    base_model: str | None = None,
    provenance: Mapping[str, Any] | None = None,
) -> Path:
    """Generator output tokens (T, r+2, c+2) → detokenize → PEFT adapter folder."""
    flat = tokenizer.detokenize_flat(tokens.detach().float(), dtype=parse_dtype(dtype)).cpu()
    state_dict = tokenizer.unflatten(flat)
    return write_adapter(state_dict, tokenizer.layout, out_dir, dtype=dtype, base_model=base_model,
                         provenance={**(provenance or {}), "tokenizer": tokenizer.state_dict_config()})
