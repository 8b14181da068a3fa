"""LoraLayout: every LoRA matrix of a base model, with its exact PEFT key and shape.

Everything downstream (token geometry, generator shapes, the adapter export, `dnd plan`) is derived
from this one object, which is built from a model *config* alone — no weights are needed, so a 70B
target can be planned on a laptop.

PEFT's `save_pretrained` writes one pair per adapted linear layer ``W (out × in)``::

    base_model.model.<module>.lora_A.weight   (r, in)
    base_model.model.<module>.lora_B.weight   (out, r)

and the adapter's update is ``ΔW = scale · B @ A`` with ``scale = alpha / r`` (``alpha / sqrt(r)``
under rsLoRA).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
ALL_LINEAR = ATTENTION_MODULES + MLP_MODULES

# model_type -> module path of the decoder layers of the *language* model. Multimodal checkpoints
# keep their language tower under `model.language_model` (transformers >= 4.52 naming).
_LAYER_PREFIX = {
    "qwen2": "model.layers",
    "qwen3": "model.layers",
    "llama": "model.layers",
    "mistral": "model.layers",
    "gemma": "model.layers",
    "gemma2": "model.layers",
    "gemma3_text": "model.layers",
    "gemma3": "model.language_model.layers",
    "qwen2_5_vl": "model.language_model.layers",
}
# Multimodal configs nest the language model's geometry in `text_config`.
_TEXT_CONFIG_TYPES = {"gemma3": "gemma3_text", "qwen2_5_vl": "qwen2_5_vl_text"}


class LayoutError(ValueError):
    """A model config, LoRA spec or state dict does not fit the layout; the message says what to do."""


@dataclass(frozen=True)
class LoraSpec:
    """Which LoRA to put on the base model."""

    rank: int = 8
    """LoRA rank r: lora_A is (r, in), lora_B is (out, r)."""
    alpha: float = 16.0
    """LoRA alpha; the update is scaled by alpha/r (alpha/sqrt(r) with rsLoRA)."""
    target_modules: tuple[str, ...] | str = ALL_LINEAR
    """Module names inside each decoder layer (q_proj ... down_proj), or "all-linear" for all seven."""
    layers: tuple[int, ...] | None = None
    """Decoder layer indices to adapt; None adapts every layer."""
    use_rslora: bool = False
    """Rank-stabilized scaling alpha/sqrt(r) instead of alpha/r."""
    dropout: float = 0.0
    """LoRA dropout used while collecting checkpoints (does not change shapes)."""

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, (list, tuple)):
            modules = tuple(self.target_modules)
            object.__setattr__(self, "target_modules", "all-linear" if modules == ("all-linear",) else modules)
        if isinstance(self.layers, list):
            object.__setattr__(self, "layers", tuple(self.layers))
        if self.rank < 1:
            raise LayoutError(f"LoRA rank must be >= 1, got {self.rank}")
        unknown = [m for m in self.modules if m not in ALL_LINEAR]
        if unknown:
            raise LayoutError(
                f"unknown LoRA target modules {unknown}; choose from {list(ALL_LINEAR)} or 'all-linear'"
            )

    @property
    def modules(self) -> tuple[str, ...]:
        if self.target_modules == "all-linear":
            return ALL_LINEAR
        if isinstance(self.target_modules, str):
            return (self.target_modules,)
        # keep the model's own order whatever order the user wrote
        return tuple(m for m in ALL_LINEAR if m in self.target_modules) + tuple(
            m for m in self.target_modules if m not in ALL_LINEAR
        )

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

    @classmethod
    def parse(cls, text: str) -> "LoraSpec":
        """``"r=8,alpha=16,modules=q_proj+v_proj,layers=0-3,rslora"`` → LoraSpec (the CLI's form)."""
        kwargs: dict[str, Any] = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            key, _, value = part.partition("=")
            if key in ("r", "rank"):
                kwargs["rank"] = int(value)
            elif key == "alpha":
                kwargs["alpha"] = float(value)
            elif key in ("modules", "target_modules"):
                kwargs["target_modules"] = "all-linear" if value == "all-linear" else tuple(value.split("+"))
            elif key == "layers":
                kwargs["layers"] = _parse_ranges(value)
            elif key == "rslora":
                kwargs["use_rslora"] = value.lower() not in ("0", "false", "no")
            elif key == "dropout":
                kwargs["dropout"] = float(value)
            else:
                raise LayoutError(
                    f"unknown LoRA spec field {key!r} in {text!r}; "
                    "use r=, alpha=, modules=a+b|all-linear, layers=0-3+7, rslora, dropout="
                )
        return cls(**kwargs)


def _parse_ranges(text: str) -> tuple[int, ...]:
    out: list[int] = []
    for piece in text.split("+"):
        lo, _, hi = piece.partition("-")
        out.extend(range(int(lo), int(hi) + 1) if hi else [int(lo)])
    return tuple(out)


@dataclass(frozen=True)
class LoraMatrix:
    """One LoRA matrix as PEFT saves it."""

    key: str
    """Exact key in adapter_model.safetensors, e.g. base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight."""
    module: str
    """Module path inside the base model, e.g. model.layers.0.self_attn.q_proj."""
    layer: int
    """Decoder layer index."""
    name: str
    """Short module name (q_proj ... down_proj)."""
    kind: str
    """"A" (shape (r, in)) or "B" (shape (out, r))."""
    shape: tuple[int, int]
    """Tensor shape."""

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]


