"""The hyper-convolutional parameter generator: prompt embeddings in, LoRA weight tokens out.

A generator is a cascade of hyper-convolution stages between consecutive *feature shapes*
``(N, H, W)``. The first shape is the condition ``(num_prompts, max_tokens, embed_dim)`` that the
frozen encoder produces; the last is the tokenizer's ``(num_tokens, r + 2, c + 2)``. One stage
(``dnd_kernels.hyperconv.reference`` holds the math) normalizes over ``(H, W)``, runs two branches of
channel convolutions that take H → H' and W → W', averages them with a learned bias, then mixes the
N axis with a k×k convolution (N → N'); a stage whose output shape equals its input is residual.

The feature list comes from one of three places:

- a named preset: the paper's settings for Qwen2.5-0.5B / 1.5B / 7B, and the sizing rule's lists for
  Qwen2.5-7B-72B and Llama-3.1-70B at r=16, chunk 512 (``PRESETS``);
- ``preset="auto"``: the sizing rule ``features_for`` derives a list for any condition and token
  geometry (14B-70B targets have 10k-40k+ tokens, no hand-made list exists for them);
- an explicit ``features`` list.

``resolve_features`` turns a config plus the actual geometry into the list, and refuses a preset that
does not fit the layout. ``count_parameters`` and ``stage_flops`` size a generator without building
it (``dnd plan``, benchmarks). ``generator_loss`` is the masked, per-token-weighted MSE of training.
"""

from __future__ import annotations

import functools
import importlib
import math
import warnings
from dataclasses import dataclass, replace
from typing import Callable

import torch
from torch import Tensor, nn

from dnd_kernels.hyperconv.reference import hyperconv_stage_reference

Shape = tuple[int, int, int]  # (N, H, W)

IMPLS = ("auto", "torch", "triton")
DEFAULT_KERNEL_SIZE = 9  # the 0.5B preset's; used by "auto" and explicit lists unless set
TRITON_MODULE = "dnd_kernels.hyperconv.function"


@dataclass(frozen=True)
class GeneratorPreset:
    """A feature list and kernel size recorded as data: published with the DnD paper's code, or made
    once by the sizing rule `features_for` for a target no paper list exists for."""

    features: tuple[Shape, ...]
    """(N, H, W) per stage boundary: first = condition, last = (num_tokens, r + 2, c + 2)."""
    kernel_size: int
    """k of every k×k convolution in the generator."""
    source: str
    """Where the numbers come from (the paper's training script that used them, or the rule call)."""


# The paper's settings, from its public training scripts (Drag-and-Drop-LLMs, workspace/main/tasks/).
# The 1.5B and 7B scripts feed the decoder a condition of 1000 tokens made by a learned projection over the token
# axis (Linear(max_text_length -> 1000), SiLU, Linear(1000 -> 1000)) in front of the decoder; these
# presets describe the decoder only, so their condition must already be (N, 1000, 384).
PRESETS: dict[str, GeneratorPreset] = {
    "qwen2.5-0.5b": GeneratorPreset(
        features=(
            (128, 384, 384),
            (128, 200, 300),
            (128, 100, 256),
            (256, 50, 200),
            (512, 50, 200),
            (1024, 25, 200),
            (1024, 10, 200),
            (2048, 10, 200),
            (4296, 10, 130),
        ),
        kernel_size=9,
        source="tasks/common_sense_reasoning/train_qwen0.5lora_*.py (r=8, c=128)",
    ),
    "qwen2.5-1.5b": GeneratorPreset(
        features=(
            (16, 1000, 384),
            (64, 500, 300),
            (256, 125, 300),
            (512, 64, 300),
            (1024, 64, 256),
            (2048, 32, 256),
            (4508, 18, 258),
        ),
        kernel_size=11,
        source="tasks/coding/train_qwen1.5lora_Coding.py (r=16, c=256)",
    ),
    # The paper's 1.5B math run used 32 prompts and a different second and third stage.
    "qwen2.5-1.5b-math": GeneratorPreset(
        features=(
            (32, 1000, 384),
            (64, 500, 300),
            (256, 500, 300),
            (512, 125, 300),
            (1024, 64, 256),
            (2048, 32, 256),
            (4508, 18, 258),
        ),
        kernel_size=11,
        source="tasks/math/train_qwen1.5lora_Math.py (r=16, c=256)",
    ),
    "qwen2.5-7b": GeneratorPreset(
        features=(
            (16, 1000, 384),
            (64, 500, 384),
            (256, 125, 400),
            (512, 64, 400),
            (1024, 64, 400),
            (2048, 32, 400),
            (4928, 18, 514),
        ),
        kernel_size=11,
        source="tasks/{coding,math}/train_qwen7lora_*.py (r=16, c=512)",
    ),
}

