"""`dnd plan`: every shipped model config, numbers checked against independently built objects.

LoRA and generator parameter counts are compared with real modules instantiated on the meta device
(transformers + peft for the LoRA, HyperConvGenerator for the generator), so a 72B plan is checked
without allocating a byte.
"""

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import transformers
from peft import get_peft_model

from dnd_scale.generator import GeneratorConfig, HyperConvGenerator
from dnd_scale.layout import LoraSpec, load_config_dict
from dnd_scale.plan import (
    PlanConfig, PlanError, activation_bytes_per_sample, check_gpu_memory, display_name, main, make_plan, model_state_bytes,
    stage_activation_bytes_per_sample,
)
from dnd_scale.train_config import TrainConfig

MODELS = sorted((Path(__file__).resolve().parents[1] / "configs" / "models").glob("*.json"))
# The paper's condition (128 prompts x 384 encoder tokens) at micro-batch 8, sized with the paper
# preset that fits it: what docs/scaling.md's commands give on the command line.
RECIPE_05B = MODELS[0].parents[1] / "qwen2.5-0.5b.yaml"  # the paper's 0.5B recipe
PAPER = PlanConfig(num_prompts=128, max_tokens=384, micro_batch=8, preset="match")


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
    # every token holds r x c values and only the last chunk of a matrix (of each expert's) is padded
    tokens = plan["tokens"]
    assert tokens["count"] == sum(
        (s[0] // 8) * -(-s[1] // 128) if ".lora_A" in n else (s[1] // 8) * -(-s[0] // 128) for n, s in lora.items())
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
    assert all(mem["zero3+offload"][w] <= mem["zero3"][w] for w in mem["zero3"])
    for size, verdict in plan["fits_gpu_gib"].items():  # the verdict is the first column under 90%
        for w, name in verdict.items():
            fitting = [c for c in mem if mem[c][w] <= 0.9 * int(size) * 2**30]
            assert name == (fitting[0] if fitting else None)


def test_paper_05b_plan_uses_the_paper_preset():
    plan = make_plan(MODELS[0].parent / "qwen2.5-0.5b.json", LoraSpec(rank=8), PAPER)
    assert plan["generator"]["preset"] == "qwen2.5-0.5b"
    assert plan["generator"]["params"] == 1_113_203_220
    assert plan["tokens"]["count"] == 4296 and plan["lora"]["params"] == 4_399_104


def test_plan_states_the_condition_cache_size_given_the_pool_prompts(capsys):
    """The paper's 0.5B recipe: its four train sets' 17,754 prompts, L = 384, D = 384, float32."""
    model = str(MODELS[0].parent / "qwen2.5-0.5b.json")
    cache = make_plan(model, LoraSpec(rank=8), PlanConfig(pool_prompts=17_754, max_tokens=384))["condition_cache"]
    assert cache["bytes_at_most"] == 17_754 * 384 * 384 * 4 == 10_471_735_296
    assert (cache["prompts"], cache["length"], cache["dim"], cache["dtype"]) == (17_754, 384, 384, "float32")
    assert cache["time"].startswith("one encoder pass over all prompts")
    half = make_plan(model, LoraSpec(rank=8), PlanConfig(pool_prompts=17_754, max_tokens=384, cache_dtype="float16"))
    assert half["condition_cache"]["bytes_at_most"] == cache["bytes_at_most"] // 2
    assert "condition_cache" not in make_plan(model, LoraSpec(rank=8))  # the committed plans stay as made
    assert main(["--config", str(RECIPE_05B), "--pool-prompts", "17754"]) == 0  # as the README says
    assert ("condition cache <= 9.75 GiB (10.47 GB: 17,754 prompts x L 384 x D 384 x 4 B float32) in "
            "RUN/conditions/; one encoder pass over all prompts") in capsys.readouterr().out
    assert main(["--model", model, "--lora", "r=8"]) == 0
    assert "condition cache: give --pool-prompts" in capsys.readouterr().out
    with pytest.raises(ValueError, match="cache_dtype must be one of"):
        PlanConfig(pool_prompts=10, cache_dtype="bfloat16")


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


def test_model_state_offload_follows_deepspeed():
    p, largest = 1_000_000, 600_000
    assert model_state_bytes(p, largest, 2, 8, offload_optimizer=True) == 2 * p
    assert model_state_bytes(p, largest, 3, 8, offload_optimizer=True, offload_params=True) == 4 * largest
    # one stage with more than half the parameters: ZeRO-3 gathers it whole, so it costs more than ZeRO-2
    assert model_state_bytes(p, largest, 3, 8) > model_state_bytes(p, largest, 2, 8)


def test_plan_explains_zero3_above_zero2_and_names_folders_whole(capsys, tmp_path):
    plan = make_plan(MODELS[0].parent / "qwen2.5-72b.json", LoraSpec(rank=16), replace(PAPER, chunk=512))
    mem = plan["memory_per_gpu_bytes"]
    assert mem["zero3"]["8"] > mem["zero2"]["8"]
    assert plan["generator"]["preset"] == "qwen2.5-72b-rule"
    note = next(n for n in plan["memory_notes"] if n.startswith("zero3 > zero2"))
    share = plan["generator"]["largest_stage_params"] / plan["generator"]["params"]
    assert f"{share:.0%}" in note
    folder = tmp_path / "Qwen2.5-0.5B-Instruct"
    folder.mkdir()
    (folder / "config.json").write_text((MODELS[0].parent / "qwen2.5-0.5b.json").read_text())
    assert display_name(folder) == display_name(folder / "config.json") == "Qwen2.5-0.5B-Instruct"
    assert display_name("configs/models/qwen2.5-0.5b.json") == "qwen2.5-0.5b"
    assert main(["--model", str(folder)]) == 0
    assert "== Qwen2.5-0.5B-Instruct:" in capsys.readouterr().out


def test_gemma2_without_tie_key_counts_its_embeddings_once():
    plan = make_plan(MODELS[0].parent / "gemma-2-9b.json", LoraSpec(rank=8))
    assert plan["model"]["tied_embeddings"] and round(plan["model"]["base_params"] / 1e9, 2) == 9.24


def test_moe_plan_with_expert_loras():
    path = MODELS[0].parent / "qwen3-30b-a3b.json"
    attention = make_plan(path, LoraSpec(rank=16, target_modules="attention"), PlanConfig(chunk=512))
    experts = make_plan(path, LoraSpec(rank=16, target_modules="attention", experts=True), PlanConfig(chunk=512))
    assert experts["lora"]["modules"] == ["q_proj", "k_proj", "v_proj", "o_proj", "experts.gate_up_proj", "experts.down_proj"]
    # 128 experts x 48 layers x (gate_up: r x (2048 + 1536), down: r x (768 + 2048))
    assert experts["lora"]["params"] - attention["lora"]["params"] == 48 * 128 * 16 * (2048 + 1536 + 768 + 2048)
    assert experts["tokens"]["per_module"]["experts.down_proj"] == 48 * 128 * (2 + 4)


def _declared(gib, **kwargs):
    features = [(4, 32, 16), (8, 16, 16), (30, 6, 18)]
    config = TrainConfig(generator=GeneratorConfig(preset=None, features=features, kernel_size=3),
                         gpu_memory_gib=gib, **kwargs)
    return config, features


def test_check_gpu_memory_refuses_with_the_plans_numbers():
    config, features = _declared(1e-4, micro_batch_size=4, zero_stage=2)
    with pytest.raises(PlanError) as err:
        check_gpu_memory(config, features, world=8, device="cpu")
    message = str(err.value)
    assert "zero2 on 8 GPU(s)" in message and "train.gpu_memory_gib = 0.0001" in message
    assert "zero3+offload" in message and "micro_batch_size" in message
    from dnd_scale.plan import gpu_memory_estimate

    config, features = _declared(80.0, bf16=True)
    fits = check_gpu_memory(config, features, world=1, device="cpu")
    assert fits == gpu_memory_estimate(features, 3, 2, 1, config.micro_batch_size)["total"]
    fp32 = check_gpu_memory(_declared(80.0)[0], features, world=1, device="cpu")  # fp32 stage activations: twice the bytes
    assert fp32 - fits == stage_activation_bytes_per_sample(features) * config.micro_batch_size  # the loss is fp32 in both
    config, features = _declared(None)
    assert check_gpu_memory(config, features, world=1, device="cpu") is None  # CPU, undeclared: no check


def test_check_gpu_memory_counts_the_resident_data():
    """train.resident=device puts the packed targets and condition caches on every GPU beside the
    generator: the check adds their bytes to every configuration's estimate and says so."""
    from dnd_scale.plan import GIB, USABLE_FRACTION

    config, features = _declared(80.0)
    estimate = check_gpu_memory(config, features, world=1, device="cpu")
    resident = 10 * GIB
    assert check_gpu_memory(config, features, world=1, device="cpu", resident_bytes=resident) == estimate + resident
    config, features = _declared((estimate + resident / 2) / USABLE_FRACTION / GIB)
    assert check_gpu_memory(config, features, world=1, device="cpu") == estimate  # streamed from the host: fits
    with pytest.raises(PlanError) as err:
        check_gpu_memory(config, features, world=1, device="cpu", resident_bytes=resident)
    message = str(err.value)
    assert f"needs ~{(estimate + resident) / GIB:.1f} GiB per GPU" in message
    assert "+ 10.0 GiB of resident data, the packed targets and condition caches train.resident puts" in message
    assert "with the resident data (GiB):" in message and "zero3+offload 10.0" in message  # offload moves no data
    assert "set train.resident=host to stream the data from the host" in message


def _tiny_train(tmp_path, gpu_memory_gib):
    """(run folder, train config) of a tiny run that declares a GPU of `gpu_memory_gib`."""
    from tinyrun import make_tiny_encoder, make_tiny_run, tiny_features

    from dnd_scale.encoder import EncoderConfig

    run = make_tiny_run(tmp_path / "run")
    encoder = make_tiny_encoder(tmp_path / "encoder")
    config = TrainConfig(
        generator=GeneratorConfig(preset=None, features=tiny_features(), kernel_size=3),
        encoder=EncoderConfig(name=str(encoder), max_length=8), micro_batch_size=2, steps=2, warmup_steps=1,
        zero_stage=0, checkpoint_every=2, num_workers=0, gpu_memory_gib=gpu_memory_gib,
    )
    return run, config


def test_train_refuses_before_building_anything(tmp_path, one_thread):
    from dnd_scale.trainer import train

    run, config = _tiny_train(tmp_path, 1e-6)
    with pytest.raises(PlanError, match="needs ~.* GiB per GPU"):
        train(config, run)
    # nothing but the run's lock file: no config, checkpoint or export was written
    assert [p.name for p in (run / "generator").iterdir()] == [".lock"]


def test_train_counts_resident_data_in_the_memory_check(tmp_path, one_thread, monkeypatch):
    """A generator that fits the declared GPU alone is refused when train.resident puts the run's
    targets and condition caches on that GPU too, before anything is built."""
    from dataclasses import replace

    from dnd_scale import trainer
    from dnd_scale.plan import GIB, USABLE_FRACTION
    from dnd_scale.resident import resident_bytes
    from dnd_scale.train_data import TrainingData

    run, config = _tiny_train(tmp_path, 80.0)
    estimate = check_gpu_memory(config, config.generator.features, world=1, device="cpu")
    targets = resident_bytes(TrainingData.open(run).targets, None)  # the condition caches come on top
    config = replace(config, gpu_memory_gib=(estimate + targets / 2) / USABLE_FRACTION / GIB, resident="device")
    monkeypatch.setattr(trainer, "resolve_resident", lambda *args: True)  # as on a GPU with room for the data
    with pytest.raises(PlanError, match=r"needs ~.* GiB per GPU .* GiB of resident data.*train.resident=host"):
        trainer.train(config, run)
    assert [p.name for p in (run / "generator").iterdir()] == [".lock"]


def test_resident_auto_streams_the_data_when_the_generator_would_not_fit_beside_it(tmp_path, one_thread,
                                                                                  monkeypatch, capsys):
    """train.resident=auto on a GPU with room for the data but not for the data and the generator:
    the run streams from the host instead of being refused (train.resident=device is, above)."""
    from dataclasses import replace

    from dnd_scale import trainer
    from dnd_scale.io import read_json
    from dnd_scale.plan import GIB, USABLE_FRACTION
    from dnd_scale.resident import resident_bytes
    from dnd_scale.train_data import TrainingData

    run, config = _tiny_train(tmp_path, 80.0)
    estimate = check_gpu_memory(config, config.generator.features, world=1, device="cpu")
    targets = resident_bytes(TrainingData.open(run).targets, None)
    config = replace(config, gpu_memory_gib=(estimate + targets / 2) / USABLE_FRACTION / GIB, resident="auto",
                     output_dir=str(tmp_path / "gen"))  # fmt: skip
    monkeypatch.setattr(trainer, "resolve_resident", lambda *args: True)
    trainer.train(config, run)
    info = read_json(tmp_path / "gen" / trainer.TRAIN_INFO, "train info")
    assert info["resident"]["on_device"] is False and info["resident"]["bytes"] > targets / 2
    assert "streamed from the host" in capsys.readouterr().err


@pytest.mark.parametrize("index", [0, 1], ids=["plans.json", "plans_moe_experts.json"])
def test_committed_plans_are_what_the_code_computes(index, tmp_path, monkeypatch, capsys):
    """benchmarks/results/plans*.json (docs/scaling.md's numbers) must be what its commands give today."""
    import importlib.util
    import shlex

    root = MODELS[0].parents[2]
    spec = importlib.util.spec_from_file_location("plans_doc", root / "benchmarks" / "plans_doc.py")
    plans_doc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plans_doc)
    argv = shlex.split(plans_doc.COMMANDS[index])[2:]  # after `dnd plan`
    committed = root / argv[argv.index("--out") + 1]
    argv[argv.index("--out") + 1] = str(tmp_path / "fresh.json")
    monkeypatch.chdir(root)  # the commands' paths, and the plans' keys, are relative to the repository
    assert main(argv) == 0
    assert (tmp_path / "fresh.json").read_text() == committed.read_text(), "rerun the commands in docs/scaling.md"


def test_scaling_doc_tables_are_rendered_from_the_committed_plans():
    import subprocess
    import sys

    root = MODELS[0].parents[2]
    result = subprocess.run([sys.executable, str(root / "benchmarks" / "plans_doc.py"), "--check"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_a_plan_without_a_recipe_sizes_runconfigs_defaults_and_says_so(tmp_path, capsys):
    import yaml

    from dnd_scale.recipe import RunConfig

    model, defaults = str(MODELS[0].parent / "qwen2.5-0.5b.json"), RunConfig()
    recipe = tmp_path / "defaults.yaml"
    recipe.write_text(yaml.safe_dump({"model_config": model}))  # a recipe that sets nothing else
    assert main(["--config", str(recipe), "--json"]) == 0
    out, err = capsys.readouterr()
    assert "no recipe" not in out + err
    assert main(["--model", model, "--json"]) == 0
    bare, note = capsys.readouterr()
    assert json.loads(bare) == json.loads(out), "no recipe: the plan of RunConfig's defaults, numbers and all"
    plan = json.loads(bare)[model]
    assert plan["generator"]["features"][0][0] == defaults.shard.num_prompts
    assert plan["tokens"]["chunk"] == defaults.pack.chunk and plan["lora"]["rank"] == defaults.collect.lora.rank
    assert note.startswith("no recipe: these are RunConfig's defaults")
    for said in (f"shard.num_prompts = {defaults.shard.num_prompts}", f"pack.chunk = {defaults.pack.chunk}",
                 f"train.micro_batch_size = {defaults.train.micro_batch_size}",
                 f"train.generator = preset {defaults.train.generator.preset}", "collect.lora = r=8,alpha=16"):
        assert said in note
    # what a flag gives is not a default; in text the note heads the plan
    assert main(["--model", model, "--micro-batch", "2", "--lora", "r=4", "--preset", "match"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("no recipe: these are RunConfig's defaults") and "shard.num_prompts" in text
    assert "train.micro_batch_size" not in text and "collect.lora" not in text and "train.generator" not in text
