"""`dnd generate` from a generator trained by `dnd train` on a tiny run: peft loads the adapter, the
adapter changes the base model's logits, and its values are exactly the generator's output detokenized."""

import json
import warnings

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from dnd_scale.basemodel import base_identity
from dnd_scale.encoder import EncoderConfig, PromptTruncationWarning
from dnd_scale.export import ADAPTER_CONFIG, ADAPTER_WEIGHTS, PROVENANCE, check_vllm_contract
from dnd_scale.generate import AdapterGenerator, main, read_prompts
from dnd_scale.generator import GeneratorConfig
from dnd_scale.io import ArtifactError, sha256_file, write_json
from dnd_scale.layout import LayoutError
from dnd_scale.train_config import TrainConfig
from dnd_scale.trainer import train
from tinymodels import tiny_config, tiny_model
from tinyrun import make_tiny_encoder, make_tiny_run, tiny_features

PROMPTS = [f"new task: how many letters are in word number {i}?" for i in range(9)]


@pytest.fixture(scope="module")
def export(tmp_path_factory, one_thread):
    run = make_tiny_run(tmp_path_factory.mktemp("run"))
    # What `dnd collect` records of its base model; training carries it into the export.
    (run / "checkpoints").mkdir()
    write_json(run / "checkpoints" / "collect.json", {"base_model": {"source": "tiny", "saved_to": None},
                                                      "base_identity": base_identity(tiny_model(layers=1))})
    encoder = make_tiny_encoder(tmp_path_factory.mktemp("encoder"))
    config = TrainConfig(
        generator=GeneratorConfig(preset=None, features=tiny_features(), kernel_size=3),
        encoder=EncoderConfig(name=str(encoder), max_length=8), micro_batch_size=2, steps=4, warmup_steps=1,
        zero_stage=0, checkpoint_every=4, num_workers=0, lr=1e-2,
    )
    return train(config, run) / "export"


def test_generated_adapter_is_the_detokenized_generator_output(export, tmp_path):
    gen = AdapterGenerator(export)
    chosen = gen.pick_prompts(PROMPTS, seed=3)
    assert len(chosen) == gen.num_prompts == 4 and set(chosen) <= set(PROMPTS)
    folder = gen.generate(PROMPTS, tmp_path / "adapter", seed=3)
    saved = load_file(folder / ADAPTER_WEIGHTS)
    expected = gen.tokenizer.detokenize(gen.tokens(chosen))
    assert set(saved) == set(expected)
    for key, value in expected.items():
        assert torch.equal(saved[key], value), key
    provenance = json.loads((folder / PROVENANCE).read_text())
    assert provenance["generator_sha256"] == gen.generator_sha256 == sha256_file(export / "model.safetensors")
    assert provenance["layout_fingerprint"] == gen.layout.fingerprint()
    assert provenance["num_prompts"] == 4 and len(provenance["prompts_sha256"]) == 64
    assert provenance["base_identity"] == base_identity(tiny_model(layers=1)), "dnd eval checks it"


def test_generated_adapter_loads_in_peft_and_changes_logits(export, tmp_path):
    gen = AdapterGenerator(export)
    gen.check_base(tiny_config(layers=1))
    folder = gen.generate(PROMPTS, tmp_path / "adapter", seed=0)
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = tiny_model(layers=1)(ids).logits
        peft = PeftModel.from_pretrained(tiny_model(layers=1), folder)
        adapted = peft(ids).logits
    assert (adapted - base).abs().max() > 1e-6
    # and the adapter in the model is the one in the file (peft did not drop keys silently)
    loaded = {k: v for k, v in peft.state_dict().items() if "lora_" in k}
    assert len(loaded) == len(gen.layout.matrices)


