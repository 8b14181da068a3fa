"""WeightTokenizer: exact round trips, padding mask, criterion weights, and real peft adapters."""

from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model, get_peft_model_state_dict

from dnd_scale.export import ADAPTER_CONFIG, ADAPTER_WEIGHTS, PROVENANCE, export_tokens
from dnd_scale.io import ArtifactError, load_safetensors
from dnd_scale.layout import LayoutError, LoraLayout, LoraSpec
from dnd_scale.tokenizer import WeightTokenizer, criterion_weights
from tinymodels import tiny_config, tiny_model

MODELS = Path(__file__).resolve().parents[1] / "configs" / "models"


def random_lora(layout, seed=0, scale=0.02):
    g = torch.Generator().manual_seed(seed)
    return {m.key: torch.randn(m.shape, generator=g) * scale * (1 + m.layer) for m in layout.matrices}


def max_relative_error(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


LAYOUTS = {
    # (config, spec, chunk): aligned widths, odd widths that need padding, a subset with rsLoRA
    "qwen0.5b-r8-c128-L0_1": (MODELS / "qwen2.5-0.5b.json", LoraSpec(rank=8, layers=(0, 1)), 128),
    "tiny-qwen2-odd-r4-c16": (tiny_config("qwen2"), LoraSpec(rank=4), 16),
    "tiny-llama-odd-r3-c7": (tiny_config("llama", hidden=40, intermediate=50), LoraSpec(rank=3), 7),
    "gemma270m-r16-c256-qv-L2": (MODELS / "gemma-3-270m.json", LoraSpec(16, target_modules=("q_proj", "v_proj"), layers=(2,), use_rslora=True), 256),
    # fused projections and MoE experts (E LoRAs stacked on one rank axis, lora_B rank-major)
    "tiny-phi3-fused-r4-c16": (tiny_config("phi3"), LoraSpec(rank=4), 16),
    "tiny-mixtral-experts-r3-c7": (tiny_config("mixtral"), LoraSpec(rank=3, experts=True), 7),
    "tiny-qwen2moe-shared+experts-r4-c16": (tiny_config("qwen2_moe"), LoraSpec(rank=4, experts=True), 16),
    "qwen3-30b-a3b-experts-r2-c512-L5": (MODELS / "qwen3-30b-a3b.json", LoraSpec(2, target_modules="attention", experts=True, layers=(5,)), 512),
}


@pytest.mark.parametrize("name", LAYOUTS)
def test_roundtrip_is_exact_in_fp32(name):
    config, spec, chunk = LAYOUTS[name]
    layout = LoraLayout.from_config(config, spec)
    tok = WeightTokenizer(layout, chunk=chunk)
    lora = random_lora(layout)
    lora[layout.keys[1]] = torch.zeros_like(lora[layout.keys[1]])  # lora_B at initialization: std 0
    tokens, mask = tok.tokenize(lora)
    assert tokens.shape == (tok.num_tokens, spec.rank + 2, chunk + 2) and tokens.dtype == torch.float32
    back = tok.detokenize(tokens)
    assert list(back) == layout.keys
    for key in layout.keys:
        assert back[key].shape == lora[key].shape
        if lora[key].abs().max() == 0:
            assert torch.equal(back[key], lora[key])
        else:
            assert max_relative_error(back[key], lora[key]) <= 1e-6, key
    # standardized chunks: valid values have mean 0 / std 1 per token (constant chunks are all zero)
    body = tokens[:, :spec.rank, :chunk]
    valid = mask[:, :spec.rank, :chunk]
    n = valid.sum(dim=(1, 2))
    means = (body * valid).sum(dim=(1, 2)) / n
    assert means.abs().max() < 1e-5


@pytest.mark.parametrize("name", LAYOUTS)
def test_mask_covers_exactly_the_padding(name):
    config, spec, chunk = LAYOUTS[name]
    layout = LoraLayout.from_config(config, spec)
    tok = WeightTokenizer(layout, chunk=chunk)
    tokens, mask = tok.tokenize(random_lora(layout))
    r = spec.rank
    expected_padding = 0
    for m in layout.matrices:
        n = m.shape[1] if m.kind == "A" else m.shape[0]
        expected_padding += (-n % chunk) * r * m.experts
    assert int((~mask).sum()) == expected_padding
    assert torch.all(tokens[~mask] == 0)
    assert mask[:, r:, :].all() and mask[:, :, chunk:].all()  # the border always counts
    # masked-out cells are exactly the tail columns of each matrix's last chunk
    t = 0
    for m in layout.matrices:
        n = m.shape[1] if m.kind == "A" else m.shape[0]
        count = -(-n // chunk)
        for _ in range(m.experts):  # an experts matrix: each expert's r x n view is chunked on its own
            last = t + count - 1
            w = n - (count - 1) * chunk
            assert mask[last, :r, :w].all() and not mask[last, :r, w:chunk].any()
            assert mask[t:last, :r, :chunk].all()
            t += count
    assert t == tok.num_tokens


def test_detokenize_is_the_flat_peft_buffer_and_casts():
    layout = LoraLayout.from_config(tiny_config("llama"), LoraSpec(rank=2))
    tok = WeightTokenizer(layout, chunk=16)
    lora = random_lora(layout)
    tokens, _ = tok.tokenize(lora)
    flat = tok.detokenize_flat(tokens)
    assert flat.numel() == layout.num_params
    expected = torch.cat([lora[k].flatten() for k in layout.keys])
    assert max_relative_error(flat, expected) <= 1e-6
    bf16 = tok.detokenize(tokens, dtype=torch.bfloat16)
    assert all(v.dtype == torch.bfloat16 for v in bf16.values())
    assert max_relative_error(bf16[layout.keys[0]].float(), lora[layout.keys[0]]) < 1e-2


def test_statistics_are_read_from_the_border_average():
    layout = LoraLayout.from_config(tiny_config("qwen2"), LoraSpec(rank=4))
    tok = WeightTokenizer(layout, chunk=16)
    lora = random_lora(layout)
    tokens, mask = tok.tokenize(lora)
    noisy = tokens.clone()
    border = torch.zeros_like(mask[0]); border[4:, :] = True; border[:, 16:] = True
    noise = torch.randn_like(noisy) * 1e-3
    noisy[:, border] += noise[:, border]
    back = tok.detokenize(noisy)
    # averaging ~40 border cells keeps the statistics close; no single cell decides them
    assert max_relative_error(back[layout.keys[0]], lora[layout.keys[0]]) < 5e-3


def test_tokens_of_wrong_geometry_or_nan_are_refused():
    layout = LoraLayout.from_config(tiny_config("qwen2"), LoraSpec(rank=4))
    tok = WeightTokenizer(layout, chunk=16)
    with pytest.raises(LayoutError, match="do not fit this layout"):
        tok.detokenize(torch.zeros(tok.num_tokens + 1, 6, 18))
    tokens, _ = tok.tokenize(random_lora(layout))
    tokens[3, 0, 0] = float("nan")
    with pytest.raises(LayoutError, match="NaN"):
        tok.detokenize(tokens)


def test_criterion_weights():
    layout = LoraLayout.from_config(tiny_config("qwen2"), LoraSpec(rank=4))
    tok = WeightTokenizer(layout, chunk=16)
    base = random_lora(layout, seed=0)
    ckpts = []
    for k in range(4):
        moved = {key: v + (0.01 * k * torch.randn_like(v) if ".0." in key else 0) for key, v in base.items()}
        ckpts.append(tok.tokenize(moved)[0])
    stacked = torch.stack(ckpts)
    w = criterion_weights(stacked, tok.mask())
    assert w.shape == (tok.num_tokens,) and abs(w.mean().item() - 1) < 1e-5
    layer0 = torch.tensor([s.matrix.layer == 0 for s in tok.segments for _ in range(s.count)])
    assert w[layer0].min() > w[~layer0].max()  # tokens that move across the trajectory weigh more
    assert torch.equal(criterion_weights(stacked[:1], tok.mask()), torch.ones(tok.num_tokens))
    with pytest.raises(LayoutError):
        criterion_weights(stacked[0], tok.mask())


def test_expert_tokens_hold_one_expert_each():
    layout = LoraLayout.from_config(tiny_config("mixtral"), LoraSpec(rank=3, experts=True, layers=(0,)))
    tok = WeightTokenizer(layout, chunk=7)
    lora = random_lora(layout)
    b = next(m for m in layout.matrices if m.experts > 1 and m.kind == "B")
    lora[b.key] = torch.arange(3.0).repeat(b.shape[1] // 3 * b.shape[0]).view(b.shape) + 1  # column j*E + e holds e + 1
    tokens, _ = tok.tokenize(lora)
    segs = [s for s in tok.segments if s.matrix is b]
    assert [s.expert for s in segs] == [0, 1, 2]
    for seg in segs:  # each expert's chunk is constant (e + 1): std 1 code, mean code (e + 1) * mean_scale
        first = tokens[seg.first_token]
        assert first[3, 0].item() == pytest.approx((seg.expert + 1) * 8.0)
    assert torch.equal(tok.detokenize(tokens)[b.key], lora[b.key])


@pytest.mark.parametrize("family,experts", [("qwen2", False), ("llama", False), ("phi3", False),
                                            ("mixtral", True), ("qwen2_moe", True), ("qwen3_moe", True)])
def test_peft_saved_adapter_survives_tokenize_detokenize_export(tmp_path, family, experts):
    layout = LoraLayout.from_config(tiny_config(family), LoraSpec(rank=4, alpha=8, experts=experts))
    model = get_peft_model(tiny_model(family), layout.to_peft_config(init_lora_weights=False))
    with torch.no_grad():  # make the update large enough to see in the logits
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.2)
    model.save_pretrained(tmp_path / "original")
    saved = load_safetensors(tmp_path / "original" / ADAPTER_WEIGHTS)
    assert list(saved) == sorted(layout.keys) or set(saved) == set(layout.keys)

    tok = WeightTokenizer(layout, chunk=16)
    tokens, _ = tok.tokenize(saved)
    out = export_tokens(tokens, tok, tmp_path / "exported", provenance={"generator_sha256": "test"})
    assert {p.name for p in out.iterdir()} == {ADAPTER_CONFIG, ADAPTER_WEIGHTS, PROVENANCE}
    assert set(load_safetensors(out / ADAPTER_WEIGHTS)) == set(layout.keys)

    ids = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base_logits = tiny_model(family)(ids).logits
        original = PeftModel.from_pretrained(tiny_model(family), tmp_path / "original")(ids).logits
        exported = PeftModel.from_pretrained(tiny_model(family), out)(ids).logits
    assert (original - base_logits).abs().max() > 1e-2  # the adapter really does something
    torch.testing.assert_close(exported, original, rtol=1e-5, atol=1e-5)


def test_non_safetensors_and_missing_files_are_refused(tmp_path):
    torch.save({"w": torch.zeros(2)}, tmp_path / "adapter.bin")
    with pytest.raises(ArtifactError, match="not safetensors"):
        load_safetensors(tmp_path / "adapter.bin")
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{bad")
    with pytest.raises(ArtifactError, match="not safetensors"):
        load_safetensors(tmp_path / "junk.safetensors")
    with pytest.raises(ArtifactError, match="not found"):
        load_safetensors(tmp_path / "nope.safetensors")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=lambda d: str(d)[6:])
def test_flat_safetensors_equal_what_safetensors_writes(tmp_path, dtype):
    from safetensors import safe_open

    from dnd_scale.io import save_flat_safetensors

    tensors = {"b.lora_A.weight": torch.randn(3, 5), "a.lora_B.weight": torch.randn(7, 3), "c": torch.randn(1)}
    flat = torch.cat([t.flatten() for t in tensors.values()]).to(dtype)
    entries, offset = [], 0
    for name, t in tensors.items():
        entries.append((name, tuple(t.shape), offset))
        offset += t.numel()
    save_flat_safetensors(flat, entries, tmp_path / "flat.safetensors", metadata={"format": "pt"})
    loaded = load_safetensors(tmp_path / "flat.safetensors")
    assert set(loaded) == set(tensors)
    for name, t in tensors.items():
        assert loaded[name].dtype == dtype and torch.equal(loaded[name], t.to(dtype))
    with safe_open(tmp_path / "flat.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt"}
    with pytest.raises(ValueError, match="expected 15 \\(no gaps\\)"):
        save_flat_safetensors(flat, [entries[0], (entries[1][0], entries[1][1], 16)], tmp_path / "x.safetensors")
    with pytest.raises(ValueError, match="cover 36 of the buffer's 37"):
        save_flat_safetensors(flat, entries[:2], tmp_path / "x.safetensors")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_flat_adapter_from_the_gpu_is_the_same_file(tmp_path):
    from dnd_scale.export import write_flat_adapter

    layout = LoraLayout.from_config(tiny_config("qwen2"), LoraSpec(rank=4))
    tok = WeightTokenizer(layout, chunk=16)
    flat = torch.randn(tok.flat_numel, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    for _ in range(2):  # the second write reuses the cached page-locked staging buffer
        write_flat_adapter(flat.cuda(), tok, tmp_path / "gpu")
    write_flat_adapter(flat, tok, tmp_path / "cpu")
    assert (tmp_path / "gpu" / ADAPTER_WEIGHTS).read_bytes() == (tmp_path / "cpu" / ADAPTER_WEIGHTS).read_bytes()
    flat[5] = float("inf")
    with pytest.raises(LayoutError, match="NaN/Inf"):
        write_flat_adapter(flat.cuda(), tok, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()
