"""Fused Triton hyper-convolution stage vs the PyTorch reference: output and every gradient.

CPU (CI): the kernels run under TRITON_INTERPRET=1 at small shapes in fp32 and fp16, against the
reference in fp64 on the same (rounded) inputs, under a random upstream gradient.
GPU (skipped without CUDA): the 0.5B preset's stage shapes at batch 1 in bf16 autocast, against
the fp32 reference; the tolerance is anchored on the error of PyTorch's own bf16 autocast path.
"""

from __future__ import annotations

import pytest
import torch

import dnd_kernels.hyperconv.function as F
import dnd_kernels.hyperconv.kernel as K
from dnd_kernels.hyperconv.buffers import EPILOGUE_TANH_AVG, PLANE_AXES, empty_channels_last
from dnd_kernels.hyperconv.layernorm import layer_norm_channels_last
from dnd_kernels.hyperconv.reference import hyperconv_stage_reference
from dnd_kernels.testing import DEVICE, HAS_CUDA, PARAM_NAMES, assert_close, error_report, stage_inputs, stage_outputs

EPS = 1e-5


def _run(fn, x, params, grad_out, autocast=False):
    """(output, grads of x and of every param) with fresh leaf copies."""
    return stage_outputs(fn, x, params, grad_out, autocast, eps=EPS)


def _check_stage(batch, in_shape, out_shape, k, dtype, rms_tol, max_tol, seed=0):
    x, params = stage_inputs(batch, in_shape, out_shape, k, dtype, seed=seed)
    grad_out = torch.randn(batch, *out_shape, generator=torch.Generator().manual_seed(seed + 1))
    out, grads = _run(F.hyperconv_stage, x, params, grad_out)
    ref, ref_grads = _run(hyperconv_stage_reference, x.double(), [p.double() for p in params], grad_out.double())
    assert out.dtype == dtype and out.shape == ref.shape
    assert_close("out", out, ref, rms_tol, max_tol)
    for name, g, rg in zip(("x", *PARAM_NAMES), grads, ref_grads):
        assert g is not None and g.dtype == dtype, f"grad of {name}: {None if g is None else g.dtype}"
        assert_close(f"grad {name}", g, rg, rms_tol, max_tol)


# (batch, in (N, H, W), out (N', H', W'), k): odd, aligned/residual, tiny, kernel wider than the plane.
CPU_CASES = [
    pytest.param(2, (3, 5, 7), (4, 6, 5), 3, id="B2-N3H5W7-to-N4H6W5-k3"),
    pytest.param(1, (16, 8, 16), (16, 8, 16), 3, id="B1-N16H8W16-residual-k3"),
    pytest.param(1, (1, 2, 3), (2, 3, 1), 1, id="B1-N1H2W3-to-N2H3W1-k1"),
    pytest.param(1, (2, 3, 4), (3, 2, 3), 5, id="B1-N2H3W4-to-N3H2W3-k5"),
]


@pytest.mark.skipif(HAS_CUDA, reason="interpreter tests run on CPU-only machines (the GPU tests cover CUDA)")
@pytest.mark.parametrize("batch,in_shape,out_shape,k", CPU_CASES)
def test_stage_fp32_interpreter(batch, in_shape, out_shape, k):
    # fp32 operands and exact fp32 dots in the interpreter: only summation order differs.
    _check_stage(batch, in_shape, out_shape, k, torch.float32, rms_tol=1e-5, max_tol=1e-4)


@pytest.mark.skipif(HAS_CUDA, reason="interpreter tests run on CPU-only machines (the GPU tests cover CUDA)")
@pytest.mark.parametrize("batch,in_shape,out_shape,k", CPU_CASES[:2])
def test_stage_fp16_interpreter(batch, in_shape, out_shape, k):
    # fp16 intermediates (y, a1, b1, t, z and the branch gradients) are rounded to 2^-11 relative.
    _check_stage(batch, in_shape, out_shape, k, torch.float16, rms_tol=5e-3, max_tol=2e-2, seed=3)


@pytest.mark.skipif(HAS_CUDA, reason="interpreter test")
def test_channels_last_padding_is_zero_and_views_are_logical():
    t = empty_channels_last((2, 3, 5, 7), axis=2, dtype=torch.float32, device=torch.device("cpu"))
    assert t.view.shape == (2, 3, 5, 7) and t.view.stride(2) == 1 and t.padded == 16
    storage = t.view.as_strided((2, 3, 7, 16), (3 * 7 * 16, 7 * 16, 16, 1))
    assert torch.all(storage[..., 5:] == 0)


