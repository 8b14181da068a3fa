"""Hyper-convolutional generator: presets, sizing rule, counts, forward, loss, implementation switch."""

from __future__ import annotations

import dataclasses
import types

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from dnd_scale import generator as gen
from dnd_scale.generator import (
    PRESETS,
    GeneratorConfig,
    HyperConvGenerator,
    HyperConvStage,
    count_parameters,
    features_for,
    generator_loss,
    resolve_features,
    resolve_impl,
    stage_flops,
)

# Tiny feature lists with odd sizes: growing N, shrinking and growing H/W, a residual stage.
TINY = {
    "odd": [(3, 5, 7), (4, 3, 6), (5, 3, 9)],
    "residual": [(2, 4, 6), (3, 5, 5), (3, 5, 5), (7, 3, 4)],
    "single": [(1, 1, 3), (2, 2, 1)],
}


def _seeded_generator(features, kernel_size=3, impl="torch", seed=0):
    torch.manual_seed(seed)
    return HyperConvGenerator(GeneratorConfig(preset=None, features=features, kernel_size=kernel_size, impl=impl))


# ---------------------------------------------------------------------------------------------- presets


def test_paper_05b_preset_has_1113203220_parameters():
    preset = PRESETS["qwen2.5-0.5b"]
    assert preset.kernel_size == 9
    assert preset.features[0] == (128, 384, 384) and preset.features[-1] == (4296, 10, 130)
    assert count_parameters(list(preset.features), preset.kernel_size) == 1_113_203_220
    # The real module, built on the meta device (shapes only, no memory), holds exactly that many.
    with torch.device("meta"):
        model = HyperConvGenerator(GeneratorConfig(preset="qwen2.5-0.5b"))
    assert sum(p.numel() for p in model.parameters()) == 1_113_203_220
    assert model.config.kernel_size == 9


@pytest.mark.parametrize(
    "name, tokens, kernel_size",
    [("qwen2.5-1.5b", (4508, 18, 258), 11), ("qwen2.5-1.5b-math", (4508, 18, 258), 11), ("qwen2.5-7b", (4928, 18, 514), 11)],
)
def test_larger_presets_end_in_their_token_geometry(name, tokens, kernel_size):
    preset = PRESETS[name]
    assert preset.features[-1] == tokens
    assert preset.kernel_size == kernel_size
    assert preset.features[0][1:] == (1000, 384)


# ------------------------------------------------------------------------------------- counts and FLOPs


@pytest.mark.parametrize("kernel_size", [1, 3, 5])
@pytest.mark.parametrize("name", list(TINY))
def test_count_parameters_equals_module_numel(name, kernel_size):
    model = _seeded_generator(TINY[name], kernel_size)
    assert count_parameters(TINY[name], kernel_size) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    "in_shape, out_shape, kernel_size",
    [((3, 5, 7), (4, 3, 6), 3), ((2, 6, 4), (2, 6, 4), 5), ((1, 2, 9), (5, 7, 2), 1)],
    ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else f"k{v}",
)
def test_stage_flops_matches_torch_flop_counter(in_shape, out_shape, kernel_size):
    torch.manual_seed(0)
    stage = HyperConvStage(in_shape, out_shape, kernel_size, impl="torch")
    for batch in (1, 3):
        with FlopCounterMode(display=False) as counter:
            stage(torch.randn(batch, *in_shape))
        assert counter.get_total_flops() == batch * stage_flops(in_shape, out_shape, kernel_size)


# ---------------------------------------------------------------------------------------------- forward


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("kernel_size", [3, 5])
@pytest.mark.parametrize("name", list(TINY))
def test_forward_shape(name, kernel_size, batch):
    features = TINY[name]
    model = _seeded_generator(features, kernel_size)
    out = model(torch.randn(batch, *features[0]))
    assert out.shape == (batch, *features[-1])
    assert torch.isfinite(out).all()


