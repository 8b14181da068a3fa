"""dnd eval: option log-likelihood scoring, adapters on one loaded base, skips, DnD data parsing, report."""

import json
import math
import re
from pathlib import Path

import pytest
import torch

from dnd_scale.basemodel import base_identity, load_base_model
from dnd_scale.eval_adapters import applied_adapter, check_adapter, expand_adapter_paths
from dnd_scale.eval_records import prepare_task, render_context, select_records
from dnd_scale.eval_report import write_report
from dnd_scale.eval_scoring import parse_choice, score_continuations, wilson_interval
from dnd_scale.evaluate import EvalConfig, evaluate, main, parse_adapter_groups
from dnd_scale.export import PROVENANCE, write_adapter
from dnd_scale.io import ArtifactError, append_jsonl, sha256_file
from dnd_scale.layout import LayoutError, LoraLayout, LoraSpec
from dnd_scale.tasks import Task, TaskRecord, load_task
from tinymodels import tiny_config, tiny_model

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "dnd"
SPEC = LoraSpec(rank=4, target_modules=("q_proj", "v_proj", "down_proj"))
FP32_CPU = dict(dtype="float32", device="cpu")


def write_config(folder: Path, **kwargs) -> Path:
    """A tiny Qwen2 config.json: load_base_model gives it a random init and the built-in chat tokenizer."""
    config = tiny_config("qwen2", hidden=kwargs.pop("hidden", 32), intermediate=48, vocab=112, **kwargs)
    config.max_position_embeddings = 512  # DnD-style system prompts are a few hundred characters
    folder.mkdir(parents=True, exist_ok=True)
    config.to_json_file(folder / "config.json")
    return folder / "config.json"


def make_adapter(folder: Path, base_config, *, scale: float, zero_b: bool = False, seed: int = 0) -> Path:
    """A PEFT folder (with provenance.json) of random LoRA weights of std `scale` for `base_config`."""
    layout = LoraLayout.from_config(base_config, SPEC)
    generator = torch.Generator().manual_seed(seed)
    state = {m.key: scale * torch.randn(m.shape, generator=generator) for m in layout.matrices}
    if zero_b:
        state = {key: torch.zeros_like(t) if ".lora_B." in key else t for key, t in state.items()}
    return write_adapter(state, layout, folder)


@pytest.fixture(scope="module", autouse=True)
def _single_threaded(one_thread):
    """Every test of this module runs on one thread (see conftest.one_thread)."""


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    config_path = write_config(folder / "model")
    base = load_base_model(config_path, **FP32_CPU)
    adapters = {
        "big": make_adapter(folder / "big", base.model.config, scale=1.0),
        "zero": make_adapter(folder / "zero", base.model.config, scale=1.0, zero_b=True),
    }
    return {"config_path": config_path, "base": base, "adapters": adapters, "folder": folder}


def mc_task(records: int = 12, seed: int = 3) -> Task:
    return load_task("synthetic:largest_number_mc", num_records=records, seed=seed)


def manual_option_logprob(model, context, option) -> float:
    """Σ log p(option token | all before it) from one unpadded forward pass over the whole sequence."""
    ids = torch.tensor([list(context) + list(option)])  # (1, L)
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids).logits.float(), dim=-1)[0]  # (L, V)
    start = len(context)
    return sum(float(logprobs[t - 1, ids[0, t]]) for t in range(start, ids.shape[1]))


# ----------------------------------------------------------------------------------------------------
# scoring


def test_batched_option_scores_equal_manual_logprob_sums_and_argmax_is_predicted(tiny):
    base = tiny["base"]
    config = EvalConfig(batch_size=5, **FP32_CPU)  # 12 records x 4 options: batches mix lengths and padding
    prepared = prepare_task(mc_task(), base.tokenizer, config)
    pairs = [(c, o) for item in prepared.items for c, o in zip(item.contexts, item.continuations)]
    scores = score_continuations(base.model, pairs, batch_size=5, pad_id=0)
    manual = [manual_option_logprob(base.model, c, o) for c, o in pairs]
    assert [count for _, count in scores] == [len(o) for _, o in pairs]
    torch.testing.assert_close(torch.tensor([s for s, _ in scores]), torch.tensor(manual), rtol=0, atol=1e-4)

    results = evaluate(base, [prepared.task], config=config)
    metrics = results["models"][0]["tasks"][prepared.task.name]
    per_record = [manual[4 * i: 4 * i + 4] for i in range(len(prepared.items))]
    expected = [max(range(4), key=sums.__getitem__) for sums in per_record]
    assert metrics["predictions"] == expected
    answers = [item.answer for item in prepared.items]
    assert metrics["correct"] == sum(p == a for p, a in zip(expected, answers))
    assert metrics["accuracy"] == metrics["correct"] / len(answers)


