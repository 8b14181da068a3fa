"""`dnd shard`: pair sampling, shard files, index, input errors."""

import collections
import tarfile

import numpy as np
import pytest
import torch

from dnd_scale.io import LOCK_FILE, ArtifactError, write_json
from dnd_scale.shards import (
    ShardConfig,
    ShardsError,
    build_shards,
    decode_block,
    encode_block,
    iter_blocks,
    load_prompt_pools,
    main,
    read_shard_index,
)
from dnd_scale.targets import write_common, write_task_targets
from dnd_scale.tasks import load_task

CHECKPOINTS = {"alpha": 3, "beta": 2, "gamma": 4}
POOL_SIZES = {"alpha": 12, "beta": 9, "gamma": 15}
CONFIG = ShardConfig(num_prompts=4, pairs_per_task=10, shard_size=4, block_size=3, seed=7)


def records(task, size):
    """Task records whose prompt and answer texts cannot be confused."""
    return [{"prompt": f"[{task}] question {i}: what follows {i}?", "response": f"ANSWER<{task}:{i}>"} for i in range(size)]


def prompt_pools():
    return {t: [r["prompt"] for r in records(t, n)] for t, n in POOL_SIZES.items()}


def read_pairs(shards_dir, index):
    """Every pair of the set as (shard file, pair id, {"task", "checkpoint", "prompt_ids"}), in written order."""
    names = index["encoding"]["task_names"]
    out = []
    for shard, block in iter_blocks(shards_dir, index):
        for row, pair_id in enumerate(block.pair_id.tolist()):
            payload = {"task": names[block.task[row]], "checkpoint": int(block.checkpoint[row]),
                       "prompt_ids": block.prompt_ids[row].tolist()}
            out.append((shard["file"], pair_id, payload))
    return out


def test_pairs_reference_their_task_and_index_matches(tmp_path):
    index = build_shards(CHECKPOINTS, prompt_pools(), tmp_path, CONFIG, progress=False)
    assert index == read_shard_index(tmp_path)
    pairs = read_pairs(tmp_path, index)
    assert len(pairs) == index["num_samples"] == 30
    assert [s["samples"] for s in index["shards"]] == [4] * 7 + [2]
    assert [pair_id for _, pair_id, _ in pairs] == list(range(30))
    per_shard = collections.Counter(f for f, _, _ in pairs)
    assert all(per_shard[s["file"]] == s["samples"] for s in index["shards"])
    with tarfile.open(tmp_path / "pairs-000001.tar") as tar:  # blocks of 3 pairs: 3 + 1
        assert [m.name for m in tar.getmembers()] == ["0000000004.safetensors", "0000000007.safetensors"]
    assert index["shards"][1]["first_pair"] == 4 and index["encoding"]["prompt_bits"] == 4  # pools <= 15
    uses = collections.Counter()
    for _, _, pair in pairs:
        task, ids = pair["task"], pair["prompt_ids"]
        assert 0 <= pair["checkpoint"] < CHECKPOINTS[task]
        assert len(ids) == len(set(ids)) == 4 and all(0 <= i < POOL_SIZES[task] for i in ids)
        uses[task, pair["checkpoint"]] += 1
    for task, k in CHECKPOINTS.items():  # checkpoints used equally often, +-1
        counts = [uses[task, c] for c in range(k)]
        assert max(counts) - min(counts) <= 1 and sum(counts) == 10
    assert len({p["task"] for _, _, p in pairs[:8]}) > 1, "tasks are interleaved, not grouped"
    assert load_prompt_pools(tmp_path, index) == prompt_pools()
    assert index["tasks"]["beta"]["pool_size"] == 9 and index["num_prompts"] == 4 and index["seed"] == 7


def test_no_answer_text_in_any_file(tmp_path):
    build_shards(CHECKPOINTS, prompt_pools(), tmp_path, CONFIG, progress=False)
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.suffix == ".jsonl" for p in files) and any(p.suffix == ".tar" for p in files)
    for path in files:
        data = path.read_bytes()
        assert b"ANSWER" not in data, f"answer text leaked into {path.name}"
    assert b"question 3" in (tmp_path / "prompts" / "alpha.jsonl").read_bytes()


@pytest.mark.parametrize("bits", [1, 7, 8, 10, 16, 17])
def test_block_round_trip(bits):
    rng = np.random.default_rng(bits)
    prompt_ids = rng.integers(0, 1 << bits, (5, 13))
    data = encode_block(rng.integers(0, 3, 5), rng.integers(0, 300, 5), prompt_ids, bits, 3, 300)
    block = decode_block(data, 40, bits, 13)
    assert block.pair_id.tolist() == list(range(40, 45)) and np.array_equal(block.prompt_ids, prompt_ids)
    with pytest.raises(ValueError, match="expected 5 > 0 pairs of N = 12"):
        decode_block(data, 40, bits, 12)
    with pytest.raises(ValueError, match="not a safetensors block"):
        decode_block(b"garbage" + data, 40, bits, 13)


