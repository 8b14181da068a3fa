"""Export: generator tokens → a PEFT adapter folder that `PeftModel.from_pretrained` loads as is.

The folder holds ``adapter_config.json`` (written by peft's own LoraConfig), ``adapter_model.safetensors``
(exact PEFT keys, chosen dtype) and ``provenance.json`` (what made it: generator and prompt hashes,
layout fingerprint). The folder is built in a staging folder and swapped into place (`atomic_folder`),
so a reader never sees half an adapter; it is as readable as any file the user writes (the umask), and an
existing folder is replaced only when asked (`overwrite=True`, `dnd generate --overwrite`).

`check_vllm_contract` checks a folder against the LoRA format vLLM's adapter loader takes (config
fields and tensor names only; it does not run vLLM) and says which `max_lora_rank` serves it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import Tensor

from dnd_scale.io import (
    atomic_folder,
    read_json,
    safetensors_keys,
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
    with atomic_folder(out_dir, "dnd generate") as staging:
        config = layout.to_peft_config(base_model_name_or_path=base_model)
        config.save_pretrained(str(staging))
        write_weights(staging / ADAPTER_WEIGHTS)
        write_json(staging / PROVENANCE, {
            "layout_fingerprint": layout.fingerprint(),
            "dtype": str(dtype).removeprefix("torch."),
            "base_model": base_model,
            **(provenance or {}),
        })
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


# ----------------------------------------------------------------------------------------------------
# vLLM's LoRA contract

# vLLM's `max_lora_rank` choice list (the values its engine argument accepts). An adapter of rank r is
# served by any max_lora_rank >= r, so a rank between two of them (say 12) is served by the next larger
# one (16); a rank above 512 cannot be served at all.
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# The only tensors vLLM loads from a LoRA adapter: a lora_A and a lora_B weight per adapted module.
_VLLM_KEY = re.compile(r"base_model\.model\.(?P<module>.+)\.lora_(?P<kind>[AB])\.weight")
# What other PEFT tensors are, for the message about a key vLLM would not load.
_FOREIGN_KEYS = (
    ("lora_magnitude_vector", "a DoRA magnitude vector"),
    ("lora_embedding_", "an embedding LoRA (lora_embedding_A/B)"),
    ("modules_to_save", "a fully trained module copy (modules_to_save)"),
    (".bias", "a bias (peft's lora_bias or bias != 'none')"),
)


class VllmContractError(ValueError):
    """An adapter folder breaks vLLM's LoRA contract; the message lists every breach and what to do."""


def vllm_max_lora_rank(rank: int) -> int:
    """The smallest of vLLM's `max_lora_rank` choices that serves an adapter of rank `rank`."""
    for allowed in VLLM_MAX_LORA_RANKS:
        if rank <= allowed:
            return allowed
    raise VllmContractError(f"LoRA rank {rank} is above {VLLM_MAX_LORA_RANKS[-1]}, the largest max_lora_rank vLLM "
                            f"offers ({', '.join(map(str, VLLM_MAX_LORA_RANKS))}); train with a smaller rank")


def check_vllm_contract(folder: str | os.PathLike) -> int:
    """Check an adapter folder against vLLM's LoRA contract; the `max_lora_rank` vLLM must be started with.

    Reads adapter_config.json and the tensor names of adapter_model.safetensors (no tensor data), and
    checks: `r`, `lora_alpha` and `target_modules` are set, `r` <= 512; a plain LoRA (peft_type LORA, no
    DoRA, bias "none", no modules_to_save, one rank and alpha for every module, no peft
    target_parameters, i.e. no routed-expert LoRA, whose vLLM support this check does not vouch for);
    every tensor a `base_model.model.<module>.lora_A.weight` or `.lora_B.weight`, each module with both.
    This is the format only: no vLLM runs here. Raises VllmContractError listing every breach.
    """
    folder = Path(folder)
    config = read_json(folder / ADAPTER_CONFIG, "adapter config")
    keys = safetensors_keys(folder / ADAPTER_WEIGHTS, "adapter weights")
    if not isinstance(config, dict):
        raise VllmContractError(f"{folder / ADAPTER_CONFIG} holds a {type(config).__name__}, not a JSON object")
    problems = [f"{ADAPTER_CONFIG} has no {field!r}" for field in ("r", "lora_alpha", "target_modules")
                if config.get(field) is None]  # fmt: skip
    if config.get("peft_type", "LORA") != "LORA":
        problems.append(f"peft_type is {config['peft_type']!r}; vLLM loads LORA adapters only")
    if config.get("use_dora"):
        problems.append("use_dora is true; vLLM does not serve DoRA adapters")
    if config.get("bias", "none") != "none":
        problems.append(f"bias is {config['bias']!r}; vLLM takes bias \"none\" only")
    if config.get("modules_to_save"):
        problems.append(f"modules_to_save is {config['modules_to_save']}; vLLM loads the LoRA matrices only")
    for pattern in ("rank_pattern", "alpha_pattern"):
        if config.get(pattern):
            problems.append(f"{pattern} is set; vLLM scales every module by the one lora_alpha / r")
    if config.get("target_parameters"):
        problems.append("target_parameters is set (routed-expert LoRAs); this check does not vouch for vLLM serving "
                        "them: serve an adapter of the attention and dense modules only")
    rank = config.get("r")
    if isinstance(rank, int) and rank > VLLM_MAX_LORA_RANKS[-1]:
        problems.append(f"r = {rank} is above {VLLM_MAX_LORA_RANKS[-1]}, the largest max_lora_rank vLLM offers")
    elif rank is not None and (not isinstance(rank, int) or rank < 1):
        problems.append(f"r = {rank!r} is not a positive integer")
    kinds: dict[str, set[str]] = {}
    for key in keys:
        match = _VLLM_KEY.fullmatch(key)
        if match is None:
            what = next((name for marker, name in _FOREIGN_KEYS if marker in key), "not a LoRA matrix")
            problems.append(f"tensor {key!r} is {what}; vLLM loads only base_model.model.<module>.lora_A.weight "
                            "and .lora_B.weight")  # fmt: skip
        else:
            kinds.setdefault(match["module"], set()).add(match["kind"])
    for module, found in kinds.items():
        if len(found) == 1:
            (have,) = found
            problems.append(f"module {module} has a lora_{have} but no lora_{'B' if have == 'A' else 'A'} tensor")
    if not keys:
        problems.append(f"{ADAPTER_WEIGHTS} holds no tensors")
    if problems:
        raise VllmContractError(f"adapter {folder} is not a LoRA adapter vLLM loads: " + "; ".join(problems)
                                + ". Serve it with peft, or write it as a plain LoRA (as dnd generate does)")
    return vllm_max_lora_rank(rank)
