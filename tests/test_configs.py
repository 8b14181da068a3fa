"""Every shipped recipe loads as a RunConfig and fits its model's geometry; recipe paths are relative
to the recipe file; a stage without --config reads the run folder's saved recipe (and refuses to run
on defaults); the tiny recipe runs stage by stage through the real command line."""

import os
from pathlib import Path

import pytest
import yaml

from dnd_scale.cli import main as dnd
from dnd_scale.config import ConfigError
from dnd_scale.generator import resolve_features
from dnd_scale.io import flush_deferred_writes
from dnd_scale.layout import LoraLayout
from dnd_scale.recipe import RECIPE_FILE, RunConfig, load_recipe, parse_stage_args, record_recipe
from dnd_scale.tokenizer import WeightTokenizer
from dnd_scale.train_config import TrainConfig, condition_length, load_train_config

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "configs").glob("*.yaml"))
ENCODER_DIM = 384  # all-MiniLM-L6-v2, the default condition encoder


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.stem for r in RECIPES])
def test_recipe_dry_run(recipe):
    run = load_recipe(recipe)
    assert isinstance(run, RunConfig) and run.tasks, "a recipe lists its training tasks"
    assert Path(run.model_config).is_file(), "model_config resolves relative to the recipe file"
    layout = LoraLayout.from_config(run.model_config, run.collect.lora)
    tokenizer = WeightTokenizer(layout, run.pack)
    features = resolve_features(run.train.generator, (run.shard.num_prompts, condition_length(run.train), ENCODER_DIM),
                                tokenizer.token_shape, tokenizer.num_tokens)
    assert features[-1] == (tokenizer.num_tokens, *tokenizer.token_shape)
    assert dnd(["plan", "--config", str(recipe), "--json"]) == 0  # plan sizes the recipe's own generator


def test_overrides_of_unknown_fields_are_refused():
    with pytest.raises(ConfigError, match="unknown config field"):
        load_recipe(RECIPES[0], ["--train.learning_rate=1"])
    with pytest.raises(ConfigError, match="expected an integer"):
        load_recipe(RECIPES[0], ["--train.steps=1.5"])
    with pytest.raises(ConfigError, match=r"unknown config field\(s\) \['train.generator.stages'\]"):
        load_recipe(RECIPES[0], ["--train.generator.stages=3"])  # a nested field is named by its whole path
    with pytest.raises(ConfigError, match="synthetic_records must be >= 1"):
        load_recipe(RECIPES[0], ["--synthetic_records=0"])


def test_recipe_paths_are_relative_to_the_recipe_file(tmp_path, monkeypatch):
    folder = tmp_path / "recipes"
    folder.mkdir()
    (folder / "r.yaml").write_text(yaml.safe_dump({
        "model_config": "models/m.json", "tasks": ["data/a.json", "synthetic:uppercase", "hf:org/set:train"],
        "collect": {"base_model": "../weights/base"},
    }))
    monkeypatch.chdir(ROOT)  # anywhere but the recipe's folder
    run = load_recipe(folder / "r.yaml")
    assert run.model_config == str(folder / "models" / "m.json")
    assert run.tasks == [str(folder / "data" / "a.json"), "synthetic:uppercase", "hf:org/set:train"]
    assert run.collect.base_model == str(tmp_path / "weights" / "base")
    # an override's path is the command line's: relative to the working directory
    monkeypatch.chdir(tmp_path)
    run = load_recipe(folder / "r.yaml", ["--collect.base_model=here.json"])
    assert run.collect.base_model == str(tmp_path / "here.json")


def _stage_parser():
    import argparse

    parser = argparse.ArgumentParser(prog="dnd pack")
    parser.add_argument("--run", required=True)
    parser.add_argument("--config")
    return parser