def test_only_the_option_tokens_are_scored_under_uniform_logits(tmp_path):
    # A zero output layer makes every next-token distribution uniform: each scored token costs exactly
    # log V, so an option's score is -len(option) * log V only if nothing but its own tokens is summed.
    base = load_base_model(write_config(tmp_path), **FP32_CPU)
    torch.nn.init.zeros_(base.model.lm_head.weight)
    vocab = base.model.config.vocab_size
    task = load_task("synthetic:parity_tf", num_records=10, seed=0)
    prepared = prepare_task(task, base.tokenizer, EvalConfig(**FP32_CPU))
    item = prepared.items[0]
    assert item.options == ("[True]", "[False]")
    context_text = base.tokenizer.decode(item.contexts[0])
    assert context_text.endswith("<|assistant|>") and task.records[0].system in context_text
    pairs = list(zip(item.contexts, item.continuations))
    scores = score_continuations(base.model, pairs, batch_size=2, pad_id=0)
    assert [count for _, count in scores] == [6, 7]  # "[True]", "[False]": one character-token each
    for (total, count) in scores:
        assert total == pytest.approx(-count * math.log(vocab), abs=1e-4)
    # The shorter option wins the summed rule; per token both tie and the first option is taken.
    results = evaluate(base, [task], config=EvalConfig(**FP32_CPU))
    metrics = results["models"][0]["tasks"][task.name]
    assert metrics["predictions"] == [0] * len(prepared.items)
    assert metrics["predictions_norm"] == [0] * len(prepared.items)


def test_results_are_deterministic_across_two_runs(tiny):
    config = EvalConfig(max_records=6, batch_size=4, **FP32_CPU)
    runs = [
        evaluate(str(tiny["config_path"]), ["synthetic:sum_mc", "synthetic:parity_tf"],
                 {"g": [tiny["adapters"]["big"]]}, config)
        for _ in range(2)
    ]
    assert runs[0]["models"] == runs[1]["models"]
    assert runs[0]["tasks"] == runs[1]["tasks"]
    assert json.dumps(runs[0], sort_keys=True) == json.dumps(runs[1], sort_keys=True)


def test_adapter_changes_scores_zero_adapter_does_not_and_base_is_restored(tiny):
    base = tiny["base"]
    probe = torch.tensor([[7, 8, 9, 10, 11]])
    with torch.no_grad():
        before = base.model(probe).logits.clone()
    config = EvalConfig(batch_size=8, **FP32_CPU)
    adapters = {"big": [tiny["adapters"]["big"]], "zero": [tiny["adapters"]["zero"]]}
    results = evaluate(base, [mc_task()], adapters, config)
    by_label = {m["label"]: m["tasks"]["largest_number_mc"] for m in results["models"]}
    # B = 0: the LoRA update is exactly zero, so the scores are the base model's to the bit.
    assert by_label["zero"]["answer_logprob_mean"] == by_label["base"]["answer_logprob_mean"]
    assert by_label["zero"]["predictions"] == by_label["base"]["predictions"]
    assert abs(by_label["big"]["answer_logprob_mean"] - by_label["base"]["answer_logprob_mean"]) > 1e-2
    with torch.no_grad():
        after = base.model(probe).logits
    assert torch.equal(before, after)
    assert not any("lora" in name for name, _ in base.model.named_modules())


# MoE adapters as peft writes them for the layouts dnd_scale supports: routed experts through
# target_parameters (keys ...mlp.experts.[base_layer.]lora_A.weight), a shared expert as linear modules.
MOE_ADAPTERS = {
    "mixtral-experts-down-L1": ("mixtral", LoraSpec(rank=2, target_modules=("experts.down_proj",), layers=(1,))),
    "mixtral-attention+experts": ("mixtral", LoraSpec(rank=2, target_modules="attention", experts=True)),
    "qwen2moe-all+experts-L0": ("qwen2_moe", LoraSpec(rank=2, experts=True, layers=(0,))),
    "qwen3moe-experts-gate-up": ("qwen3_moe", LoraSpec(rank=2, target_modules=("experts.gate_up_proj",))),
}


