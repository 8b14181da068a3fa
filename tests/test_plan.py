"""`dnd plan`: every shipped model config, numbers checked against independently built objects.

LoRA and generator parameter counts are compared with real modules instantiated on the meta device
(transformers + peft for the LoRA, HyperConvGenerator for the generator), so a 72B plan is checked
without allocating a byte.
"""

import json
from pathlib import Path

import pytest
import torch
import transformers
from peft import get_peft_model

from dnd_scale.generator import GeneratorConfig, HyperConvGenerator
from dnd_scale.layout import LoraSpec, load_config_dict
from dnd_scale.plan import PlanConfig, main, make_plan, model_state_bytes

MODELS = sorted((Path(__file__).resolve().parents[1] / "configs" / "models").glob("*.json"))


def meta_lora_params(config_path, spec, layout_peft_config):
    data = load_config_dict(config_path)
    data = {k: v for k, v in data.items() if not k.startswith("_")}
    config = transformers.AutoConfig.for_model(**data)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config) if data["model_type"] != "qwen2_5_vl" \
            else transformers.Qwen2_5_VLForConditionalGeneration(config)
        peft_model = get_peft_model(model, layout_peft_config)
    return {n: tuple(p.shape) for n, p in peft_model.named_parameters() if "lora_" in n}


@pytest.mark.parametrize("path", MODELS, ids=[p.stem for p in MODELS])
def test_plan_counts_match_real_modules(path):
    from dnd_scale.layout import LoraLayout

    spec = LoraSpec(rank=8)
    plan = make_plan(path, spec, PlanConfig(micro_batch=1))
    layout = LoraLayout.from_config(path, spec)
    lora = meta_lora_params(path, spec, layout.to_peft_config())
    assert len(lora) == plan["lora"]["matrices"]
    assert sum(a * b for a, b in lora.values()) == plan["lora"]["params"]
    # every token holds r x c values and only the last chunk of a matrix is padded
    tokens = plan["tokens"]
    assert tokens["count"] == sum(-(-(s[1] if ".lora_A" in n else s[0]) // 128) for n, s in lora.items())
    assert tokens["shape"] == [10, 130]
    gen = plan["generator"]
    with torch.device("meta"):
        model = HyperConvGenerator(GeneratorConfig(preset=None, features=gen["features"], kernel_size=gen["kernel_size"]))
    assert sum(p.numel() for p in model.parameters()) == gen["params"]
    assert gen["features"][-1] == [tokens["count"], 10, 130]
    mem = plan["memory_per_gpu_bytes"]
    for stage in ("zero1", "zero2", "zero3"):  # partitioning never costs memory
        assert mem[stage]["1"] >= mem[stage]["8"] >= mem[stage]["64"]
    assert mem["zero3"]["64"] < mem["zero0"]["64"]


def test_paper_05b_plan_uses_the_paper_preset():
    plan = make_plan(MODELS[0].parent / "qwen2.5-0.5b.json", LoraSpec(rank=8))
    assert plan["generator"]["preset"] == "qwen2.5-0.5b"
    assert plan["generator"]["params"] == 1_113_203_220
    assert plan["tokens"]["count"] == 4296 and plan["lora"]["params"] == 4_399_104


def test_model_state_formula_follows_zero():
    p, largest = 1_000_000, 10_000
    assert model_state_bytes(p, largest, 0, 8) == 20 * p
    assert model_state_bytes(p, largest, 1, 8) == 4 * p + 2 * p
    assert model_state_bytes(p, largest, 2, 8) == 2 * p + 18 * p // 8  # DeepSpeed's estimator
    assert model_state_bytes(p, largest, 3, 64) == 4 * largest + 18 * p // 64


def test_cli_prints_every_shipped_model(capsys):
    assert main(["--model", *map(str, MODELS), "--json"]) == 0
    plans = json.loads(capsys.readouterr().out)
    assert len(plans) == len(MODELS)
    assert main(["--model", str(MODELS[0]), "--lora", "r=4,modules=q_proj+v_proj"]) == 0
    out = capsys.readouterr().out
    assert "memory per GPU" in out and "zero3" in out