# Presets made by the sizing rule (not the paper's) are registered after `features_for` below.


@dataclass
class GeneratorConfig:
    """Which hyper-convolutional generator to build and how to run it."""

    preset: str | None = "auto"
    """A name from PRESETS ("qwen2.5-0.5b", "qwen2.5-1.5b", "qwen2.5-1.5b-math", "qwen2.5-7b"; the
    sizing rule's "qwen2.5-7b-rule" ... "qwen2.5-72b-rule", "llama-3.1-70b-rule"),
    "auto" (derive the stages from the condition and token geometry with `features_for`), or None
    when `features` is given."""
    features: list[Shape] | None = None
    """Explicit (N, H, W) list; first = condition (num_prompts, max_tokens, embed_dim), last =
    (num_tokens, r + 2, c + 2). Exclusive with `preset`."""
    kernel_size: int | None = None
    """k of every k×k convolution (odd). None: the preset's own (9 for 0.5B, 11 for 1.5B/7B), else 9."""
    num_stages: int = 8
    """Stages made by the sizing rule (preset="auto" only); the 0.5B preset has 8."""
    max_channels: int = 2048
    """Cap on N of the stages before the last one (preset="auto" only). All three paper presets end
    with 2048 -> T; parameters grow as max_channels * T * k², so lower it for very large T."""
    impl: str = "auto"
    """"auto": the fused Triton stage on a GPU (measured faster on an H100, benchmarks/README.md),
    the PyTorch reference on CPU or where Triton does not import; "torch": always the PyTorch
    reference; "triton": always the fused Triton stage (error if it does not import). `dnd generate`
    detokenizes by the same switch (``WeightTokenizer.detokenize_flat``)."""
    eps: float = 1e-5
    """LayerNorm epsilon of every stage."""

    def __post_init__(self) -> None:
        # YAML and JSON give lists; shapes are compared as tuples everywhere else.
        if self.features is not None:
            self.features = [tuple(int(v) for v in shape) for shape in self.features]
        if (self.preset is None) == (self.features is None):
            raise ValueError(
                "generator config needs exactly one of `preset` and `features`, got "
                f"preset={self.preset!r} and features={self.features!r}; set preset=null to use "
                "an explicit feature list"
            )
        if self.preset is not None and self.preset != "auto" and self.preset not in PRESETS:
            raise ValueError(
                f"unknown generator preset {self.preset!r}; choose one of "
                f"{['auto', *PRESETS]} or give an explicit `features` list"
            )
        if self.features is not None:
            _check_features(self.features)
        if self.kernel_size is not None and (self.kernel_size < 1 or self.kernel_size % 2 == 0):
            raise ValueError(f"generator kernel_size must be a positive odd integer, got {self.kernel_size}")
        if self.impl not in IMPLS:
            raise ValueError(f"generator impl must be one of {IMPLS}, got {self.impl!r}")
        if self.num_stages < 1 or self.max_channels < 1:
            raise ValueError(
                f"num_stages and max_channels must be >= 1, got {self.num_stages} and {self.max_channels}"
            )
        if not self.eps > 0:
            raise ValueError(f"generator eps must be > 0, got {self.eps}")


def _check_features(features: list[Shape]) -> None:
    if len(features) < 2:
        raise ValueError(
            f"a generator feature list needs at least 2 shapes (condition and tokens), got {features}"
        )
    for shape in features:
        if len(shape) != 3 or min(shape) < 1:
            raise ValueError(f"every generator feature shape must be 3 positive ints (N, H, W), got {shape}")


# --------------------------------------------------------------------------------------------------
# Sizing: feature lists, parameter counts, FLOPs (no modules built)


def _round_channels(x: float) -> int:
    """Round a channel count; counts of 64 and more go to a multiple of 8 (tensor-core friendly)."""
    return max(1, round(x)) if x < 64 else 8 * round(x / 8)


