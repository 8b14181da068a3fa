"""Packed targets: write, memory-mapped gather, validation."""

import json
import multiprocessing
import pickle

import pytest
import torch

from dnd_scale.io import sha256_file
from dnd_scale.targets import (
    PackedTargets,
    TargetsError,
    canonical_json_sha256,
    write_common,
    write_task_targets,
)

T, H, W = 3, 4, 6
LAYOUT = {"rank": 2, "matrices": [{"key": "q.lora_A.weight", "shape": [2, 8]}]}


def make_pack(directory, checkpoints=None):
    """Random targets for tasks {name: K}; returns the tokens written per task."""
    checkpoints = checkpoints or {"alpha": 3, "beta": 2}
    gen = torch.Generator().manual_seed(0)
    written = {}
    for task, k in checkpoints.items():
        written[task] = torch.randn(k, T, H, W, generator=gen)
        write_task_targets(directory, task, written[task])
    mask = torch.rand(T, H, W, generator=gen) > 0.25
    weights = torch.rand(T, generator=gen) + 0.5
    write_common(directory, mask, weights, LAYOUT, {"chunk": W - 2})
    return written, mask, weights


def _child_get(targets):
    return targets.get("alpha", 1)


def test_roundtrip_gather_and_index(tmp_path):
    written, mask, weights = make_pack(tmp_path)
    targets = PackedTargets(tmp_path, expected_fingerprint=canonical_json_sha256(LAYOUT))
    assert targets.tasks == ["alpha", "beta"]
    assert targets.num_checkpoints == {"alpha": 3, "beta": 2}
    assert (targets.num_tokens, targets.token_shape) == (T, (H, W))
    for task, tokens in written.items():
        for k in range(tokens.shape[0]):
            torch.testing.assert_close(targets.get(task, k), tokens[k], rtol=0, atol=0)
    batch = targets.gather(["beta", "alpha", "beta"], [1, 2, 0])  # (B, T, H, W)
    torch.testing.assert_close(batch, torch.stack([written["beta"][1], written["alpha"][2], written["beta"][0]]))
    assert torch.equal(targets.mask, mask) and torch.equal(targets.weights, weights)
    assert targets.layout_json() == LAYOUT and targets.extra == {"chunk": W - 2}
    index = json.loads((tmp_path / "index.json").read_text())
    assert index["tasks"]["alpha"]["sha256"] == sha256_file(tmp_path / "alpha.safetensors")
    assert index["token_shape"] == [H, W] and index["num_tokens"] == T
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    targets.verify()
    with pytest.raises(IndexError, match="out of range"):
        targets.get("alpha", 3)
    with pytest.raises(TargetsError, match="not in the packed targets"):
        targets.get("delta", 0)


def test_reopens_after_fork_and_pickles_without_handles(tmp_path):
    written, _, _ = make_pack(tmp_path)
    targets = PackedTargets(tmp_path)
    targets.get("alpha", 0)  # the parent now holds a handle
    with multiprocessing.get_context("fork").Pool(1) as pool:
        from_child = pool.apply(_child_get, (targets,))
    torch.testing.assert_close(from_child, written["alpha"][1])
    clone = pickle.loads(pickle.dumps(targets))
    torch.testing.assert_close(clone.get("beta", 1), written["beta"][1])


def test_verify_names_the_changed_file(tmp_path):
    make_pack(tmp_path)
    path = tmp_path / "beta.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(TargetsError, match=r"beta\.safetensors.*dnd pack"):
        PackedTargets(tmp_path).verify()


def test_layout_mismatch_says_to_repack(tmp_path):
    make_pack(tmp_path)
    with pytest.raises(TargetsError, match="re-run `dnd pack`"):
        PackedTargets(tmp_path, expected_fingerprint="0" * 64)


@pytest.mark.parametrize("remove", ["alpha.safetensors", "common.safetensors", "index.json"])
def test_missing_file_is_refused(tmp_path, remove):
    make_pack(tmp_path)
    (tmp_path / remove).unlink()
    with pytest.raises(TargetsError, match="dnd pack"):
        PackedTargets(tmp_path)


def test_pack_without_common_is_incomplete(tmp_path):
    write_task_targets(tmp_path, "alpha", torch.randn(1, T, H, W))
    with pytest.raises(TargetsError, match="incomplete"):
        PackedTargets(tmp_path)


@pytest.mark.parametrize(
    "tokens, match",
    [
        (torch.randn(2, T, H, W, dtype=torch.float64), "float32"),
        (torch.randn(T, H, W), "float32"),
        (torch.randn(0, T, H, W), "K >= 1"),
        (torch.full((1, T, H, W), float("nan")), "NaN"),
        (torch.randn(1, T + 1, H, W), "same tokenizer"),
    ],
    ids=["fp64", "3d", "K0", "nan", "T-mismatch"],
)
def test_bad_tokens_are_refused(tmp_path, tokens, match):
    make_pack(tmp_path)
    with pytest.raises(TargetsError, match=match):
        write_task_targets(tmp_path, "gamma", tokens)


@pytest.mark.parametrize("task", ["common", "../escape", "a/b", "", ".hidden"])
def test_unsafe_task_names_are_refused(tmp_path, task):
    with pytest.raises(ValueError, match="cannot be used as a file name"):
        write_task_targets(tmp_path, task, torch.randn(1, T, H, W))