def _stage_by_hand(stage: HyperConvStage, x: torch.Tensor) -> torch.Tensor:
    """The stage math written independently of the reference: each axis moved to dim 1 for conv2d."""
    k = stage.kernel_size
    pad = k // 2

    def conv_over(t, weight, axis):  # convolve with `axis` as channels, other two axes as the plane
        return F.conv2d(t.movedim(axis, 1), weight, padding=pad).movedim(1, axis)

    B, N, H, W = x.shape
    mean = x.mean(dim=(2, 3), keepdim=True)
    var = x.var(dim=(2, 3), unbiased=False, keepdim=True)
    y = (x - mean) / torch.sqrt(var + stage.eps) * stage.ln_weight + stage.ln_bias
    # Plane order matters for a k×k kernel: (H, N) for the W-conv of branch A, etc.
    a = conv_over(y.permute(0, 3, 2, 1), stage.w_w1, 1).permute(0, 3, 2, 1)  # W -> W', plane (H, N)
    a = conv_over(a.permute(0, 2, 1, 3), stage.w_h1, 1).permute(0, 2, 1, 3)  # H -> H', plane (N, W')
    b = conv_over(y.permute(0, 2, 1, 3), stage.w_h2, 1).permute(0, 2, 1, 3)  # H -> H', plane (N, W)
    b = torch.tanh(conv_over(b.permute(0, 3, 2, 1), stage.w_w2, 1).permute(0, 3, 2, 1))  # W -> W', plane (H', N)
    z = (a + b + stage.bias) / 3
    out = F.conv2d(z, stage.mix_weight, stage.mix_bias, padding=pad)
    return x + out if out.shape == x.shape else out


@pytest.mark.parametrize(
    "in_shape, out_shape",
    [((3, 5, 7), (4, 3, 6)), ((3, 5, 5), (3, 5, 5))],
    ids=["N3-H5-W7-to-N4-H3-W6", "residual-N3-H5-W5"],
)
def test_stage_matches_math_written_by_hand(in_shape, out_shape):
    torch.manual_seed(1)
    stage = HyperConvStage(in_shape, out_shape, kernel_size=3, impl="torch")
    with torch.no_grad():  # non-trivial LayerNorm affine so that its wiring is checked too
        stage.ln_weight.normal_()
        stage.ln_bias.normal_()
    x = torch.randn(2, *in_shape)
    torch.testing.assert_close(stage(x), _stage_by_hand(stage, x), rtol=1e-5, atol=1e-5)


def test_residual_stage_adds_its_input():
    torch.manual_seed(2)
    stage = HyperConvStage((3, 5, 5), (3, 5, 5), kernel_size=3, impl="torch")
    x = torch.randn(2, 3, 5, 5)
    with torch.no_grad():
        stage.mix_weight.zero_()
        stage.mix_bias.zero_()
    torch.testing.assert_close(stage(x), x)  # residual: x + 0
    shrinking = HyperConvStage((3, 5, 5), (3, 5, 4), kernel_size=3, impl="torch")
    with torch.no_grad():
        shrinking.mix_weight.zero_()
        shrinking.mix_bias.zero_()
    assert shrinking(x).abs().max() == 0  # not residual: the mixing conv's output only


def test_forward_rejects_wrong_condition_shape():
    model = _seeded_generator(TINY["odd"])
    with pytest.raises(ValueError, match=r"\(B, 3, 5, 7\).*got \(2, 3, 5, 8\)"):
        model(torch.randn(2, 3, 5, 8))
    with pytest.raises(ValueError, match="got \\(3, 5, 7\\)"):
        model(torch.randn(3, 5, 7))


def test_gradient_reaches_every_parameter():
    features = TINY["residual"]
    model = _seeded_generator(features)
    cond = torch.randn(2, *features[0])
    target = torch.randn(2, *features[-1])
    mask = torch.rand(features[-1]) > 0.3
    generator_loss(model(cond), target, mask, torch.rand(features[-1][0]) + 0.5).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"no gradient reaches {name}"


def test_parameter_names_are_stable():
    # These names are the checkpoint format: changing them breaks every saved generator.
    model = _seeded_generator(TINY["odd"])
    per_stage = ["ln_weight", "ln_bias", "w_w1", "w_h1", "w_h2", "w_w2", "bias", "mix_weight", "mix_bias"]
    assert list(model.state_dict()) == [f"stages.{i}.{n}" for i in range(2) for n in per_stage]


