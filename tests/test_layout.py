"""LoraLayout: PEFT keys and shapes derived from configs, checked against real peft models."""

import json
from pathlib import Path

import pytest
import torch
from peft import get_peft_model, get_peft_model_state_dict

from dnd_scale.layout import LayoutError, LoraLayout, LoraSpec, load_config_dict
from dnd_scale.tokenizer import WeightTokenizer
from tinymodels import tiny_config, tiny_model

MODELS = Path(__file__).resolve().parents[1] / "configs" / "models"


def peft_shapes(model, layout):
    peft_model = get_peft_model(model, layout.to_peft_config(init_lora_weights=False))
    return {k: tuple(v.shape) for k, v in get_peft_model_state_dict(peft_model).items()}


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "llama", "mistral", "gemma", "gemma2", "gemma3_text"])
def test_layout_keys_and_shapes_equal_peft(family):
    layout = LoraLayout.from_config(tiny_config(family), LoraSpec(rank=4))
    expected = {m.key: m.shape for m in layout.matrices}
    assert peft_shapes(tiny_model(family), layout) == expected
    assert list(expected) == layout.keys  # layout order is deterministic


def test_layer_subset_and_module_subset_adapt_exactly_those():
    spec = LoraSpec(rank=2, target_modules=("v_proj", "q_proj", "down_proj"), layers=(1,))
    layout = LoraLayout.from_config(tiny_config("llama", layers=3), spec)
    assert {m.layer for m in layout.matrices} == {1}
    assert [m.name for m in layout.matrices[::2]] == ["q_proj", "v_proj", "down_proj"]  # model order
    assert peft_shapes(tiny_model("llama", layers=3), layout) == {m.key: m.shape for m in layout.matrices}


def test_gqa_widths_and_gemma_head_dim():
    layout = LoraLayout.from_config(MODELS / "gemma-3-270m.json", LoraSpec(rank=8))
    shapes = {m.name + m.kind: m.shape for m in layout.matrices if m.layer == 0}
    assert shapes["q_projB"] == (4 * 256, 8) and shapes["k_projB"] == (256, 8) and shapes["o_projA"] == (8, 1024)
    layout = LoraLayout.from_config(MODELS / "llama-3.1-70b.json", LoraSpec(rank=8))
    shapes = {m.name + m.kind: m.shape for m in layout.matrices if m.layer == 0}
    assert shapes["k_projB"] == (1024, 8) and shapes["down_projA"] == (8, 28672)


def test_qwen25_vl_language_tower_keys():
    layout = LoraLayout.from_config(MODELS / "qwen2.5-vl-3b.json", LoraSpec(rank=16))
    assert layout.keys[0] == "base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight"
    assert layout.geometry.hidden == 2048 and layout.geometry.kv_heads == 2
    config = layout.to_peft_config()
    # the regex must not catch the vision tower's blocks (they reuse mlp.up_proj names)
    import re
    assert re.fullmatch(config.target_modules, "model.language_model.layers.3.mlp.up_proj")
    assert not re.fullmatch(config.target_modules, "model.visual.blocks.3.mlp.up_proj")


@pytest.mark.parametrize("name,rank,chunk,params,tokens,shape", [
    ("qwen2.5-0.5b", 8, 128, 4_399_104, 4296, (10, 130)),
    ("qwen2.5-1.5b", 16, 256, None, 4508, (18, 258)),
    ("qwen2.5-7b", 16, 512, None, 4928, (18, 514)),
    ("qwen2.5-vl-3b", 16, 256, None, 7308, (18, 258)),
])
def test_paper_geometries(name, rank, chunk, params, tokens, shape):
    layout = LoraLayout.from_config(MODELS / f"{name}.json", LoraSpec(rank=rank))
    tok = WeightTokenizer(layout, chunk=chunk)
    assert (tok.num_tokens, tok.token_shape) == (tokens, shape)
    if params is not None:
        assert layout.num_params == params == tok.num_tokens * rank * chunk


