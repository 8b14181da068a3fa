"""Streaming loader: rank/worker split, resampling, damaged data, resume."""

import collections
import itertools
import json
import tarfile

import numpy as np
import pytest
import torch
import webdataset as wds

from dnd_scale.io import write_json
from dnd_scale.loader import LoaderConfig, PairLoader
from dnd_scale.shards import ShardConfig, ShardsError, build_shards, encode_block, iter_blocks, read_shard_index
from dnd_scale.targets import PackedTargets, write_common, write_task_targets

CHECKPOINTS = {"alpha": 3, "beta": 2, "gamma": 4}
POOL_SIZES = {"alpha": 12, "beta": 9, "gamma": 15}
T, H, W = 3, 2, 5


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Tiny run folder: random packed targets and 30 pairs in 8 shards (7 x 4 + 2), blocks of 2 pairs."""
    root = tmp_path_factory.mktemp("run")
    gen = torch.Generator().manual_seed(0)
    for task, k in CHECKPOINTS.items():
        write_task_targets(root / "targets", task, torch.randn(k, T, H, W, generator=gen))
    write_common(root / "targets", torch.rand(T, H, W, generator=gen) > 0.3, torch.rand(T, generator=gen), {"rank": 2})
    pools = {t: [f"[{t}] question {i}?" for i in range(n)] for t, n in POOL_SIZES.items()}
    config = ShardConfig(num_prompts=4, pairs_per_task=10, shard_size=4, block_size=2, seed=3)
    build_shards(PackedTargets(root / "targets"), pools, root / "shards", config, progress=False)
    return root, pools


def loader(root, rank=0, world_size=1, gather_tokens=True, **overrides):
    config = LoaderConfig(**{"batch_size": 3, "num_workers": 2, **overrides})
    return PairLoader(root / "shards", root / "targets", config, rank=rank, world_size=world_size,
                      gather_tokens=gather_tokens)


def pairs_of(batch):
    return [(t, int(c), tuple(ids.tolist())) for t, c, ids in zip(batch["task"], batch["checkpoint"], batch["prompt_ids"])]


def stream(batches):
    """Batches as comparable values."""
    return [pairs_of(b) for b in batches]


def written_pairs(shards_dir, files=None):
    """pair id -> (task, checkpoint, prompt ids) of every pair in the shard files, as written."""
    index = read_shard_index(shards_dir)
    names = index["encoding"]["task_names"]
    out = {}
    for shard, block in iter_blocks(shards_dir, index):
        if files is None or shard["file"] in files:
            for row, pair_id in enumerate(block.pair_id.tolist()):
                out[pair_id] = (names[block.task[row]], int(block.checkpoint[row]), tuple(block.prompt_ids[row].tolist()))
    return out


def pairs_in_tars(shards_dir, files=None):
    return collections.Counter(written_pairs(shards_dir, files).values())


def test_epoch_yields_every_sample_once_across_2_ranks_x_2_workers(run):
    root, pools = run
    targets = PackedTargets(root / "targets")
    written = written_pairs(root / "shards")
    seen = collections.Counter()
    ids_seen = collections.Counter()
    for rank in range(2):
        rank_loader = loader(root, rank=rank, world_size=2)
        batches = list(rank_loader)
        assert len(batches) == rank_loader.batches_per_rank(0)[rank]
        assert rank_loader.epoch == 1 and rank_loader.skipped == dict.fromkeys(rank_loader.skipped, 0)
        for batch in batches:
            b = len(batch["task"])
            assert batch["tokens"].shape == (b, T, H, W) and batch["prompt_ids"].shape == (b, 4)
            assert torch.equal(batch["mask"], targets.mask) and torch.equal(batch["weights"], targets.weights)
            for row, (task, checkpoint, ids) in enumerate(pairs_of(batch)):
                assert batch["prompts"][row] == [pools[task][i] for i in ids]
                assert all(p.startswith(f"[{task}]") for p in batch["prompts"][row]), "prompts from another task"
                torch.testing.assert_close(batch["tokens"][row], targets.get(task, checkpoint), rtol=0, atol=0)
                seen[task, checkpoint, ids] += 1
                pair_id = int(batch["pair_id"][row])
                assert written[pair_id] == (task, checkpoint, ids), "a pair id travelled without its pair"
                ids_seen[pair_id] += 1
    assert seen == pairs_in_tars(root / "shards")
    assert ids_seen == collections.Counter(range(30)), "every pair exactly once across ranks and workers"


def test_batches_are_shuffled_within_shards(run):
    root, _ = run
    ids = [int(i) for b in loader(root, num_workers=0, batch_size=4) for i in b["pair_id"]]
    shard_of = {}
    for shard in read_shard_index(root / "shards")["shards"]:
        shard_of.update(dict.fromkeys(range(shard["first_pair"], shard["first_pair"] + shard["samples"]), shard["file"]))
    runs = [list(g) for _, g in itertools.groupby(ids, key=shard_of.get)]
    assert len(runs) == 8, "one worker reads one shard after another"
    assert any(r != sorted(r) for r in runs), "pairs keep the written order within shards"


def test_index_only_reading_is_the_same_stream(run):
    root, _ = run
    full, light = list(loader(root)), list(loader(root, gather_tokens=False))
    assert stream(light) == stream(full)
    assert set(light[0]) == {"prompt_ids", "task", "checkpoint", "pair_id"}


def test_epochs_differ_in_order_but_not_content(run):
    root, _ = run
    ranked = loader(root)
    first, second = stream(ranked), stream(ranked)
    assert first != second
    assert collections.Counter(itertools.chain(*first)) == collections.Counter(itertools.chain(*second))


def test_resampled_stream_is_reproducible_per_seed(run):
    root, _ = run
    take = lambda seed: stream(itertools.islice(loader(root, resampled=True, seed=seed), 12))  # noqa: E731
    first = take(0)
    assert len(first) == 12 and sum(map(len, first)) == 36  # endless: more pairs than one epoch holds
    assert take(0) == first
    assert take(1) != first
    drawn = collections.Counter(itertools.chain(*first))
    assert set(drawn) <= set(pairs_in_tars(root / "shards")) and max(drawn.values()) > 1  # with replacement


@pytest.mark.parametrize("consumed", [1, 4, 9, 11], ids=lambda k: f"k{k}")
def test_resume_continues_the_same_stream(run, consumed):
    root, _ = run
    reference = stream(loader(root))
    assert len(reference) == 11  # k=11: every batch consumed, only the end markers remain
    interrupted = loader(root)
    assert stream(itertools.islice(interrupted, consumed)) == reference[:consumed]
    state = json.loads(json.dumps(interrupted.state_dict()))  # a position must survive JSON
    resumed = loader(root)
    resumed.load_state_dict(state)
    assert stream(resumed) == reference[consumed:]
    assert resumed.epoch == 1


def test_resampled_resume_continues_the_same_stream(run):
    root, _ = run
    reference = stream(itertools.islice(loader(root, resampled=True), 10))
    interrupted = loader(root, resampled=True)
    list(itertools.islice(interrupted, 4))
    resumed = loader(root, resampled=True)
    resumed.load_state_dict(interrupted.state_dict())
    assert stream(itertools.islice(resumed, 6)) == reference[4:]


def test_position_is_refused_by_another_stream(run):
    root, _ = run
    state = loader(root).state_dict()
    with pytest.raises(ValueError, match="same shards, seed, batch_size"):
        loader(root, num_workers=1).load_state_dict(state)


@pytest.fixture(params=["cut-in-payload", "cut-at-header"])
def damaged(run, tmp_path, request):
    """A copy of the run with one truncated shard and one shard with a broken block and a bad pair.

    Cut in a payload, tar reading fails; cut at a header boundary, the tar reads as a valid
    shorter one and only the pair count in index.json shows the loss. Returns the copy, the pairs
    kept from the truncated shard and the pairs that must be skipped as bad.
    """
    root, _ = run
    copy = tmp_path / "run"
    for path in root.rglob("*"):
        if path.is_file():
            (copy / path.relative_to(root)).parent.mkdir(parents=True, exist_ok=True)
            (copy / path.relative_to(root)).write_bytes(path.read_bytes())
    shards = copy / "shards"
    written = written_pairs(root / "shards")
    # pairs-000001 holds pairs 4..7 in two blocks; keep the first block.
    with tarfile.open(shards / "pairs-000001.tar") as tar:
        second = tar.getmembers()[1]
    cut = second.offset_data + 8 if request.param == "cut-in-payload" else second.offset
    data = (shards / "pairs-000001.tar").read_bytes()
    (shards / "pairs-000001.tar").write_bytes(data[:cut])
    kept = [written[4], written[5]]
    # pairs-000004 holds pairs 16..19: block 16 becomes bytes that are not a block, pair 18 gets a
    # checkpoint out of range.
    with tarfile.open(root / "shards" / "pairs-000004.tar") as tar:
        members = [(m.name.split(".")[0], tar.extractfile(m).read()) for m in tar.getmembers()]
    index = read_shard_index(root / "shards")
    names = index["encoding"]["task_names"]
    task, checkpoint, ids = zip(*(written[i] for i in (18, 19)))
    broken = encode_block(np.array([names.index(t) for t in task]), np.array([99, checkpoint[1]]), np.array(ids),
                          index["encoding"]["prompt_bits"], len(names), 100)
    with wds.TarWriter(str(shards / "pairs-000004.tar"), encoder=False) as writer:
        writer.write({"__key__": members[0][0], "safetensors": b"not a block" + members[0][1][11:]})
        writer.write({"__key__": members[1][0], "safetensors": broken})
    bad = [written[16], written[17], written[18]]
    return copy, kept, bad


def test_truncated_shard_and_bad_samples_are_skipped_and_counted(run, damaged):
    root, _ = run
    copy, kept, bad = damaged
    full = loader(copy)
    got = collections.Counter(itertools.chain(*stream(full)))
    assert full.skipped == {"corrupt_shards": 1, "lost_samples": 2, "bad_samples": 3}
    expected = pairs_in_tars(root / "shards")
    expected -= pairs_in_tars(root / "shards", {"pairs-000001.tar"})
    expected += collections.Counter(kept)
    expected -= collections.Counter(bad)
    assert got == expected


def test_old_format_is_refused_with_what_to_do(run, tmp_path):
    root, _ = run
    index = json.loads((root / "shards" / "index.json").read_text())
    shards = tmp_path / "shards"
    shards.mkdir()
    write_json(shards / "index.json", {**index, "format": 1})
    with pytest.raises(ShardsError, match="has format 1 .* re-run `dnd shard`"):
        PairLoader(shards, root / "targets", LoaderConfig(), rank=0, world_size=1)


@pytest.mark.parametrize("consumed", [2, 5], ids=lambda k: f"k{k}")
def test_skip_counts_survive_resume_without_double_counting(damaged, consumed):
    copy, _, _ = damaged
    full = loader(copy)
    reference = stream(full)
    interrupted = loader(copy)
    list(itertools.islice(interrupted, consumed))
    resumed = loader(copy)
    resumed.load_state_dict(interrupted.state_dict())
    assert stream(resumed) == reference[consumed:]
    assert resumed.skipped == full.skipped


def test_reads_in_process_without_workers(run):
    root, _ = run
    assert stream(loader(root, num_workers=0)) == stream(loader(root, num_workers=1))


def test_too_few_shards_for_the_ranks_is_refused(run):
    root, _ = run
    with pytest.raises(ShardsError, match="cannot feed 9 ranks"):
        loader(root, rank=0, world_size=9)


def test_shards_of_other_targets_are_refused(run, tmp_path):
    root, _ = run
    write_task_targets(tmp_path, "alpha", torch.randn(1, T, H, W))
    write_common(tmp_path, torch.ones(T, H, W, dtype=torch.bool), torch.ones(T), {"rank": 4})
    with pytest.raises(ShardsError, match="re-run `dnd shard`"):
        PairLoader(root / "shards", tmp_path, LoaderConfig(), rank=0, world_size=1)
