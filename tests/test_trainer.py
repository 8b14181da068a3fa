"""Trainer pieces that need no process group: config → DeepSpeed JSON, schedule, recipe loading,
the resumable pair stream, condition sources, RNG and log state. The launched runs are in
tests/test_distributed.py."""

from __future__ import annotations

import json
import math
import os
import random
import signal

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from dnd_scale.config import ConfigError, save_config
from dnd_scale.encoder import ConditionCache, ConditionEncoder, EncoderConfig
from dnd_scale.generator import GeneratorConfig
from dnd_scale.train_checkpoint import check_resume_config, load_checkpoint, rng_state, set_rng_state
from dnd_scale.train_config import (
    TrainConfig,
    TrainError,
    WarmupCosine,
    condition_length,
    deepspeed_config,
    load_train_config,
)
from dnd_scale.train_data import ConditionSource, TrainingData, condition_source, pair_stream
from dnd_scale.train_metrics import MetricsLog
from dnd_scale.trainer import train
from dnd_scale.io import exclusive_folder, read_jsonl
from tinyrun import make_tiny_encoder, make_tiny_run, tiny_features


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


def test_malformed_or_non_utf8_recipes_and_overrides_are_named(tmp_path):
    (tmp_path / "broken.yaml").write_text("train:\n  lr: [1e-4, 2\n")
    with pytest.raises(ConfigError, match=r"config recipe '.*broken.yaml' is not valid YAML: expected ',' or ']'.* "
                                          r"at line 3, column 1; fix the file"):
        load_train_config(str(tmp_path / "broken.yaml"), [])
    (tmp_path / "latin1.yaml").write_bytes("train:\n  output_dir: résumé\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"config recipe '.*latin1.yaml' is not UTF-8 text \(byte 0xe9"):
        load_train_config(str(tmp_path / "latin1.yaml"), [])
    with pytest.raises(ConfigError, match=r"override '--train.betas=\[0.9' is not valid YAML|override "
                                          r"'--train.betas=\[0.9': the value is not valid YAML"):
        load_train_config(None, ["--train.betas=[0.9"])
    (tmp_path / "gen").mkdir()
    (tmp_path / "gen" / "train_config.yaml").write_text("lr: {\n")  # a resumed run's saved config, damaged
    with pytest.raises(ConfigError, match=r"saved train config '.*gen/train_config.yaml' is not valid YAML"):
        check_resume_config(TrainConfig(), tmp_path / "gen" / "train_config.yaml")


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
    check_resume_config(TrainConfig(steps=40, lr=1e-3), tmp_path / "train_config.yaml")  # more steps: continue
    with pytest.raises(TrainError, match=r"differ \(saved -> now\): lr: 0.001 -> 0.002; restore them"):
        check_resume_config(TrainConfig(steps=40, lr=2e-3), tmp_path / "train_config.yaml")
    with pytest.raises(TrainError, match=r"encoder.max_length: None -> 8"):
        check_resume_config(TrainConfig(steps=20, lr=1e-3, encoder=EncoderConfig(max_length=8)), tmp_path / "train_config.yaml")


@pytest.mark.parametrize("override, message", [
    ("--train.lr=.inf", r"lr=inf \(need 0 < lr <= 1\)"),
    ("--train.lr=.nan", r"lr=nan"),
    ("--train.lr=50", r"lr=50.0"),
    ("--train.weight_decay=.nan", r"weight_decay=nan"),
    ("--train.betas=[0.9,1.5]", r"betas=\(0.9, 1.5\)"),
    ("--train.adam_eps=-1e-8", r"adam_eps=-1e-08"),
    ("--train.grad_clip=.inf", r"grad_clip=inf"),
    ("--train.min_lr_ratio=.nan", r"min_lr_ratio=nan"),
], ids=["lr-inf", "lr-nan", "lr-50", "wd-nan", "beta2", "eps-neg", "clip-inf", "min-lr-nan"])
def test_non_finite_or_absurd_optimizer_numbers_are_refused(override, message):
    with pytest.raises(ConfigError, match=message + r".*fix them in the recipe"):
        load_train_config(None, [override])


# In-process training (a world of one, ZeRO-0, a few steps): what the trainer refuses or guards.


def _tiny_train_config(encoder_dir, output_dir, **overrides) -> TrainConfig:
    return TrainConfig(**{
        "generator": GeneratorConfig(preset=None, features=tiny_features(), kernel_size=3),
        "encoder": EncoderConfig(name=str(encoder_dir), max_length=8),
        "micro_batch_size": 2, "steps": 4, "lr": 1e-2, "warmup_steps": 1, "zero_stage": 0,
        "checkpoint_every": 1, "log_every": 1, "num_workers": 0, "output_dir": str(output_dir), **overrides,
    })


class MeddledStream:
    """The production stream `inner`, whose subclasses do something at micro-batch `at`; its data
    position (state_dict) stays the inner stream's."""

    def __init__(self, inner, at: int) -> None:
        self.inner, self.at, self.taken = inner, at, 0

    def state_dict(self) -> dict:
        return self.inner.state_dict()

    def load_state_dict(self, state) -> None:
        self.inner.load_state_dict(state)

    @property
    def skipped(self) -> dict:
        return self.inner.skipped


class PoisonedStream(MeddledStream):
    """The production stream with NaN targets from micro-batch `at` on (a diverging run)."""

    def __next__(self) -> dict:
        batch = next(self.inner)
        self.taken += 1
        if self.taken >= self.at:
            batch["tokens"] = torch.full_like(batch["tokens"], float("nan"))
        return batch


def test_a_non_finite_loss_stops_training_without_saving_the_diverged_state(tiny_run, tmp_path, one_thread):
    run, encoder_dir = tiny_run
    config = _tiny_train_config(encoder_dir, tmp_path / "gen")
    poisoned = lambda data, cfg, rank, world: PoisonedStream(pair_stream(data, cfg, rank, world), at=3)  # noqa: E731
    with pytest.raises(TrainError, match=r"loss became nan at step 3 .* nothing of step 3 was saved \(last checkpoint: "
                                         r"step00000002\)\. Lower train.lr"):
        train(config, run, make_stream=poisoned)
    checkpoints = sorted(p.name for p in (tmp_path / "gen" / "checkpoints").iterdir() if p.is_dir())
    assert checkpoints == ["step00000001", "step00000002"]
    assert (tmp_path / "gen" / "checkpoints" / "latest").read_text() == "step00000002"
    assert not (tmp_path / "gen" / "export").exists()
    assert [r["step"] for r in read_jsonl(tmp_path / "gen" / "metrics.jsonl")] == [1, 2]


def test_a_second_train_on_a_busy_output_folder_fails_at_once(tiny_run, tmp_path, one_thread):
    run, encoder_dir = tiny_run
    out = tmp_path / "gen"
    config = _tiny_train_config(encoder_dir, out, steps=1)
    with exclusive_folder(out, "dnd train", "wait"):  # another run is writing there
        with pytest.raises(TrainError, match=rf"another `dnd train` is writing to {out}; wait for that run to "
                                             r"finish, or set train.output_dir to another folder"):
            train(config, run)
    assert sorted(p.name for p in out.iterdir()) == [".lock"], "the refused run wrote nothing"
    train(config, run)  # the lock is free again: this run trains, and releases it when done
    assert (out / "export" / "model.safetensors").is_file()
    with exclusive_folder(out, "dnd train", "wait"):
        pass


class StopAfter(MeddledStream):
    """The production stream, sending this process SIGTERM while it serves micro-batch `at` (a job
    preempted mid-step: the trainer checkpoints at the step boundary and returns)."""

    def __next__(self) -> dict:
        self.taken += 1
        if self.taken == self.at:
            os.kill(os.getpid(), signal.SIGTERM)
        return next(self.inner)


class FillsTheDisk(MeddledStream):
    """The production stream; from micro-batch `at` on, the disk is full: torch.save fails the way it
    does then (a RuntimeError that names no cause) and no space is free."""

    def __init__(self, inner, at: int, monkeypatch) -> None:
        super().__init__(inner, at)
        self.monkeypatch = monkeypatch

    def __next__(self) -> dict:
        self.taken += 1
        if self.taken == self.at:
            import dnd_scale.io

            def short_write(*args, **kwargs):
                raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 46528 vs 46400")

            self.monkeypatch.setattr(torch, "save", short_write)
            self.monkeypatch.setattr(dnd_scale.io, "_free_bytes", lambda path: 0)
        return next(self.inner)


def test_a_full_disk_at_a_checkpoint_says_no_space_left_and_keeps_the_previous_one(tiny_run, tmp_path, one_thread,
                                                                                   monkeypatch):
    run, encoder_dir = tiny_run
    config = _tiny_train_config(encoder_dir, tmp_path / "gen")
    filling = lambda data, cfg, rank, world: FillsTheDisk(pair_stream(data, cfg, rank, world), 3, monkeypatch)  # noqa: E731
    with pytest.raises(TrainError, match=r"no space left on the device of .*checkpoints/step00000003 \(0.0 MiB free\)"
                                         r".*The incomplete checkpoint step00000003 was removed; `latest` still names "
                                         r"step00000002: continue with --resume once there is space"):
        train(config, run, make_stream=filling)
    checkpoints = tmp_path / "gen" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir() if p.is_dir()) == ["step00000001", "step00000002"]


def _cut_shards(data, every: int) -> None:
    """Damage every `every`-th shard file after the run checked them (a failing disk, an overwrite
    mid-run): cut after its first member's header, so all its pairs are lost."""
    for shard in data.shard_index["shards"][::every]:
        path = data.shards_dir / shard["file"]
        path.write_bytes(path.read_bytes()[:700])


def test_all_shards_damaged_after_the_check_say_so(tiny_run, tmp_path):
    data = TrainingData.open(_copy_run(tiny_run[0], tmp_path))
    _cut_shards(data, every=1)
    stream = pair_stream(data, TrainConfig(micro_batch_size=2, num_workers=0), rank=0, world_size=1)
    with pytest.raises(TrainError, match=r"no full micro-batch of 2 pairs in a whole epoch: its shards are damaged "
                                         r"\(16 corrupt_shards, 144 lost_samples, 0 bad_samples; .*re-run `dnd shard`"):  # over two epochs
        next(stream)


def test_skipped_damaged_data_is_in_the_metrics_the_train_info_and_a_summary(tiny_run, tmp_path, one_thread, capfd):
    run, encoder_dir = tiny_run
    run = _copy_run(run, tmp_path)
    config = _tiny_train_config(encoder_dir, tmp_path / "gen")

    def damaged(data, cfg, rank, world):
        _cut_shards(data, every=2)
        return pair_stream(data, cfg, rank, world)

    out = train(config, run, make_stream=damaged)
    records = read_jsonl(out / "metrics.jsonl")
    counts = [(r["corrupt_shards"], r["lost_samples"], r["bad_samples"]) for r in records]
    assert counts[0][0] >= 1 and counts[0][1] >= 1 and counts == sorted(counts), counts
    info = json.loads((out / "train_info.json").read_text())
    assert info["skipped"] == dict(zip(("corrupt_shards", "lost_samples", "bad_samples"), counts[-1]))
    assert (f"dnd train: damaged data skipped over all ranks: {counts[-1][0]} corrupt shards ({counts[-1][1]} pairs "
            f"lost), {counts[-1][2]} bad pairs") in capfd.readouterr().err


def test_an_in_process_resume_reproduces_the_uninterrupted_run(tiny_run, tmp_path, one_thread):
    """ZeRO-2: the model, optimizer and ZeRO files all load back with weights_only=True."""
    run, encoder_dir = tiny_run
    whole = train(_tiny_train_config(encoder_dir, tmp_path / "whole", zero_stage=2), run)
    config = _tiny_train_config(encoder_dir, tmp_path / "cut", zero_stage=2, checkpoint_every=10)
    stopping = lambda data, cfg, rank, world: StopAfter(pair_stream(data, cfg, rank, world), at=2)  # noqa: E731
    cut = train(config, run, make_stream=stopping)
    assert (cut / "checkpoints" / "latest").read_text() == "step00000002" and not (cut / "export").exists()
    train(config, run, resume=True)
    losses = [[r["loss"] for r in read_jsonl(out / "metrics.jsonl")] for out in (cut, whole)]
    assert len(losses[0]) == 4 and losses[0] == losses[1]
    final, reference = (load_file(out / "export" / "model.safetensors") for out in (cut, whole))
    assert final.keys() == reference.keys() and all((final[k] == reference[k]).all() for k in final)


def test_a_finished_run_continues_with_more_steps(tiny_run, tmp_path, one_thread):
    run, encoder_dir = tiny_run
    config = _tiny_train_config(encoder_dir, tmp_path / "gen", steps=3, min_lr_ratio=0.5, checkpoint_every=10)
    out = train(config, run)
    before = load_file(out / "export" / "model.safetensors")
    more = _tiny_train_config(encoder_dir, tmp_path / "gen", steps=5, min_lr_ratio=0.5, checkpoint_every=10)
    train(more, run, resume=True)
    log = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5]
    # the schedule the run started with: steps 4 and 5 train at its final LR, lr x min_lr_ratio
    assert log[3]["lr"] == log[4]["lr"] == pytest.approx(1e-2 * 0.5)
    assert (out / "checkpoints" / "latest").read_text() == "step00000005"
    assert json.loads((out / "export" / "config.json").read_text())["step"] == 5
    after = load_file(out / "export" / "model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(TrainError, match=r"at step 5, past train.steps=4; set train.steps to 5 or more"):
        train(_tiny_train_config(encoder_dir, tmp_path / "gen", steps=4, min_lr_ratio=0.5), run, resume=True)


class WritesMarker:
    """Unpickling this object calls open(path, "w"): the code a crafted checkpoint would run."""

    def __init__(self, path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.parametrize("flags", [{"resume": True}, {"export_only": True}], ids=["resume", "export-only"])
def test_a_checkpoint_that_would_run_code_is_refused(tiny_run, tmp_path, one_thread, flags):
    run, encoder_dir = tiny_run
    config = _tiny_train_config(encoder_dir, tmp_path / "gen", steps=2)
    out = train(config, run)
    states = out / "checkpoints" / "step00000002" / "mp_rank_00_model_states.pt"
    saved = torch.load(states, weights_only=True)
    marker = tmp_path / "pwned"
    torch.save({**saved, "module": WritesMarker(marker)}, states)
    with pytest.raises(TrainError, match=r"mp_rank_00_model_states.pt holds more than tensors and plain data "
                                         r"\(Unsupported global: GLOBAL io.open.*never runs code from them"):
        train(config, run, **flags)
    assert not marker.exists(), "unpickling the checkpoint ran its code"


def test_resume_compares_with_the_checkpoint_not_a_deletable_yaml(tiny_run, tmp_path, one_thread):
    run, encoder_dir = tiny_run
    config = _tiny_train_config(encoder_dir, tmp_path / "gen", steps=2)
    out = train(config, run)
    (out / "train_config.yaml").unlink()
    changed = _tiny_train_config(encoder_dir, tmp_path / "gen", steps=6, lr=2e-2, weight_decay=0.1, log_every=2)
    message = (r"checkpoint .*step00000002 belongs to another run: these differ \(checkpoint -> now\): "
               r"train_config.lr: 0.01 -> 0.02, train_config.weight_decay: 0.01 -> 0.1\. "
               r"Restore the train fields")  # log_every and steps may change: the trajectory so far stays
    for flags in ({"resume": True}, {"export_only": True}):
        with pytest.raises(TrainError, match=message):
            train(changed, run, **flags)
    assert not (out / "train_config.yaml").exists(), "a refused resume records nothing"


def test_a_generator_folder_of_another_run_does_not_resume_as_this_one(tiny_run, tmp_path, one_thread):
    run, encoder_dir = tiny_run
    other = make_tiny_run(tmp_path / "other", seed=1)  # same recipe, other checkpoints and pairs
    config = _tiny_train_config(encoder_dir, tmp_path / "gen", steps=2)
    train(config, run)
    with pytest.raises(TrainError, match=r"belongs to another run: these differ \(checkpoint -> now\): "
                                         r"data.shards_index_sha256: '[0-9a-f]{64}' -> '[0-9a-f]{64}', "
                                         r"data.targets_index_sha256: .*and shards/ it was trained on"):
        train(config, other, export_only=True)


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
    from dnd_scale import train_engine

    yield train_engine.init_distributed()
    train_engine.drop_standalone_env()


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
    # the cache of the new weights (the old weights' cache folder is still there, and older)
    cache = max(run.glob("conditions/*/task0.safetensors"), key=lambda path: path.stat().st_mtime_ns)
    raw = bytearray(cache.read_bytes())
    raw[-4:] = np.array([np.nan], dtype=np.float32).tobytes()
    cache.write_bytes(bytes(raw))
    with pytest.warns(UserWarning, match="task0.safetensors.*does not match the sha256.*Rebuilding it"):
        torch.testing.assert_close(conditions(), fresh, atol=1e-5, rtol=0)
    cache.write_bytes(cache.read_bytes()[:-100])  # truncated (a full disk, a killed copy)
    with pytest.warns(UserWarning, match="task0.safetensors.*Rebuilding it"):
        torch.testing.assert_close(conditions(), fresh, atol=1e-5, rtol=0)


# DataLoader workers: an error or an interrupt ends the process promptly (each run under a hard timeout,
# so a regression fails instead of hanging the suite).

WORKER_SCRIPT = """
import faulthandler
import signal
import sys
import time
faulthandler.dump_traceback_later(40, exit=False)  # a hang prints every thread's stack for the test's message
# Ctrl-C as in a terminal: a shell that starts the suite in the background hands down SIGINT ignored
signal.signal(signal.SIGINT, signal.default_int_handler)
from pathlib import Path
from dnd_scale.train_config import TrainConfig
from dnd_scale.train_data import TrainingData, pair_stream
run, fault = Path(sys.argv[1]), sys.argv[2]
data = TrainingData.open(run)  # checks the hashes: the damage below happens after it
stream = pair_stream(data, TrainConfig(micro_batch_size=2, num_workers=2, resampled=True), rank=0, world_size=1)
if fault == "truncate":  # a targets file cut short under a running job: the workers open it after the check
    path = run / "targets" / "task0.safetensors"
    path.write_bytes(path.read_bytes()[:100])
next(stream)
print("serving", flush=True)
while True:  # a training step between batches: the interrupt lands there, outside the loader
    next(stream)
    time.sleep(0.1)
"""


@pytest.mark.parametrize("fault", ["truncate", "interrupt"])
def test_a_worker_error_or_an_interrupt_ends_the_process_promptly(tiny_run, tmp_path, fault):
    """With num_workers > 0 the workers start with SIGTERM blocked (a job-wide SIGTERM must not kill
    them before the trainer checkpoints); the process must still exit at once on a worker error or a
    Ctrl-C, which the deepspeed launcher forwards to the rank alone, not to its workers."""
    import subprocess
    import sys
    import time

    run = _copy_run(tiny_run[0], tmp_path)
    proc = subprocess.Popen([sys.executable, "-c", WORKER_SCRIPT, str(run), fault], text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        if fault == "interrupt":
            assert proc.stdout.readline() == "serving\n", proc.stderr.read()
            time.sleep(0.5)
            proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"the process hung after the {fault}; its output:\n{err[-3000:]}")
    assert proc.returncode != 0
    assert ("KeyboardInterrupt" if fault == "interrupt" else "task0.safetensors") in err, err[-3000:]



def test_the_condition_cache_says_what_it_builds_once(tiny_run, tmp_path, world_of_one, capfd):
    import shutil

    run = _copy_run(tiny_run[0], tmp_path)
    shutil.rmtree(run / "conditions", ignore_errors=True)  # caches that earlier tests' training built
    data, config = TrainingData.open(run), EncoderConfig(name=str(tiny_run[1]))
    condition_source(config, 8, data.pools, run, 0, torch.device("cpu"))
    err = capfd.readouterr().err
    bound = 30 * 8 * 16 * 4 / 2**20  # prompts x L x D x float32, in MiB
    assert f"encoding 30 prompts of 3 tasks once into the condition cache {run / 'conditions'}" in err
    assert f"(at most {bound:.0f} MiB; later runs and --resume reuse it; --no-cache" in err
    assert "condition cache: 100%" in err  # the progress bar over the tasks
    condition_source(config, 8, data.pools, run, 0, torch.device("cpu"))
    assert "encoding" not in capfd.readouterr().err  # built once: the next run reuses it silently


def test_no_cache_encodes_on_the_fly(tmp_path, monkeypatch):
    from dnd_scale import trainer

    seen = []
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setattr(trainer, "train", lambda config, run, **kwargs: seen.append(config) or run)
    (tmp_path / "recipe.yaml").write_text("train: {steps: 3}\n")  # the run folder's recipe
    trainer.main(["--run", str(tmp_path), "--no-cache"])
    trainer.main(["--run", str(tmp_path)])
    assert [config.encoder.cache for config in seen] == [False, True]
    assert [config.steps for config in seen] == [3, 3]


def test_resident_data_gathers_what_the_host_stream_serves(tiny_run, tmp_path):
    """The device copy (here on the CPU) of targets and caches gives the host path's values, from the
    indices-only batches the loader serves in that mode."""
    from dnd_scale.resident import ResidentData, resident_bytes

    run, encoder_dir = tiny_run
    data = TrainingData.open(run)
    encoder = ConditionEncoder(str(encoder_dir), length=16)
    caches = {t: ConditionCache.build(encoder, pool, tmp_path / f"{t}.safetensors", torch.float16)
              for t, pool in data.pools.items()}
    config = TrainConfig(micro_batch_size=5, num_workers=0)
    host = [next(s) for s in [pair_stream(data, config, 0, 1)] for _ in range(3)]
    data.resident = ResidentData(data.targets, caches, torch.device("cpu"))
    indices = [next(s) for s in [pair_stream(data, config, 0, 1)] for _ in range(3)]
    for full, light in zip(host, indices, strict=True):
        assert "tokens" not in light and light["task"] == full["task"]
        conditions, targets = data.resident.batch(light)
        torch.testing.assert_close(targets, full["tokens"], rtol=0, atol=0)
        torch.testing.assert_close(conditions, ConditionSource(caches=caches)(full), rtol=0, atol=0)
    tokens = sum(data.targets.num_checkpoints.values()) * data.targets.num_tokens * 4 * 18 * 4
    assert resident_bytes(data.targets, caches) == tokens + sum(c.embeddings.nbytes + 8 * c.offsets.numel()
                                                                for c in caches.values())


@pytest.mark.parametrize("mode, device, caches, expected", [
    ("host", "cpu", True, False),
    ("auto", "cpu", True, False),
    ("device", "cpu", True, "the device is cpu"),
    ("everywhere", "cpu", True, "must be one of"),
], ids=["host", "auto-cpu", "device-cpu", "bad-mode"])
def test_resident_mode_is_resolved_or_refused_with_the_reason(mode, device, caches, expected):
    from dnd_scale.resident import resolve_resident

    if isinstance(expected, str):
        with pytest.raises(ValueError, match=expected):
            resolve_resident(mode, torch.device(device), 1, caches)
    else:
        assert resolve_resident(mode, torch.device(device), 1, caches) is expected


def test_a_run_on_resident_data_trains_like_the_streamed_one(tiny_run, tmp_path, one_thread, monkeypatch):
    """The whole path: indices-only loader, gathers on the device copy, the same losses and export."""
    from dnd_scale import trainer

    run, encoder_dir = tiny_run
    streamed = train(_tiny_train_config(encoder_dir, tmp_path / "streamed"), run)
    monkeypatch.setattr(trainer, "resolve_resident", lambda *args: True)
    resident = train(_tiny_train_config(encoder_dir, tmp_path / "resident"), run)
    info = json.loads((resident / "train_info.json").read_text())
    assert info["resident"]["on_device"] is True and info["resident"]["bytes"] > 0
    assert json.loads((streamed / "train_info.json").read_text())["resident"]["on_device"] is False
    losses = [[r["loss"] for r in read_jsonl(out / "metrics.jsonl")] for out in (resident, streamed)]
    assert len(losses[0]) >= 2 and losses[0] == losses[1]
    final, reference = (load_file(out / "export" / "model.safetensors") for out in (resident, streamed))
    assert all(torch.equal(final[k], reference[k]) for k in reference)


def test_bf16_without_zero_departs_from_fp32_and_train_warns(tiny_run, tmp_path, one_thread, capsys):
    """DeepSpeed's bf16 at ZeRO-0 (its fp16-style optimizer) follows another loss curve than fp32, while
    bf16 under ZeRO-1 (fp32 gradients) stays on it; `dnd train` says so when it is asked for ZeRO-0 bf16."""
    from dnd_scale.trainer import BF16_ZERO0_WARNING

    run, encoder_dir = tiny_run
    curves, warned = {}, {}
    for name, stage, bf16 in (("fp32", 0, False), ("bf16-zero0", 0, True), ("bf16-zero1", 1, True)):
        config = _tiny_train_config(encoder_dir, tmp_path / name, zero_stage=stage, bf16=bf16, steps=5,
                                    checkpoint_every=100)
        capsys.readouterr()
        train(config, run)
        warned[name] = BF16_ZERO0_WARNING in capsys.readouterr().err
        curves[name] = [r["loss"] for r in read_jsonl(tmp_path / name / "metrics.jsonl")]
    assert warned == {"fp32": False, "bf16-zero0": True, "bf16-zero1": False}
    gap = {name: abs(curves[name][-1] - curves["fp32"][-1]) / curves["fp32"][-1] for name in ("bf16-zero0", "bf16-zero1")}
    assert gap["bf16-zero1"] < 0.01 < gap["bf16-zero0"], (gap, curves)
