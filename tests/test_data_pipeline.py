"""Issue 3 end to end on a tiny random-init Qwen2: collect -> pack -> shard -> load, all real components."""

import itertools

import pytest
import torch

from dnd_scale.basemodel import build_tiny_tokenizer
from dnd_scale.collect import collect
from dnd_scale.collect_config import CollectConfig
from dnd_scale.io import ArtifactError
from dnd_scale.layout import LoraSpec
from dnd_scale.loader import LoaderConfig, PairLoader
from dnd_scale.pack import PACK_LOCK, pack
from dnd_scale.shards import ShardConfig, build_shards
from dnd_scale.store import load_checkpoint, read_manifest
from dnd_scale.targets import PackedTargets
from dnd_scale.tasks import load_task
from dnd_scale.tokenizer import TokenizerConfig, WeightTokenizer
from tinymodels import tiny_config

TASKS = ["synthetic:reverse_word", "synthetic:sum_mc", "synthetic:parity_tf"]


@pytest.fixture(scope="module")
def run(tmp_path_factory, one_thread):
    folder = tmp_path_factory.mktemp("base")
    config = tiny_config("qwen2", hidden=32, intermediate=48, vocab=len(build_tiny_tokenizer()))
    config.max_position_embeddings = 512
    config.save_pretrained(folder)
    run_dir = tmp_path_factory.mktemp("run")
    tasks = [load_task(spec, num_records=24) for spec in TASKS]
    collect(CollectConfig(base_model=str(folder / "config.json"), lora=LoraSpec(rank=2, alpha=4.0), steps=6,
                          save_last=3, lr=1e-2, batch_size=4, max_length=256, device="cpu", dtype="float32"),
            tasks, run_dir)
    targets = pack(run_dir, TokenizerConfig(chunk=16))
    build_shards(PackedTargets(targets), {t.name: t.prompts for t in tasks}, run_dir / "shards",
                 ShardConfig(num_prompts=4, pairs_per_task=10, shard_size=7, seed=1), progress=False)
    return run_dir, tasks


def test_every_manifest_checkpoint_exists_and_loads(run):
    run_dir, tasks = run
    records = read_manifest(run_dir)
    assert {r["task"] for r in records} == {t.name for t in tasks} and len(records) == 9
    targets = PackedTargets(run_dir / "targets")
    for r in records:
        state = load_checkpoint(run_dir, r)
        assert len(state) == len(targets.layout_json()["matrices"])


def test_packed_targets_detokenize_to_the_collected_adapters(run):
    run_dir, _ = run
    targets = PackedTargets(run_dir / "targets")
    targets.verify()
    from dnd_scale.layout import LoraLayout

    layout = LoraLayout.from_dict(targets.layout_json())
    tok = WeightTokenizer(layout, TokenizerConfig(**targets.extra["tokenizer"]))
    for task, records in itertools.groupby(read_manifest(run_dir), key=lambda r: r["task"]):
        for k, record in enumerate(sorted(records, key=lambda r: int(r["step"]))):
            original = load_checkpoint(run_dir, record)
            back = tok.detokenize(targets.get(task, k))
            for key, value in original.items():  # stored in fp32: the round trip is exact to rounding
                err = (back[key] - value).abs().max() / value.abs().max().clamp(min=1e-30)
                assert err <= 1e-6, (task, k, key)


def test_pairs_hold_only_their_own_tasks_prompts_and_no_answers(run):
    run_dir, tasks = run
    by_name = {t.name: t for t in tasks}
    loader = PairLoader(run_dir / "shards", run_dir / "targets", LoaderConfig(batch_size=3, num_workers=0), 0, 1)
    seen = 0
    targets = PackedTargets(run_dir / "targets")
    for batch in loader:
        for i, (task, prompts) in enumerate(zip(batch["task"], batch["prompts"])):
            own = set(by_name[task].prompts)
            assert set(prompts) <= own
            assert not any(p == r.response for r in by_name[task].records for p in prompts)
            seen += 1
    assert seen == 30
    # no answer text anywhere in the shards or prompt pools (answers that occur inside some prompt of
    # the task, like an option label, cannot be told apart and are left out of the check)
    blob = b"".join(p.read_bytes() for p in (run_dir / "shards").rglob("*") if p.is_file()).decode(errors="ignore")
    checked = 0
    for t in tasks:
        for r in t.records:
            if r.response and not any(r.response in prompt for prompt in t.prompts):
                assert r.response not in blob, (t.name, r.response)
                checked += 1
    assert checked > 0


def test_pack_refuses_a_run_without_collect(tmp_path):
    with pytest.raises(ArtifactError, match="dnd collect"):
        pack(tmp_path)