def peft_moe_adapter(name: str, folder: Path):
    """(base model, layout, peft model) of MOE_ADAPTERS[name]; the adapter, random, saved to `folder`."""
    from peft import get_peft_model

    family, spec = MOE_ADAPTERS[name]
    base = tiny_model(family, layers=2)
    layout = LoraLayout.from_config(base.config, spec)
    made = get_peft_model(tiny_model(family, layers=2), layout.to_peft_config())
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for key, tensor in made.named_parameters():
            if "lora_" in key:  # peft starts lora_B at zero: an adapter that changes nothing
                tensor.copy_(torch.randn(tensor.shape, generator=generator))
    made.save_pretrained(folder)
    return base, layout, made


@pytest.mark.parametrize("name", list(MOE_ADAPTERS))
def test_moe_expert_adapters_made_by_peft_are_applied_as_peft_made_them(name, tmp_path):
    base, layout, made = peft_moe_adapter(name, tmp_path / "adapter")
    checked = check_adapter(tmp_path / "adapter", base.config)
    assert checked.layout.fingerprint() == layout.fingerprint()
    ids = torch.randint(0, 97, (2, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        before, expected = base(ids).logits, made(ids).logits
        with applied_adapter(base, checked) as model:
            adapted = model(ids).logits
        after = base(ids).logits
    # peft only warns about keys it does not load: the logits show that every tensor was loaded
    assert (adapted - before).abs().max() > 1e-3
    torch.testing.assert_close(adapted, expected)
    torch.testing.assert_close(after, before, rtol=0, atol=0)


def test_expert_keys_need_target_parameters_that_name_the_expert_parameters(tmp_path):
    base, _, _ = peft_moe_adapter("mixtral-experts-down-L1", tmp_path / "adapter")
    config_path = tmp_path / "adapter" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    for targets in (None, ["down_proj"]):  # ...mlp.experts.lora_A.weight alone says neither parameter
        config_path.write_text(json.dumps({**config, "target_parameters": targets}))
        with pytest.raises(LayoutError, match="routed experts.*do not name them"):
            check_adapter(tmp_path / "adapter", base.config)


def test_collect_checkpoint_file_scores_like_the_same_peft_folder(tiny, tmp_path):
    base = tiny["base"]
    layout = LoraLayout.from_config(base.model.config, SPEC)
    generator = torch.Generator().manual_seed(5)
    state = {m.key: torch.randn(m.shape, generator=generator) for m in layout.matrices}
    checkpoints = tmp_path / "run" / "checkpoints"
    layout.save(checkpoints / "layout.json")
    (checkpoints / "taskx").mkdir(parents=True)
    from safetensors.torch import save_file

    checkpoint = checkpoints / "taskx" / "3.safetensors"
    save_file(state, str(checkpoint))
    folder = write_adapter(state, layout, tmp_path / "same")
    config = EvalConfig(max_records=5, **FP32_CPU)
    adapters = {"file": [checkpoint], "folder": [folder]}
    with pytest.raises(ArtifactError, match="no line in"):  # collect writes the manifest line after the file
        evaluate(base, [mc_task()], adapters, config)
    append_jsonl(checkpoints / "manifest.jsonl", {"task": "taskx", "step": 3, "file": "taskx/3.safetensors",
                                                  "sha256": sha256_file(checkpoint)})  # fmt: skip
    results = evaluate(base, [mc_task()], adapters, config)
    by_label = {m["label"]: m["tasks"]["largest_number_mc"] for m in results["models"]}
    assert by_label["file"] == by_label["folder"]
    state[layout.matrices[0].key][0, 0] += 1.0  # the file changes after collect
    save_file(state, str(checkpoint))
    with pytest.raises(ArtifactError, match="does not match the sha256"):
        evaluate(base, [mc_task()], adapters, config)


def test_a_failed_eval_leaves_no_temporary_file(tiny, tmp_path, monkeypatch):
    import tempfile

    import dnd_scale.eval_report as report_module
    import dnd_scale.evaluate as evaluate_module

    base = tiny["base"]
    layout = LoraLayout.from_config(base.model.config, SPEC)
    checkpoints = tmp_path / "run" / "checkpoints"
    layout.save(checkpoints / "layout.json")
    (checkpoints / "taskx").mkdir()
    from safetensors.torch import save_file

    save_file({m.key: torch.zeros(m.shape) for m in layout.matrices}, str(checkpoints / "taskx" / "1.safetensors"))
    append_jsonl(checkpoints / "manifest.jsonl", {"task": "taskx", "step": 1, "file": "taskx/1.safetensors",
                                                  "sha256": sha256_file(checkpoints / "taskx" / "1.safetensors")})
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))  # where the checkpoint's PEFT folder is made

    def fails(model, *args):
        if hasattr(model, "peft_config"):  # while the checkpoint is applied from its temporary folder
            raise RuntimeError("scoring failed")
        return real(model, *args)

    real = evaluate_module.score_model
    monkeypatch.setattr(evaluate_module, "score_model", fails)
    with pytest.raises(RuntimeError, match="scoring failed"):
        evaluate(base, [mc_task()], {"file": [checkpoints / "taskx" / "1.safetensors"]}, EvalConfig(max_records=2,
                                                                                                   **FP32_CPU))
    assert list(scratch.iterdir()) == []
    monkeypatch.undo()
    results = evaluate(base, [mc_task()], config=EvalConfig(max_records=2, **FP32_CPU))
    monkeypatch.setattr(report_module, "plot_report", lambda results, path: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        write_report(results, tmp_path / "report")
    assert sorted(p.name for p in (tmp_path / "report").iterdir()) == ["results.json", "results.md"]


def test_generate_mode_batched_equals_one_by_one_and_scores_exact_match(tiny):
    base = tiny["base"]
    task = load_task("synthetic:add_numbers", num_records=5, seed=0)  # free-text answers: generate mode only
    batched = evaluate(base, [task], config=EvalConfig(mode="generate", batch_size=5, max_new_tokens=4, **FP32_CPU))
    single = evaluate(base, [task], config=EvalConfig(mode="generate", batch_size=1, max_new_tokens=4, **FP32_CPU))
    generations = batched["models"][0]["tasks"][task.name]["generations"]
    assert generations == single["models"][0]["tasks"][task.name]["generations"]
    assert len(generations) == 5
    assert all(len(base.tokenizer(g, add_special_tokens=False)["input_ids"]) <= 4 for g in generations)
    # Make one record's reference the model's own greedy reply: exact match must count it (and only it).
    records = list(task.records)
    records[2] = TaskRecord(prompt=records[2].prompt, response=f"  {generations[2].upper()} ")
    config = EvalConfig(mode="generate", max_new_tokens=4, **FP32_CPU)
    rigged = evaluate(base, [Task("rigged", records, "test")], config=config)
    metrics = rigged["models"][0]["tasks"]["rigged"]
    assert metrics["correct"] >= 1 and metrics["accuracy"] == metrics["correct"] / 5
    with pytest.raises(ValueError, match="no record that loglik mode can score"):
        evaluate(base, [task], config=EvalConfig(**FP32_CPU))


# ----------------------------------------------------------------------------------------------------
# adapters that do not fit


def test_adapter_of_another_base_model_is_refused_clearly(tiny, tmp_path):
    other = load_base_model(write_config(tmp_path / "other", hidden=48), **FP32_CPU).model.config
    wrong = make_adapter(tmp_path / "wrong", other, scale=0.1)
    with pytest.raises(LayoutError, match=r"adapter .*wrong.*has shape .*expected.*another model"):
        evaluate(tiny["base"], [mc_task()], {"g": [wrong]}, EvalConfig(**FP32_CPU))

    deeper = load_base_model(write_config(tmp_path / "deeper", layers=3), **FP32_CPU).model.config
    layers = make_adapter(tmp_path / "layers", deeper, scale=0.1)
    with pytest.raises(LayoutError, match=r"does not fit the base model: LoRA layers \[2\] do not exist"):
        check_adapter(layers, tiny["base"].model.config)

    # Same keys and shapes, but provenance.json records another layout: refused, naming the fingerprint.
    tampered = make_adapter(tmp_path / "tampered", tiny["base"].model.config, scale=0.1)
    provenance = json.loads((tampered / PROVENANCE).read_text())
    (tampered / PROVENANCE).write_text(json.dumps({**provenance, "layout_fingerprint": "f" * 64}))
    with pytest.raises(LayoutError, match=r"made for LoRA layout ffffffffffff.*another base model"):
        check_adapter(tampered, tiny["base"].model.config)

    with pytest.raises(FileNotFoundError, match="no adapter_model.safetensors"):
        check_adapter(tmp_path / "other", tiny["base"].model.config)


def test_an_adapter_made_for_another_base_of_the_same_shapes_is_refused_unless_allowed(tiny, tmp_path):
    """Another seed, another family (llama of Qwen2's shapes): same layout, so only the base identity
    recorded in provenance.json (or a collect run's collect.json) tells them apart."""
    base = tiny["base"]
    mine = base_identity(base.model)
    seed1 = load_base_model(tiny["config_path"], seed=1, **FP32_CPU).model
    llama = tiny_model("llama", hidden=32, intermediate=48, vocab=112)
    assert LoraLayout.from_config(llama.config, SPEC).fingerprint() == LoraLayout.from_config(base.model.config,
                                                                                               SPEC).fingerprint()
    layout = LoraLayout.from_config(base.model.config, SPEC)
    state = {m.key: 0.1 * torch.randn(m.shape, generator=torch.Generator().manual_seed(1)) for m in layout.matrices}
    made = {name: write_adapter(state, layout, tmp_path / name, provenance={"base_identity": base_identity(model)})
            for name, model in [("seed1", seed1), ("llama", llama), ("mine_bf16", base.model.to(torch.bfloat16))]}
    base.model.float()
    assert json.loads((made["seed1"] / "adapter_config.json").read_text())["r"] == SPEC.rank  # still a peft folder
    config = EvalConfig(max_records=3, **FP32_CPU)
    with pytest.raises(LayoutError, match=r"seed1 was made for another base model of the same shapes: its weights "
                                          r"differ from this base model's \(correlation .* --allow-other-base"):
        evaluate(base, [mc_task()], {"g": [made["seed1"]]}, config)
    with pytest.raises(LayoutError, match=r"it is a 'llama' model, this base model is 'qwen2'"):
        check_adapter(made["llama"], base.model.config, mine)
    check_adapter(made["mine_bf16"], base.model.config, mine)  # the same base in another dtype fits
    check_adapter(made["seed1"], base.model.config)  # no identity given: layout checks only (experiment.py)
    allowed = evaluate(base, [mc_task()], {"g": [made["seed1"]]}, EvalConfig(max_records=3, allow_other_base=True,
                                                                             **FP32_CPU))
    assert allowed["models"][1]["tasks"]["largest_number_mc"]["count"] == 3

    # A collect checkpoint: its run's collect.json records the base it was trained on.
    checkpoints = tmp_path / "run" / "checkpoints"
    layout.save(checkpoints / "layout.json")
    (checkpoints / "taskx").mkdir()
    from safetensors.torch import save_file

    save_file(state, str(checkpoints / "taskx" / "3.safetensors"))
    append_jsonl(checkpoints / "manifest.jsonl", {"task": "taskx", "step": 3, "file": "taskx/3.safetensors",
                                                  "sha256": sha256_file(checkpoints / "taskx" / "3.safetensors")})
    (checkpoints / "collect.json").write_text(json.dumps({"base_identity": base_identity(seed1)}))
    with pytest.raises(LayoutError, match=r"3.safetensors was made for another base model of the same shapes"):
        check_adapter(checkpoints / "taskx" / "3.safetensors", base.model.config, mine)
    (checkpoints / "collect.json").write_text(json.dumps({"base_identity": mine}))
    check_adapter(checkpoints / "taskx" / "3.safetensors", base.model.config, mine)


# ----------------------------------------------------------------------------------------------------
# records that cannot be scored


def test_unparseable_and_unanswered_records_are_skipped_and_counted(tiny, tmp_path):
    rows = [
        {"prompt": "Pick one.\nA: red\nB: blue\nC: green", "response": "[B]"},
        {"prompt": "Pick one.\nA: red\nB: blue", "response": "[E]"},  # answer not among the parsed labels
        {"prompt": "Pick one.\nA: red\nB: blue"},  # hidden label
        {"prompt": "What is 2 + 2?", "response": "4"},  # free text: no options
        {"prompt": "Pick one." + " Think." * 40 + "\nA: red\nB: blue", "response": "[A]"},  # ~300 tokens
    ]
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    results = evaluate(tiny["base"], [str(path)], config=EvalConfig(max_length=200, **FP32_CPU))
    info = results["tasks"]["mixed"]
    assert info["skipped"] == {"no_answer": 1, "no_options": 2, "too_long": 1}
    assert info["records"] == [0] and info["evaluated"] == 1 and info["scorable"] == 2
    assert results["models"][0]["tasks"]["mixed"]["count"] == 1
    assert any("longer than max_length=200" in warning for warning in info["warnings"])

    generate = evaluate(tiny["base"], [str(path)], config=EvalConfig(mode="generate", max_new_tokens=2, **FP32_CPU))
    assert generate["tasks"]["mixed"]["skipped"] == {"no_answer": 1, "no_options": 0, "too_long": 0}
    assert generate["tasks"]["mixed"]["records"] == [0, 1, 3, 4]

    with pytest.raises(ValueError, match="longer than max_length=20"):
        evaluate(tiny["base"], [str(path)], config=EvalConfig(max_length=20, **FP32_CPU))


def test_subsample_is_seeded_sized_and_in_record_order(tiny):
    task = mc_task(records=40)

    def pick(seed):
        config = EvalConfig(max_records=7, seed=seed)
        return [item.record for item in prepare_task(task, tiny["base"].tokenizer, config).items]

    assert pick(0) == pick(0) and len(pick(0)) == 7 and pick(0) != pick(1)
    assert pick(0) == sorted(pick(0))


# ----------------------------------------------------------------------------------------------------
# the DnD data files: options derived from the prompt, per dataset family

needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"{DATA} is absent")


