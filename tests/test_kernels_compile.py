"""Every Triton kernel a CPU test launches also compiles for an H100 (sm_90), with no GPU.

The interpreter runs a kernel's Python on CPU tensors and accepts code the compiler refuses; these
tests record each launch of a small hyper-convolution stage (forward and backward) and of a
detokenization and compile it for the GPU through Triton's compiler and ptxas.
"""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

import dnd_kernels.detokenize.kernel as DK
import dnd_kernels.hyperconv.function as F
import dnd_kernels.hyperconv.kernel as K
import dnd_kernels.hyperconv.layernorm as LN
from dnd_kernels.compile_check import CompileCheckError, Launch, recorded_launches
from dnd_kernels.testing import HAS_CUDA, compile_or_skip, random_tokens, stage_inputs, stage_outputs, token_table

pytestmark = pytest.mark.skipif(HAS_CUDA, reason="on a GPU every launch compiles for real")


def test_hyperconv_stage_kernels_compile_for_hopper():
    x, params = stage_inputs(2, (3, 5, 7), (4, 6, 5), 3, torch.float32, seed=0)
    with recorded_launches(K, LN) as launches:
        _, grads = stage_outputs(F.hyperconv_stage, x, params, torch.randn(2, 4, 6, 5))
    assert grads[1] is not None  # the interpreter still ran every launch
    assert {x.kernel for x in launches} == {"_ln_fwd_kernel", "_pack_weight_kernel", "_conv_kernel", "_ln_bwd_kernel",
                                            "_ln_param_grad_kernel", "_wgrad_kernel"}  # fmt: skip
    assert all(".entry" in ptx for ptx in compile_or_skip(launches))


def test_detokenize_kernel_compiles_for_hopper():
    table, numel = token_table([6], [5], rank=2, chunk=6)  # a lora_A chunk (2 x 6) and a lora_B chunk (5 x 2)
    with recorded_launches(DK) as launches:
        out = DK.detokenize_triton(random_tokens(2, rank=2, chunk=6), table, numel, 2, 6, 8.0, 6.0, torch.bfloat16)
    assert [x.kernel for x in launches] == ["_detokenize_kernel"] and out.shape == (22,)
    assert ".entry" in compile_or_skip(launches)[0]


@triton.jit
def _rebinding_kernel(out_ptr, N: tl.constexpr):
    v = tl.load(out_ptr + tl.arange(0, N))
    if tl.max(v, axis=0) > 0:
        v = tl.sum(v, axis=0)  # a block rebound to a scalar inside an `if`: the compiler refuses it
    tl.store(out_ptr, tl.sum(v, axis=0))


def test_a_kernel_the_compiler_refuses_fails_the_check():
    bad = Launch(__name__, "_rebinding_kernel", {"out_ptr": "*fp32", "N": "constexpr"}, {"N": 16}, [0])
    with pytest.raises(CompileCheckError, match="_rebinding_kernel does not compile"):
        compile_or_skip([bad])
