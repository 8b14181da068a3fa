"""The frozen base LLM and its tokenizer, from one `source` string.

- a local Hugging Face folder (config.json + weights + tokenizer files);
- a `.gguf` file, loaded by transformers with `gguf_file=` (dequantized; needs the `gguf` extra);
- a model `config.json` file: a random-init model of that shape, seeded, for tests and the demo.
  Its tokenizer comes from tokenizer files beside the config when there are some, otherwise it is
  the built-in character-level tokenizer (`build_tiny_tokenizer`), which needs no hub at all.

A random-init model exists only as (config, seed); `save_base_model` writes it as a plain HF folder
so that later stages (eval, generate) load the very same weights as a local folder. The folder says
what it was saved from (`dnd_base.json`), so that it loads as kind "random-init, saved", never as a
pretrained model.
"""

from __future__ import annotations

import json
import os
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import PreTrainedModel, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from dnd_scale.io import atomic_folder, canonical_json_sha256
from dnd_scale.layout import HF_CONFIG, load_config_dict

_WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
SAVED_FROM = "dnd_base.json"  # written by save_base_model: the kind and source the folder was saved from

# A minimal chat format for the tiny tokenizer: one special token per role and one end-of-turn token,
# so the response of a rendered conversation is exactly the text after `<|assistant|>`.
TINY_SPECIAL_TOKENS = ("<pad>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer over printable ASCII plus chat special tokens.

    Every synthetic task and any ASCII text tokenizes without an unknown token; other characters map
    to `<unk>`. Built in code from `tokenizers`, so tests and the demo need no download.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    # Vertical tab, form feed and carriage return never occur in prompts worth keeping apart.
    characters = [c for c in string.printable if c not in "\x0b\x0c\r"]
    vocab = {token: index for index, token in enumerate([*TINY_SPECIAL_TOKENS, *characters])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    # Split every character (newlines included) into its own piece; Fuse joins them back on decode.
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(list(TINY_SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        unk_token="<unk>",
        eos_token="<|end|>",
        chat_template=TINY_CHAT_TEMPLATE,
    )


@dataclass
class BaseModel:
    """A loaded base model with its tokenizer and where it came from."""

    model: PreTrainedModel
    """The causal LM, on its device, in eval mode."""
    tokenizer: PreTrainedTokenizerBase
    """Its tokenizer (with a chat template when the source has one)."""
    source: str
    """The source string it was loaded from."""
    kind: str
    """"pretrained" (HF folder), "gguf" or "random-init"."""


def resolve_device(device: str) -> torch.device:
    """"auto" → cuda when available, else cpu; anything else is passed to torch.device."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} was requested but CUDA is not available; use device 'cpu' or 'auto'")
    return resolved


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """"auto" → bfloat16 on a GPU that supports it, float32 elsewhere; or "float32"/"bfloat16"/"float16"."""
    if dtype == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    names = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in names:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of 'auto', {', '.join(map(repr, names))}")
    return names[dtype]


def _has_tokenizer(folder: Path) -> bool:
    return any((folder / name).is_file() for name in _TOKENIZER_FILES)


def _random_init(config_path: Path, dtype: torch.dtype, device: torch.device, seed: int) -> BaseModel:
    raw = load_config_dict(config_path)
    model_type = raw.pop("model_type", None)
    if model_type is None:
        raise ValueError(f"model config {config_path} has no 'model_type'; expected a HF config.json (e.g. qwen2)")
    config = transformers.AutoConfig.for_model(model_type, **{k: v for k, v in raw.items() if not k.startswith("_")})
    folder = config_path.parent
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder) if _has_tokenizer(folder) else build_tiny_tokenizer()
    if len(tokenizer) > config.vocab_size:
        raise ValueError(
            f"model config {config_path} has vocab_size {config.vocab_size} but its tokenizer has {len(tokenizer)} "
            f"tokens; set vocab_size >= {len(tokenizer)} in the config"
        )
    # fork_rng: seeding for a reproducible init must not disturb the caller's random stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    return BaseModel(model.to(device).eval(), tokenizer, str(config_path), "random-init")


def load_base_model(
    source: str | os.PathLike, *, dtype: str = "auto", device: str = "auto", seed: int = 0
) -> BaseModel:
    """Load the base model and tokenizer from a HF folder, a .gguf file or a config.json (random init).

    `seed` only matters for a random-init model.
    """
    path = Path(source)
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    if path.is_file() and path.suffix == ".json":
        return _random_init(path, torch_dtype, torch_device, seed)
    if path.is_file() and path.suffix == ".gguf":
        try:
            import gguf  # noqa: F401  (transformers needs it to read the file; checked here for a clear message)
        except ImportError:
            raise ImportError(
                f"loading the GGUF base model {path} needs the `gguf` package: pip install 'dnd-scale[gguf]'"
            ) from None
        model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch_dtype)
        tokenizer = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        return BaseModel(model.to(torch_device).eval(), tokenizer, str(path), "gguf")
    if path.is_dir():
        if not (path / HF_CONFIG).is_file():
            raise FileNotFoundError(
                f"base model folder {path} has no config.json; expected a Hugging Face model folder"
            )
        if not any(any(path.glob(pattern)) for pattern in _WEIGHT_PATTERNS):
            raise FileNotFoundError(
                f"base model folder {path} has a config.json but no weights (*.safetensors / *.bin); "
                f"download the weights, or pass {path / 'config.json'} itself to train on a random-init model"
            )
        if not _has_tokenizer(path):
            raise FileNotFoundError(f"base model folder {path} has no tokenizer files ({', '.join(_TOKENIZER_FILES)})")
        model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, device_map=str(torch_device))
        tokenizer = transformers.AutoTokenizer.from_pretrained(path)
        saved = json.loads((path / SAVED_FROM).read_text()) if (path / SAVED_FROM).is_file() else {}
        kind = "random-init, saved" if saved.get("kind") == "random-init" else "pretrained"
        return BaseModel(model.eval(), tokenizer, str(path), kind)
    raise FileNotFoundError(
        f"base model {str(source)!r} not found; expected a Hugging Face model folder, a .gguf file, "
        "or a model config.json (random-init model)"
    )


# Config fields that say how a model was loaded or saved, not which model it is.
_RUNTIME_CONFIG_FIELDS = {"dtype", "torch_dtype", "transformers_version", "use_cache", "output_attentions",
                          "output_hidden_states", "return_dict", "quantization_config"}  # fmt: skip
_SAMPLED_MATRICES = 8
_SAMPLES_PER_MATRIX = 32
# Weights of one base in another dtype or quantized (bf16, GGUF) correlate above 0.99 with its own;
# independently initialized or trained weights near 0 (± 0.07 for 256 values).
SAME_WEIGHTS_MIN_CORRELATION = 0.9


def sample_positions(numel: int, count: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """`count` positions spread evenly from 0 to numel - 1 (each rounded half up), in exact integer
    arithmetic: a float32 linspace to 136 M (a 0.5B model's embedding) rounds its last position
    past the end on CUDA, which faulted collection on a GPU."""
    steps = torch.arange(count, device=device)
    return (2 * steps * (numel - 1) + count - 1) // (2 * max(count - 1, 1))


def base_identity(model: PreTrainedModel) -> dict[str, Any]:
    """What tells this base model from another of the same shapes (another seed, another family):
    its model_type, a sha256 of its config (load and save fields left out) and a sample of its weights
    (`_SAMPLES_PER_MATRIX` values at fixed positions of `_SAMPLED_MATRICES` weight matrices spread over
    the model, by parameter name). Cheap at any size: a few hundred elements are read."""
    config = {key: value for key, value in model.config.to_dict().items()
              if key not in _RUNTIME_CONFIG_FIELDS and not key.startswith("_")}
    # Matrices only: norms and biases start as constants, equal for every seed.
    matrices = sorted((name, p) for name, p in model.named_parameters() if p.dim() >= 2 and p.device.type != "meta")
    picked = [matrices[round(i * (len(matrices) - 1) / max(_SAMPLED_MATRICES - 1, 1))]
              for i in range(min(_SAMPLED_MATRICES, len(matrices)))]
    sample = {}
    for name, param in picked:
        flat = param.detach().reshape(-1)
        positions = sample_positions(flat.numel(), _SAMPLES_PER_MATRIX, flat.device)
        sample[name] = [float(f"{v:.6g}") for v in flat[positions].float().cpu().tolist()]
    return {"model_type": model.config.model_type, "config_sha256": canonical_json_sha256(config),
            "weights_sample": sample}


def identity_mismatch(recorded: dict[str, Any], current: dict[str, Any]) -> str | None:
    """Why a base model of identity `current` is not the one of `recorded` (`base_identity`), or None.

    A config hash that differs alone is not a mismatch (transformers renames config fields between
    versions): only another family, or weights that do not correlate, are."""
    if recorded.get("model_type") != current.get("model_type"):
        return f"it is a {recorded.get('model_type')!r} model, this base model is {current.get('model_type')!r}"
    mine, theirs = current.get("weights_sample", {}), recorded.get("weights_sample", {})
    common = [name for name in theirs if name in mine and len(theirs[name]) == len(mine[name])]
    if not common:
        return f"its sampled weights ({sorted(theirs)[:2]} ...) are not parameters of this base model"
    a = torch.tensor([v for name in common for v in theirs[name]], dtype=torch.float64)
    b = torch.tensor([v for name in common for v in mine[name]], dtype=torch.float64)
    correlation = float(torch.corrcoef(torch.stack([a, b]))[0, 1]) if a.std() > 0 and b.std() > 0 else float(a.equal(b))
    if not correlation >= SAME_WEIGHTS_MIN_CORRELATION:  # NaN included
        return (f"its weights differ from this base model's (correlation {correlation:.3f} of {a.numel()} sampled "
                f"values; the same base in another dtype or quantized gives > {SAME_WEIGHTS_MIN_CORRELATION})")
    return None


def save_base_model(base: BaseModel, folder: str | os.PathLike) -> Path:
    """Write model + tokenizer as a Hugging Face folder, atomically (temp folder, then rename); a model
    loaded from a .gguf is written as its dequantized weights (the folder then loads without `gguf`)."""
    folder = Path(folder)
    if folder.exists():
        raise FileExistsError(f"{folder} already exists; remove it or choose another folder")
    with atomic_folder(folder, "save_base_model") as tmp:
        if base.kind == "gguf":
            # transformers dequantized the GGUF on load, so the weights are plain tensors, but it refuses to
            # save a model its gguf quantizer loaded; without that marker the folder is an ordinary model.
            base.model.hf_quantizer = None
            if hasattr(base.model.config, "quantization_config"):
                del base.model.config.quantization_config
        base.model.save_pretrained(tmp)
        base.tokenizer.save_pretrained(tmp)
        (tmp / SAVED_FROM).write_text(json.dumps({"kind": base.kind, "source": base.source}) + "\n")
    return folder