def test_bf16_adapter_and_cli(export, tmp_path, capsys):
    prompts = tmp_path / "task.json"
    prompts.write_text(json.dumps(PROMPTS))
    assert read_prompts(prompts) == PROMPTS
    assert main(["--generator", str(export), "--prompts", str(prompts), "--out", str(tmp_path / "out"),
                 "--samples", "2", "--dtype", "bfloat16", "--device", "cpu"]) == 0
    for i in range(2):
        weights = load_file(tmp_path / "out" / f"task-{i}" / ADAPTER_WEIGHTS)
        assert all(v.dtype == torch.bfloat16 for v in weights.values())
    # the tiny layout's rank 2 is served by vLLM's smallest max_lora_rank above 1
    assert capsys.readouterr().out.count("vLLM's LoRA contract met: serve with --max-lora-rank 8") == 2


def test_generated_adapters_meet_the_vllm_contract(export, tmp_path, capsys, monkeypatch):
    gen = AdapterGenerator(export)
    for dtype in ("float32", "bfloat16", "float16"):
        assert check_vllm_contract(gen.generate(PROMPTS, tmp_path / dtype, dtype=dtype)) == 8
    # a folder the check refuses is still written, and the command says why vLLM would not load it
    prompts = tmp_path / "task.txt"
    prompts.write_text("\n".join(PROMPTS))
    real = check_vllm_contract

    def with_dora(folder):
        config = json.loads((folder / ADAPTER_CONFIG).read_text())
        (folder / ADAPTER_CONFIG).write_text(json.dumps({**config, "use_dora": True}))
        return real(folder)

    monkeypatch.setattr("dnd_scale.generate.check_vllm_contract", with_dora)
    assert main(["--generator", str(export), "--prompts", str(prompts), "--out", str(tmp_path / "cli")]) == 0
    out, err = capsys.readouterr()
    assert "not one vLLM loads" in out and "use_dora is true" in err
    assert (tmp_path / "cli" / "task" / ADAPTER_WEIGHTS).is_file()


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_impl_switches_the_detokenizer_too(export, tmp_path, monkeypatch, impl):
    """--impl torch runs no Triton kernel, the detokenizer included (which "auto" runs on a GPU);
    --impl triton runs the Triton detokenizer (here under the interpreter)."""
    import dnd_kernels.detokenize.kernel as DK
    import dnd_scale.tokenizer as tokenizer_module

    asked, launched = [], []
    real_detokenize, real_kernel = tokenizer_module.detokenize, DK.detokenize_triton

    def detokenize(*args, impl, **kwargs):  # what the tokenizer asks for decides on a GPU
        asked.append(impl)
        return real_detokenize(*args, impl=impl, **kwargs)

    def kernel(*args, **kwargs):
        if impl == "torch":
            raise AssertionError("dnd generate --impl torch ran the Triton detokenizer")
        launched.append(args[0].shape)
        return real_kernel(*args, **kwargs)

    monkeypatch.setattr(tokenizer_module, "detokenize", detokenize)
    monkeypatch.setattr(DK, "detokenize_triton", kernel)
    (tmp_path / "task.txt").write_text("\n".join(PROMPTS))
    assert main(["--generator", str(export), "--prompts", str(tmp_path / "task.txt"), "--out", str(tmp_path / "out"),
                 "--device", "cpu", "--impl", impl]) == 0
    assert asked == [impl] and len(launched) == (impl == "triton")
    assert load_file(tmp_path / "out" / "task" / ADAPTER_WEIGHTS)


def test_bad_inputs_get_clear_errors(export):
    gen = AdapterGenerator(export)
    with pytest.raises(ArtifactError, match="empty"):
        gen.generate([], "unused")
    with pytest.raises(ArtifactError, match="at least 4 prompts"):
        gen.pick_prompts(PROMPTS[:3])
    with pytest.raises(LayoutError, match="use the base model the generator was trained for"):
        gen.check_base(tiny_config(layers=1, hidden=48))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gen.tokens(["word " * 200] + PROMPTS[:3])
    assert any(issubclass(w.category, PromptTruncationWarning) for w in caught)
    with pytest.raises(ArtifactError, match="not found"):
        AdapterGenerator(export.parent / "missing")


def test_a_prompt_file_that_is_not_utf8_is_named(tmp_path):
    (tmp_path / "prompts.txt").write_bytes("¿cuántas letras?\n".encode("latin-1"))
    with pytest.raises(ArtifactError, match=r"prompt file '.*prompts.txt' is not UTF-8 text \(byte 0xbf at offset 0\)"):
        read_prompts(tmp_path / "prompts.txt")