def first(task: Task, predicate) -> tuple[int, TaskRecord]:
    return next((i, r) for i, r in enumerate(task.records) if predicate(r))


FAMILY_RECORDS = [
    ("ARC-c_test", ["[A]", "[B]", "[C]", "[D]"], "[C]"),
    ("ARC-e_test", ["[A]", "[B]", "[C]", "[D]"], "[A]"),
    ("OBQA_test", ["[A]", "[B]", "[C]", "[D]"], "[B]"),  # "choosing from [A]/[B]/[C]/[D]" is no option
    ("WinoGrande_validation", ["[A]", "[B]"], "[B]"),  # two options although the text names [C]/[D]
    ("PIQA_test", ["[A]", "[B]"], "[A]"),
    ("BoolQ_validation", ["[True]", "[False]"], "[False]"),
    ("science-dataset", ["[A]", "[B]", "[C]", "[D]"], "[C]"),  # inline after "choices:"
]


@needs_data
@pytest.mark.parametrize("file, options, answer", FAMILY_RECORDS, ids=[case[0] for case in FAMILY_RECORDS])
def test_real_records_parse_per_family(tiny, file, options, answer):
    task = load_task(str(DATA / f"{file}.json"))
    record = task.records[0]
    assert record.options == options and record.answer == answer
    selected, skipped = select_records(task, "loglik")
    assert len(selected) == len(task.records) and sum(skipped.values()) == 0
    # One option per option line (or inline "X: " entry) for the first 50 records; none for BoolQ.
    for r in task.records[:50]:
        listed = re.findall(r"(?:^|\n|choices: |, )([A-Z1-9]): ", r.prompt)
        assert r.options == ([f"[{label}]" for label in listed] if listed else ["[True]", "[False]"])
    # The scored reply is exactly the bracketed label, right after the assistant turn opens.
    context = render_context(tiny["base"].tokenizer, record, answer)
    assert context.endswith(record.prompt + "<|end|>\n<|assistant|>")
    assert context.startswith("<|system|>" + record.system) if record.system else context.startswith("<|user|>")