def features_for(
    condition_shape: Shape,
    token_shape: tuple[int, int],
    num_tokens: int,
    num_stages: int = 8,
    max_channels: int = 2048,
) -> list[Shape]:
    """The sizing rule: a feature list from condition (N0, L, D) to tokens (T, Ht, Wt).

    Stage boundaries i = 0..S (S = num_stages):
    - H (the prompt-token axis) halves per stage until it reaches the token's Ht, as in the paper's
      lists (384 -> 200 -> 100 -> 50 ... -> 10; 1000 -> 500 -> 125 -> 64 ... -> 18):
      H_i = max(Ht, L / 2**i). Shrinking H while N grows keeps the activation volume N * H * W, and
      with it the FLOPs of the middle stages, near the condition's and the output's.
    - W moves geometrically from D to Wt: W_i = D * (Wt / D) ** (i / S).
    - N moves geometrically from N0 to a hidden width Nh over boundaries 0..S-1, then the last stage
      maps Nh -> T. Nh is where a plain geometric ramp N0 -> T would be at S-1, capped at
      `max_channels`: every paper preset ends with 2048 -> T, and the last mixing conv
      (Nh * T * k² weights) dominates the parameter count, so the cap keeps a 40k-token target at
      ~2048 * 40000 * k² instead of a quadratic blow-up.
    - Rounding: N to a multiple of 8 from 64 up, H and W to the nearest positive integer; the two
      ends are exact. Equal consecutive shapes are allowed (those stages are residual).

    Against the paper's hand-made lists (same geometry and kernel size), the rule lands within 15%:
    Qwen2.5-0.5B ((128, 384, 384) -> 4296 x (10, 130), k = 9): 1.22 B parameters and 9.4 TFLOP
    forward per sample vs 1.11 B and 8.3; 1.5B: 1.82 B / 22.8 vs 1.72 B / 27.3; 7B: 2.11 B / 45.6
    vs 1.94 B / 52.8. A 40,000-token target with Nh = 2048 gets 7.2 B parameters (k = 9), 6.6 B of
    them in the last mixing conv.
    """
    n0, length, dim = (int(v) for v in condition_shape)
    token_h, token_w = (int(v) for v in token_shape)
    if min(n0, length, dim, token_h, token_w, num_tokens) < 1:
        raise ValueError(
            f"features_for needs positive sizes, got condition {tuple(condition_shape)}, "
            f"token shape {tuple(token_shape)}, {num_tokens} tokens"
        )
    if num_stages < 1 or max_channels < 1:
        raise ValueError(f"num_stages and max_channels must be >= 1, got {num_stages} and {max_channels}")
    s = num_stages
    hidden = min(max_channels, n0 * (num_tokens / n0) ** ((s - 1) / s))
    features = [(n0, length, dim)]
    for i in range(1, s):
        n = n0 * (hidden / n0) ** (i / (s - 1))
        h = max(token_h, length / 2**i)
        w = dim * (token_w / dim) ** (i / s)
        features.append((_round_channels(n), max(1, round(h)), max(1, round(w))))
    features.append((num_tokens, token_h, token_w))
    return features


# Presets made by the sizing rule (not the paper's): large targets with all-linear LoRA at the paper's
# large setting, r=16 and chunk 512 (its 7B script), from the condition the default encoder gives
# without the paper's learned token projection, 128 prompts x 384 tokens x 384 dims: each is
# `features_for((128, 384, 384), (18, 514), T)` with the default 8 stages and max_channels 2048, T
# being the tokenizer's count for that model's LoRA layout (tests/test_generator.py re-derives T from
# the layout, so a count never drifts). Only the last stage differs (2048 -> T); k = 9 is the rule's
# default (the paper's 7B used 11). Named presets let a run name its generator.
RULE_PRESET_TOKENS = {"qwen2.5-7b": 4928, "qwen2.5-14b": 8400, "qwen2.5-32b": 16384, "qwen2.5-72b": 25760,
                      "llama-3.1-70b": 25280}
for _model, _tokens in RULE_PRESET_TOKENS.items():
    PRESETS[f"{_model}-rule"] = GeneratorPreset(
        features=tuple(features_for((128, 384, 384), (18, 514), _tokens)),
        kernel_size=9,
        source=f"features_for((128, 384, 384), (18, 514), {_tokens}): {_model}, LoRA r=16 all-linear, chunk 512",
    )


def stage_parameters(in_shape: Shape, out_shape: Shape, kernel_size: int) -> int:
    """Trainable parameters of one stage (N, H, W) -> (N', H', W'), as HyperConvStage holds them."""
    n, h, w = in_shape
    n2, h2, w2 = out_shape
    kk = kernel_size * kernel_size
    return (
        2 * h * w  # LayerNorm affine
        + 2 * w2 * w * kk  # w_w1, w_w2
        + 2 * h2 * h * kk  # w_h1, w_h2
        + h2 * w2  # bias
        + n2 * n * kk  # mix_weight
        + n2  # mix_bias
    )