def test_a_pair_costs_its_index_bits(tmp_path):
    # N = 128 prompts of a 1000-prompt pool: 128 x 10 bits = 160 B, + 1 B task, + 1 B checkpoint;
    # the member headers and the tar's end record add ~3 B a pair at 4096 pairs per shard.
    pools = {"alpha": [f"prompt {i}" for i in range(1000)]}
    config = ShardConfig(num_prompts=128, pairs_per_task=4096, shard_size=4096, block_size=1024)
    index = build_shards({"alpha": 16}, pools, tmp_path, config, progress=False)
    per_pair = (tmp_path / index["shards"][0]["file"]).stat().st_size / 4096
    assert 162 <= per_pair < 166, per_pair


def test_old_format_is_refused_with_what_to_do(tmp_path):
    index = build_shards(CHECKPOINTS, prompt_pools(), tmp_path, CONFIG, progress=False)
    write_json(tmp_path / "index.json", {**index, "format": 1})
    with pytest.raises(ShardsError, match=r"format 1 \(one JSON tar member per pair\).*re-run `dnd shard`"):
        read_shard_index(tmp_path)


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    first = build_shards(CHECKPOINTS, prompt_pools(), tmp_path / "a", CONFIG, progress=False)
    second = build_shards(CHECKPOINTS, prompt_pools(), tmp_path / "b", CONFIG, progress=False)
    other = build_shards(CHECKPOINTS, prompt_pools(), tmp_path / "c", ShardConfig(**{**vars(CONFIG), "seed": 8}), progress=False)
    assert first == second
    assert (tmp_path / "a" / "pairs-000003.tar").read_bytes() == (tmp_path / "b" / "pairs-000003.tar").read_bytes()
    assert [s["sha256"] for s in other["shards"]] != [s["sha256"] for s in first["shards"]]


def test_adding_a_task_keeps_the_other_tasks_pairs(tmp_path):
    pools = prompt_pools()
    small = build_shards({"alpha": 3}, {"alpha": pools["alpha"]}, tmp_path / "a", CONFIG, progress=False)
    full = build_shards(CHECKPOINTS, pools, tmp_path / "b", CONFIG, progress=False)
    alpha = lambda d, i: [p for _, _, p in read_pairs(d, i) if p["task"] == "alpha"]  # noqa: E731
    assert alpha(tmp_path / "a", small) == alpha(tmp_path / "b", full)


def test_rebuild_replaces_the_previous_set(tmp_path):
    out = tmp_path / "shards"
    build_shards(CHECKPOINTS, prompt_pools(), out, CONFIG, progress=False)
    index = build_shards(CHECKPOINTS, prompt_pools(), out, ShardConfig(**{**vars(CONFIG), "shard_size": 16}), progress=False)
    assert sorted(p.name for p in out.glob("pairs-*.tar")) == [s["file"] for s in index["shards"]]
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".shards{LOCK_FILE}", "shards"]  # the set's lock beside it


@pytest.mark.parametrize(
    "pools, checkpoints, config, match",
    [
        ({"alpha": ["p"] * 3}, {"alpha": 1}, CONFIG, "has 3 prompts but each pair needs num_prompts=4"),
        ({"alpha": []}, {"alpha": 1}, CONFIG, "empty"),
        ({}, {}, CONFIG, "no tasks"),
        ({"alpha": ["p"] * 5}, {"beta": 1}, CONFIG, "have prompts but no packed checkpoints"),
        ({"alpha": ["p", "", "q", "r"]}, {"alpha": 1}, CONFIG, "empty or not strings"),
        ({"alpha": ["p"] * 5}, {"alpha": 0}, CONFIG, "no checkpoints"),
        ({"alpha": ["p"] * 5}, {"alpha": 1}, ShardConfig(num_prompts=0), ">= 1"),
    ],
    ids=["N-gt-pool", "empty-pool", "no-tasks", "task-mismatch", "blank-prompt", "K0", "N0"],
)
def test_bad_input_is_refused(tmp_path, pools, checkpoints, config, match):
    with pytest.raises(ShardsError, match=match):
        build_shards(checkpoints, pools, tmp_path, config, progress=False)
    assert not (tmp_path / "index.json").exists()


def test_missing_index_or_shard_is_refused(tmp_path):
    with pytest.raises(ShardsError, match="run `dnd shard`"):
        read_shard_index(tmp_path)
    build_shards(CHECKPOINTS, prompt_pools(), tmp_path, CONFIG, progress=False)
    (tmp_path / "pairs-000002.tar").unlink()
    with pytest.raises(ShardsError, match="pairs-000002.tar"):
        read_shard_index(tmp_path)


