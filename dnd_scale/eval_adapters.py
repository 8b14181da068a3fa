"""The adapters `dnd eval` scores: which paths are adapters, the checks that they fit the base model,
and applying them to it.

Adapters are PEFT folders (`adapter_config.json` + `adapter_model.safetensors`, optionally
`provenance.json`) or `dnd collect` checkpoints (`<run>/checkpoints/<task>/<step>.safetensors`, whose
layout is `<run>/checkpoints/layout.json`); a PEFT folder's LoRA spec is read from its config and
its tensor keys (MoE models: attention, shared-expert projections and the routed experts' fused
parameters, which peft adapts through `target_parameters`). Each adapter is applied to the one
loaded base model with `PeftModel.from_pretrained` and removed again with `unload()`. Before any
scoring, every adapter's layout (keys, shapes, and the fingerprint in provenance.json) is checked
against the layout the base model gives for that adapter's LoRA spec, and the base model it was made
for (its family and a sample of its weights, `basemodel.base_identity`, which collect records in
collect.json and generate copies into provenance.json) against this base model: an adapter of
another seed or family of the same shapes is refused unless `allow_other_base` (`--allow-other-base`).
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch

from dnd_scale.basemodel import identity_mismatch
from dnd_scale.export import ADAPTER_CONFIG, ADAPTER_WEIGHTS, PROVENANCE, write_adapter
from dnd_scale.io import load_safetensors, read_json
from dnd_scale.layout import EXPERT_PARAMETERS, LayoutError, LoraLayout, LoraSpec
from dnd_scale.store import LAYOUT, check_collected_hash, collected_base, store_of_checkpoint

logger = logging.getLogger(__name__)

# PEFT keys of a decoder layer's LoRA tensors (...<layers>.<i>.<path>.lora_<A|B>.weight), as peft
# writes them for the layouts LoraLayout makes: an adapted linear module, self_attn.<name> or
# mlp.<name> (Qwen2-MoE's shared expert: mlp.shared_expert.<name>); and the routed experts' 3-D
# parameters, which peft adapts on their module, mlp.experts (gate_up_proj one `base_layer.` deeper
# when down_proj is adapted too, LoraLayout.from_config). Which parameter an expert key holds only
# the config's target_parameters say.
_LINEAR_KEY = re.compile(r"\.(\d+)\.(?:self_attn|mlp)\.((?:shared_expert\.)?\w+)\.lora_[AB]\.weight$")
_EXPERTS_KEY = re.compile(r"\.(\d+)\.mlp\.experts\.(?:base_layer\.)?lora_[AB]\.weight$")


@dataclass(frozen=True)
class CheckedAdapter:
    """An adapter that fits the base model."""

    path: Path
    """A PEFT folder, or a `dnd collect` checkpoint (.safetensors)."""
    layout: LoraLayout
    """Its layout on the base model."""
    provenance: dict[str, Any] | None
    """provenance.json of a generated adapter (None when absent)."""


def _spec_from_peft(path: Path, adapter_config: Mapping[str, Any], keys: Sequence[str]) -> LoraSpec:
    """The LoraSpec an adapter was made with, from its adapter_config.json and its tensor keys."""
    if adapter_config.get("peft_type", "LORA") != "LORA":
        raise LayoutError(f"adapter {path} is a {adapter_config['peft_type']} adapter; dnd eval applies LoRA adapters")
    experts = [_EXPERTS_KEY.search(key) for key in keys]
    linear = [None if e else _LINEAR_KEY.search(key) for key, e in zip(keys, experts)]
    foreign = [key for key, e, m in zip(keys, experts, linear) if e is None and m is None]
    if foreign:
        raise LayoutError(
            f"adapter {path} has tensors outside the decoder layers' linear modules and routed experts, e.g. "
            f"{foreign[:3]}; dnd eval checks adapters against a LoRA layout of attention and MLP projections "
            "(MoE: shared-expert projections, routed experts' gate_up_proj/down_proj)"
        )
    names = [m.group(2) for m in linear if m]
    if any(experts):
        names += _expert_parameters(path, adapter_config)
    try:
        return LoraSpec(
            rank=int(adapter_config["r"]),
            alpha=float(adapter_config.get("lora_alpha", adapter_config["r"])),
            target_modules=tuple(dict.fromkeys(names)),
            layers=tuple(sorted({int(m.group(1)) for m in experts + linear if m})),
            use_rslora=bool(adapter_config.get("use_rslora", False)),
        )
    except KeyError as missing:
        raise LayoutError(
            f"adapter {path}: {ADAPTER_CONFIG} has no {missing} field; it is not a PEFT LoRA config"
        ) from None
    except LayoutError as error:
        raise LayoutError(f"adapter {path}: {error}") from None


def _expert_parameters(path: Path, adapter_config: Mapping[str, Any]) -> list[str]:
    """The routed-expert parameters (EXPERT_PARAMETERS) an adapter adapts: its config's
    target_parameters, e.g. model.layers.1.mlp.experts.down_proj."""
    targets = adapter_config.get("target_parameters") or []
    names = [next((n for n in EXPERT_PARAMETERS if t == n or t.endswith(f".{n}")), None) for t in targets]
    if not names or None in names:
        raise LayoutError(
            f"adapter {path} has LoRA tensors of routed experts (mlp.experts) but its {ADAPTER_CONFIG} "
            f"target_parameters {targets} do not name them as {EXPERT_PARAMETERS} (or paths ending so); "
            "make the adapter with the peft config of its LoRA layout (LoraLayout.to_peft_config)"
        )
    return names


def check_adapter(
    path: str | os.PathLike, base_config: Any, base: dict[str, Any] | None = None, allow_other_base: bool = False
) -> CheckedAdapter:
    """Check that an adapter fits the base model: keys, shapes and finite values against the layout the
    base model gives for the adapter's LoRA spec, and the layout fingerprint its provenance.json records
    (a collect checkpoint: the layout of its run, and the sha256 of its manifest line). With `base`
    (the base model's `basemodel.base_identity`), also that the adapter was made for this very base
    model, not another of the same shapes, when its provenance.json (or its run's collect.json)
    records one; `allow_other_base` turns a mismatch into a warning.

    Raises LayoutError (what differs, what to do) or ArtifactError (missing / unreadable files).
    """
    path = Path(path)
    if path.is_file() and path.suffix == ".safetensors":
        layout_path = store_of_checkpoint(path) / LAYOUT
        if not layout_path.is_file():
            raise FileNotFoundError(
                f"adapter {path} is a .safetensors file but {layout_path} does not exist; a checkpoint file must "
                "sit in <run>/checkpoints/<task>/ as `dnd collect` writes it, otherwise pass a PEFT adapter folder"
            )
        collected = LoraLayout.load(layout_path)
        spec, recorded, provenance = collected.spec, collected.fingerprint(), None
        check_collected_hash(path)
        made_for = collected_base(store_of_checkpoint(path)).get("base_identity")
        state = load_safetensors(path, "checkpoint")
    elif path.is_dir():
        if not (path / ADAPTER_WEIGHTS).is_file():
            found = sorted(p.name for p in path.iterdir())
            raise FileNotFoundError(
                f"adapter folder {path} has no {ADAPTER_WEIGHTS} (found {found[:8]}); dnd eval reads safetensors "
                "adapters only: re-save the adapter with peft's save_pretrained(safe_serialization=True)"
            )
        state = load_safetensors(path / ADAPTER_WEIGHTS, "adapter weights")
        spec = _spec_from_peft(path, read_json(path / ADAPTER_CONFIG, "adapter config"), list(state))
        provenance = read_json(path / PROVENANCE, "provenance") if (path / PROVENANCE).is_file() else None
        recorded = (provenance or {}).get("layout_fingerprint")
        made_for = (provenance or {}).get("base_identity")
    else:
        raise FileNotFoundError(
            f"adapter {path} not found; expected a PEFT adapter folder or a `dnd collect` checkpoint .safetensors"
        )
    try:
        layout = LoraLayout.from_config(base_config, spec)
    except LayoutError as error:
        raise LayoutError(f"adapter {path} does not fit the base model: {error}") from None
    layout.check_state_dict(state, f"adapter {path}")
    if recorded is not None and recorded != layout.fingerprint():
        raise LayoutError(
            f"adapter {path} was made for LoRA layout {recorded[:12]}, but the base model with this adapter's LoRA "
            f"spec has layout {layout.fingerprint()[:12]}: the adapter belongs to another base model. Evaluate it "
            f"with the base model it was made for (provenance base_model: {(provenance or {}).get('base_model')!r})"
        )
    if base is not None and made_for is not None:
        _check_base_identity(path, made_for, base, allow_other_base, (provenance or {}).get("base_model"))
    return CheckedAdapter(path, layout, provenance)


def _check_base_identity(path: Path, made_for: dict, base: dict, allow_other_base: bool, named: str | None) -> None:
    """Refuse (or, allowed, warn about) an adapter made for another base model of the same shapes."""
    reason = identity_mismatch(made_for, base)
    if reason is None:
        if made_for.get("config_sha256") != base.get("config_sha256"):
            logger.warning("adapter %s: the base model's config differs from the one it was made for (same family "
                           "and weights; a transformers version may serialize it differently)", path)
        return
    message = f"adapter {path} was made for another base model of the same shapes: {reason}"
    if allow_other_base:
        logger.warning("%s; scoring it anyway (allow_other_base)", message)
        return
    raise LayoutError(
        f"{message}. Evaluate it with the base model it was made for (provenance base_model: {named!r}; a "
        "collect run's own is <run>/base_model), or pass --allow-other-base to score it on this one anyway"
    )


@contextlib.contextmanager
def applied_adapter(model: torch.nn.Module, adapter: CheckedAdapter) -> Iterator[torch.nn.Module]:
    """The base model with the adapter applied (peft), restored to the bare base model on exit."""
    from peft import PeftModel

    with contextlib.ExitStack() as stack:
        folder = adapter.path
        if folder.is_file():
            # A collect checkpoint becomes a PEFT folder first, so that every adapter loads the one way.
            staging = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="dnd-eval-")))
            state = load_safetensors(folder, "checkpoint")
            folder = write_adapter(state, adapter.layout, staging / "adapter")
        peft_model = PeftModel.from_pretrained(model, str(folder), is_trainable=False)
        try:
            yield peft_model.eval()
        finally:
            # unload() takes the LoRA layers out again and returns the same, unchanged base model object.
            peft_model.unload()


def expand_adapter_paths(paths: Sequence[str]) -> list[str]:
    """Adapter paths as a shell would not give them: a quoted glob (`run/checkpoints/*/200.safetensors`)
    is expanded, sorted; a folder that is not itself an adapter stands for the adapter folders and
    `*.safetensors` checkpoints directly inside it (`out/adapters`, `run/checkpoints/<task>`). A glob
    or folder that yields nothing is an error, never an empty group."""
    expanded: list[str] = []
    for path in paths:
        matches = sorted(glob.glob(path)) if glob.has_magic(path) else [path]
        if not matches:
            raise ValueError(f"adapter glob {path!r} matches no file or folder")
        for match in matches:
            folder = Path(match)
            if folder.is_dir() and not (folder / ADAPTER_CONFIG).is_file():
                inside = sorted(str(p) for p in folder.iterdir()
                                if (p / ADAPTER_CONFIG).is_file() or (p.is_file() and p.suffix == ".safetensors"))
                if not inside:
                    raise ValueError(f"adapter folder {match!r} holds no adapter folders ({ADAPTER_CONFIG}) or "
                                     "*.safetensors checkpoints")
                expanded += inside
            else:
                expanded.append(match)
    return expanded