def test_resolved_config_rebuilds_the_same_generator():
    model = HyperConvGenerator(GeneratorConfig(num_stages=3), (2, 9, 8), (4, 6), 11)
    assert model.config.preset is None and model.config.kernel_size == 9
    again = HyperConvGenerator(GeneratorConfig(**dataclasses.asdict(model.config)))
    assert again.features == model.features
    assert {k: v.shape for k, v in again.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}


def test_init_follows_conv2d_defaults():
    torch.manual_seed(3)
    stage = HyperConvStage((16, 6, 10), (32, 4, 8), kernel_size=3)
    bound = 1.0 / (16 * 3 * 3) ** 0.5  # nn.Conv2d: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    assert stage.mix_weight.abs().max() <= bound and stage.mix_weight.abs().max() > 0.9 * bound
    assert stage.mix_bias.abs().max() <= bound
    assert stage.bias.abs().max() <= 1.0 / (4 * 8)
    assert (stage.ln_weight == 1).all() and (stage.ln_bias == 0).all()


# ------------------------------------------------------------------------------------------ sizing rule


@pytest.mark.parametrize(
    "condition, token_shape, num_tokens",
    [
        ((4, 12, 16), (6, 10), 37),
        ((128, 384, 384), (10, 130), 4296),
        ((128, 256, 384), (18, 258), 12000),
        ((128, 256, 384), (18, 258), 40000),
        ((64, 8, 384), (34, 130), 37),  # fewer tokens than prompts, condition shorter than a token
    ],
    ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else f"T{v}",
)
def test_sizing_rule_gives_valid_shapes(condition, token_shape, num_tokens):
    features = features_for(condition, token_shape, num_tokens, num_stages=8, max_channels=2048)
    assert len(features) == 9
    assert features[0] == condition and features[-1] == (num_tokens, *token_shape)
    assert all(isinstance(v, int) and v >= 1 for shape in features for v in shape)
    ns, hs, ws = zip(*features)
    hidden = ns[1:-1]
    assert max(hidden) <= max(2048, condition[0])
    step = 1 if num_tokens >= condition[0] else -1  # N moves monotonically toward T
    assert all(step * (b - a) >= 0 for a, b in zip(ns, ns[1:]))
    for series, end in ((hs, token_shape[0]), (ws, token_shape[1])):  # H, W move monotonically toward the token
        direction = 1 if end >= series[0] else -1
        assert all(direction * (b - a) >= 0 for a, b in zip(series, series[1:]))
    assert all(n % 8 == 0 for n in hidden if n >= 64)
    assert count_parameters(features, 9) > 0


@pytest.mark.parametrize("name", ["qwen2.5-0.5b", "qwen2.5-1.5b", "qwen2.5-7b"])
def test_sizing_rule_lands_near_the_paper_presets(name):
    preset = PRESETS[name]
    first, last = preset.features[0], preset.features[-1]
    k = preset.kernel_size
    auto = features_for(first, last[1:], last[0])

    def flops(f):
        return sum(stage_flops(a, b, k) for a, b in zip(f, f[1:]))

    paper = list(preset.features)
    assert 0.85 <= count_parameters(auto, k) / count_parameters(paper, k) <= 1.15
    assert 0.80 <= flops(auto) / flops(paper) <= 1.20


def test_sizing_rule_caps_hidden_channels():
    capped = features_for((128, 256, 384), (18, 258), 40000, max_channels=1024)
    assert capped[-2][0] == 1024
    assert count_parameters(capped, 9) < count_parameters(features_for((128, 256, 384), (18, 258), 40000), 9)


# ------------------------------------------------------------------------------------ config resolution


def test_auto_preset_uses_the_sizing_rule():
    config = GeneratorConfig(preset="auto", num_stages=4, max_channels=16)
    assert resolve_features(config, (3, 12, 10), (4, 6), 50) == features_for((3, 12, 10), (4, 6), 50, 4, 16)
    with pytest.raises(ValueError, match="condition_shape"):
        resolve_features(config, (3, 12, 10), None, 50)