def test_save_load_roundtrip_and_fingerprint(tmp_path):
    layout = LoraLayout.from_config(MODELS / "qwen2.5-0.5b.json", LoraSpec.parse("r=8,alpha=32,layers=0-2+5,rslora"))
    layout.save(tmp_path / "layout.json")
    again = LoraLayout.load(tmp_path / "layout.json")
    assert again.fingerprint() == layout.fingerprint() and again.keys == layout.keys
    assert again.spec.layers == (0, 1, 2, 5) and again.spec.use_rslora and again.spec.scale == 32 / 8 ** 0.5
    data = json.loads((tmp_path / "layout.json").read_text())
    data["matrices"][0]["shape"] = [9, 896]
    (tmp_path / "layout.json").write_text(json.dumps(data))
    with pytest.raises(LayoutError, match="fingerprint"):
        LoraLayout.load(tmp_path / "layout.json")


def test_unknown_family_and_bad_spec_errors(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 8}))
    with pytest.raises(LayoutError, match="unsupported model family 'gpt2'"):
        LoraLayout.from_config(tmp_path)
    with pytest.raises(LayoutError, match="not found"):
        LoraLayout.from_config(tmp_path / "missing.json")
    with pytest.raises(LayoutError, match="unknown LoRA target modules"):
        LoraSpec(target_modules=("qkv",))
    with pytest.raises(LayoutError, match="do not exist"):
        LoraLayout.from_config(tiny_config("qwen2"), LoraSpec(layers=(5,)))
    with pytest.raises(LayoutError, match="lacks"):
        LoraLayout.from_config({"model_type": "llama", "hidden_size": 8})


def test_check_state_dict_names_each_problem():
    layout = LoraLayout.from_config(tiny_config("qwen2"), LoraSpec(rank=4))
    good = {m.key: torch.randn(m.shape) for m in layout.matrices}
    layout.check_state_dict(good)
    missing = dict(good); missing.pop(layout.keys[3])
    with pytest.raises(LayoutError, match="1 missing"):
        layout.check_state_dict(missing)
    extra = {**good, "base_model.model.lm_head.lora_A.weight": torch.zeros(4, 40)}
    with pytest.raises(LayoutError, match="1 unexpected"):
        layout.check_state_dict(extra)
    named = {k.replace("lora_A.weight", "lora_A.default.weight"): v for k, v in good.items()}
    with pytest.raises(LayoutError, match="get_peft_model_state_dict"):
        layout.check_state_dict(named)
    wrong_rank = {**good, layout.keys[0]: torch.randn(8, 40)}
    with pytest.raises(LayoutError, match="LoRA rank 8, layout expects rank 4"):
        layout.check_state_dict(wrong_rank)
    wrong_shape = {**good, layout.keys[0]: torch.randn(4, 41)}
    with pytest.raises(LayoutError, match=r"shape \(4, 41\)"):
        layout.check_state_dict(wrong_shape)
    for bad in (float("nan"), float("inf")):
        t = torch.randn(layout.matrices[1].shape); t[0, 0] = bad
        with pytest.raises(LayoutError, match="NaN/Inf"):
            layout.check_state_dict({**good, layout.keys[1]: t})


# Larger backbones of other shapes. transformers 5 keeps each MoE block's routed experts as two 3-D
# parameters (mlp.experts.gate_up_proj (E, 2I, H), mlp.experts.down_proj (E, H, I)); peft adapts those
# through target_parameters, attention and Qwen2-MoE's shared expert as ordinary nn.Linear modules.
OTHER_SHAPES = {
    "phi3-all-linear": ("phi3", LoraSpec(rank=4)),
    "phi3-qkv-L1": ("phi3", LoraSpec(rank=3, target_modules=("qkv_proj",), layers=(1,))),
    "mixtral-attention": ("mixtral", LoraSpec(rank=4, target_modules="attention")),
    "mixtral-attention+experts": ("mixtral", LoraSpec(rank=4, experts=True)),
    "mixtral-experts-down-L1": ("mixtral", LoraSpec(rank=2, target_modules=("q_proj", "experts.down_proj"), layers=(1,))),
    "qwen2moe-all-linear": ("qwen2_moe", LoraSpec(rank=4)),
    "qwen2moe-all+experts": ("qwen2_moe", LoraSpec(rank=4, experts=True)),
    "qwen3moe-attention": ("qwen3_moe", LoraSpec(rank=4, target_modules="attention")),
    "qwen3moe-attention+experts-L1": ("qwen3_moe", LoraSpec(rank=4, target_modules="attention", experts=True, layers=(1,))),
}