def count_parameters(features: list[Shape], kernel_size: int) -> int:
    """Trainable parameters of a generator with these feature shapes, computed without building it."""
    return sum(stage_parameters(a, b, kernel_size) for a, b in zip(features, features[1:]))


def stage_flops(in_shape: Shape, out_shape: Shape, kernel_size: int) -> int:
    """Forward FLOPs of one stage for ONE sample (2 per multiply-add), convolutions only.

    The LayerNorm, tanh, bias and average are elementwise and below 0.1% of the convolutions at
    preset sizes; they are left out so the number matches torch.utils.flop_counter's convention.
    A training step (forward + backward) costs about 3x this.
    """
    n, h, w = in_shape
    n2, h2, w2 = out_shape
    kk = kernel_size * kernel_size
    macs = (
        n * h * w2 * w * kk  # branch A, W -> W' over the (H, N) plane
        + n * w2 * h2 * h * kk  # branch A, H -> H' over the (N, W') plane
        + n * w * h2 * h * kk  # branch B, H -> H' over the (N, W) plane
        + n * h2 * w2 * w * kk  # branch B, W -> W' over the (H', N) plane
        + h2 * w2 * n2 * n * kk  # N -> N' mixing over the (H', W') plane
    )
    return 2 * macs


def resolve_features(
    config: GeneratorConfig,
    condition_shape: Shape | None = None,
    token_shape: tuple[int, int] | None = None,
    num_tokens: int | None = None,
) -> list[Shape]:
    """The feature list `config` asks for, checked against the actual geometry.

    condition_shape = (num_prompts, max_tokens, embed_dim) of the encoder; token_shape = (r + 2, c + 2)
    and num_tokens = T of the tokenizer. preset="auto" needs all three; for a named preset or an
    explicit list, each one given is checked and one left as None is not.
    """
    if config.preset == "auto":
        if condition_shape is None or token_shape is None or num_tokens is None:
            raise ValueError(
                "generator preset 'auto' derives its stages from the geometry: pass condition_shape "
                "(prompts, tokens, dims), token_shape (r + 2, c + 2) and num_tokens, got "
                f"{condition_shape}, {token_shape}, {num_tokens}"
            )
        return features_for(condition_shape, token_shape, num_tokens, config.num_stages, config.max_channels)

    if config.preset is not None:
        features, what = list(PRESETS[config.preset].features), f"generator preset {config.preset!r}"
    else:
        features, what = list(config.features), "the generator's explicit feature list"
    if token_shape is not None or num_tokens is not None:
        expected_last = (
            num_tokens if num_tokens is not None else features[-1][0],
            *(tuple(token_shape) if token_shape is not None else features[-1][1:]),
        )
        if tuple(features[-1]) != expected_last:
            raise ValueError(
                f"{what} ends in weight tokens (T, H, W) = {features[-1]} but the tokenizer of this "
                f"LoRA layout produces {expected_last}; use preset='auto' to size the generator for "
                "this layout"
            )
    if condition_shape is not None and tuple(features[0]) != tuple(condition_shape):
        raise ValueError(
            f"{what} starts from a condition of (prompts, tokens, dims) = {features[0]} but the "
            f"condition encoder gives {tuple(condition_shape)}; set the number of prompts and the "
            "encoder's max length to match, or use preset='auto'"
        )
    return features


# --------------------------------------------------------------------------------------------------
# Modules


@functools.cache
def _load_triton_stage() -> tuple[object | None, str]:
    """(the fused stage's module, "") or (None, why it is unavailable); imported once, on first use."""
    try:
        module = importlib.import_module(TRITON_MODULE)
        module.hyperconv_stage  # noqa: B018 - a module without it is unusable
        return module, ""
    except (ImportError, AttributeError) as err:  # no triton, no CUDA build, or module missing
        return None, f"{type(err).__name__}: {err}"