def test_named_preset_on_a_wrong_layout_names_both_and_suggests_auto():
    config = GeneratorConfig(preset="qwen2.5-0.5b")
    assert resolve_features(config, (128, 384, 384), (10, 130), 4296) == list(PRESETS["qwen2.5-0.5b"].features)
    with pytest.raises(ValueError, match=r"\(4296, 10, 130\).*\(4508, 18, 258\).*preset='auto'"):
        resolve_features(config, (128, 384, 384), (18, 258), 4508)
    with pytest.raises(ValueError, match=r"\(128, 384, 384\).*\(64, 256, 384\).*preset='auto'"):
        resolve_features(config, (64, 256, 384), (10, 130), 4296)


def test_explicit_features_are_checked_against_the_geometry():
    config = GeneratorConfig(preset=None, features=[[3, 5, 7], [5, 3, 9]])  # lists, as YAML gives them
    assert resolve_features(config, (3, 5, 7), (3, 9), 5) == [(3, 5, 7), (5, 3, 9)]
    with pytest.raises(ValueError, match=r"explicit feature list.*\(5, 3, 9\).*\(6, 3, 9\)"):
        resolve_features(config, (3, 5, 7), (3, 9), 6)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"preset": "qwen2.5-0.5b", "features": [(1, 2, 3), (4, 5, 6)]}, "exactly one of"),
        ({"preset": None}, "exactly one of"),
        ({"preset": "qwen9-1t"}, "unknown generator preset 'qwen9-1t'"),
        ({"kernel_size": 4}, "odd"),
        ({"impl": "cuda"}, "impl must be one of"),
        ({"preset": None, "features": [(1, 2, 3)]}, "at least 2 shapes"),
        ({"preset": None, "features": [(1, 2, 3), (4, 0, 6)]}, "3 positive ints"),
        ({"num_stages": 0}, "num_stages"),
    ],
    ids=["preset-and-features", "neither", "unknown-preset", "even-kernel", "bad-impl", "one-shape", "zero-size", "no-stages"],
)
def test_bad_config_is_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GeneratorConfig(**kwargs)


def test_kernel_size_resolution():
    with torch.device("meta"):
        assert HyperConvGenerator(GeneratorConfig(preset="qwen2.5-7b")).config.kernel_size == 11
        assert HyperConvGenerator(GeneratorConfig(preset="qwen2.5-7b", kernel_size=3)).config.kernel_size == 3
    assert HyperConvGenerator(GeneratorConfig(num_stages=2), (2, 4, 4), (3, 3), 5).config.kernel_size == 9


# ---------------------------------------------------------------------------------- implementation switch


@pytest.fixture
def fake_triton(monkeypatch):
    """Replace the lazy import of the fused stage with a recording stand-in that runs the reference:
    `calls` gets the argument count of each stage call, `packs` one entry per weight packing;
    `calls.too_large` names the stage input shapes whose buffers the stand-in says pass 2**31."""
    calls = type("Calls", (list,), {})()
    packs = calls.packs = []
    calls.too_large = set()

    def stage(*args, eps, packed):
        calls.append(len(args))
        return gen.hyperconv_stage_reference(*args, eps=eps)

    def pack(*weights_and_dtype):
        packs.append(weights_and_dtype[-1])
        return tuple(w.detach().clone() for w in weights_and_dtype[:-1])

    module = types.SimpleNamespace(hyperconv_stage=stage, pack_forward_weights=pack, compute_dtype=lambda x: x.dtype,
                                   index_fits=lambda batch, in_shape, out_shape, k: in_shape not in calls.too_large)
    monkeypatch.setattr(gen, "_load_triton_stage", lambda: (module, ""))
    return calls


@pytest.fixture
def no_triton(monkeypatch):
    monkeypatch.setattr(gen, "_load_triton_stage", lambda: (None, "ModuleNotFoundError: no module"))


def test_triton_impl_dispatches_to_the_fused_stage(fake_triton):
    features = TINY["odd"]
    x = torch.randn(2, *features[0])
    expected = _seeded_generator(features, impl="torch")(x)
    out = _seeded_generator(features, impl="triton")(x)
    assert fake_triton == [10, 10]  # one call per stage with x and the 9 parameters
    torch.testing.assert_close(out, expected)