@dataclass(frozen=True)
class ModelGeometry:
    """The few numbers of a decoder-only model that fix every LoRA shape."""

    model_type: str
    num_layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied_embeddings: bool

    def linear_shape(self, name: str) -> tuple[int, int]:
        """(in, out) of one linear layer of a decoder layer."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        return {
            "q_proj": (self.hidden, q),
            "k_proj": (self.hidden, kv),
            "v_proj": (self.hidden, kv),
            "o_proj": (q, self.hidden),
            "gate_proj": (self.hidden, self.intermediate),
            "up_proj": (self.hidden, self.intermediate),
            "down_proj": (self.intermediate, self.hidden),
        }[name]

    @property
    def num_params(self) -> int:
        """Parameters of the base model (embeddings, decoder layers, norms, LM head), biases ignored."""
        per_layer = sum(i * o for i, o in map(self.linear_shape, ALL_LINEAR)) + 2 * self.hidden
        embed = self.vocab * self.hidden
        return self.num_layers * per_layer + embed * (1 if self.tied_embeddings else 2) + self.hidden

    @classmethod
    def from_config(cls, config: Any) -> "ModelGeometry":
        cfg = load_config_dict(config)
        model_type = cfg.get("model_type")
        if model_type not in _LAYER_PREFIX:
            raise LayoutError(
                f"unsupported model family {model_type!r}; supported: {sorted(_LAYER_PREFIX)}. "
                "Pass a config.json of one of these families (its 'model_type' field)."
            )
        text = cfg.get("text_config") or {}
        if model_type in _TEXT_CONFIG_TYPES and isinstance(text, dict) and "hidden_size" in text:
            merged = {**cfg, **text}
        else:
            merged = cfg
        try:
            hidden = int(merged["hidden_size"])
            heads = int(merged["num_attention_heads"])
            geometry = cls(
                model_type=model_type,
                num_layers=int(merged["num_hidden_layers"]),
                hidden=hidden,
                intermediate=int(merged["intermediate_size"]),
                heads=heads,
                kv_heads=int(merged.get("num_key_value_heads") or heads),
                head_dim=int(merged.get("head_dim") or hidden // heads),
                vocab=int(merged.get("vocab_size", 0)),
                tied_embeddings=bool(merged.get("tie_word_embeddings", cfg.get("tie_word_embeddings", False))),
            )
        except KeyError as missing:
            raise LayoutError(
                f"model config of type {model_type!r} lacks {missing}; it needs hidden_size, "
                "intermediate_size, num_hidden_layers, num_attention_heads (and num_key_value_heads, "
                "head_dim where they differ from the defaults)"
            ) from None
        return geometry


def load_config_dict(config: Any) -> dict[str, Any]:
    """A HF config as a plain dict: from a PretrainedConfig, a dict, a config.json or a model folder."""
    if isinstance(config, Mapping):
        return dict(config)
    if hasattr(config, "to_dict"):
        return config.to_dict()
    from dnd_scale.io import ArtifactError, read_json

    path = Path(config)
    if path.is_dir():
        path = path / "config.json"
    try:
        return read_json(path, "model config")
    except ArtifactError as err:
        raise LayoutError(f"{err}; pass a config.json or a model folder") from None


@dataclass
class LoraLayout:
    """The ordered list of every LoRA matrix of one (model, LoRA spec) pair.

    Order: layer by layer, module by module in `ALL_LINEAR` order, lora_A before lora_B — the order
    the weight tokenizer walks and the exported adapter is written in.
    """

    geometry: ModelGeometry
    spec: LoraSpec
    matrices: list[LoraMatrix] = field(default_factory=list)

    @classmethod
    def from_config(cls, config: Any, spec: LoraSpec | None = None) -> "LoraLayout":
        spec = spec or LoraSpec()
        geometry = ModelGeometry.from_config(config)
        layers = range(geometry.num_layers) if spec.layers is None else spec.layers
        bad = [i for i in layers if not 0 <= i < geometry.num_layers]
        if bad:
            raise LayoutError(f"LoRA layers {bad} do not exist: the model has {geometry.num_layers} layers")
        prefix = _LAYER_PREFIX[geometry.model_type]
        matrices = []
        for layer in sorted(set(layers)):
            for name in spec.modules:
                group = "self_attn" if name in ATTENTION_MODULES else "mlp"
                module = f"{prefix}.{layer}.{group}.{name}"
                fan_in, fan_out = geometry.linear_shape(name)
                for kind, shape in (("A", (spec.rank, fan_in)), ("B", (fan_out, spec.rank))):
                    key = f"base_model.model.{module}.lora_{kind}.weight"
                    matrices.append(LoraMatrix(key, module, layer, name, kind, shape))
        return cls(geometry, spec, matrices)

    # ---- derived numbers -------------------------------------------------------------------
    @property
    def rank(self) -> int:
        return self.spec.rank

    @property
    def keys(self) -> list[str]:
        return [m.key for m in self.matrices]

    @property
    def num_params(self) -> int:
        return sum(m.numel for m in self.matrices)

    @property
    def modules(self) -> list[str]:
        return list(dict.fromkeys(m.module for m in self.matrices))

    def bytes_per_checkpoint(self, dtype: torch.dtype = torch.float32) -> int:
        return self.num_params * torch.empty((), dtype=dtype).element_size()

    # ---- PEFT ------------------------------------------------------------------------------
    def to_peft_config(self, **overrides: Any):
        """A peft.LoraConfig adapting exactly the modules of this layout (and nothing else).

        The target is a full-match regex over module paths, so a layer subset or a multimodal
        model's language tower (whose vision tower reuses names such as mlp.up_proj) is exact.
        """
        from peft import LoraConfig

        names = "|".join(self.spec.modules)
        layers = "|".join(str(i) for i in sorted({m.layer for m in self.matrices}))
        prefix = re.escape(_LAYER_PREFIX[self.geometry.model_type])
        kwargs = dict(
            r=self.spec.rank,
            lora_alpha=self.spec.alpha,
            lora_dropout=self.spec.dropout,
            use_rslora=self.spec.use_rslora,
            target_modules=rf"(.*\.)?{prefix}\.({layers})\.(self_attn|mlp)\.({names})",
            bias="none",
            task_type="CAUSAL_LM",
        )
        kwargs.update(overrides)
        return LoraConfig(**kwargs)

    # ---- validation ------------------------------------------------------------------------
    def check_state_dict(self, state_dict: Mapping[str, torch.Tensor], source: str = "state dict") -> None:
        """Raise LayoutError naming the first problems: missing/extra keys, shapes, rank, NaN/Inf."""
        expected = {m.key: m for m in self.matrices}
        missing = [k for k in expected if k not in state_dict]
        extra = [k for k in state_dict if k not in expected]
        if missing or extra:
            hint = ""
            if extra and any(".default." in k for k in extra):
                hint = " (keys contain the adapter name 'default': use peft.get_peft_model_state_dict)"
            raise LayoutError(
                f"{source} does not match the LoRA layout ({len(expected)} matrices): "
                f"{len(missing)} missing e.g. {missing[:3]}, {len(extra)} unexpected e.g. {extra[:3]}{hint}. "
                "Re-create the layout from the same base model config and LoRA spec that made the adapter."
            )
        for key, matrix in expected.items():
            tensor = state_dict[key]
            if tuple(tensor.shape) != matrix.shape:
                rank_axis = 0 if matrix.kind == "A" else 1
                found_rank = tensor.shape[rank_axis] if tensor.dim() == 2 else None
                why = (
                    f" (LoRA rank {found_rank}, layout expects rank {self.rank})"
                    if found_rank is not None and found_rank != self.rank
                    else ""
                )
                raise LayoutError(
                    f"{source}: {key} has shape {tuple(tensor.shape)}, expected {matrix.shape}{why}; "
                    "the adapter was made for another model or LoRA spec"
                )
            if not torch.isfinite(tensor).all():
                bad = int((~torch.isfinite(tensor)).sum())
                raise LayoutError(
                    f"{source}: {key} holds {bad} NaN/Inf values; the adapter is corrupt (re-collect it)"
                )

    # ---- serialization ---------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        spec = asdict(self.spec)
        spec["target_modules"] = list(self.spec.modules)
        spec["layers"] = sorted({m.layer for m in self.matrices})
        return {
            "geometry": asdict(self.geometry),
            "spec": spec,
            "matrices": [
                {"key": m.key, "module": m.module, "layer": m.layer, "name": m.name, "kind": m.kind, "shape": list(m.shape)}
                for m in self.matrices
            ],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "LoraLayout":
        spec = dict(data["spec"])
        spec["target_modules"] = tuple(spec["target_modules"])
        spec["layers"] = tuple(spec["layers"])
        matrices = [
            LoraMatrix(m["key"], m["module"], m["layer"], m["name"], m["kind"], tuple(m["shape"]))
            for m in data["matrices"]
        ]
        return cls(ModelGeometry(**data["geometry"]), LoraSpec(**spec), matrices)

    def fingerprint(self) -> str:
        """sha256 of the matrices' keys and shapes (what decides whether two adapters are compatible)."""
        canon = json.dumps([[m.key, list(m.shape)] for m in self.matrices], separators=(",", ":"))
        return hashlib.sha256(canon.encode()).hexdigest()

    def save(self, path: str | os.PathLike) -> None:
        from dnd_scale.io import write_json

        write_json(path, {**self.to_dict(), "fingerprint": self.fingerprint()})

    @classmethod
    def load(cls, path: str | os.PathLike) -> "LoraLayout":
        data = json.loads(Path(path).read_text())
        layout = cls.from_dict(data)
        if "fingerprint" in data and data["fingerprint"] != layout.fingerprint():
            raise LayoutError(f"{path}: stored fingerprint does not match its matrices; the file was edited")
        return layout