def test_launchers_reject_bad_inputs():
    x = empty_channels_last((1, 2, 3, 4), axis=3, dtype=torch.float32, device=DEVICE)
    w = K.conv_weight(torch.randn(5, 4, 3, 3, device=DEVICE), x.padded, torch.float32)
    with pytest.raises(ValueError, match="output must be"):
        K.channel_conv(x, w, torch.empty(1, 2, 3, 6, device=DEVICE))  # 6 output channels, weight makes 5
    with pytest.raises(ValueError, match="stored channels"):
        K.channel_conv(x, K.conv_weight(torch.randn(5, 4, 3, 3, device=DEVICE), 32, torch.float32), torch.empty(1, 2, 3, 5, device=DEVICE))
    with pytest.raises(ValueError, match="share one of"):
        K.channel_conv(x, w.half(), torch.empty(1, 2, 3, 5, device=DEVICE))
    with pytest.raises(ValueError, match="tanh-average epilogue needs"):
        K.channel_conv(x, w, torch.empty(1, 2, 3, 5, device=DEVICE), epilogue=EPILOGUE_TANH_AVG)
    with pytest.raises(ValueError, match="contiguous"):
        layer_norm_channels_last(torch.randn(1, 2, 4, 3, device=DEVICE).transpose(2, 3), torch.ones(3, 4, device=DEVICE),
                                   torch.ones(3, 4, device=DEVICE), 1e-5, torch.float32)  # fmt: skip
    if HAS_CUDA:  # outside the interpreter the kernels take CUDA tensors only
        with pytest.raises(ValueError, match="take CUDA tensors"):
            K.conv_weight(torch.randn(5, 4, 3, 3), 16, torch.float32)


def test_stage_rejects_mismatched_parameters():
    x, params = stage_inputs(1, (2, 3, 4), (3, 2, 5), 3)
    params[3] = torch.randn(2, 4, 3, 3)  # w_h1 must be (H', H, k, k) = (2, 3, 3, 3)
    with pytest.raises(ValueError, match="w_h1 must be"):
        F.hyperconv_stage(x, *params)


# ---- GPU: preset shapes, bf16 -----------------------------------------------------------------

PRESET_05B = [(128, 384, 384), (128, 200, 300), (128, 100, 256), (256, 50, 200), (512, 50, 200),
              (1024, 25, 200), (1024, 10, 200), (2048, 10, 200), (4296, 10, 130)]  # fmt: skip