def test_a_stage_without_config_reads_the_run_folders_recipe(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"tasks": ["synthetic:uppercase"], "pack": {"chunk": 16}, "train": {"steps": 7}}))
    run = tmp_path / "run"
    _, config = parse_stage_args(_stage_parser(), ["--run", str(run), "--config", str(recipe), "--pack.chunk=8"], "pack")
    assert not (run / RECIPE_FILE).exists(), "recorded once the stage starts work, not while it checks"
    flush_deferred_writes()  # what the stage's first write (or `dnd`, when it ends well) does
    assert (run / RECIPE_FILE).is_file(), "with --config the run folder keeps the recipe"
    _, again = parse_stage_args(_stage_parser(), ["--run", str(run)], "pack")
    assert again == config  # resolved: the override included, nothing from the defaults
    _, once = parse_stage_args(_stage_parser(), ["--run", str(run), "--pack.chunk=4"], "pack")
    assert once.pack.chunk == 4 and load_recipe(run / RECIPE_FILE).pack.chunk == 8  # holds for that run only


def test_a_stage_with_neither_config_nor_saved_recipe_is_refused(tmp_path, capsys):
    assert dnd(["pack", "--run", str(tmp_path / "fresh")]) == 1
    err = capsys.readouterr().err
    assert "dnd pack: error: dnd pack needs a recipe" in err and "pass --config R.yaml" in err
    assert not (tmp_path / "fresh").exists()


REFUSALS = {  # dnd <stage> arguments (after --run RUN --config NEW) that the stage refuses before it starts work
    "collect-without-tasks": ["collect"],
    "pack-without-checkpoints": ["pack"],
    "shard-without-targets": ["shard"],
    "train-without-targets": ["train"],
    "generate-without-export": ["generate", "--prompts", "{prompts}"],
    "eval-with-bad-adapters": ["eval", "--base", "b.json", "--tasks", "synthetic:sum_mc", "--adapters", "x.safetensors",
                               "--out", "{out}"],
}


@pytest.mark.parametrize("argv", REFUSALS.values(), ids=REFUSALS.keys())
def test_a_refused_stage_leaves_the_run_folders_recipe_as_it_was(argv, tmp_path, capsys):
    run = tmp_path / "run"
    record_recipe(run, load_recipe(None, ["--collect.steps=7", "--collect.save_last=1", "--train.steps=5"]), "collect")
    before = (run / RECIPE_FILE).read_bytes()
    new = tmp_path / "new.yaml"
    new.write_text(yaml.safe_dump({"collect": {"steps": 9, "save_last": 1}, "pack": {"chunk": 4}, "shard": {"num_prompts": 3},
                                   "train": {"steps": 6}, "eval": {"seed": 2}}))
    (tmp_path / "p.txt").write_text("a prompt\n")
    stage, *rest = [a.format(prompts=tmp_path / "p.txt", out=tmp_path / "report") for a in argv]
    try:
        status = dnd([stage, "--run", str(run), "--config", str(new), *rest])
    except SystemExit as exit:  # a usage error (argparse)
        status = exit.code
    assert status != 0, capsys.readouterr().err
    assert (run / RECIPE_FILE).read_bytes() == before, f"a refused dnd {stage} rewrote the run folder's recipe"


def test_a_stage_that_ends_well_without_writing_records_its_recipe(tmp_path, monkeypatch):
    import dnd_scale.pack

    run = tmp_path / "run"
    (tmp_path / "new.yaml").write_text(yaml.safe_dump({"pack": {"chunk": 4}}))
    monkeypatch.setattr(dnd_scale.pack, "pack", lambda run_dir, config, tasks: run_dir)  # packs nothing
    monkeypatch.setattr(dnd_scale.pack, "PackedTargets", lambda out: type("Packed", (), {
        "tasks": [], "num_checkpoints": {}, "num_tokens": 0, "token_shape": (0, 0)})())
    assert dnd(["pack", "--run", str(run), "--config", str(tmp_path / "new.yaml")]) == 0
    assert load_recipe(run / RECIPE_FILE).pack.chunk == 4


def test_a_later_stage_keeps_what_the_earlier_stages_ran_with(tmp_path):
    run = tmp_path / "run"
    first = load_recipe(None, ["--collect.steps=3", "--collect.save_last=1", "--train.steps=5"])
    record_recipe(run, first, "collect")
    second = load_recipe(None, ["--collect.steps=9", "--collect.save_last=1", "--train.steps=6"])
    record_recipe(run, second, "train")
    saved = load_recipe(run / RECIPE_FILE)
    assert saved.collect.steps == 3 and saved.train.steps == 6