def resolve_impl(impl: str, device: torch.device) -> str:
    """"torch" or "triton" for a stage whose input lives on `device` (see GeneratorConfig.impl)."""
    if impl == "torch":
        return "torch"
    if impl == "triton":
        fn, why = _load_triton_stage()
        if fn is None:
            raise RuntimeError(
                f"generator impl='triton' but {TRITON_MODULE}.hyperconv_stage is unavailable ({why}); "
                "install triton with a CUDA build of torch, or set generator.impl to 'auto' or 'torch'"
            )
        return "triton"
    if impl != "auto":
        raise ValueError(f"generator impl must be one of {IMPLS}, got {impl!r}")
    # "auto": the fused stages on a GPU, where they measured faster than eager PyTorch in the same run
    # (H100, 0.5B preset: a 16-sample training step 1132 vs 1220 ms, run 7; the batch-1 generation
    # forward 24.2 vs 37.4 ms, run 6; benchmarks/README.md); the reference elsewhere or without Triton.
    if device.type == "cuda" and _load_triton_stage()[0] is not None:
        return "triton"
    return "torch"


class HyperConvStage(nn.Module):
    """One hyper-convolution stage (N, H, W) -> (N', H', W'); residual when the shapes are equal.

    Parameter names equal the reference's argument names and are part of the checkpoint format.
    """

    def __init__(self, in_shape: Shape, out_shape: Shape, kernel_size: int, eps: float = 1e-5, impl: str = "auto"):
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"hyper-conv kernel_size must be a positive odd integer, got {kernel_size}")
        self.in_shape, self.out_shape = tuple(in_shape), tuple(out_shape)
        self.kernel_size, self.eps, self.impl = kernel_size, eps, impl
        n, h, w = self.in_shape
        n2, h2, w2 = self.out_shape
        k = kernel_size
        self.ln_weight = nn.Parameter(torch.empty(h, w))
        self.ln_bias = nn.Parameter(torch.empty(h, w))
        self.w_w1 = nn.Parameter(torch.empty(w2, w, k, k))  # branch A, first
        self.w_h1 = nn.Parameter(torch.empty(h2, h, k, k))  # branch A, second
        self.w_h2 = nn.Parameter(torch.empty(h2, h, k, k))  # branch B, first
        self.w_w2 = nn.Parameter(torch.empty(w2, w, k, k))  # branch B, second
        self.bias = nn.Parameter(torch.empty(h2, w2))
        self.mix_weight = nn.Parameter(torch.empty(n2, n, k, k))
        self.mix_bias = nn.Parameter(torch.empty(n2))
        self._packed: tuple[tuple, tuple[Tensor, ...]] | None = None  # (key, weights): see _packed_weights
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """LayerNorm at identity, convolutions as nn.Conv2d initializes them, bias ~ U(±1/numel)."""
        nn.init.ones_(self.ln_weight)
        nn.init.zeros_(self.ln_bias)
        for weight in (self.w_w1, self.w_h1, self.w_h2, self.w_w2, self.mix_weight):
            nn.init.kaiming_uniform_(weight, a=math.sqrt(5))  # nn.Conv2d's default
        bound = 1.0 / self.bias.numel()
        nn.init.uniform_(self.bias, -bound, bound)
        fan_in = self.mix_weight[0].numel()
        nn.init.uniform_(self.mix_bias, -1.0 / math.sqrt(fan_in), 1.0 / math.sqrt(fan_in))

    def forward(self, x: Tensor) -> Tensor:  # (B, N, H, W) -> (B, N', H', W')
        args = (self.ln_weight, self.ln_bias, self.w_w1, self.w_h1, self.w_h2, self.w_w2,
                self.bias, self.mix_weight, self.mix_bias)  # fmt: skip
        if resolve_impl(self.impl, x.device) == "triton":
            module, _ = _load_triton_stage()
            if module.index_fits(x.shape[0], self.in_shape, self.out_shape, self.kernel_size):
                return module.hyperconv_stage(x, *args, eps=self.eps, packed=self._packed_weights(module, x))
            warnings.warn(
                f"hyper-conv stage {self.in_shape} -> {self.out_shape} at batch {x.shape[0]}: a Triton buffer would "
                "pass 2**31 elements (the kernels' 32-bit offsets), so this stage runs on the PyTorch path, which "
                "splits its convolutions", stacklevel=2,
            )  # fmt: skip
        self._packed = None
        return hyperconv_stage_reference(x, *args, eps=self.eps)

    def _packed_weights(self, module, x: Tensor) -> tuple[Tensor, ...] | None:
        """Outside autograd (generation), the convolution weights packed once for the Triton kernels
        and reused until a weight changes (in-place updates bump `_version`, a reload changes the
        storage); None in training, where every step's forward packs the weights it just got."""
        if torch.is_grad_enabled():
            self._packed = None
            return None
        weights = (self.w_w1, self.w_h1, self.w_h2, self.w_w2, self.mix_weight)
        dtype = module.compute_dtype(x)
        key = (dtype, tuple((w.data_ptr(), w._version) for w in weights))
        if self._packed is None or self._packed[0] != key:
            self._packed = (key, module.pack_forward_weights(*weights, dtype))
        return self._packed[1]

    def extra_repr(self) -> str:
        return f"{self.in_shape} -> {self.out_shape}, kernel_size={self.kernel_size}"


