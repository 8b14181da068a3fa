"""Triton detokenization vs the PyTorch reference (interpreter on CPU, compiled on a GPU)."""

from __future__ import annotations

import re

import pytest
import torch

import dnd_kernels.detokenize.kernel as DK
from dnd_kernels.detokenize.function import detokenize
from dnd_kernels.detokenize.reference import detokenize_reference
from dnd_kernels.testing import DEVICE, HAS_CUDA, assert_close, compile_or_skip, dtype_name, random_tokens, token_table

# (RMS ratio, max error / max|ref|): fp32 statistics vs the reference's fp64, then at most one
# rounding step of the output dtype. The interpreter truncates fp32 -> bf16 instead of rounding
# (half of all values land one ulp low, measured), hence the bf16 RMS bound of ~1 ulp.
TOLERANCE = {torch.float32: (1e-6, 1e-6), torch.bfloat16: (8e-3, 2**-7), torch.float16: (5e-4, 2**-10)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=dtype_name)
@pytest.mark.parametrize(
    "rank,chunk,widths_a,widths_b",
    [
        pytest.param(4, 6, [9, 6], [7, 1], id="r4-c6-odd"),
        pytest.param(8, 16, [32], [48, 16], id="r8-c16-aligned"),
        pytest.param(1, 1, [3], [2], id="r1-c1-tiny"),
        pytest.param(3, 7, [20], [13], id="r3-c7-odd-chunk"),
    ],
)
def test_detokenize_matches_reference(rank, chunk, widths_a, widths_b, dtype):
    table, numel = token_table(widths_a, widths_b, rank, chunk)
    tokens, table = random_tokens(table.shape[0], rank, chunk, DEVICE, seed=rank * 100 + chunk), table.to(DEVICE)
    ref = detokenize_reference(tokens, table, numel, rank, chunk, 8.0, 6.0, dtype)
    poison = torch.full((numel,), float("nan"), dtype=dtype, device=DEVICE)  # every element must be written
    out = detokenize(tokens, table, numel, rank, chunk, 8.0, 6.0, dtype, impl="triton", out=poison)
    assert out.data_ptr() == poison.data_ptr() and out.dtype == dtype
    rms_tol, max_tol = TOLERANCE[dtype]
    assert_close("flat", out, ref, rms_tol, max_tol)


def test_detokenize_round_trip_through_tokenizer():
    from dnd_scale.layout import LoraLayout, LoraSpec
    from dnd_scale.tokenizer import WeightTokenizer
    from tinymodels import tiny_config

    # Odd widths (hidden 40, GQA v_proj 20, intermediate 56) give padded last chunks in A and B.
    layout = LoraLayout.from_config(tiny_config("qwen2"), LoraSpec(rank=4, target_modules=("q_proj", "v_proj", "down_proj")))
    tok = WeightTokenizer(layout, chunk=32)
    gen = torch.Generator().manual_seed(0)
    sd = {m.key: torch.randn(*m.shape, generator=gen) * 0.02 for m in layout.matrices}
    tokens, _ = tok.tokenize(sd)
    flat = detokenize(tokens.to(DEVICE), tok.token_table(), tok.flat_numel, tok.rank, tok.chunk,
                      tok.config.mean_scale, tok.config.std_shift, impl="triton")  # fmt: skip
    for key, value in tok.unflatten(flat.cpu()).items():
        assert_close(key, value, sd[key], rms_tol=1e-6, max_tol=1e-5)


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("model,rank,chunk", [("qwen2.5-0.5b", 8, 128), ("qwen2.5-7b", 16, 512)])
def test_detokenize_preset_layouts_gpu(model, rank, chunk):
    from dnd_scale.bench_kernels import model_tokenizer

    tok = model_tokenizer(model, rank, chunk)
    tokens, table = random_tokens(tok.num_tokens, rank, chunk, "cuda"), tok.token_table().cuda()
    args = (tok.flat_numel, rank, chunk, tok.config.mean_scale, tok.config.std_shift, torch.bfloat16)
    ref = detokenize_reference(tokens, table, *args)
    poison = torch.full((tok.flat_numel,), float("nan"), dtype=torch.bfloat16, device="cuda")
    out = DK.detokenize_triton(tokens, table, *args, out=poison)
    assert_close("flat", out, ref, *TOLERANCE[torch.bfloat16])


def test_detokenize_rejects_a_table_with_holes():
    table, numel = token_table([8], [], 2, 4)
    tokens = torch.randn(table.shape[0], 4, 6, device=DEVICE)
    with pytest.raises(ValueError, match="covers 16 values but the flat buffer has 20"):
        DK.detokenize_triton(tokens, table.to(DEVICE), numel + 4, 2, 4, 8.0, 6.0)
    with pytest.raises(ValueError, match="tokens \\(T, 4, 6\\)"):
        DK.detokenize_triton(tokens[:, :3], table.to(DEVICE), numel, 2, 4, 8.0, 6.0)


def test_table_facts_find_the_store_alignment_and_refuse_foreign_strides():
    aligned, numel = token_table([32], [48, 16], 8, 16)
    assert DK.table_facts(aligned, 8) == (numel, 16)
    odd, numel = token_table([9, 6], [7, 1], 4, 6)
    assert DK.table_facts(odd, 4) == (numel, 1)
    half, numel = token_table([12], [6], 2, 6)  # offsets 0, 6, 24, widths 6, A row stride 12
    assert DK.table_facts(half, 2) == (numel, 2)
    bad = aligned.clone()
    bad[-1, 2] = 4  # a lora_B row whose column stride is not the rank
    with pytest.raises(ValueError, match="column stride other than 1"):
        DK.table_facts(bad, 8)


@pytest.mark.parametrize("rank,chunk", [(8, 128), (16, 512)], ids=["0.5b", "7b"])
@pytest.mark.parametrize("out_dtype", ["*bf16", "*fp32"])
def test_detokenize_compiles_for_hopper_with_vector_stores(rank, chunk, out_dtype):
    """The kernel compiled for sm_90 (what a GPU runs; the interpreter runs the Python instead), with
    the 16-byte-aligned pointers a GPU launch gets, stores the flat buffer in 16-byte vectors, lora_A
    and lora_B chunks alike: no scalar stores are left."""
    from dnd_kernels.compile_check import Launch

    consts = {"RANK": rank, "CHUNK": chunk, "BLOCK_R": rank, "BLOCK_C": chunk, "BLOCK_B": 2 * chunk, "ALIGN": 16}
    signature = {"tok_ptr": "*fp32", "table_ptr": "*i64", "out_ptr": out_dtype, "mean_scale": "fp32",
                 "std_shift": "fp32", **dict.fromkeys(consts, "constexpr")}  # fmt: skip
    launch = Launch(DK.__name__, "_detokenize_kernel", signature, consts, [0, 1, 2], {"num_warps": 4 if rank * chunk <= 2048 else 8})
    (ptx,) = compile_or_skip([launch])
    stores = re.findall(r"st\.global[.\w]*", ptx)
    assert stores and set(stores) == {"st.global.v4.b32"}, sorted(set(stores))
