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
        "phi3": transformers.Phi3Config,
        "mixtral": transformers.MixtralConfig,
        "qwen2_moe": transformers.Qwen2MoeConfig,
        "qwen3_moe": transformers.Qwen3MoeConfig,
    }
    if model_type == "phi3":  # its default pad/eos ids (32000) lie outside the tiny vocabulary
        common.update(pad_token_id=0, eos_token_id=1, bos_token_id=1)
    # MoE: 3 experts of odd width; Qwen2-MoE with a shared expert and one dense-MLP layer (the last)
    if model_type == "mixtral":
        common.update(num_local_experts=3, num_experts_per_tok=2)
    if model_type in ("qwen2_moe", "qwen3_moe"):
        common.update(num_experts=3, num_experts_per_tok=2, moe_intermediate_size=24)
    if model_type == "qwen2_moe":
        common.update(shared_expert_intermediate_size=44, mlp_only_layers=[layers - 1])
    if model_type in ("qwen3", "qwen3_moe") and head_dim is None:
        common["head_dim"] = hidden // heads
    if model_type.startswith("gemma") and head_dim is None:
        common["head_dim"] = 12  # Gemma's head_dim is not hidden/heads
    return classes[model_type](**common)


def tiny_model(model_type: str = "qwen2", seed: int = 0, **kwargs) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config(model_type, **kwargs))
    return model.eval()