def test_train_config_takes_train_overrides_only():
    assert load_train_config(None, ["--train.steps=3"]) == TrainConfig(steps=3)
    with pytest.raises(ConfigError, match="dnd train takes overrides of the train section only"):
        load_train_config(None, ["--collect.steps=3"])


def test_tiny_recipe_stage_by_stage_through_the_cli(tmp_path, one_thread, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the recipe's paths are relative to the recipe, not to the working directory
    run, recipe = str(tmp_path / "run"), str(ROOT / "configs" / "tiny-cpu.yaml")
    assert dnd(["collect", "--run", run, "--config", recipe, "--synthetic-records", "24",
                "--tasks", "synthetic:uppercase", "synthetic:parity_tf", "synthetic:largest_number_mc",
                "--collect.steps=3", "--collect.save_last=2"]) == 0
    saved = load_recipe(Path(run) / RECIPE_FILE)
    assert saved.synthetic_records == 24 and saved.collect.steps == 3 and len(saved.tasks) == 3
    # the later stages read the run folder's recipe; shard reads the prompt pools collect kept
    assert dnd(["pack", "--run", run]) == 0
    assert dnd(["shard", "--run", run, "--shard.pairs_per_task=16", "--shard.shard_size=16"]) == 0
    assert dnd(["train", "--run", run, "--train.steps=2", "--train.checkpoint_every=2"]) == 0
    export = tmp_path / "run" / "generator" / "export"
    prompts = tmp_path / "heldout.txt"
    prompts.write_text("\n".join(f"Is {i} an even number?" for i in range(10)))
    assert dnd(["generate", "--generator", str(export), "--prompts", str(prompts), "--out", str(tmp_path / "ad"),
                "--device", "cpu"]) == 0
    assert (tmp_path / "ad" / "heldout" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "run" / "generator" / "train_config.yaml").is_file()
    assert dnd(["eval", "--run", run, "--base", str(tmp_path / "run" / "base_model"), "--tasks", "synthetic:sum_mc",
                "--adapters", f"generated={tmp_path / 'ad'}", "--out", str(tmp_path / "report"),
                "--eval.task_records=8"]) == 0
    assert (tmp_path / "report" / "results.json").is_file()
    assert os.path.samefile(saved.collect.base_model, ROOT / "configs" / "models" / "tiny-qwen2.json")


DATA = ROOT.parent / "shared" / "data"  # the DnD data sets, where this machine has them


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.stem for r in RECIPES])
def test_recipes_train_on_sets_whose_answers_vary(recipe):
    from dnd_scale.tasks import check_answers_vary, load_task

    files = [Path(spec) for spec in load_recipe(recipe).tasks if spec.endswith((".json", ".jsonl"))]
    assert not [spec for spec in files if "_test" in spec.stem], "a recipe trains on train splits"
    present = [DATA.parent / p.relative_to(ROOT) if p.is_relative_to(ROOT / "data") else p for p in files]
    for path in [p for p in present if p.is_file()]:
        check_answers_vary(load_task(str(path)))


def test_a_task_whose_answers_are_all_one_option_is_refused(tmp_path):
    import json

    from dnd_scale.collect import collect
    from dnd_scale.collect_config import CollectConfig
    from dnd_scale.tasks import Task, check_answers_vary, load_task

    records = [{"prompt": f"Goal {i}?\nA: one\nB: two", "response": "[A]"} for i in range(16)]
    (tmp_path / "constant.json").write_text(json.dumps(records))
    task = load_task(str(tmp_path / "constant.json"))
    with pytest.raises(ValueError, match=r"all 16 answers are \[A\], so a LoRA trained on it learns to answer \[A\]"):
        collect(CollectConfig(base_model="unused.json", steps=1, save_last=1), [task], tmp_path / "run")
    assert not (tmp_path / "run").exists(), "refused before anything is written"
    assert task.records[0].options == ["[A]", "[B]"]
    check_answers_vary(Task("few", task.records[:15], "few.json"))  # 15 agreeing answers may be chance