@pytest.mark.parametrize("name", OTHER_SHAPES)
def test_fused_and_moe_layouts_equal_peft(name):
    family, spec = OTHER_SHAPES[name]
    layout = LoraLayout.from_config(tiny_config(family), spec)
    assert peft_shapes(tiny_model(family), layout) == {m.key: m.shape for m in layout.matrices}
    again = LoraLayout.from_dict(json.loads(json.dumps(layout.to_dict())))  # layout.json keeps experts
    assert again.fingerprint() == layout.fingerprint() and again.matrices == layout.matrices
    assert LoraLayout.from_config(tiny_config(family), again.spec).keys == layout.keys  # the saved spec rebuilds it


def test_phi3_fused_widths():
    layout = LoraLayout.from_config(MODELS / "phi-3-mini-4k.json", LoraSpec(rank=8))
    shapes = {m.name + m.kind: m.shape for m in layout.matrices if m.layer == 0}
    assert layout.module_names == ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
    assert shapes["qkv_projB"] == (3 * 3072, 8) and shapes["gate_up_projB"] == (2 * 8192, 8)


def test_moe_expert_matrices_stack_the_experts():
    layout = LoraLayout.from_config(MODELS / "mixtral-8x7b.json", LoraSpec(rank=16, experts=True, layers=(0,)))
    experts = {m.name + m.kind: m for m in layout.matrices if m.experts > 1}
    assert experts["experts.gate_up_projA"].shape == (8 * 16, 4096)
    assert experts["experts.gate_up_projB"].shape == (2 * 14336, 8 * 16)
    assert experts["experts.down_projA"].shape == (8 * 16, 14336)
    assert experts["experts.gate_up_projA"].key == "base_model.model.model.layers.0.mlp.experts.base_layer.lora_A.weight"
    qwen3 = LoraLayout.from_config(MODELS / "qwen3-30b-a3b.json", LoraSpec(rank=16, target_modules="attention"))
    assert qwen3.module_names == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert qwen3.geometry.num_experts == 128 and len(qwen3.geometry.sparse_layers) == 48


def test_other_shapes_refuse_what_they_lack():
    with pytest.raises(LayoutError, match="fuses q/k/v into qkv_proj"):
        LoraLayout.from_config(tiny_config("phi3"), LoraSpec(target_modules=("q_proj", "v_proj")))
    with pytest.raises(LayoutError, match="experts are 3-D parameters"):
        LoraLayout.from_config(tiny_config("mixtral"), LoraSpec(target_modules=("gate_proj",)))
    with pytest.raises(LayoutError, match="not a MoE model"):
        LoraLayout.from_config(tiny_config("llama"), LoraSpec(experts=True))
    with pytest.raises(LayoutError, match="unknown LoRA target modules"):
        LoraSpec(target_modules=("experts.w1",))
    qwen3 = {**tiny_config("qwen3_moe").to_dict(), "mlp_only_layers": [1]}
    with pytest.raises(LayoutError, match="dense MLP layers"):
        LoraLayout.from_config(qwen3, LoraSpec(target_modules=("q_proj", "down_proj")))


def test_spec_parse_experts_and_attention():
    spec = LoraSpec.parse("r=16,modules=attention,experts")
    assert spec.experts and spec.target_modules == "attention" and spec.rank == 16


def test_missing_tie_key_means_the_family_default():
    # Gemma ties its embeddings unless told otherwise; its public config.json has no tie key.
    gemma = LoraLayout.from_config(MODELS / "gemma-2-9b.json").geometry
    assert gemma.tied_embeddings and abs(gemma.num_params / 1e9 - 9.24) < 0.01
    llama = {k: v for k, v in load_config_dict(MODELS / "llama-3.1-8b.json").items() if k != "tie_word_embeddings"}
    assert not LoraLayout.from_config(llama).geometry.tied_embeddings


@pytest.mark.parametrize("name,billions", [("mixtral-8x7b", 46.7), ("qwen3-30b-a3b", 30.5), ("phi-3-mini-4k", 3.82)])
def test_other_shapes_base_parameters(name, billions):
    assert abs(LoraLayout.from_config(MODELS / f"{name}.json").geometry.num_params / 1e9 - billions) < 0.05