def _preset_features():
    try:
        from dnd_scale.generator import PRESETS

        return list(PRESETS["qwen2.5-0.5b"].features), PRESETS["qwen2.5-0.5b"].kernel_size
    except ImportError:
        return PRESET_05B, 9


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("stage", range(8), ids=lambda i: f"qwen0.5b-stage{i}-B1-bf16")
def test_stage_bf16_gpu_preset(stage):
    features, k = _preset_features()
    in_shape, out_shape = features[stage], features[stage + 1]
    x, params = stage_inputs(1, in_shape, out_shape, k, torch.float32, device="cuda", seed=stage)
    grad_out = torch.randn(1, *out_shape, device="cuda", generator=torch.Generator("cuda").manual_seed(stage))
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False  # the fp32 reference is plain fp32
    try:
        ref, ref_grads = _run(hyperconv_stage_reference, x, params, grad_out)
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
    amp, amp_grads = _run(hyperconv_stage_reference, x, params, grad_out, autocast=True)
    out, grads = _run(F.hyperconv_stage, x, params, grad_out, autocast=True)
    for name, a, t, r in zip(("out", "x", *PARAM_NAMES), (out, *grads), (amp, *amp_grads), (ref, *ref_grads)):
        # bf16 autocast of the reference sets the scale of acceptable error; 2x + 2e-3 slack.
        base = error_report(t, r)["rms_ratio"]
        assert_close(name, a, r, rms_tol=2 * base + 2e-3, max_tol=5e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("axis", [1, 2, 3], ids=lambda a: f"channels-axis{a}")
def test_wgrad_backends_match_reference_gpu(axis, monkeypatch):
    # Every weight-gradient candidate that conv_wgrad times (Triton tiles; cuDNN on the same
    # buffers, and on NCHW copies with and without its benchmark mode), on odd sizes, against the
    # fp32 weight gradient of reference._conv_channels.
    from dnd_kernels.hyperconv.reference import _conv_channels

    shape, k, c_out = (2, 40, 23, 57), 5, 37
    gen = torch.Generator("cuda").manual_seed(axis)
    x = empty_channels_last(shape, axis, torch.bfloat16, torch.device("cuda"))
    x.view.copy_(torch.randn(shape, device="cuda", generator=gen))
    out_shape = list(shape)
    out_shape[axis] = c_out
    dy = empty_channels_last(tuple(out_shape), axis, torch.bfloat16, torch.device("cuda"))
    dy.view.copy_(torch.randn(out_shape, device="cuda", generator=gen))
    w = torch.zeros(c_out, shape[axis], k, k, device="cuda", requires_grad=True)
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        _conv_channels(x.view.float(), w, axis).backward(dy.view.float())
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
    monkeypatch.setenv("DND_KERNELS_AUTOTUNE", "0")  # the first candidate: a Triton tile
    assert_close("triton wgrad", K.conv_wgrad(dy, x, k), w.grad, rms_tol=2e-3, max_tol=1e-2)
    cudnn = K._wgrad_cudnn(dy, x, k, PLANE_AXES[axis])
    assert_close("cudnn wgrad", cudnn, w.grad, rms_tol=5e-3, max_tol=1e-2)  # rounded to bf16 once
    for benchmark in (False, True):
        with torch.backends.cudnn.flags(enabled=True, benchmark=benchmark):
            nchw = K._wgrad_cudnn(dy, x, k, PLANE_AXES[axis], nchw=True)
        assert_close(f"cudnn wgrad on NCHW copies (benchmark {benchmark})", nchw, w.grad, rms_tol=5e-3, max_tol=1e-2)


def test_a_convolution_past_the_32_bit_index_limit_is_split_into_the_same_result(monkeypatch):
    """The reference splits a convolution whose weight or output would pass INDEX_LIMIT elements (the
    Llama-70B generator's last mixing weight, 4.19 G elements, overflowed a GPU kernel's indexing)."""
    from dnd_kernels.hyperconv import reference

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 6, 5, 7, generator=gen, dtype=torch.float64, requires_grad=True)  # sums in another order
    weight = torch.randn(11, 6, 3, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(11, generator=gen, dtype=torch.float64, requires_grad=True)
    whole = reference.conv2d_same(x, weight, bias)
    grads = torch.autograd.grad(whole.square().sum(), (x, weight, bias))
    calls = []
    real = reference.F.conv2d

    def counted(inp, w, *args, **kwargs):
        calls.append(w.numel())
        return real(inp, w, *args, **kwargs)

    # a channel holds 6*3*3 = 54 weights and 2*5*7 = 70 outputs: the larger bounds the call
    monkeypatch.setattr(reference, "INDEX_LIMIT", 4 * 70 + 1)  # 4 output channels a call
    monkeypatch.setattr(reference.F, "conv2d", counted)
    split = reference.conv2d_same(x, weight, bias)
    assert calls == [4 * 54, 4 * 54, 3 * 54]
    torch.testing.assert_close(split, whole)
    for got, want in zip(torch.autograd.grad(split.square().sum(), (x, weight, bias)), grads):
        torch.testing.assert_close(got, want)
    monkeypatch.setattr(reference, "INDEX_LIMIT", 70)  # one output channel a call
    calls.clear()
    torch.testing.assert_close(reference.conv2d_same(x, weight, bias), whole)
    assert len(calls) == 11


class _FakeEvent:
    """A CUDA event stand-in for timing the candidates on a machine without a GPU: 1 ms a launch."""

    def __init__(self, enable_timing: bool) -> None:
        self.at = 0.0

    def record(self) -> None:
        self.at = float(len(_FakeEvent.launches))

    def synchronize(self) -> None:
        pass

    def elapsed_time(self, end: "_FakeEvent") -> float:
        return end.at - self.at


_FakeEvent.launches = []


@pytest.mark.parametrize("autotune", [True, False], ids=["autotune", "first-fit"])
def test_a_tile_that_does_not_fit_the_gpu_is_skipped(monkeypatch, autotune):
    """An fp32 tile can need more shared memory than the GPU has (Triton raises OutOfResources when it
    loads the kernel): the pick skips it, with or without autotuning, and says what to do when none fits."""
    from triton.runtime.errors import OutOfResources

    from dnd_kernels.hyperconv import tiling

    monkeypatch.setattr(tiling, "interpreted", lambda: False)
    monkeypatch.setattr(tiling, "autotune_enabled", lambda: autotune)
    monkeypatch.setattr(tiling, "_tuned_from_file", lambda: {})
    monkeypatch.setattr(torch.cuda, "Event", _FakeEvent)
    monkeypatch.setattr(_FakeEvent, "launches", [])
    for cache in ("_TUNED", "_TUNE_LOG", "_FIRST_FIT"):  # this test's choices stay out of the process's
        monkeypatch.setattr(tiling, cache, {})
    big, huge = tiling.TileConfig(256, 128, 64, 8, 3), tiling.TileConfig(256, 256, 64, 8, 3)
    small = tiling.TileConfig(128, 64, 64, 4, 4)

    def launch(cfg):
        if cfg.block_m == 256:
            raise OutOfResources(294912, 232448, "shared memory")
        _FakeEvent.launches.append(cfg)

    key = ("conv", "test", autotune)
    assert tiling.pick(key, [big, small], launch) == small
    assert tiling.pick(key, [big, small], launch) == small  # cached: no more launches
    assert set(_FakeEvent.launches) == {small}
    count = len(_FakeEvent.launches)
    tiling.pick(key, [big, small], launch)
    assert len(_FakeEvent.launches) == count
    with pytest.raises(RuntimeError, match=r"no tile candidate .* fits this GPU's resources .*bf16, or with impl torch"):
        tiling.pick(("conv", "none fits", autotune), [big, huge], launch)
    assert (key in tiling._TUNE_LOG) == autotune  # timed: the fitting candidate only
    if autotune:
        assert list(tiling._TUNE_LOG[key]) == ["128x64x64/w4/s4"]
