"""Tiny random-init base models for tests (no hub, no downloads): one config builder per family."""

from __future__ import annotations

import torch
import transformers


def tiny_config(model_type: str = "qwen2", *, layers: int = 2, hidden: int = 40, intermediate: int = 56,
                heads: int = 4, kv_heads: int = 2, head_dim: int | None = None, vocab: int = 97):
    """A transformers config of the family with deliberately odd widths (they need token padding)."""
    common = dict(
        num_hidden_layers=layers, hidden_size=hidden, intermediate_size=intermediate,
        num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab,
        max_position_embeddings=128, tie_word_embeddings=False,
    )
    if head_dim is not None:
        common["head_dim"] = head_dim
    classes = {
        "qwen2": transformers.Qwen2Config,
        "qwen3": transformers.Qwen3Config,
        "llama": transformers.LlamaConfig,
        "mistral": transformers.MistralConfig,
        "gemma": transformers.GemmaConfig,
        "gemma2": transformers.Gemma2Config,
        "gemma3_text": transformers.Gemma3TextConfig,
    }
    if model_type == "qwen3" and head_dim is None:
        common["head_dim"] = hidden // heads
    if model_type.startswith("gemma") and head_dim is None:
        common["head_dim"] = 12  # Gemma's head_dim is not hidden/heads
    return classes[model_type](**common)


def tiny_model(model_type: str = "qwen2", seed: int = 0, **kwargs) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config(model_type, **kwargs))
    return model.eval()