def test_weights_changed_after_export_are_refused(export, tmp_path):
    import shutil

    from safetensors.torch import save_file

    copy = tmp_path / "export"
    shutil.copytree(export, copy)
    state = load_file(copy / "model.safetensors")
    first = next(iter(state))
    state[first] = state[first] + 1.0  # other weights, same names and shapes: they would load
    save_file(state, str(copy / "model.safetensors"), metadata={"format": "dnd-generator"})
    with pytest.raises(ArtifactError, match="changed after `dnd train` exported them.*--export-only"):
        AdapterGenerator(copy)


@pytest.mark.parametrize("found", ["dnd-generator-0", None], ids=["other-format", "no-format"])
def test_an_export_of_another_format_is_refused(export, tmp_path, found):
    import shutil

    copy = tmp_path / "export"
    shutil.copytree(export, copy)
    config = json.loads((copy / "config.json").read_text())  # the weights are left as they are
    if found is None:
        del config["format"]
    else:
        config["format"] = found
    (copy / "config.json").write_text(json.dumps(config))
    what = "has no format tag" if found is None else f"has format '{found}'"
    with pytest.raises(ArtifactError, match=rf"config.json {what}, so it is not a generator export this version "
                                            r"reads \(format 'dnd-generator-1'\).*--export-only"):
        AdapterGenerator(copy)
    (tmp_path / "task.txt").write_text("\n".join(PROMPTS))
    with pytest.raises(ArtifactError, match=what):
        main(["--generator", str(copy), "--prompts", str(tmp_path / "task.txt"), "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_a_failed_generate_leaves_no_temporary_folder(export, tmp_path, monkeypatch):
    import dnd_scale.export as export_module

    gen = AdapterGenerator(export)

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(export_module, "save_flat_safetensors", fail)
    with pytest.raises(OSError, match="disk full"):
        gen.generate(PROMPTS, tmp_path / "adapter")
    assert list(tmp_path.iterdir()) == []


KILLED_GENERATE = """
import os, signal, sys, time
import dnd_scale.export as export
from dnd_scale import cli

real = export.save_flat_safetensors

def terminated(*args, **kwargs):  # `kill` arrives while the adapter is being written
    real(*args, **kwargs)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(60)

export.save_flat_safetensors = terminated
sys.exit(cli.main(["generate", "--generator", sys.argv[1], "--prompts", sys.argv[2], "--out", sys.argv[3]]))
"""


def test_sigterm_and_a_killed_run_leave_no_temporary_folder(export, tmp_path):
    import subprocess
    import sys

    (tmp_path / "task.txt").write_text("\n".join(PROMPTS))
    out = tmp_path / "adapters"
    proc = subprocess.run([sys.executable, "-c", KILLED_GENERATE, str(export), str(tmp_path / "task.txt"), str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 128 + 15, proc.stderr[-2000:]
    assert list(out.iterdir()) == [], "SIGTERM ran the cleanup: no staging folder is left"
    (out / ".task-staging-abc123").mkdir()  # what SIGKILL leaves: removed by the next generate of that adapter
    main(["--generator", str(export), "--prompts", str(tmp_path / "task.txt"), "--out", str(out)])
    assert sorted(p.name for p in out.iterdir()) == ["task"]


def test_adapter_folders_follow_the_umask(export, tmp_path):
    from dnd_scale.io import _UMASK

    folder = AdapterGenerator(export).generate(PROMPTS, tmp_path / "adapter")
    assert folder.stat().st_mode & 0o777 == 0o777 & ~_UMASK  # not mkdtemp's 0700
    for path in folder.iterdir():
        assert path.stat().st_mode & 0o777 == 0o666 & ~_UMASK, path.name


def test_an_existing_adapter_folder_is_replaced_only_with_overwrite(export, tmp_path, capsys):
    prompts = tmp_path / "task.json"
    prompts.write_text(json.dumps(PROMPTS))
    argv = ["--generator", str(export), "--prompts", str(prompts), "--out", str(tmp_path / "out"), "--device", "cpu"]
    assert main(argv) == 0
    weights = tmp_path / "out" / "task" / ADAPTER_WEIGHTS
    before = weights.stat().st_mtime_ns
    with pytest.raises(SystemExit):
        main(argv + ["--seed", "1"])
    err = capsys.readouterr().err
    assert "already exist" in err and "--overwrite" in err
    assert weights.stat().st_mtime_ns == before
    gen = AdapterGenerator(export)
    with pytest.raises(FileExistsError, match="already exists; nothing was written"):
        gen.generate(PROMPTS, tmp_path / "out" / "task", seed=1)
    assert weights.stat().st_mtime_ns == before
    assert main(argv + ["--seed", "1", "--overwrite"]) == 0
    assert json.loads((tmp_path / "out" / "task" / PROVENANCE).read_text())["seed"] == 1


def test_several_prompt_files_load_the_generator_once(export, tmp_path, monkeypatch):
    import dnd_scale.generate as generate_module

    files = []
    for name in ("a", "b", "c"):
        files.append(tmp_path / f"{name}.json")
        files[-1].write_text(json.dumps([f"{name}: {p}" for p in PROMPTS]))
    loads = []

    class Counting(AdapterGenerator):
        def __init__(self, *args, **kwargs):
            loads.append(args)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(generate_module, "AdapterGenerator", Counting)
    assert main(["--generator", str(export), "--prompts", *map(str, files), "--out", str(tmp_path / "out"),
                 "--device", "cpu"]) == 0
    assert len(loads) == 1
    hashes = {json.loads((tmp_path / "out" / n / PROVENANCE).read_text())["prompts_sha256"] for n in "abc"}
    assert len(hashes) == 3


def test_generate_reads_its_recipe_section_and_flags_override_it(export, tmp_path):
    import yaml

    from dnd_scale.recipe import RECIPE_FILE, load_recipe

    prompts = tmp_path / "task.txt"
    prompts.write_text("\n".join(PROMPTS))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"train": {"output_dir": str(export.parent)}, "generate": {
        "samples": 2, "seed": 5, "dtype": "bfloat16", "device": "cpu", "impl": "torch"}}))

    def made(folder):  # (dtypes of the adapter's tensors, the seed its prompts were drawn with)
        weights = load_file(folder / ADAPTER_WEIGHTS)
        return {str(v.dtype) for v in weights.values()}, json.loads((folder / PROVENANCE).read_text())["seed"]

    base = ["--generator", str(export), "--prompts", str(prompts)]
    assert main([*base, "--config", str(recipe), "--out", str(tmp_path / "a")]) == 0
    assert [made(tmp_path / "a" / f"task-{i}") for i in range(2)] == [({"torch.bfloat16"}, 5), ({"torch.bfloat16"}, 6)]
    # flags and --generate.field=value overrides beat the recipe
    assert main([*base, "--config", str(recipe), "--out", str(tmp_path / "b"), "--samples", "1", "--dtype", "float32",
                 "--generate.seed=9"]) == 0
    assert made(tmp_path / "b" / "task") == ({"torch.float32"}, 9)
    # a run folder: --config's recipe is recorded there; the generator is the run's export and the
    # adapters go to the run's adapters/ folder
    run = tmp_path / "run"
    assert main(["--run", str(run), "--config", str(recipe), "--prompts", str(prompts)]) == 0
    assert made(run / "adapters" / "task-1") == ({"torch.bfloat16"}, 6)
    assert load_recipe(run / RECIPE_FILE).generate.samples == 2
    # without --config the run folder's recipe is read
    assert main(["--run", str(run), "--prompts", str(prompts), "--generate.seed=1", "--overwrite"]) == 0
    assert made(run / "adapters" / "task-0") == ({"torch.bfloat16"}, 1)
    with pytest.raises(SystemExit):  # neither --generator and --out, nor --run
        main(["--prompts", str(prompts)])
    with pytest.raises(ValueError, match="generate: unknown adapter dtype 'int8'"):
        load_recipe(recipe, ["--generate.dtype=int8"])