def test_a_stage_past_the_kernels_32_bit_offsets_runs_on_the_pytorch_path(fake_triton):
    features = TINY["odd"]
    x = torch.randn(2, *features[0])
    expected = _seeded_generator(features, impl="torch")(x)
    fake_triton.too_large.add(tuple(features[1]))  # the second stage's buffers would pass 2**31
    with pytest.warns(UserWarning, match=r"would pass 2\*\*31 elements .* runs on the PyTorch path"):
        out = _seeded_generator(features, impl="triton")(x)
    assert fake_triton == [10]  # the first stage on the fused kernels, the second on the reference
    torch.testing.assert_close(out, expected)


def test_index_fits_counts_the_packed_weights_and_padded_activations():
    """The fused path's 32-bit check at the shapes that need it: the Llama-3.1-70B generator's last
    stage (its mixing weight, 81 x 2048 x 25,280 = 4.19 G elements packed) does not fit at any batch;
    the 7B preset's last stage fits at the training micro-batch 4 and not at 64 (activations)."""
    pytest.importorskip("triton")
    from dnd_kernels.hyperconv.function import index_fits

    assert not index_fits(1, (2048, 18, 496), (25280, 18, 514), 9)
    assert index_fits(4, (2048, 32, 400), (4928, 18, 514), 11)
    assert not index_fits(64, (2048, 32, 400), (4928, 18, 514), 11)  # 64 x 4928 x 18 x 544 = 3.09 G


def test_generation_packs_the_weights_once_until_they_change(fake_triton):
    model = _seeded_generator(TINY["odd"], impl="triton")
    x = torch.randn(1, *TINY["odd"][0])
    model(x)  # training-style call: the stage packs its own weights every time
    assert fake_triton.packs == []
    with torch.no_grad():
        first = model(x)
        assert model(x).equal(first)
        assert len(fake_triton.packs) == 2  # one packing per stage for both calls
        model.stages[0].mix_weight.mul_(2)  # an optimizer step or a load changes a weight in place
        model(x)
    assert len(fake_triton.packs) == 3  # only the changed stage packs again


def test_triton_impl_without_kernels_says_what_to_do(no_triton):
    model = _seeded_generator(TINY["odd"], impl="triton")
    with pytest.raises(RuntimeError, match="impl='triton'.*no module.*'auto' or 'torch'"):
        model(torch.randn(1, 3, 5, 7))
    assert resolve_impl("auto", torch.device("cuda")) == "torch"  # auto falls back without Triton


def test_auto_impl_picks_the_measured_faster_path(fake_triton):
    # the fused stages measured faster on an H100 (benchmarks/README.md); CPU runs the reference
    assert resolve_impl("auto", torch.device("cpu")) == "torch"
    assert resolve_impl("auto", torch.device("cuda")) == "triton"
    assert resolve_impl("triton", torch.device("cuda")) == "triton"
    assert resolve_impl("torch", torch.device("cuda")) == "torch"


# ------------------------------------------------------------------------------------------------- loss


