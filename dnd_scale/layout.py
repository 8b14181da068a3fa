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

import functools
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
# Phi-3 fuses q/k/v into one projection and gate/up into another.
FUSED_MODULES = ("qkv_proj", "gate_up_proj")
# Qwen2-MoE's always-on shared expert (nn.Linear modules under mlp.shared_expert).
SHARED_EXPERT_MODULES = ("shared_expert.gate_proj", "shared_expert.up_proj", "shared_expert.down_proj")
# Routed experts. transformers 5 stores each MoE block's experts as two 3-D nn.Parameters,
# mlp.experts.gate_up_proj (E, 2·I, H) and mlp.experts.down_proj (E, H, I), not as per-expert
# nn.Linear modules; peft adapts them through `target_parameters` (its ParamWrapper), with one LoRA
# pair per parameter whose rank axis holds all E experts: lora_A (E·r, in), lora_B (out, E·r).
EXPERT_PARAMETERS = ("experts.gate_up_proj", "experts.down_proj")
KNOWN_MODULES = ALL_LINEAR + FUSED_MODULES + SHARED_EXPERT_MODULES + EXPERT_PARAMETERS
MOE_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe")
HF_CONFIG = "config.json"  # a Hugging Face model folder's config

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
    "phi3": "model.layers",
    "mixtral": "model.layers",
    "qwen2_moe": "model.layers",
    "qwen3_moe": "model.layers",
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
    target_modules: tuple[str, ...] | str = "all-linear"
    """Module names inside each decoder layer (q_proj ... down_proj; Phi-3: qkv_proj, o_proj,
    gate_up_proj, down_proj; Qwen2-MoE also shared_expert.gate_proj/up_proj/down_proj), "all-linear"
    for every linear module of the family's decoder layers (routed experts excepted, see `experts`),
    or "attention" for the attention projections only. (Qwen3-MoE: "all-linear" leaves out the
    dense-MLP layers of mlp_only_layers, which peft cannot target there by name.)"""
    layers: tuple[int, ...] | None = None
    """Decoder layer indices to adapt; None adapts every layer."""
    use_rslora: bool = False
    """Rank-stabilized scaling alpha/sqrt(r) instead of alpha/r."""
    dropout: float = 0.0
    """LoRA dropout used while collecting checkpoints (does not change shapes)."""
    experts: bool = False
    """MoE models (Mixtral, Qwen2-MoE, Qwen3-MoE): also adapt the routed experts' fused weights
    (experts.gate_up_proj and experts.down_proj of every MoE block, one LoRA of rank r per expert);
    False adapts attention (and shared-expert) modules only."""

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, (list, tuple)):
            modules = tuple(self.target_modules)
            if modules in (("all-linear",), ("attention",)):
                modules = modules[0]
            object.__setattr__(self, "target_modules", modules)
        if isinstance(self.layers, list):
            object.__setattr__(self, "layers", tuple(self.layers))
        if self.rank < 1:
            raise LayoutError(f"LoRA rank must be >= 1, got {self.rank}")
        if isinstance(self.target_modules, str) and self.target_modules not in ("all-linear", "attention"):
            object.__setattr__(self, "target_modules", (self.target_modules,))
        unknown = [m for m in self.target_modules if m not in KNOWN_MODULES] if isinstance(self.target_modules, tuple) else []
        if unknown:
            raise LayoutError(
                f"unknown LoRA target modules {unknown}; choose from {list(KNOWN_MODULES)}, "
                "'all-linear' or 'attention'"
            )

    @property
    def modules(self) -> tuple[str, ...]:
        """The names asked for (the dense families' names for "all-linear"/"attention"; the layout
        resolves these keywords per family, see LoraLayout.module_names)."""
        if self.target_modules == "all-linear":
            return ALL_LINEAR
        if self.target_modules == "attention":
            return ATTENTION_MODULES
        # keep a canonical order whatever order the user wrote
        return tuple(m for m in KNOWN_MODULES if m in self.target_modules)

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
                kwargs["target_modules"] = value if value in ("all-linear", "attention") else tuple(value.split("+"))
            elif key == "layers":
                kwargs["layers"] = _parse_ranges(value)
            elif key == "rslora":
                kwargs["use_rslora"] = value.lower() not in ("0", "false", "no")
            elif key == "dropout":
                kwargs["dropout"] = float(value)
            elif key == "experts":
                kwargs["experts"] = value.lower() not in ("0", "false", "no")
            else:
                raise LayoutError(
                    f"unknown LoRA spec field {key!r} in {text!r}; use r=, alpha=, "
                    "modules=a+b|all-linear|attention, layers=0-3+7, rslora, dropout=, experts"
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
    experts: int = 1
    """E for a routed-experts parameter: its rank axis stacks E LoRAs of rank r (peft's
    ParamWrapper: lora_A rows expert-major, (E, r, in); lora_B columns rank-major, (out, r, E))."""

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
    num_experts: int = 0
    """Routed experts per MoE block (0: a dense model)."""
    moe_intermediate: int = 0
    """Width of one routed expert's MLP."""
    shared_expert_intermediate: int = 0
    """Width of Qwen2-MoE's shared expert (0: none)."""
    sparse_layers: tuple[int, ...] = ()
    """Decoder layers whose MLP is a MoE block (the others have a dense MLP of `intermediate`)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "sparse_layers", tuple(self.sparse_layers))  # JSON gives a list

    def layer_modules(self, layer: int) -> dict[str, tuple[str, int, int, int]]:
        """Every module a LoRA can adapt in decoder layer `layer`, in model order:
        short name -> (path inside the layer, in features, out features, experts)."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        h = self.hidden
        if self.model_type == "phi3":
            attention = {"qkv_proj": ("self_attn.qkv_proj", h, q + 2 * kv, 1)}
        else:
            attention = {n: (f"self_attn.{n}", h, w, 1) for n, w in (("q_proj", q), ("k_proj", kv), ("v_proj", kv))}
        attention["o_proj"] = ("self_attn.o_proj", q, h, 1)
        if self.model_type == "phi3":
            mlp = {"gate_up_proj": ("mlp.gate_up_proj", h, 2 * self.intermediate, 1),
                   "down_proj": ("mlp.down_proj", self.intermediate, h, 1)}
        elif layer in self.sparse_layers:
            mlp, shared, e, i = {}, self.shared_expert_intermediate, self.num_experts, self.moe_intermediate
            if shared:
                mlp = {f"shared_expert.{n}": (f"mlp.shared_expert.{n}", a, b, 1)
                       for n, a, b in (("gate_proj", h, shared), ("up_proj", h, shared), ("down_proj", shared, h))}
            mlp["experts.gate_up_proj"] = ("mlp.experts.gate_up_proj", h, 2 * i, e)
            mlp["experts.down_proj"] = ("mlp.experts.down_proj", i, h, e)
        else:
            i = self.intermediate
            mlp = {n: (f"mlp.{n}", a, b, 1) for n, a, b in (("gate_proj", h, i), ("up_proj", h, i), ("down_proj", i, h))}
        return {**attention, **mlp}

    @property
    def num_params(self) -> int:
        """Parameters of the base model (embeddings, decoder layers, norms, LM head, MoE routers),
        biases and per-head norms ignored."""
        total = 0
        for layer in range(self.num_layers):
            total += sum(a * b * e for _, a, b, e in self.layer_modules(layer).values()) + 2 * self.hidden
            if layer in self.sparse_layers:
                total += self.num_experts * self.hidden  # the router
                total += self.hidden if self.shared_expert_intermediate else 0  # shared_expert_gate
        embed = self.vocab * self.hidden
        return total + embed * (1 if self.tied_embeddings else 2) + self.hidden

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
        defaults = _config_defaults(model_type)
        try:
            hidden = int(merged["hidden_size"])
            heads = int(merged["num_attention_heads"])
            layers = int(merged["num_hidden_layers"])
            moe = _moe_fields(model_type, merged, defaults, layers)
            geometry = cls(
                model_type=model_type,
                num_layers=layers,
                hidden=hidden,
                intermediate=int(merged["intermediate_size"]),
                heads=heads,
                kv_heads=int(merged.get("num_key_value_heads") or heads),
                head_dim=int(merged.get("head_dim") or hidden // heads),
                vocab=int(merged.get("vocab_size", 0)),
                # A config.json without the key means the family's default (Gemma ties, Llama does not).
                tied_embeddings=bool(merged.get("tie_word_embeddings", cfg.get(
                    "tie_word_embeddings", defaults.get("tie_word_embeddings", False)))),
                **moe,
            )
        except KeyError as missing:
            raise LayoutError(
                f"model config of type {model_type!r} lacks {missing}; it needs hidden_size, "
                "intermediate_size, num_hidden_layers, num_attention_heads (and num_key_value_heads, "
                "head_dim where they differ from the defaults; MoE configs their expert counts and widths)"
            ) from None
        return geometry


@functools.cache
def _config_defaults(model_type: str) -> dict[str, Any]:
    """The defaults transformers' config class of `model_type` uses for keys a config.json leaves out."""
    import transformers

    try:
        config = transformers.AutoConfig.for_model(model_type)
    except (KeyError, ValueError):  # a family this transformers does not know: no defaults
        return {}
    return config.to_dict()


def _moe_fields(model_type: str, cfg: Mapping[str, Any], defaults: Mapping[str, Any], layers: int) -> dict[str, Any]:
    """ModelGeometry's MoE fields from a Mixtral / Qwen2-MoE / Qwen3-MoE config (empty for dense models)."""
    if model_type not in MOE_TYPES:
        return {}
    get = lambda key: cfg.get(key, defaults.get(key))  # noqa: E731
    if model_type == "mixtral":  # every layer is a MoE block; experts are intermediate_size wide
        return {"num_experts": int(cfg["num_local_experts"]), "moe_intermediate": int(cfg["intermediate_size"]),
                "sparse_layers": tuple(range(layers))}
    # Qwen3-MoE's config.json says num_experts; transformers 5's Qwen3MoeConfig.to_dict() num_local_experts
    experts = int(cfg["num_experts"] if "num_experts" in cfg else cfg["num_local_experts"])
    step, dense = int(get("decoder_sparse_step") or 1), set(get("mlp_only_layers") or ())
    # the rule of Qwen2MoeDecoderLayer / Qwen3MoeDecoderLayer
    sparse = tuple(i for i in range(layers) if i not in dense and experts > 0 and (i + 1) % step == 0)
    shared = int(get("shared_expert_intermediate_size") or 0) if model_type == "qwen2_moe" else 0
    return {"num_experts": experts, "moe_intermediate": int(cfg["moe_intermediate_size"]),
            "shared_expert_intermediate": shared, "sparse_layers": sparse}


def load_config_dict(config: Any) -> dict[str, Any]:
    """A HF config as a plain dict: from a PretrainedConfig, a dict, a config.json or a model folder."""
    if isinstance(config, Mapping):
        return dict(config)
    if hasattr(config, "to_dict"):
        return config.to_dict()
    from dnd_scale.io import ArtifactError, read_json

    path = Path(config)
    if path.is_dir():
        path = path / HF_CONFIG
    try:
        return read_json(path, "model config")
    except ArtifactError as err:
        raise LayoutError(f"{err}; pass a config.json or a model folder") from None


def _chosen_modules(geometry: ModelGeometry, spec: LoraSpec) -> set[str]:
    """The module names of `spec` this model has, or a LayoutError that lists the ones it has."""
    family = list(dict.fromkeys(n for layer in range(geometry.num_layers) for n in geometry.layer_modules(layer)))
    attention = [n for n in family if n in ATTENTION_MODULES + ("qkv_proj",)]
    if spec.target_modules == "attention":
        chosen = set(attention)
    elif spec.target_modules == "all-linear":
        chosen = {n for n in family if n not in EXPERT_PARAMETERS}
    else:
        chosen = set(spec.target_modules)
        missing = sorted(chosen - set(family))
        if missing:
            hint = ""
            if geometry.model_type == "phi3":
                hint = " (Phi-3 fuses q/k/v into qkv_proj and gate/up into gate_up_proj)"
            elif geometry.num_experts:
                hint = (" (MoE blocks have no dense gate/up/down_proj: their experts are 3-D parameters, "
                        "adapted with experts=true; the router is not adaptable)")
            raise LayoutError(
                f"{geometry.model_type} decoder layers have no {missing}{hint}; this family's modules are "
                f"{list(family)}, or use 'all-linear' / 'attention'"
            )
    dense_mlp = chosen & set(MLP_MODULES)
    if geometry.model_type == "qwen3_moe" and dense_mlp:
        # peft (0.21, on transformers 5) maps qwen3_moe targets named gate_proj/up_proj/down_proj onto
        # the routed experts' fused parameters, so a dense layer's MLP cannot be targeted by name.
        if spec.target_modules != "all-linear":
            raise LayoutError(
                f"qwen3_moe: LoRA on the dense MLP layers ({sorted(dense_mlp)}, layers in mlp_only_layers) is "
                "not supported: peft renames these targets to the routed experts' parameters on this model "
                "family; adapt attention (and experts=true) only"
            )
        chosen -= dense_mlp
    if spec.experts:
        if not geometry.num_experts:
            raise LayoutError(
                f"LoRA spec asks for expert LoRAs (experts=true) but {geometry.model_type} is not a MoE model; "
                "drop experts=true"
            )
        chosen |= set(EXPERT_PARAMETERS)
    return chosen


@dataclass
class LoraLayout:
    """The ordered list of every LoRA matrix of one (model, LoRA spec) pair.

    Order: layer by layer, module by module in model order (`ModelGeometry.layer_modules`), lora_A
    before lora_B — the order the weight tokenizer walks and the exported adapter is written in.
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
        chosen = _chosen_modules(geometry, spec)
        matrices = []
        for layer in sorted(set(layers)):
            available = geometry.layer_modules(layer)
            names = [n for n in available if n in chosen]
            # peft nests a module's targeted parameters (ParamWrapper inside ParamWrapper) in the order
            # the module defines them: the first one ends up deepest, under one `base_layer.` per
            # parameter wrapped after it (checked against peft in tests/test_layout.py).
            params = [n for n in names if n in EXPERT_PARAMETERS]
            for name in names:
                path, fan_in, fan_out, experts = available[name]
                module = f"{prefix}.{layer}.{path}"
                owner, wrapped = module, ""
                if name in EXPERT_PARAMETERS:  # a parameter of mlp.experts, which carries its LoRA
                    owner, wrapped = module.rpartition(".")[0], "base_layer." * (len(params) - 1 - params.index(name))
                rows = spec.rank * experts
                for kind, shape in (("A", (rows, fan_in)), ("B", (fan_out, rows))):
                    key = f"base_model.model.{owner}.{wrapped}lora_{kind}.weight"
                    matrices.append(LoraMatrix(key, module, layer, name, kind, shape, experts))
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

    @property
    def module_names(self) -> list[str]:
        """The short module names this layout adapts, in model order (e.g. qkv_proj ... down_proj)."""
        return list(dict.fromkeys(m.name for m in self.matrices))

    def bytes_per_checkpoint(self, dtype: torch.dtype = torch.float32) -> int:
        return self.num_params * torch.empty((), dtype=dtype).element_size()

    # ---- PEFT ------------------------------------------------------------------------------
    def to_peft_config(self, **overrides: Any):
        """A peft.LoraConfig adapting exactly the modules of this layout (and nothing else).

        The target is a full-match regex over module paths, so a layer subset or a multimodal
        model's language tower (whose vision tower reuses names such as mlp.up_proj) is exact; MoE
        models get exact module paths instead, and their routed experts `target_parameters`.
        """
        from peft import LoraConfig

        prefix = _LAYER_PREFIX[self.geometry.model_type]
        linear = [m for m in self.matrices if m.name not in EXPERT_PARAMETERS and m.kind == "A"]
        # module paths inside a decoder layer, e.g. self_attn.q_proj, mlp.shared_expert.up_proj
        paths = "|".join(re.escape(p) for p in dict.fromkeys(m.module[len(prefix) + 1:].split(".", 1)[1] for m in linear))
        layers = "|".join(str(i) for i in sorted({m.layer for m in linear}))
        kwargs = dict(
            r=self.spec.rank,
            lora_alpha=self.spec.alpha,
            lora_dropout=self.spec.dropout,
            use_rslora=self.spec.use_rslora,
            target_modules=rf"(.*\.)?{re.escape(prefix)}\.({layers})\.({paths})" if linear else None,
            bias="none",
            task_type="CAUSAL_LM",
        )
        if self.geometry.num_experts:
            # On transformers 5, peft rewrites a MoE model's string target (it resolves the regex to leaf
            # names such as "q_proj", which widens a layer subset to every layer); exact module paths
            # pass through that rewrite unchanged.
            kwargs["target_modules"] = [m.module for m in linear] or None
        experts = [m.module for m in self.matrices if m.name in EXPERT_PARAMETERS and m.kind == "A"]
        if experts:  # routed experts are 3-D parameters: peft adapts them by exact parameter name
            kwargs["target_parameters"] = experts
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
                found_rank = tensor.shape[rank_axis] // matrix.experts if tensor.dim() == 2 else None
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
        spec["target_modules"] = self.module_names
        spec["layers"] = sorted({m.layer for m in self.matrices})
        geometry = asdict(self.geometry)
        geometry["sparse_layers"] = list(self.geometry.sparse_layers)
        return {
            "geometry": geometry,
            "spec": spec,
            "matrices": [
                {"key": m.key, "module": m.module, "layer": m.layer, "name": m.name, "kind": m.kind, "shape": list(m.shape),
                 **({"experts": m.experts} if m.experts > 1 else {})}
                for m in self.matrices
            ],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "LoraLayout":
        spec = dict(data["spec"])
        spec["target_modules"] = tuple(spec["target_modules"])
        spec["layers"] = tuple(spec["layers"])
        matrices = [
            LoraMatrix(m["key"], m["module"], m["layer"], m["name"], m["kind"], tuple(m["shape"]), m.get("experts", 1))
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
