"""Every shipped recipe parses into the typed sections and fits its model's geometry; the tiny recipe
runs stage by stage through the real command line."""

from pathlib import Path

import pytest
import yaml

from dnd_scale.cli import main as dnd
from dnd_scale.collect import CollectConfig
from dnd_scale.config import ConfigError, load_section
from dnd_scale.generator import resolve_features
from dnd_scale.layout import LoraLayout
from dnd_scale.shards import ShardConfig
from dnd_scale.tokenizer import TokenizerConfig, WeightTokenizer
from dnd_scale.trainer import TrainConfig, condition_length

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "configs").glob("*.yaml"))
ENCODER_DIM = 384  # all-MiniLM-L6-v2, the default condition encoder


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.stem for r in RECIPES])
def test_recipe_dry_run(recipe):
    raw = yaml.safe_load(recipe.read_text())
    collect, _ = load_section(CollectConfig, "collect", recipe)
    tokens, _ = load_section(TokenizerConfig, "pack", recipe)
    shard, _ = load_section(ShardConfig, "shard", recipe)
    train, _ = load_section(TrainConfig, "train", recipe)
    assert raw["tasks"], "a recipe lists its training tasks"
    layout = LoraLayout.from_config(ROOT / raw["model_config"], collect.lora)
    tokenizer = WeightTokenizer(layout, tokens)
    features = resolve_features(train.generator, (shard.num_prompts, condition_length(train), ENCODER_DIM),
                                tokenizer.token_shape, tokenizer.num_tokens)
    assert features[-1] == (tokenizer.num_tokens, *tokenizer.token_shape)


def test_overrides_of_unknown_fields_are_refused():
    with pytest.raises(ConfigError, match="unknown config field"):
        load_section(TrainConfig, "train", RECIPES[0], ["--train.learning_rate=1"])
    with pytest.raises(ConfigError, match="expected an integer"):
        load_section(TrainConfig, "train", RECIPES[0], ["--train.steps=1.5"])


def test_tiny_recipe_stage_by_stage_through_the_cli(tmp_path, one_thread, monkeypatch):
    monkeypatch.chdir(ROOT)  # the recipe names configs/models/... relative to the repository
    run, recipe = str(tmp_path / "run"), "configs/tiny-cpu.yaml"
    assert dnd(["collect", "--run", run, "--config", recipe, "--synthetic-records", "24",
                "--collect.steps=3", "--collect.save_last=2"]) == 0
    assert dnd(["pack", "--run", run, "--config", recipe]) == 0
    assert dnd(["shard", "--run", run, "--config", recipe, "--synthetic-records", "24",
                "--shard.pairs_per_task=16", "--shard.shard_size=16"]) == 0
    assert dnd(["train", "--run", run, "--config", recipe, "--train.steps=2", "--train.checkpoint_every=2"]) == 0
    export = tmp_path / "run" / "generator" / "export"
    prompts = tmp_path / "heldout.txt"
    prompts.write_text("\n".join(f"Is {i} an even number?" for i in range(10)))
    assert dnd(["generate", "--generator", str(export), "--prompts", str(prompts), "--out", str(tmp_path / "ad"),
                "--device", "cpu"]) == 0
    assert (tmp_path / "ad" / "heldout" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "run" / "generator" / "train_config.yaml").is_file()


DATA = ROOT.parent / "shared" / "data"  # the DnD data sets, where this machine has them


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.stem for r in RECIPES])
def test_recipes_train_on_sets_whose_answers_vary(recipe):
    from dnd_scale.tasks import check_answers_vary, load_task

    files = [spec for spec in yaml.safe_load(recipe.read_text())["tasks"] if spec.endswith((".json", ".jsonl"))]
    assert not [spec for spec in files if "_test" in Path(spec).stem], "a recipe trains on train splits"
    present = [DATA.parent / spec if spec.startswith("data/") else ROOT / spec for spec in files]
    for path in [p for p in present if p.is_file()]:
        check_answers_vary(load_task(str(path)))


def test_a_task_whose_answers_are_all_one_option_is_refused(tmp_path):
    import json

    from dnd_scale.collect import CollectConfig, collect
    from dnd_scale.tasks import Task, check_answers_vary, load_task

    records = [{"prompt": f"Goal {i}?\nA: one\nB: two", "response": "[A]"} for i in range(16)]
    (tmp_path / "constant.json").write_text(json.dumps(records))
    task = load_task(str(tmp_path / "constant.json"))
    with pytest.raises(ValueError, match=r"all 16 answers are \[A\], so a LoRA trained on it learns to answer \[A\]"):
        collect(CollectConfig(base_model="unused.json", steps=1, save_last=1), [task], tmp_path / "run")
    assert not (tmp_path / "run").exists(), "refused before anything is written"
    assert task.records[0].options == ["[A]", "[B]"]
    check_answers_vary(Task("few", task.records[:15], "few.json"))  # 15 agreeing answers may be chance