def _loss_inputs(batch=3, tokens=5, h=4, w=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    pred = torch.randn(batch, tokens, h, w, generator=g, requires_grad=True)
    target = torch.randn(batch, tokens, h, w, generator=g)
    mask = torch.rand(tokens, h, w, generator=g) > 0.4
    weights = torch.rand(tokens, generator=g) + 0.2
    return pred, target, mask, weights


def test_loss_is_the_weighted_mean_over_valid_elements():
    pred, target, mask, weights = _loss_inputs()
    w = weights / weights.mean()
    sq = (pred - target) ** 2 * w[:, None, None]
    expected = sq[:, mask].sum() / (mask.sum() * pred.shape[0])
    torch.testing.assert_close(generator_loss(pred, target, mask, weights), expected)
    torch.testing.assert_close(generator_loss(pred, target, mask, 5 * weights), expected)  # scale-free
    unweighted = ((pred - target) ** 2)[:, mask].mean()
    torch.testing.assert_close(generator_loss(pred, target, mask), unweighted)


def test_padding_does_not_change_the_loss_or_its_gradient():
    pred, target, mask, weights = _loss_inputs()
    loss = generator_loss(pred, target, mask, weights)
    (grad,) = torch.autograd.grad(loss, pred)
    pad = ~mask.expand_as(pred)
    junk_pred = torch.where(pad, torch.full_like(pred, 1e6), pred).detach().requires_grad_(True)
    junk_target = torch.where(pad, torch.full_like(target, float("nan")), target)
    junk_loss = generator_loss(junk_pred, junk_target, mask, weights)
    (junk_grad,) = torch.autograd.grad(junk_loss, junk_pred)
    torch.testing.assert_close(junk_loss, loss)
    torch.testing.assert_close(junk_grad, grad)
    assert (grad[pad] == 0).all()


def test_per_token_weight_scales_that_tokens_error():
    target = torch.zeros(1, 4, 2, 3)
    mask = torch.ones(4, 2, 3, dtype=torch.bool)
    pred = torch.zeros(1, 4, 2, 3)
    pred[0, 2] = 1.0  # error in token 2 only
    weights = torch.tensor([1.0, 1.0, 3.0, 1.0])  # mean 1.5: token 2 weighs 2 after normalization
    assert generator_loss(pred, target, mask).item() == pytest.approx(6 / 24)
    assert generator_loss(pred, target, mask, weights).item() == pytest.approx(2 * 6 / 24)


def test_per_sample_losses():
    pred, target, mask, weights = _loss_inputs()
    per_sample = generator_loss(pred, target, mask, weights, per_sample=True)
    assert per_sample.shape == (3,)
    for b in range(3):
        torch.testing.assert_close(per_sample[b], generator_loss(pred[b : b + 1], target[b : b + 1], mask, weights))
    torch.testing.assert_close(per_sample.mean(), generator_loss(pred, target, mask, weights))
    # Per-sample masks: each sample averages over its own valid elements.
    masks = torch.stack([mask, ~mask, torch.ones_like(mask)])
    per_sample = generator_loss(pred, target, masks, weights, per_sample=True)
    for b in range(3):
        torch.testing.assert_close(per_sample[b], generator_loss(pred[b : b + 1], target[b : b + 1], masks[b], weights))


def test_loss_bad_input_is_refused():
    pred, target, mask, weights = _loss_inputs()
    with pytest.raises(ValueError, match="same shape"):
        generator_loss(pred, target[:, :4], mask, weights)
    with pytest.raises(ValueError, match="bool mask"):
        generator_loss(pred, target, mask.float(), weights)
    with pytest.raises(ValueError, match=r"weights of shape \(5,\)"):
        generator_loss(pred, target, mask, weights[:4])
    with pytest.raises(ValueError, match="no valid element"):
        generator_loss(pred, target, torch.zeros_like(mask), weights)


@pytest.mark.parametrize("model", ["qwen2.5-7b", "qwen2.5-14b", "qwen2.5-32b", "qwen2.5-72b", "llama-3.1-70b"])
def test_rule_presets_are_the_sizing_rule_for_their_layout(model):
    """A rule preset is data: it must equal features_for at its model's r=16, chunk-512 token geometry."""
    from pathlib import Path

    from dnd_scale.layout import LoraLayout, LoraSpec
    from dnd_scale.tokenizer import WeightTokenizer

    config = Path(__file__).resolve().parents[1] / "configs" / "models" / f"{model}.json"
    tok = WeightTokenizer(LoraLayout.from_config(config, LoraSpec(rank=16, target_modules="all-linear")), chunk=512)
    preset = PRESETS[f"{model}-rule"]
    assert list(preset.features) == features_for((128, 384, 384), tok.token_shape, tok.num_tokens)
    assert preset.kernel_size == 9 and str(tok.num_tokens) in preset.source
    built = resolve_features(GeneratorConfig(preset=f"{model}-rule"), (128, 384, 384), tok.token_shape, tok.num_tokens)
    assert built == list(preset.features)