def test_cli_shards_the_packed_tasks_with_the_prompt_pools_collect_kept(tmp_path):
    from dnd_scale.collect_task import save_prompt_pool
    from dnd_scale.store import store_dir, write_completion

    tasks = [load_task(spec, num_records=12, seed=5) for spec in ["synthetic:reverse_word", "synthetic:parity_tf"]]
    for task in tasks:
        (store_dir(tmp_path) / task.name).mkdir(parents=True)
        write_completion(store_dir(tmp_path), task.name,
                         {"prompt_pool": save_prompt_pool(store_dir(tmp_path) / task.name, task)})
        write_task_targets(tmp_path / "targets", task.name, torch.randn(2, 3, 2, 4))
    write_common(tmp_path / "targets", torch.ones(3, 2, 4, dtype=torch.bool), torch.ones(3), {"rank": 2})
    (tmp_path / "recipe.yaml").write_text("shard: {num_prompts: 3, pairs_per_task: 5}\n")
    assert main(["--run", str(tmp_path)]) == 0  # no task specs: the run folder's recipe and collect's pools
    index = read_shard_index(tmp_path / "shards")
    assert sorted(index["tasks"]) == sorted(t.name for t in tasks) and index["num_samples"] == 10
    assert load_prompt_pools(tmp_path / "shards", index) == {t.name: t.prompts for t in tasks}
    assert index["targets_fingerprint"] is not None
    write_task_targets(tmp_path / "targets", "packed_only", torch.randn(2, 3, 2, 4))
    write_common(tmp_path / "targets", torch.ones(3, 2, 4, dtype=torch.bool), torch.ones(3), {"rank": 2})
    with pytest.raises(ArtifactError, match="task 'packed_only' has not been collected"):
        main(["--run", str(tmp_path)])


def test_a_failure_mid_write_leaves_the_previous_set_and_no_temporary_file(tmp_path, monkeypatch):
    import dnd_scale.shards as shards

    build_shards(CHECKPOINTS, prompt_pools(), tmp_path, CONFIG, progress=False)
    before = {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    calls = []

    def fail_on_the_third_block(*args):
        calls.append(1)
        if len(calls) == 3:
            raise OSError("disk full")
        return encode_block(*args)

    monkeypatch.setattr(shards, "encode_block", fail_on_the_third_block)
    with pytest.raises(OSError, match="disk full"):
        build_shards(CHECKPOINTS, prompt_pools(), tmp_path, ShardConfig(**{**vars(CONFIG), "seed": 8}), progress=False)
    assert {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_a_full_disk_says_no_space_left_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    import errno

    import dnd_scale.shards as shards
    from dnd_scale.io import DiskFullError

    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(shards, "encode_block", full)
    with pytest.raises(DiskFullError, match=rf"no space left on the device of {tmp_path / 'shards'} \(.* MiB free\) while writing "
                                            r"it: free space there, or write to another disk, then run the stage again"):
        build_shards(CHECKPOINTS, prompt_pools(), tmp_path / "shards", CONFIG, progress=False)
    assert [p.name for p in tmp_path.iterdir()] == [f".shards{LOCK_FILE}"]  # the lock's file, which means nothing unlocked


def test_staging_left_by_a_killed_run_is_removed_unless_a_run_builds_it(tmp_path):
    from dnd_scale.io import building

    out = tmp_path / "shards"
    (tmp_path / ".shards-staging-killed").mkdir()  # SIGKILL runs no cleanup
    (tmp_path / ".shards-staging-killed" / "pairs-000000.tar").write_bytes(b"half")
    build_shards(CHECKPOINTS, prompt_pools(), out, CONFIG, progress=False)
    assert not list(tmp_path.glob(".shards-staging-*"))
    (tmp_path / ".shards-staging-running").mkdir()
    with building(tmp_path / ".shards-staging-running"):  # another `dnd shard` is at work: left alone
        build_shards(CHECKPOINTS, prompt_pools(), out, CONFIG, progress=False)
    assert [p.name for p in tmp_path.glob(".shards-staging-*")] == [".shards-staging-running"]


def test_targets_changed_since_packing_are_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    from dnd_scale.targets import PackedTargets

    targets = tmp_path / "targets"
    write_task_targets(targets, "alpha", torch.randn(2, 3, 2, 4))
    write_common(targets, torch.ones(3, 2, 4, dtype=torch.bool), torch.ones(3), {"rank": 2})
    tokens = load_file(targets / "alpha.safetensors")["tokens"]
    save_file({"tokens": tokens * 2}, str(targets / "alpha.safetensors"))  # finite, but not what was packed
    with pytest.raises(ArtifactError, match=r"alpha\.safetensors.*re-run `dnd pack`"):
        build_shards(PackedTargets(targets), {"alpha": [f"p{i}" for i in range(5)]}, tmp_path / "shards",
                     ShardConfig(num_prompts=3, pairs_per_task=4), progress=False)
    assert not (tmp_path / "shards" / "index.json").exists()


def test_a_second_shard_of_one_folder_is_refused_while_the_first_runs(tmp_path):
    from dnd_scale.io import FolderBusyError
    from dnd_scale.shards import writing_shard_set

    out = tmp_path / "shards"
    with writing_shard_set(out):  # what a running `dnd shard` holds
        with pytest.raises(FolderBusyError, match=r"another `dnd shard` is writing to"):
            build_shards(CHECKPOINTS, prompt_pools(), out, CONFIG, progress=False)
        assert not (out / "index.json").exists()
    build_shards(CHECKPOINTS, prompt_pools(), out, CONFIG, progress=False)  # free again
    assert (out / "index.json").is_file()
