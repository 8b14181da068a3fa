"""`dnd experiment` at tiny scale (random-init base, synthetic families): the leave-one-out study runs
end to end, keeps conditioning and scoring apart, and continues a stopped run instead of redoing it."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from dnd_scale.collect_config import CollectConfig
from dnd_scale.config import ConfigError, from_dict
from dnd_scale.evaluate import EvalConfig
from dnd_scale.experiment import run_experiment, run_order
from dnd_scale.experiment_data import prompt_batches, split_heldout
from dnd_scale.experiment_recipe import load_experiment
from dnd_scale.experiment_scoring import cached_scores
from dnd_scale.experiment_stats import PAIRED, group_summary, paired_difference, paired_summaries
from dnd_scale.experiment_weights import update_gram
from dnd_scale.export import check_vllm_contract, vllm_max_lora_rank
from dnd_scale.io import read_json
from dnd_scale.recipe import RunConfig
from dnd_scale.shards import ShardConfig
from dnd_scale.tokenizer import TokenizerConfig
from dnd_scale.train_config import TrainConfig

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "experiments" / "tiny-heldout.yaml"
REAL = REPO / "configs" / "experiments" / "commonsense_qwen0.5b.yaml"
EXPERIMENTS = sorted((REPO / "configs" / "experiments").glob("*.yaml"))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, one_thread):
    out = tmp_path_factory.mktemp("experiment") / "run"
    config = load_experiment(TINY)
    return config, out, run_experiment(config, out)


def test_every_model_group_is_scored_by_both_scorers(tiny_run):
    config, out, results = tiny_run
    entry = results["heldout"]["sum"]
    for scorer in ("loglik", "generate"):
        summary = entry["summary"][scorer]
        assert set(summary) == {"base", "average", "generated", "control", "oracle", "training"}
        assert summary["generated"]["n"] == config.generated_samples
        assert summary["training"]["n"] == len(config.heldout[0].train_on)
        for stats in summary.values():
            low, high = stats["ci95"]
            assert 0.0 <= low <= stats["mean"] <= high <= 1.0
    # the table on disk is the JSON's
    assert results == json.loads((out / "results.json").read_text())
    assert "| sum |" in (out / "results.md").read_text()
    weights = entry["weights"]
    assert len(weights["to_training_mean"]) == config.generated_samples
    assert set(weights["to_training"]) == set(config.heldout[0].train_on)
    update = weights["update"]
    assert len(update["to_training_mean"]) == len(update["cosine_to_oracle"]) == config.generated_samples
    assert set(update["to_training"]) == set(config.heldout[0].train_on)
    assert all(-1.0 <= c <= 1.0 for c in update["cosine_to_oracle"])
    assert set(results["variations"]) == {"variation-more-steps"}
    varied = results["variations"]["variation-more-steps"]
    assert varied["generator"]["parameters"] > 0
    assert set(varied["summary"]["loglik"]) == set(entry["summary"]["loglik"])  # compared with the same baselines
    for scorer in ("loglik", "generate"):
        paired = entry["paired"][scorer]
        assert set(paired) == {f"{a}-{b}" for a, b in PAIRED}
        summary = entry["summary"][scorer]
        assert paired["generated-average"]["difference"] == pytest.approx(
            summary["generated"]["mean"] - summary["average"]["mean"])
        assert paired["generated-best_training"]["difference"] == pytest.approx(
            summary["generated"]["mean"] - summary["training"]["best"])
        # recomputed from the score cache alone (how a finished run's report is checked)
        assert paired_summaries(cached_scores(out, "sum")[scorer], f"sum/{scorer}") == paired
    assert "generated - average" in (out / "results.md").read_text()


def test_generated_adapters_see_only_the_conditioning_half(tiny_run):
    config, out, _ = tiny_run
    conditioning, scoring = split_heldout(config, "sum")
    assert conditioning and scoring
    assert not {r.prompt for r in conditioning} & {r.prompt for r in scoring}
    from dnd_scale.encoder import prompts_fingerprint

    batches = prompt_batches([r.prompt for r in conditioning], config.run.shard.num_prompts, config.generated_samples,
                             f"{config.split_seed}/sum/condition")
    flat = [p for batch in batches for p in batch]
    assert len(flat) == len(set(flat))  # disjoint batches
    for i, batch in enumerate(batches):
        provenance = read_json(out / "heldout-sum" / "adapters" / f"generated-{i}" / "provenance.json")
        assert provenance["prompts_sha256"] == prompts_fingerprint(batch)
    # the scored records are exactly the scoring half
    scored = read_json(out / "scores" / "sum" / "loglik" / "base.json")
    assert scored["count"] == len(scoring)


def test_every_adapter_folder_the_study_writes_meets_the_vllm_contract(tiny_run):
    config, out, _ = tiny_run
    folders = sorted(path.parent for path in out.rglob("adapter_config.json"))
    names = {folder.name.rsplit("-", 1)[0] for folder in folders}
    assert {"generated", "control", "average"} <= names, names  # generated, control and weight-averaged
    rank = config.run.collect.lora.rank
    assert all(check_vllm_contract(folder) == vllm_max_lora_rank(rank) for folder in folders)


def test_a_stopped_run_continues_without_redoing_finished_work(tiny_run):
    config, out, results = tiny_run
    timings = read_json(out / "timings.json")
    removed = out / "scores" / "sum" / "generate" / "base.json"
    removed.unlink()
    again = run_experiment(config, out)
    assert read_json(out / "timings.json") == timings  # nothing was collected, trained or generated again
    assert removed.is_file()
    assert again["heldout"]["sum"]["summary"] == results["heldout"]["sum"]["summary"]


def test_group_interval_is_a_bootstrap_over_questions():
    right = {"predictions": [0, 1, 0, 1], "answers": [0, 1, 0, 1], "accuracy": 1.0, "correct": 4, "count": 4}
    half = {"predictions": [0, 0, 1, 1], "answers": [0, 1, 0, 1], "accuracy": 0.5, "correct": 2, "count": 4}
    stats = group_summary([right, half], "seed")
    assert stats["mean"] == 0.75 and stats["best"] == 1.0 and stats["worst"] == 0.5
    assert 0.5 <= stats["ci95"][0] <= 0.75 <= stats["ci95"][1] <= 1.0
    assert group_summary([right, half], "seed") == stats  # seeded


def test_recipe_errors_name_the_problem(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("tasks: {a: {train: a.json}}\nheldout: [{task: a, train_on: [b], control: a}]\n")
    with pytest.raises(ConfigError, match="names task 'b'"):
        load_experiment(bad)
    bad.write_text("tasks: {a: {train: a.json}}\nrun: {tasks: [synthetic:uppercase]}\n")
    with pytest.raises(ConfigError, match="run.tasks must stay empty"):
        load_experiment(bad)
    # the stage sections of a recipe written before they moved under `run:`
    with pytest.raises(ConfigError, match=r"sets \['base_model', 'train'\] at the top level; .* under `run:`"):
        load_experiment(TINY, ["--base_model=m.json", "--train.steps=3"])
    with pytest.raises(ConfigError, match="overrides 'train.steps=6': .* write 'run.train.steps=6'"):
        load_experiment(TINY, ["--variations=[{name: v, heldout: sum, overrides: [train.steps=6]}]"])
    with pytest.raises(ConfigError, match="need 8 prompts"):
        prompt_batches(["p"] * 5, 4, 2, "s")


def test_each_held_out_task_runs_before_the_next_with_its_variations(tmp_path):
    config = load_experiment(REAL)
    runs = run_order(config, tmp_path)
    assert [key for key, *_ in runs] == [
        "science", "ARC-e", "variation-ARC-e-16-prompts", "variation-ARC-e-2x-steps", "OBQA"]
    by_key = {key: (held, recipe, folder) for key, held, recipe, folder in runs}
    held, recipe, folder = by_key["variation-ARC-e-2x-steps"]
    assert held.task == "ARC-e" and folder == tmp_path / "variation-ARC-e-2x-steps"
    assert recipe.run.train.steps == 2 * config.run.train.steps and by_key["ARC-e"][1] is config


@pytest.mark.parametrize("recipe", EXPERIMENTS, ids=[r.stem for r in EXPERIMENTS])
def test_every_shipped_experiment_recipe_loads(recipe):
    config = load_experiment(recipe)
    assert isinstance(config.run, RunConfig) and config.heldout and not config.run.tasks
    assert all(held.task in config.tasks for held in config.heldout)


# The stage sections of commonsense_qwen0.5b.yaml as they stood at the top level of the recipe that
# made benchmarks/results/heldout_qwen0.5b_attempt3.json (before they moved under `run:`), copied
# verbatim: the embedded RunConfig must resolve to exactly these settings.
COMMONSENSE_SECTIONS = """
collect:
  lora: {rank: 8, alpha: 16.0, target_modules: all-linear}
  steps: 100
  save_every: 1
  save_last: 50
  lr: 1.0e-4
  batch_size: 16
  max_length: 512
  dtype: bfloat16