class HyperConvGenerator(nn.Module):
    """Prompt embeddings (B, N, L, D) -> weight tokens (B, T, r + 2, c + 2).

    `config` may name a preset, "auto" or an explicit list; the geometry arguments feed
    `resolve_features` ("auto" needs them, presets are checked against them). `self.config` is the
    resolved config (explicit features and kernel size), which rebuilds the same generator.
    """

    def __init__(
        self,
        config: GeneratorConfig,
        condition_shape: Shape | None = None,
        token_shape: tuple[int, int] | None = None,
        num_tokens: int | None = None,
    ):
        super().__init__()
        features = resolve_features(config, condition_shape, token_shape, num_tokens)
        kernel_size = config.kernel_size
        if kernel_size is None:
            kernel_size = PRESETS[config.preset].kernel_size if config.preset in PRESETS else DEFAULT_KERNEL_SIZE
        self.config = replace(config, preset=None, features=features, kernel_size=kernel_size)
        self.features: list[Shape] = features
        self.stages = nn.ModuleList(
            HyperConvStage(a, b, kernel_size, config.eps, config.impl) for a, b in zip(features, features[1:])
        )

    def forward(self, cond: Tensor) -> Tensor:  # (B, N, L, D) -> (B, T, r + 2, c + 2)
        if cond.dim() != 4 or tuple(cond.shape[1:]) != self.features[0]:
            raise ValueError(
                f"generator expects conditions of shape (B, prompts, tokens, dims) = (B, "
                f"{', '.join(map(str, self.features[0]))}), got {tuple(cond.shape)}; the condition "
                "encoder's prompt count, max length and embedding size must match the generator's "
                "first feature shape"
            )
        x = cond
        for stage in self.stages:
            x = stage(x)
        return x


# --------------------------------------------------------------------------------------------------
# Loss


def generator_loss(
    pred: Tensor,  # (B, T, H, W)
    target: Tensor,  # (B, T, H, W)
    mask: Tensor,  # bool, (T, H, W) shared or (B, T, H, W); True = a real value, False = padding
    weights: Tensor | None = None,  # (T,) per-token loss weights
    per_sample: bool = False,
) -> Tensor:  # scalar, or (B,) when per_sample
    """Masked, per-token-weighted MSE, computed in fp32.

    Each valid element's squared error is multiplied by its token's weight (weights are rescaled to
    mean 1 here, so their overall scale never changes the loss) and the sum is divided by the number
    of valid elements: over the whole batch, or per sample when `per_sample`. Padding never enters:
    neither its values (even NaN) nor its gradients.
    """
    if pred.dim() != 4 or pred.shape != target.shape:
        raise ValueError(
            f"generator_loss expects pred and target of the same shape (B, T, H, W), got "
            f"{tuple(pred.shape)} and {tuple(target.shape)}"
        )
    if mask.dtype != torch.bool or mask.shape not in (pred.shape, pred.shape[1:]):
        raise ValueError(
            f"generator_loss expects a bool mask of shape {tuple(pred.shape[1:])} or {tuple(pred.shape)}, "
            f"got {mask.dtype} {tuple(mask.shape)}"
        )
    mask = mask.expand(pred.shape)
    # Select before squaring: the gradient of a masked-out NaN would otherwise be NaN * 0 = NaN.
    diff = torch.where(mask, pred.float() - target.float(), 0.0)  # (B, T, H, W)
    sq = diff.square()
    if weights is not None:
        if weights.shape != (pred.shape[1],):
            raise ValueError(
                f"generator_loss expects per-token weights of shape ({pred.shape[1]},), got {tuple(weights.shape)}"
            )
        weights = weights.float()
        sq = sq * (weights / weights.mean())[:, None, None]
    if per_sample:
        total, count = sq.sum(dim=(1, 2, 3)), mask.sum(dim=(1, 2, 3))  # (B,), (B,)
    else:
        total, count = sq.sum(), mask.sum()
    if bool((count == 0).any()):  # one host sync per step, to never return a silent 0/0
        raise ValueError("generator_loss got a mask with no valid element (for some sample); check the tokenizer mask")
    return total / count
