"""Adapter folders against vLLM's LoRA contract: what `write_adapter` writes for each model family
passes, with the right `max_lora_rank`; a folder tampered into what vLLM would not load is refused.
The check reads the format only; these tests do not run vLLM."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from dnd_scale.export import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    VLLM_MAX_LORA_RANKS,
    VllmContractError,
    check_vllm_contract,
    vllm_max_lora_rank,
    write_adapter,
)
from dnd_scale.io import ArtifactError
from dnd_scale.layout import LoraLayout, LoraSpec
from tinymodels import tiny_config

Q_PROJ_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"


def written_adapter(folder, model_type="qwen2", spec=LoraSpec(rank=2, alpha=4.0)):
    layout = LoraLayout.from_config(tiny_config(model_type, layers=2), spec)
    generator = torch.Generator().manual_seed(0)
    state = {m.key: torch.randn(m.shape, generator=generator) for m in layout.matrices}
    return write_adapter(state, layout, folder)


@pytest.mark.parametrize("rank, served_by", [(1, 1), (2, 8), (8, 8), (12, 16), (33, 64), (300, 320), (512, 512)])
def test_a_rank_is_served_by_the_smallest_max_lora_rank_at_least_as_large(rank, served_by):
    assert vllm_max_lora_rank(rank) == served_by
    assert served_by in VLLM_MAX_LORA_RANKS


def test_a_rank_above_512_cannot_be_served():
    with pytest.raises(VllmContractError, match="rank 513 is above 512"):
        vllm_max_lora_rank(513)


@pytest.mark.parametrize("model_type, spec", [
    ("qwen2", LoraSpec(rank=2, alpha=4.0)),
    ("llama", LoraSpec(rank=12, target_modules="attention", use_rslora=True)),
    ("phi3", LoraSpec(rank=4)),  # fused qkv_proj / gate_up_proj
    ("gemma2", LoraSpec(rank=8, layers=(1,))),
    ("mixtral", LoraSpec(rank=4)),  # attention only: no routed experts
], ids=["qwen2-r2", "llama-attention-r12-rslora", "phi3-fused-r4", "gemma2-layer1-r8", "mixtral-attention-r4"])
def test_written_adapters_meet_the_contract(tmp_path, model_type, spec):
    folder = written_adapter(tmp_path / "adapter", model_type, spec)
    assert check_vllm_contract(folder) == vllm_max_lora_rank(spec.rank)


def _edit_config(folder, **fields):
    config = json.loads((folder / ADAPTER_CONFIG).read_text())
    (folder / ADAPTER_CONFIG).write_text(json.dumps({**config, **fields}))


def _edit_weights(folder, add=(), drop=()):
    state = load_file(folder / ADAPTER_WEIGHTS)
    for key in drop:
        del state[key]
    state.update({key: torch.ones(4) for key in add})
    save_file(state, folder / ADAPTER_WEIGHTS)


TAMPERINGS = {
    "modules_to_save": (lambda f: _edit_config(f, modules_to_save=["lm_head"]), "modules_to_save is"),
    "use_dora": (lambda f: _edit_config(f, use_dora=True), "use_dora is true"),
    "dora-magnitude-key": (
        lambda f: _edit_weights(f, add=["base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"]),
        "DoRA magnitude vector"),
    "bad-key-name": (lambda f: _edit_weights(f, add=["model.layers.0.self_attn.q_proj.lora_A.weight"]),
                     "not a LoRA matrix"),
    "embedding-lora": (lambda f: _edit_weights(f, add=["base_model.model.model.embed_tokens.lora_embedding_A"]),
                       "embedding LoRA"),
    "lora-bias": (lambda f: _edit_weights(f, add=["base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias"]),
                  "a bias"),
    "bias-all": (lambda f: _edit_config(f, bias="all"), "bias is 'all'"),
    "lone-lora-A": (lambda f: _edit_weights(f, drop=[Q_PROJ_A.replace("lora_A", "lora_B")]),
                    "q_proj has a lora_A but no lora_B"),
    "no-r": (lambda f: _edit_config(f, r=None), "has no 'r'"),
    "no-target-modules": (lambda f: _edit_config(f, target_modules=None), "has no 'target_modules'"),
    "rank-1024": (lambda f: _edit_config(f, r=1024), "r = 1024 is above 512"),
    "rank-pattern": (lambda f: _edit_config(f, rank_pattern={"q_proj": 4}), "rank_pattern is set"),
    "routed-experts": (lambda f: _edit_config(f, target_parameters=["model.layers.0.mlp.experts.down_proj"]),
                       "target_parameters is set"),
    "not-lora": (lambda f: _edit_config(f, peft_type="IA3"), "LORA adapters only"),
}


@pytest.mark.parametrize("name", list(TAMPERINGS))
def test_a_tampered_folder_is_refused_naming_the_breach(tmp_path, name):
    folder = written_adapter(tmp_path / "adapter")
    assert check_vllm_contract(folder) == 8
    tamper, message = TAMPERINGS[name]
    tamper(folder)
    with pytest.raises(VllmContractError, match=message):
        check_vllm_contract(folder)


def test_every_breach_is_listed_at_once(tmp_path):
    folder = written_adapter(tmp_path / "adapter")
    _edit_config(folder, use_dora=True, modules_to_save=["lm_head"])
    _edit_weights(folder, add=["lm_head.weight"])
    with pytest.raises(VllmContractError) as caught:
        check_vllm_contract(folder)
    assert all(part in str(caught.value) for part in ("use_dora", "modules_to_save", "'lm_head.weight'"))


def test_missing_or_unreadable_files_are_artifact_errors(tmp_path):
    folder = written_adapter(tmp_path / "adapter")
    (folder / ADAPTER_WEIGHTS).write_bytes(b"\x80\x04 a pickle")
    with pytest.raises(ArtifactError, match="is not safetensors"):
        check_vllm_contract(folder)
    (folder / ADAPTER_CONFIG).unlink()
    with pytest.raises(ArtifactError, match="not found"):
        check_vllm_contract(folder)


def test_an_adapter_of_routed_experts_is_not_vouched_for(tmp_path):
    folder = written_adapter(tmp_path / "adapter", "mixtral", LoraSpec(rank=4, experts=True))
    with pytest.raises(VllmContractError, match="target_parameters is set"):
        check_vllm_contract(folder)