pack:
  chunk: 128
shard:
  num_prompts: 32
  pairs_per_task: 2000
  shard_size: 500
train:
  generator: {preset: auto, num_stages: 6, max_channels: 1024, kernel_size: 5, impl: torch}
  encoder: {max_length: 128, cache_dtype: float16}
  micro_batch_size: 32
  steps: 300
  lr: 2.0e-4
  warmup_steps: 50
  weight_decay: 0.1
  zero_stage: 0
  bf16: true
  checkpoint_every: 150
  keep_checkpoints: 1
  log_every: 25
  num_workers: 4
  resampled: true
eval:
  batch_size: 64
  max_length: 1024
  max_new_tokens: 8
  dtype: bfloat16
"""


def test_shipped_recipe_resolves_to_the_settings_the_results_were_made_with():
    base = "/models/qwen2.5-coder-0.5b-instruct.gguf"
    config = load_experiment(REAL, [f"--run.collect.base_model={base}"])
    old = yaml.safe_load(COMMONSENSE_SECTIONS)
    old["train"]["cudnn_benchmark"] = True  # the default then (off since); the recipe now says it
    sections = {"collect": CollectConfig, "pack": TokenizerConfig, "shard": ShardConfig, "train": TrainConfig,
                "eval": EvalConfig}
    # The base model was a top-level field that collect took over; every other field is the old section's.
    expected = {name: from_dict(cls, {**old[name], "base_model": base} if name == "collect" else old[name])
                for name, cls in sections.items()}
    assert {name: getattr(config.run, name) for name in sections} == expected
    collect, train = config.run.collect, config.run.train
    assert (collect.steps, collect.save_last, collect.lora.rank, collect.lora.alpha, collect.lr) == (100, 50, 8, 16.0, 1e-4)
    assert (train.steps, train.lr, train.micro_batch_size, config.run.shard.num_prompts) == (300, 2e-4, 32, 32)
    # The study's own fields, unchanged.
    assert config.data_dir == str((REAL.parent / "../../../shared/data/dnd").resolve())
    assert {name: (f.train, f.test, f.synthetic) for name, f in config.tasks.items()} == {
        "ARC-c": ("ARC-c_train.json", None, None), "ARC-e": ("ARC-e_train.json", "ARC-e_test.json", None),
        "BoolQ": ("BoolQ_train.json", None, None), "OBQA": ("OBQA_train.json", "OBQA_test.json", None),
        "WinoGrande": ("WinoGrande_validation.json", None, None), "science": (None, "science-dataset.json", None)}
    assert [(h.task, h.train_on, h.control) for h in config.heldout] == [
        ("science", ["ARC-c", "ARC-e", "BoolQ", "OBQA", "WinoGrande"], "BoolQ"),
        ("ARC-e", ["ARC-c", "BoolQ", "OBQA", "WinoGrande"], "BoolQ"),
        ("OBQA", ["ARC-c", "ARC-e", "BoolQ", "WinoGrande"], "BoolQ")]
    assert (config.split_seed, config.scoring_records, config.generated_samples, config.control_samples,
            config.scorers) == (0, 500, 5, 2, ["loglik", "generate"])
    assert not any(f.synthetic for f in config.tasks.values())  # so run.synthetic_records plays no part
    # Each variation differs from the study in its one override only.
    varied = {key: recipe.run for key, _, recipe, _ in run_order(config, Path("out"))}
    assert varied["variation-ARC-e-16-prompts"] == replace(config.run, shard=replace(expected["shard"], num_prompts=16))
    assert varied["variation-ARC-e-2x-steps"] == replace(config.run, train=replace(expected["train"], steps=600))
    assert varied["science"] == varied["ARC-e"] == varied["OBQA"] == config.run


def test_shipped_recipe_resolves_and_splits_disjointly():
    config = load_experiment(REAL)
    assert Path(config.data_dir).is_absolute()
    assert [h.task for h in config.heldout] == ["science", "ARC-e", "OBQA"]
    if not (Path(config.data_dir) / "ARC-e_test.json").is_file():
        pytest.skip("the public QA sets are not beside the repository")
    conditioning, scoring = split_heldout(config, "OBQA")
    assert len(conditioning) == len(scoring) == 250
    assert not {r.prompt for r in conditioning} & {r.prompt for r in scoring}


def test_paired_difference_is_per_question():
    right = {"predictions": [0, 1, 0, 1], "answers": [0, 1, 0, 1], "accuracy": 1.0}
    wrong = {"predictions": [1, 0, 1, 0], "answers": [0, 1, 0, 1], "accuracy": 0.0}
    half = {"predictions": [0, 0, 1, 1], "answers": [0, 1, 0, 1], "accuracy": 0.5}
    ahead = paired_difference([right], [wrong], "seed")
    assert ahead == {"difference": 1.0, "ci95": [1.0, 1.0], "p_not_ahead": 0.0}
    same = paired_difference([half], [half], "seed")
    assert same["difference"] == 0.0 and same["ci95"] == [0.0, 0.0] and same["p_not_ahead"] == 1.0
    # a group is averaged per question first: (right + wrong) / 2 is 0.5 on every question
    assert paired_difference([right, wrong], [half], "seed")["difference"] == 0.0
    with pytest.raises(ValueError, match="paired comparison"):
        paired_difference([right], [{"predictions": [0], "answers": [0]}], "seed")


def test_update_gram_is_the_inner_product_of_the_updates_BA():
    import torch

    gen = torch.Generator().manual_seed(0)
    keys = ["m.layers.0.q_proj", "m.layers.0.down_proj"]
    shapes = {"m.layers.0.q_proj": (6, 5), "m.layers.0.down_proj": (3, 7)}  # (out, in)
    states = []
    for _ in range(3):
        state = {}
        for key in keys:
            out, inp = shapes[key]
            state[f"{key}.lora_A.weight"] = torch.randn(2, inp, generator=gen)
            state[f"{key}.lora_B.weight"] = torch.randn(out, 2, generator=gen)
        states.append(state)
    flat = [torch.cat([(s[f"{k}.lora_B.weight"] @ s[f"{k}.lora_A.weight"]).flatten() for k in keys]).double()
            for s in states]
    explicit = torch.stack([torch.stack([a @ b for b in flat]) for a in flat])
    assert torch.allclose(update_gram(states), explicit)


def test_distances_from_a_gram_matrix_equal_the_explicit_ones():
    import torch

    from dnd_scale.experiment_weights import _distances

    x = torch.randn(6, 20, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    got = _distances(x @ x.T, {"generated": [0, 1], "training": [2, 3, 4], "oracle": [5]})
    mean = x[2:5].mean(dim=0)
    assert got["to_training_mean"] == pytest.approx([float((x[i] - mean).norm() / mean.norm()) for i in (0, 1)])
    assert got["to_oracle"] == pytest.approx([float((x[i] - x[5]).norm() / x[5].norm()) for i in (0, 1)])
    assert got["oracle_to_training_mean"] == pytest.approx(float((x[5] - mean).norm() / mean.norm()))