def test_repacking_unchanged_checkpoints_rewrites_no_task_file(run):
    run_dir, _ = run
    files = sorted((run_dir / "targets").glob("*.safetensors"))
    before = {f.name: f.stat().st_mtime_ns for f in files if f.name != "common.safetensors"}
    weights = PackedTargets(run_dir / "targets").weights.clone()
    pack(run_dir, TokenizerConfig(chunk=16))
    after = {f.name: f.stat().st_mtime_ns for f in sorted((run_dir / "targets").glob("*.safetensors"))
             if f.name != "common.safetensors"}
    assert after == before
    assert torch.equal(PackedTargets(run_dir / "targets").weights, weights)


def test_a_subset_pack_reuses_another_packs_tokens_and_weighs_only_its_tasks(run, tmp_path, monkeypatch):
    run_dir, tasks = run
    other = tmp_path / "other"
    other.mkdir()
    (other / "checkpoints").symlink_to(run_dir / "checkpoints")  # the same checkpoint store
    subset = [tasks[0].name, tasks[2].name]
    # Nothing may be tokenized again: every subset task is in the source pack with the same hashes.
    monkeypatch.setattr(WeightTokenizer, "tokenize", lambda *a, **k: pytest.fail("tokenized again"))
    pack(other, TokenizerConfig(chunk=16), subset, reuse=run_dir / "targets")
    source, packed = PackedTargets(run_dir / "targets"), PackedTargets(other / "targets")
    assert packed.tasks == sorted(subset)
    for task in subset:
        assert torch.equal(packed.get(task, 1), source.get(task, 1))
        assert packed.index["tasks"][task]["sha256"] == source.index["tasks"][task]["sha256"]
    # the criterion weights are the subset's own, not the source's three-task average
    assert not torch.equal(packed.weights, source.weights)
    monkeypatch.undo()
    alone = tmp_path / "alone"
    alone.mkdir()
    (alone / "checkpoints").symlink_to(run_dir / "checkpoints")
    pack(alone, TokenizerConfig(chunk=16), subset)  # tokenized from the checkpoints
    assert torch.equal(PackedTargets(alone / "targets").weights, packed.weights)
    # another token scheme is not reused: the tokens differ
    def refuse(*args, **kwargs):
        raise RuntimeError("tokenized again")

    monkeypatch.setattr(WeightTokenizer, "tokenize", refuse)
    with pytest.raises(RuntimeError, match="tokenized again"):
        pack(alone, TokenizerConfig(chunk=8), subset, reuse=run_dir / "targets")


def _files(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_repack_killed_before_the_loss_weights_leaves_the_previous_pack(run, tmp_path, monkeypatch):
    import dnd_scale.pack as pack_module

    run_dir, tasks = run
    (tmp_path / "checkpoints").symlink_to(run_dir / "checkpoints")
    names = sorted(t.name for t in tasks)
    pack(tmp_path, TokenizerConfig(chunk=16), names[:2], reuse=run_dir / "targets")
    before = _files(tmp_path / "targets")

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # the moment before common.safetensors (the loss weights) is written

    monkeypatch.setattr(pack_module, "write_common", killed)
    with pytest.raises(KeyboardInterrupt):
        pack(tmp_path, TokenizerConfig(chunk=16), names, reuse=run_dir / "targets")
    # all or nothing: the old two-task pack, byte for byte, and no staging folder left behind
    assert _files(tmp_path / "targets") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [PACK_LOCK, "checkpoints", "targets"]
    PackedTargets(tmp_path / "targets").verify()
    monkeypatch.undo()
    for left in (".targets-staging-k1ll", ".targets-old-k1ll"):  # what a pack killed by SIGKILL leaves
        (tmp_path / left).mkdir()
    pack(tmp_path, TokenizerConfig(chunk=16), names, reuse=run_dir / "targets")
    assert PackedTargets(tmp_path / "targets").tasks == names
    assert torch.equal(PackedTargets(tmp_path / "targets").weights, PackedTargets(run_dir / "targets").weights)
    assert sorted(p.name for p in tmp_path.iterdir()) == [PACK_LOCK, "checkpoints", "targets"]


def test_a_second_pack_of_one_run_is_refused_while_the_first_runs(run, tmp_path):
    from dnd_scale.io import FolderBusyError, exclusive_folder

    run_dir, _ = run
    (tmp_path / "checkpoints").symlink_to(run_dir / "checkpoints")
    with exclusive_folder(tmp_path, "dnd pack", "wait", name=PACK_LOCK):  # what a running `dnd pack` holds
        with pytest.raises(FolderBusyError, match=r"another `dnd pack` is writing to"):
            pack(tmp_path, TokenizerConfig(chunk=16))
        assert not (tmp_path / "targets").exists()
    pack(tmp_path, TokenizerConfig(chunk=16))
    assert (tmp_path / "targets" / "index.json").is_file()