@needs_data
def test_real_records_with_numeric_labels_five_options_and_hidden_labels():
    arc_c = load_task(str(DATA / "ARC-c_test.json"))
    _, numeric = first(arc_c, lambda r: "\n1: " in r.prompt)
    assert numeric.options == ["[1]", "[2]", "[3]", "[4]"] and numeric.answer in numeric.options
    arc_e = load_task(str(DATA / "ARC-e_test.json"))
    _, five = first(arc_e, lambda r: "\nE: " in r.prompt)
    assert five.options == ["[A]", "[B]", "[C]", "[D]", "[E]"]
    winogrande_test = load_task(str(DATA / "WinoGrande_test.json"))
    selected, skipped = select_records(winogrande_test, "loglik")
    assert selected == [] and skipped["no_answer"] == len(winogrande_test.records)
    from dnd_scale.basemodel import build_tiny_tokenizer

    piqa = prepare_task(load_task(str(DATA / "PIQA_test.json")), build_tiny_tokenizer(), EvalConfig(max_records=25))
    assert any("labels look hidden" in warning for warning in piqa.warnings)


# ----------------------------------------------------------------------------------------------------
# report and command line


def test_report_files_are_written_with_the_measured_numbers(tiny, tmp_path):
    adapters = {"train": [tiny["adapters"]["big"], tiny["adapters"]["zero"]], "generated": [tiny["adapters"]["big"]]}
    results = evaluate(tiny["base"], [mc_task(), load_task("synthetic:parity_tf", num_records=8)], adapters,
                       EvalConfig(**FP32_CPU))
    paths = write_report(results, tmp_path / "report")
    assert sorted(p.name for p in (tmp_path / "report").iterdir()) == ["accuracy.png", "results.json", "results.md"]
    assert paths["accuracy.png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads(paths["results.json"].read_text()) == json.loads(json.dumps(results))
    train = results["summary"]["largest_number_mc"]["train"]["accuracy"]
    values = [m["tasks"]["largest_number_mc"]["accuracy"] for m in results["models"] if m["label"] == "train"]
    assert train["values"] == values and train["best"] == max(values)
    assert train["mean"] == pytest.approx(sum(values) / 2)
    markdown = paths["results.md"].read_text()
    base_accuracy = results["summary"]["largest_number_mc"]["base"]["accuracy"]["mean"]
    row = f"| largest_number_mc | 12 | {100 * base_accuracy:.1f} | "
    assert row in markdown and "train (n=2)" in markdown and f"(best {100 * train['best']:.1f})" in markdown


def test_adapter_groups_on_the_command_line(tmp_path):
    assert parse_adapter_groups(["train=a", "b", "generated=c", "d"]) == {"train": ["a", "b"], "generated": ["c", "d"]}
    odd = tmp_path / "x=y"
    odd.mkdir()
    assert parse_adapter_groups(["g=a", str(odd)]) == {"g": ["a", str(odd)]}  # an existing path is never a label
    with pytest.raises(ValueError, match="before any LABEL=PATH"):
        parse_adapter_groups(["a", "g=b"])


def test_main_writes_the_report(tiny, tmp_path, capsys):
    (tmp_path / "r.yaml").write_text("eval: {task_records: 6, max_records: 4}\n")  # the flags below override it
    argv = ["--config", str(tmp_path / "r.yaml"), "--base", str(tiny["config_path"]), "--tasks", "synthetic:parity_tf",
            "--task-records", "6",
            "--adapters", f"gen={tiny['adapters']['big']}", str(tiny["adapters"]["zero"]),
            "--out", str(tmp_path / "out"), "--max-records", "4", "--dtype", "float32", "--device", "cpu"]
    assert main(argv) == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["tasks"]["parity_tf"]["evaluated"] == 4 and len(results["adapters"]["gen"]) == 2
    assert "| parity_tf | 4 |" in capsys.readouterr().out


def test_template_text_before_the_reply_is_context_and_a_template_without_the_reply_is_refused():
    from dnd_scale.basemodel import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    record = TaskRecord(prompt="Pick.\nA: x\nB: y", response="[A]", system="Be brief.", options=["[A]", "[B]"],
                        answer="[A]")
    # A template that opens every assistant turn with an empty thinking block (as Qwen3's does).
    tokenizer.chat_template = (
        "{% for m in messages %}{{ '<|' + m['role'] + '|>' }}{% if m['role'] == 'assistant' %}{{ 'think.' }}{% endif %}"
        "{{ m['content'] + '<|end|>' }}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
    )
    expected = "<|system|>Be brief.<|end|><|user|>Pick.\nA: x\nB: y<|end|><|assistant|>think."
    assert render_context(tokenizer, record, "[B]") == expected
    item = prepare_task(Task("t", [record], "test"), tokenizer, EvalConfig()).items[0]
    assert [tokenizer.decode(ids) for ids in item.continuations] == ["[A]", "[B]"]
    tokenizer.chat_template = "{% for m in messages %}{{ m['role'] }}{% endfor %}"  # drops every message's text
    with pytest.raises(ValueError, match="does not render the assistant reply '\\[A\\]' verbatim"):
        render_context(tokenizer, record, "[A]")
    tokenizer.chat_template = None  # no template: the plain rendering collect trains on
    item = prepare_task(Task("t", [record], "test"), tokenizer, EvalConfig()).items[0]
    assert tokenizer.decode(item.contexts[0]) == "Be brief.\n\nPick.\nA: x\nB: y\n"


# ----------------------------------------------------------------------------------------------------
# generate mode on option items, confidence intervals


@pytest.mark.parametrize("reply, expected", [
    ("[B]", 1), ("The answer is [C].", 2), ("b) because", 1), ("  (A) first", 0), ("[E] or [B]", 1),
    ("D", 3), ("I think so", None), ("Because A is right", None), ("", None),
])
def test_parse_choice_reads_bracketed_then_leading_labels(reply, expected):
    assert parse_choice(reply, ["[A]", "[B]", "[C]", "[D]"]) == expected


def test_parse_choice_true_false_ignores_case():
    assert parse_choice("true", ["[True]", "[False]"]) == 0
    assert parse_choice("[FALSE]", ["[True]", "[False]"]) == 1
    assert parse_choice("Truely", ["[True]", "[False]"]) is None


def test_generate_mode_scores_option_items_by_the_parsed_choice(tiny, monkeypatch):
    import dnd_scale.eval_scoring as scoring_module

    task = mc_task(records=6)
    answers = [record.options.index(record.answer) for record in task.records]
    # Replies: right bracketed, right bare label, wrong option, no option at all, right, right.
    right = [task.records[i].answer for i in range(6)]
    wrong = task.records[2].options[(answers[2] + 1) % len(task.records[2].options)]
    replies = [right[0], right[1][1:-1] + ".", wrong, "no idea", f"so {right[4]}", right[5].lower()]
    monkeypatch.setattr(scoring_module, "generate_replies", lambda model, tokenizer, prompts, **kw: replies)
    metrics = evaluate(tiny["base"], [task], config=EvalConfig(mode="generate", max_new_tokens=3, **FP32_CPU))
    scores = metrics["models"][0]["tasks"][task.name]
    assert scores["predictions"][:4] == [answers[0], answers[1], (answers[2] + 1) % len(task.records[2].options), None]
    assert scores["correct"] == 4 and scores["unparsed"] == 1 and scores["accuracy"] == 4 / 6
    assert scores["ci95"][0] < 4 / 6 < scores["ci95"][1]


def test_wilson_interval_brackets_the_accuracy():
    low, high = wilson_interval(50, 100)
    assert low < 0.5 < high and abs((0.5 - low) - (high - 0.5)) < 1e-12 and 0.09 < high - low < 0.2
    assert wilson_interval(0, 10)[0] == 0.0 and 0 < wilson_interval(0, 10)[1] < 0.35
    assert wilson_interval(10, 10)[1] == 1.0
    with pytest.raises(ValueError):
        wilson_interval(0, 0)


def test_adapters_given_as_a_quoted_glob_or_a_folder(tiny, tmp_path):
    folder = tiny["folder"]
    adapters = sorted(str(tiny["adapters"][name]) for name in ("big", "zero"))
    assert expand_adapter_paths([str(folder / "[bz]*")]) == adapters  # a glob the shell left alone
    (tmp_path / "generated").mkdir()
    for name in ("big", "zero"):
        (tmp_path / "generated" / name).symlink_to(tiny["adapters"][name], target_is_directory=True)
    (tmp_path / "generated" / "notes.txt").write_text("not an adapter")
    assert expand_adapter_paths([str(tmp_path / "generated")]) == sorted(str(tmp_path / "generated" / n)
                                                                         for n in ("big", "zero"))
    assert expand_adapter_paths([str(tiny["adapters"]["big"])]) == [str(tiny["adapters"]["big"])]  # an adapter itself
    with pytest.raises(ValueError, match="matches no file or folder"):
        expand_adapter_paths([str(tmp_path / "nothing" / "*.safetensors")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no adapter folders"):
        expand_adapter_paths([str(tmp_path / "empty")])
    (tmp_path / "r.yaml").write_text("eval: {task_records: 6, max_records: 4, dtype: float32, device: cpu}\n")
    argv = ["--config", str(tmp_path / "r.yaml"), "--base", str(tiny["config_path"]), "--tasks", "synthetic:parity_tf",
            "--adapters", f"gen={tmp_path / 'generated'}", f"big={folder / 'b*'}", "--out", str(tmp_path / "out")]
    assert main(argv) == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert len(results["adapters"]["gen"]) == 2 and len(results["adapters"]["big"]) == 1


def test_the_report_names_a_saved_random_init_base_and_tables_the_answer_logprob(tiny, tmp_path):
    from dnd_scale.basemodel import save_base_model

    saved = load_base_model(save_base_model(tiny["base"], tmp_path / "base_model"), **FP32_CPU)
    assert saved.kind == "random-init, saved"  # what collect writes for later stages: not "pretrained"
    results = evaluate(saved, [mc_task()], {"gen": [tiny["adapters"]["big"]]}, EvalConfig(**FP32_CPU))
    markdown = write_report(results, tmp_path / "report")["results.md"].read_text()
    assert "pretrained" not in markdown and "(random-init, saved, qwen2" in markdown
    assert "random-init: it knows nothing" in markdown
    logprob = results["summary"]["largest_number_mc"]["base"]["answer_logprob_mean"]["mean"]
    assert logprob == results["models"][0]["tasks"]["largest_number_mc"]["answer_logprob_mean"] < 0
    assert "## mean log-probability of the right answer" in markdown
    assert f"| largest_number_mc | 12 | {logprob:.3f} | " in markdown
