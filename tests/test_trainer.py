"""Trainer pieces that need no process group: config → DeepSpeed JSON, schedule, recipe loading,
the resumable pair stream, condition sources, RNG and log state. The launched runs are in
tests/test_distributed.py."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch
import yaml

from dnd_scale.config import ConfigError, save_config
from dnd_scale.encoder import ConditionCache, ConditionEncoder, EncoderConfig
from dnd_scale.generator import GeneratorConfig
from dnd_scale.trainer import (
    ConditionSource,
    MetricsLog,
    TrainConfig,
    TrainError,
    TrainingData,
    WarmupCosine,
    check_resume_config,
    condition_length,
    condition_source,
    deepspeed_config,
    load_checkpoint,
    load_train_config,
    pair_stream,
    rng_state,
    set_rng_state,
)
from tinyrun import make_tiny_encoder, make_tiny_run


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("trainer")
    return make_tiny_run(root / "run"), make_tiny_encoder(root / "encoder")


@pytest.mark.parametrize("micro, accum, world", [(4, 1, 1), (2, 3, 2), (1, 8, 4)], ids=lambda v: str(v))
def test_deepspeed_config_derives_global_batch(micro, accum, world):
    config = TrainConfig(micro_batch_size=micro, grad_accum_steps=accum, zero_stage=3, grad_clip=0.5)
    ds = deepspeed_config(config, world)
    assert ds["train_batch_size"] == micro * accum * world
    assert ds["train_micro_batch_size_per_gpu"] == micro and ds["gradient_accumulation_steps"] == accum
    assert ds["zero_optimization"] == {"stage": 3} and ds["gradient_clipping"] == 0.5
    assert ds["bf16"] == {"enabled": False}
    json.dumps(ds)  # saved beside the run as JSON


def test_deepspeed_config_offload_and_bf16():
    ds = deepspeed_config(TrainConfig(zero_stage=3, offload_optimizer=True, offload_params=True, bf16=True), 8)
    zero = ds["zero_optimization"]
    assert zero["offload_optimizer"]["device"] == "cpu" and zero["offload_param"]["device"] == "cpu"
    assert ds["bf16"] == {"enabled": True}
    # torch AdamW under ZeRO and offload: no DeepSpeed CPU-Adam build needed.
    assert ds["zero_allow_untested_optimizer"] is True and ds["zero_force_ds_cpu_optimizer"] is False


@pytest.mark.parametrize("kwargs, message", [
    ({"offload_params": True, "zero_stage": 2}, "offload_params needs zero_stage 3"),
    ({"offload_optimizer": True, "zero_stage": 0}, "offload_optimizer needs"),
    ({"zero_stage": 4}, "zero_stage must be"),
    ({"steps": 0}, "must be >= 1"),
    ({"min_lr_ratio": 1.5}, "min_lr_ratio"),
], ids=["param-offload-z2", "optim-offload-z0", "stage4", "steps0", "min-lr"])
def test_bad_train_configs_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**kwargs)


@pytest.mark.parametrize("world, accum", [(1, 6), (2, 3), (3, 2), (6, 1)], ids=lambda v: str(v))
def test_global_batch_size_derives_the_accumulation(world, accum):
    config = TrainConfig(micro_batch_size=2, global_batch_size=12)
    assert config.accumulation_steps(world) == accum
    ds = deepspeed_config(config, world)
    assert ds["train_batch_size"] == 12 and ds["gradient_accumulation_steps"] == accum


def test_a_world_size_that_does_not_divide_the_global_batch_is_refused():
    config = TrainConfig(micro_batch_size=2, global_batch_size=12)
    message = (r"global_batch_size=12 cannot be split over 4 ranks: it must be a multiple of micro_batch_size 2 "
               r"x world size 4 = 8\. Launch on a world size that divides 6 micro-batches \(1, 2, 3, 6 ranks\), or "
               r"set train.global_batch_size to a multiple of 8 \(e.g. 8 or 16\)")
    with pytest.raises(TrainError, match=message):
        deepspeed_config(config, 4)
    with pytest.raises(TrainError, match=r"multiple of 16 \(e.g. 16\)"):  # no zero-sized suggestion
        TrainConfig(micro_batch_size=2, global_batch_size=12).accumulation_steps(8)


@pytest.mark.parametrize("kwargs, message", [
    ({"global_batch_size": 10, "micro_batch_size": 4}, "positive multiple of micro_batch_size 4; got 10"),
    ({"global_batch_size": 0}, "positive multiple"),
    ({"global_batch_size": 16, "grad_accum_steps": 2}, r"either grad_accum_steps \(2\) or global_batch_size \(16\)"),
], ids=["not-a-multiple", "zero", "both"])
def test_bad_global_batch_sizes_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**kwargs)


def test_warmup_cosine_schedule():
    f = WarmupCosine(warmup=4, total=20, min_ratio=0.1)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == 1.0 and math.isclose(f(12), 0.55) and math.isclose(f(20), 0.1) and f(100) == f(20)
    after = [f(s) for s in range(4, 21)]
    assert all(a >= b for a, b in zip(after, after[1:])), "cosine decays monotonically"
    assert WarmupCosine(0, 10, 0.0)(0) == 1.0


def test_condition_length_is_derived():
    features = [(4, 24, 16), (6, 4, 18)]
    assert condition_length(TrainConfig()) == 128  # "auto" and no encoder length
    assert condition_length(TrainConfig(generator=GeneratorConfig(preset=None, features=features))) == 24
    assert condition_length(TrainConfig(generator=GeneratorConfig(preset="qwen2.5-0.5b"))) == 384
    assert condition_length(TrainConfig(encoder=EncoderConfig(max_length=32))) == 32


def test_load_train_config_reads_the_train_section_and_overrides(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "shard": {"num_prompts": 4},  # other stages' sections are not the trainer's business
        "train": {"lr": 3e-4, "generator": {"preset": None, "features": [[4, 8, 16], [6, 4, 18]]}},
    }))
    config = load_train_config(str(recipe), ["--train.zero_stage=3", "--train.encoder.max_length=8"])
    assert config.lr == 3e-4 and config.zero_stage == 3 and config.encoder.max_length == 8
    assert config.generator.features == [(4, 8, 16), (6, 4, 18)]
    with pytest.raises(ConfigError, match="train section only"):
        load_train_config(str(recipe), ["--shard.num_prompts=8"])
    with pytest.raises(ConfigError, match="train.warmup"):
        load_train_config(None, ["--train.warmup=3"])


def _take(stream, n):
    return [(b["task"], b["checkpoint"].tolist(), b["prompt_ids"].tolist()) for b in (next(stream) for _ in range(n))]


def test_pair_stream_chains_epochs_drops_short_batches_and_resumes(tiny_run):
    run, _ = tiny_run
    data = TrainingData.open(run)
    # 72 pairs, micro-batch 5: 14 full batches per epoch, the 2 left over are dropped.
    config = TrainConfig(micro_batch_size=5, num_workers=0)
    stream = pair_stream(data, config, rank=0, world_size=1)
    first = _take(stream, 16)
    assert all(len(tasks) == 5 for tasks, _, _ in first)
    assert stream.dropped == 1 and stream.loader.epoch == 1
    assert first[14:] != first[:2], "the second epoch is shuffled differently"
    state = json.loads(json.dumps(stream.state_dict()))  # a checkpoint stores it as JSON
    rest = _take(stream, 6)
    resumed = pair_stream(data, config, rank=0, world_size=1)
    resumed.load_state_dict(state)
    assert _take(resumed, 6) == rest and resumed.dropped == 1


def test_condition_source_cache_equals_encoder(tiny_run, tmp_path):
    run, encoder_dir = tiny_run
    data = TrainingData.open(run)
    encoder = ConditionEncoder(str(encoder_dir), length=16)
    caches = {t: ConditionCache.build(encoder, pool, tmp_path / f"{t}.safetensors") for t, pool in data.pools.items()}
    batch = next(pair_stream(data, TrainConfig(micro_batch_size=3, num_workers=0), 0, 1))
    cached, encoded = ConditionSource(caches=caches), ConditionSource(encoder=encoder)
    assert cached.dim == encoded.dim == 16
    out = cached(batch)
    assert out.shape == (3, data.num_prompts, 16, 16)
    torch.testing.assert_close(out, encoded(batch), atol=1e-5, rtol=0)


def test_resume_without_a_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(TrainError, match=r"no checkpoint to resume from or export in .* run without --resume"):
        load_checkpoint(None, tmp_path / "checkpoints", None)


def test_rng_state_round_trips_through_json():
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    state = json.loads(json.dumps(rng_state()))
    draws = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(2), np.random.seed(2), torch.manual_seed(2)
    set_rng_state(state)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == draws


def test_metrics_log_is_cut_back_to_the_checkpoint_on_resume(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in range(1, 11)))
    log = MetricsLog(tmp_path, start_step=6, enabled=True)
    log.write({"step": 7, "loss": 0.5})
    log.close()
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6, 7]
    assert (tmp_path / "tensorboard").is_dir()


def test_resume_refuses_a_config_that_changes_the_trajectory(tmp_path):
    saved = TrainConfig(steps=20, lr=1e-3, log_every=5)
    save_config(saved, tmp_path / "train_config.yaml")
    check_resume_config(TrainConfig(steps=20, lr=1e-3, log_every=1, checkpoint_every=7), tmp_path / "train_config.yaml")
    with pytest.raises(TrainError, match=r"lr: 0.001 -> 0.002, steps: 20 -> 40; restore them"):
        check_resume_config(TrainConfig(steps=40, lr=2e-3), tmp_path / "train_config.yaml")
    with pytest.raises(TrainError, match=r"encoder.max_length: None -> 8"):
        check_resume_config(TrainConfig(steps=20, lr=1e-3, encoder=EncoderConfig(max_length=8)), tmp_path / "train_config.yaml")


def _copy_run(run, tmp_path):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    return copy


def test_an_edited_shard_is_refused_when_training_opens_the_data(tiny_run, tmp_path):
    from dnd_scale.shards import ShardConfig, build_shards
    from dnd_scale.targets import PackedTargets

    copy = _copy_run(tiny_run[0], tmp_path)
    # A well-formed shard of other pairs (another seed): it decodes and its indices are in range.
    other = build_shards(PackedTargets(copy / "targets"), TrainingData.open(copy).pools, tmp_path / "other",
                         ShardConfig(num_prompts=4, pairs_per_task=24, shard_size=9, seed=1), progress=False)
    assert other["shards"][0]["sha256"] != json.loads((copy / "shards" / "index.json").read_text())["shards"][0]["sha256"]
    (copy / "shards" / "pairs-000000.tar").write_bytes((tmp_path / "other" / "pairs-000000.tar").read_bytes())
    with pytest.raises(ValueError, match=r"pairs-000000\.tar.*re-run `dnd shard`"):
        TrainingData.open(copy)


@pytest.mark.parametrize("file", ["common.safetensors", "task1.safetensors"])
def test_changed_targets_are_refused_when_training_opens_the_data(tiny_run, tmp_path, file):
    from safetensors.torch import load_file, save_file

    copy = _copy_run(tiny_run[0], tmp_path)
    tensors = load_file(copy / "targets" / file)
    name = "weights" if file == "common.safetensors" else "tokens"
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] = float("inf") if name == "weights" else 3.0  # Inf, or finite garbage
    save_file(tensors, str(copy / "targets" / file))
    with pytest.raises(ValueError, match=rf"{file}.*re-run `dnd pack`"):
        TrainingData.open(copy)


@pytest.fixture
def world_of_one():
    from dnd_scale import trainer

    yield trainer.init_distributed()
    trainer._drop_standalone_env()


def test_condition_caches_are_rebuilt_for_new_encoder_weights_and_when_corrupt(tiny_run, tmp_path, world_of_one):
    import shutil

    from safetensors.torch import load_file, save_file

    run = _copy_run(tiny_run[0], tmp_path)
    encoder_dir = shutil.copytree(tiny_run[1], tmp_path / "encoder")
    data, config = TrainingData.open(run), EncoderConfig(name=str(encoder_dir))
    batch = {"task": ["task0"], "prompt_ids": torch.tensor([[0, 1, 2, 3]])}
    prompts = [[data.pools["task0"][i] for i in range(4)]]

    def conditions():
        return condition_source(config, 8, data.pools, run, 0, torch.device("cpu"))(batch)

    old = conditions()
    weights = load_file(encoder_dir / "model.safetensors")
    save_file({k: v + 0.1 * torch.randn(v.shape) for k, v in weights.items()}, str(encoder_dir / "model.safetensors"))
    fresh = ConditionEncoder(str(encoder_dir), length=8).encode_batch(prompts)
    assert not torch.allclose(old, fresh, atol=1e-3)
    torch.testing.assert_close(conditions(), fresh, atol=1e-5, rtol=0)  # the same path, new weights: rebuilt
    cache = next(run.glob("conditions/*/task0.safetensors"))
    raw = bytearray(cache.read_bytes())
    raw[-4:] = np.array([np.nan], dtype=np.float32).tobytes()
    cache.write_bytes(bytes(raw))
    with pytest.warns(UserWarning, match="task0.safetensors.*does not match the sha256.*Rebuilding it"):
        torch.testing.assert_close(conditions(), fresh, atol=1e-5, rtol=0)
