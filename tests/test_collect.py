"""`dnd collect` on a tiny random-init Qwen2: checkpoints, manifest, crash safety, loss masking, bad input."""

import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch
from peft import get_peft_model, set_peft_model_state_dict
from safetensors.torch import load_file

from dnd_scale import collect_task
from dnd_scale.basemodel import base_identity, build_tiny_tokenizer, load_base_model, sample_positions
from dnd_scale.collect import collect
from dnd_scale.collect_config import CollectConfig
from dnd_scale.collect_examples import IGNORE_INDEX, collate, encode_record, encode_task
from dnd_scale.eval_adapters import check_adapter
from dnd_scale.export import check_vllm_contract, write_adapter
from dnd_scale.io import ArtifactError
from dnd_scale.layout import LayoutError, LoraLayout, LoraSpec
from dnd_scale.recipe import RECIPE_FILE, load_recipe
from dnd_scale.store import load_checkpoint, read_manifest, read_prompt_pools
from dnd_scale.tasks import Task, TaskRecord, load_task
from tinymodels import tiny_config

TASK_SPECS = ["synthetic:add_numbers", "synthetic:parity_tf", "synthetic:largest_number_mc"]
CHECKPOINTS_PER_TASK = 4

# Runs in a subprocess that the test kills. With KILL_AT_WRITE = n it kills itself while the n-th
# checkpoint (resume states not counted) is a finished temporary file not yet renamed into place (the worst moment).
CHILD = """
import json, os, signal, sys
import torch
from dnd_scale.collect import collect
from dnd_scale.collect_config import CollectConfig
torch.set_num_threads(1)
from dnd_scale.tasks import load_task
config, specs, run_dir, kill_at = json.loads(sys.argv[1])
if kill_at:
    real_replace, written = os.replace, []
    def replace(src, dst):
        if str(dst).endswith(".safetensors") and "checkpoints" in str(dst) and "resume" not in str(dst):
            written.append(dst)
            if len(written) == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
        real_replace(src, dst)
    os.replace = replace
collect(CollectConfig(**config), [load_task(s, num_records=16) for s in specs], run_dir)
"""


@pytest.fixture(scope="module", autouse=True)
def _single_threaded(one_thread):
    """Every test of this module runs on one thread (see conftest.one_thread)."""


@pytest.fixture(scope="module")
def base_config(tmp_path_factory):
    """config.json of a 2-layer Qwen2 whose vocabulary is the tiny character tokenizer's."""
    folder = tmp_path_factory.mktemp("base")
    config = tiny_config("qwen2", hidden=32, intermediate=48, vocab=len(build_tiny_tokenizer()))
    config.max_position_embeddings = 512
    config.save_pretrained(folder)
    return folder / "config.json"


@pytest.fixture(scope="module")
def config(base_config):
    return CollectConfig(
        base_model=str(base_config), lora=LoraSpec(rank=2, alpha=4.0), steps=8, save_last=8, save_every=2,
        lr=1e-2, batch_size=4, max_length=256, seed=5, device="cpu", dtype="float32",
    )


@pytest.fixture(scope="module")
def tasks():
    return [load_task(spec, num_records=16) for spec in TASK_SPECS]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, config, tasks):
    """One uninterrupted collect of three tasks; tests that modify a run work on a copy."""
    run_dir = tmp_path_factory.mktemp("reference")
    records = collect(config, tasks, run_dir)
    return run_dir, records


def copy_run(reference_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(reference_run[0], run_dir)
    return run_dir


def manifest_lines(run_dir):
    return (run_dir / "checkpoints" / "manifest.jsonl").read_text().splitlines()


def temporaries(run_dir):
    return [p for p in run_dir.rglob("*") if p.name.endswith(".tmp")]


def test_checkpoint_steps():
    assert CollectConfig(steps=10, save_last=5, save_every=2).checkpoint_steps() == [6, 8, 10]
    assert CollectConfig(steps=8, save_last=8, save_every=2).checkpoint_steps() == [2, 4, 6, 8]
    assert CollectConfig(steps=3, save_last=1).checkpoint_steps() == [3]
    with pytest.raises(ValueError, match="save_last must be between 1 and steps=4, got 5"):
        CollectConfig(steps=4, save_last=5)


def test_every_manifest_checkpoint_exists_loads_and_fits_the_layout(reference_run, config):
    run_dir, records = reference_run
    layout = LoraLayout.load(run_dir / "checkpoints" / "layout.json")
    assert layout.fingerprint() == LoraLayout.from_config(tiny_config("qwen2", hidden=32, intermediate=48),
                                                          config.lora).fingerprint()
    assert records == read_manifest(run_dir)
    assert [(r["task"], r["step"]) for r in records] == [
        (task, step) for task in ("add_numbers", "parity_tf", "largest_number_mc") for step in (2, 4, 6, 8)
    ]
    for record in records:
        assert record["seed"] == 5 and record["layout_fingerprint"] == layout.fingerprint()
        assert record["file"] == f"{record['task']}/{record['step']}.safetensors"
        state = load_checkpoint(run_dir, record, layout)  # checks sha256, keys, shapes, finiteness
        assert sorted(state) == sorted(layout.keys)  # safetensors files list keys alphabetically
        assert all(state[m.key].shape == m.shape and state[m.key].dtype == torch.float32 for m in layout.matrices)
        assert any(state[k].abs().sum() > 0 for k in layout.keys if "lora_B" in k)  # B moved off its zero init
    # Losses go down over a task's trajectory (lr 1e-2 on 16 records).
    by_task = json.loads((run_dir / "checkpoints" / "add_numbers" / "complete.json").read_text())["losses"]
    assert len(by_task) == config.steps and by_task[-1] < by_task[0]
    # Different tasks give different adapters.
    assert records[3]["sha256"] != records[7]["sha256"] != records[11]["sha256"]
    assert temporaries(run_dir) == []


def test_checkpoint_keys_are_what_peft_save_pretrained_writes(reference_run, config, tmp_path):
    run_dir, records = reference_run
    state = load_checkpoint(run_dir, records[-1])
    base = load_base_model(run_dir / "base_model", dtype="float32", device="cpu")
    layout = LoraLayout.from_config(base.model.config, config.lora)
    peft_model = get_peft_model(base.model, layout.to_peft_config())
    set_peft_model_state_dict(peft_model, state)
    peft_model.save_pretrained(tmp_path / "adapter")
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert saved.keys() == state.keys()
    assert all(torch.equal(saved[k], state[k]) for k in state)
    assert check_vllm_contract(tmp_path / "adapter") == 8  # peft's own folder of a collected LoRA (r=2)


def test_every_collected_checkpoint_as_an_adapter_folder_meets_the_vllm_contract(reference_run, tmp_path):
    """Each checkpoint written as the PEFT folder dnd eval applies (`write_adapter`), as a user exports it."""
    run_dir, records = reference_run
    layout = LoraLayout.load(run_dir / "checkpoints" / "layout.json")
    for index, record in enumerate(records):
        folder = write_adapter(load_checkpoint(run_dir, record, layout), layout, tmp_path / str(index))
        assert check_vllm_contract(folder) == 8


def test_eval_checks_checkpoints_against_the_base_identity_collect_recorded(reference_run, config):
    run_dir, records = reference_run
    checkpoint = run_dir / "checkpoints" / records[-1]["file"]
    saved = load_base_model(run_dir / "base_model", dtype="bfloat16", device="cpu")  # as eval loads it on a GPU
    check_adapter(checkpoint, saved.model.config, base_identity(saved.model))
    reseeded = load_base_model(config.base_model, dtype="float32", device="cpu", seed=config.seed + 1)
    with pytest.raises(LayoutError, match="was made for another base model of the same shapes: its weights differ"):
        check_adapter(checkpoint, reseeded.model.config, base_identity(reseeded.model))


def test_collect_is_deterministic_for_a_seed(reference_run, config, tasks, tmp_path):
    records = collect(config, tasks[:1], tmp_path / "again")
    assert records == reference_run[1][:CHECKPOINTS_PER_TASK]  # same losses and same file bytes (sha256)
    other = collect(replace(config, seed=6), tasks[:1], tmp_path / "other-seed")
    assert [r["sha256"] for r in other] != [r["sha256"] for r in records]


def test_rerun_skips_finished_tasks_and_repairs_a_torn_manifest_line(reference_run, config, tasks, tmp_path):
    run_dir = copy_run(reference_run, tmp_path)
    stamps = {p: p.stat().st_mtime_ns for p in (run_dir / "checkpoints").rglob("*.safetensors")}
    with open(run_dir / "checkpoints" / "manifest.jsonl", "a") as manifest:
        manifest.write('{"task": "add_numbers", "st')  # a writer killed mid-line
    assert collect(config, tasks, run_dir) == reference_run[1]
    assert manifest_lines(run_dir) == manifest_lines(reference_run[0])
    assert {p: p.stat().st_mtime_ns for p in (run_dir / "checkpoints").rglob("*.safetensors")} == stamps


def test_collect_keeps_each_tasks_prompt_pool_and_a_rerun_restores_a_lost_one(reference_run, config, tasks, tmp_path):
    run_dir = copy_run(reference_run, tmp_path)
    names = [task.name for task in tasks]
    assert read_prompt_pools(run_dir, names) == {task.name: task.prompts for task in tasks}
    lost = run_dir / "checkpoints" / names[0] / "prompts.jsonl"
    lost.write_text('{"prompt": "another prompt"}\n')  # damaged (or gone, or collected before pools were kept)
    with pytest.raises(ArtifactError, match=f"prompt pool of task {names[0]!r} .* missing or changed"):
        read_prompt_pools(run_dir, names)
    lost.unlink()
    collect(config, tasks, run_dir)  # finished tasks are skipped; the pool is written anew from the task
    assert read_prompt_pools(run_dir, names) == {task.name: task.prompts for task in tasks}
    with pytest.raises(ArtifactError, match="has not been collected"):
        read_prompt_pools(run_dir, ["never_collected"])


@pytest.mark.parametrize("kill", ["sigkill-after-first-checkpoint", "sigkill-between-write-and-rename"])
def test_killed_collect_finishes_on_rerun_like_an_uninterrupted_run(reference_run, config, tasks, tmp_path, kill):
    run_dir = tmp_path / "run"
    kill_at = 6 if kill == "sigkill-between-write-and-rename" else 0  # the 2nd checkpoint of the 2nd task
    args = json.dumps([asdict(config), TASK_SPECS, str(run_dir), kill_at])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen([sys.executable, "-c", CHILD, args], env=env, stderr=subprocess.PIPE, text=True)
    if not kill_at:
        first = run_dir / "checkpoints" / "add_numbers" / "2.safetensors"
        deadline = time.monotonic() + 120
        while not first.exists() and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        child.send_signal(signal.SIGKILL)
    _, stderr = child.communicate(timeout=120)
    assert child.returncode == -signal.SIGKILL, stderr[-2000:]
    done_before = sorted(p.parent.name for p in (run_dir / "checkpoints").glob("*/complete.json"))
    if kill_at:
        assert done_before == ["add_numbers"] and len(temporaries(run_dir)) == 1  # the unrenamed checkpoint
        finished_stamps = {p: p.stat().st_mtime_ns for p in (run_dir / "checkpoints" / "add_numbers").iterdir()}
    else:  # killed while collecting; how far it got depends on scheduling, but never to the end
        assert len(done_before) < len(TASK_SPECS)

    records = collect(config, tasks, run_dir)

    assert records == reference_run[1]  # same tasks, steps, losses and checkpoint bytes
    assert manifest_lines(run_dir) == manifest_lines(reference_run[0])
    assert temporaries(run_dir) == []
    on_disk = sorted(str(p.relative_to(run_dir / "checkpoints")) for p in run_dir.rglob("*.safetensors")
                     if "base_model" not in p.parts)
    assert on_disk == sorted(r["file"] for r in records)
    if kill_at:  # the finished task was skipped, not redone
        assert {p: p.stat().st_mtime_ns for p in (run_dir / "checkpoints" / "add_numbers").iterdir()} == finished_stamps


def test_a_task_killed_mid_way_resumes_from_its_last_state_like_an_uninterrupted_run(config, tasks, tmp_path, monkeypatch):
    # resume_every=3 with checkpoints at 2, 4, 6, 8: dying in step 4 leaves the state of step 3 (between
    # checkpoints, with the checkpoint of step 2 kept). LoRA dropout makes the result depend on the RNG state.
    config = replace(config, lora=replace(config.lora, dropout=0.1), resume_every=3)
    uninterrupted = collect(config, tasks[:1], tmp_path / "uninterrupted")
    run_dir, task_dir = tmp_path / "run", tmp_path / "run" / "checkpoints" / tasks[0].name
    real_collate, batches = collect_task.collate, []

    def collate_until_killed(*args):
        batches.append(len(batches) + 1)
        if killed and len(batches) == 4:
            raise KeyboardInterrupt("killed in step 4")
        return real_collate(*args)

    monkeypatch.setattr(collect_task, "collate", collate_until_killed)
    killed = True
    with pytest.raises(KeyboardInterrupt):
        collect(config, tasks[:1], run_dir)
    assert sorted(p.name for p in task_dir.iterdir()) == ["2.safetensors", "resume.safetensors"]

    killed, batches = False, []
    records = collect(config, tasks[:1], run_dir)

    assert len(batches) == config.steps - 3  # steps 4..8 only: the first three were not redone
    assert records == uninterrupted  # same steps, losses and checkpoint bytes
    assert manifest_lines(run_dir) == manifest_lines(tmp_path / "uninterrupted")
    done, expected = (json.loads((folder / "checkpoints" / tasks[0].name / "complete.json").read_text())
                      for folder in (run_dir, tmp_path / "uninterrupted"))
    assert done == expected  # losses and skipped steps of all eight steps
    assert sorted(p.name for p in task_dir.iterdir()) == sorted(
        ["complete.json", "prompts.jsonl", *(Path(r["file"]).name for r in records)])  # the resume state is gone


def test_checkpoints_of_another_layout_are_refused(reference_run, config, tasks, tmp_path):
    run_dir = copy_run(reference_run, tmp_path)
    with pytest.raises(LayoutError, match=r"holds checkpoints of LoRA layout \w+ \(rank 2\).*gives layout"):
        collect(replace(config, lora=LoraSpec(rank=4, alpha=4.0)), tasks, run_dir)
    wider = tiny_config("qwen2", hidden=48, intermediate=48, vocab=len(build_tiny_tokenizer()))
    wider.save_pretrained(tmp_path / "wider")
    with pytest.raises(LayoutError, match="holds checkpoints of LoRA layout"):
        collect(replace(config, base_model=str(tmp_path / "wider" / "config.json")), tasks, run_dir)
    other_layout = LoraLayout.from_config(wider, config.lora)
    with pytest.raises(LayoutError, match="collected for another base model or LoRA spec"):
        load_checkpoint(run_dir, reference_run[1][0], other_layout)
    with pytest.raises(ValueError, match=r"another config \(steps: 8 -> 10"):
        collect(replace(config, steps=10), tasks, run_dir)


def test_changed_task_data_and_tampered_checkpoints_are_refused(reference_run, config, tmp_path):
    run_dir = copy_run(reference_run, tmp_path)
    changed = load_task("synthetic:add_numbers", num_records=16, seed=1)
    with pytest.raises(ValueError, match="task 'add_numbers' was collected from other records"):
        collect(config, [changed], run_dir)
    record = reference_run[1][0]
    path = run_dir / "checkpoints" / record["file"]
    path.write_bytes(path.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(ValueError, match="does not match its manifest sha256"):
        load_checkpoint(run_dir, record)


def test_a_second_collect_on_the_same_run_is_refused(reference_run, config, tasks, tmp_path):
    run_dir = copy_run(reference_run, tmp_path)
    with open(run_dir / "checkpoints" / ".lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(RuntimeError, match="another `dnd collect` is writing to"):
            collect(config, tasks, run_dir)


def test_bad_task_input_gets_clear_errors(config, tmp_path):
    prompt_only = Task("prompts", [TaskRecord("What is 1 + 1?", "2"), TaskRecord("What is 2 + 2?")], "prompts.json")
    with pytest.raises(ValueError, match=r"'prompts' \(prompts.json\) record 1 has no response"):
        collect(config, [prompt_only], tmp_path / "run")
    long_prompt = Task("long", [TaskRecord("x" * 300, "y")], "long.json")
    with pytest.raises(ValueError, match="no record keeps a response token within max_length=256"):
        collect(config, [long_prompt], tmp_path / "run")
    twice = load_task("synthetic:uppercase", num_records=4)
    with pytest.raises(ValueError, match=r"unique within a run, found duplicates \['uppercase'\]"):
        collect(config, [twice, twice], tmp_path / "run")
    with pytest.raises(FileNotFoundError, match="has a config.json but no weights"):
        collect(replace(config, base_model=str(Path(config.base_model).parent)), [twice], tmp_path / "run2")


@pytest.mark.parametrize("template", ["chat-template", "no-template"])
def test_prompt_tokens_have_label_minus_100(template):
    tokenizer = build_tiny_tokenizer()
    if template == "no-template":
        tokenizer.chat_template = None
    record = TaskRecord("What is 2 + 3?", "5", system="Add.")
    input_ids, labels = encode_record(tokenizer, record)
    assert len(input_ids) == len(labels)
    response_start = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
    assert all(label == IGNORE_INDEX for label in labels[:response_start])
    assert labels[response_start:] == input_ids[response_start:]
    prompt_text = tokenizer.decode(input_ids[:response_start])
    response_text = tokenizer.decode(labels[response_start:])
    if template == "chat-template":
        assert prompt_text == "<|system|>Add.<|end|>\n<|user|>What is 2 + 3?<|end|>\n<|assistant|>"
        assert response_text == "5<|end|>\n"
    else:
        assert prompt_text == "Add.\n\nWhat is 2 + 3?\n"
        assert response_text == "5<|end|>"
    # Cutting at max_length keeps the prompt mask and drops only the response tail.
    task = Task("t", [record], "t.json")
    (cut_ids, cut_labels), = encode_task(tokenizer, task, response_start + 1)
    assert cut_ids == input_ids[: response_start + 1] and cut_labels[-1] == input_ids[response_start]
    # Right padding is masked out of attention and loss.
    batch = collate([(input_ids, labels), (cut_ids, cut_labels)], tokenizer.pad_token_id, torch.device("cpu"))
    assert batch["labels"][1, len(cut_ids):].eq(IGNORE_INDEX).all()
    assert batch["attention_mask"].sum(1).tolist() == [len(input_ids), len(cut_ids)]


def test_command_line_reads_recipe_tasks_and_overrides(base_config, tmp_path, capsys):
    from dnd_scale.collect import main

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"collect:\n  base_model: {base_config}\n  steps: 3\n  save_last: 2\n  batch_size: 2\n  lr: 1e-3\n"
        "  max_length: 128\n  device: cpu\n  lora: {rank: 4, target_modules: [q_proj, v_proj]}\n"
        "tasks: [synthetic:uppercase]\ntrain: {steps: 99}\n"
    )
    assert main(["--run", str(tmp_path / "run"), "--config", str(recipe), "--synthetic-records", "8",
                 "--collect.lora.rank=2"]) == 0
    assert "1 tasks, 2 checkpoints" in capsys.readouterr().out
    meta = json.loads((tmp_path / "run" / "checkpoints" / "collect.json").read_text())
    assert meta["config"]["lora"]["rank"] == 2 and meta["config"]["lora"]["target_modules"] == ["q_proj", "v_proj"]
    assert meta["config"]["lr"] == 1e-3 and meta["base_model"]["kind"] == "random-init"
    assert [(r["task"], r["step"]) for r in read_manifest(tmp_path / "run")] == [("uppercase", 2), ("uppercase", 3)]
    saved = load_recipe(tmp_path / "run" / RECIPE_FILE)  # what the later stages read
    assert saved.collect.lora.rank == 2 and saved.synthetic_records == 8 and saved.tasks == ["synthetic:uppercase"]
    pool = read_prompt_pools(tmp_path / "run", ["uppercase"])["uppercase"]
    assert pool == load_task("synthetic:uppercase", num_records=8, seed=0).prompts  # collect kept the prompts
    with pytest.raises(ValueError, match="overrides of the collect section only"):
        main(["--run", str(tmp_path / "run"), "--tasks", "synthetic:uppercase", "--train.lr=1"])


def test_a_collect_refused_by_the_runs_config_keeps_the_runs_recipe(base_config, tmp_path):
    from dnd_scale.cli import main as dnd

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"collect:\n  base_model: {base_config}\n  steps: 2\n  save_last: 1\n  batch_size: 2\n  max_length: 128\n"
        "  device: cpu\n  lora: {rank: 2, target_modules: [q_proj]}\ntasks: [synthetic:uppercase]\nsynthetic_records: 8\n"
    )
    run = tmp_path / "run"
    assert dnd(["collect", "--run", str(run), "--config", str(recipe)]) == 0
    before = (run / RECIPE_FILE).read_bytes()
    # the checkpoints were collected with 2 steps: a recipe of 3 is refused, and the later stages
    # still read the recipe the checkpoints were made with
    assert dnd(["collect", "--run", str(run), "--config", str(recipe), "--collect.steps=3"]) == 1
    assert (run / RECIPE_FILE).read_bytes() == before
    assert load_recipe(run / RECIPE_FILE).collect.steps == 2


def test_a_failed_first_collect_does_not_bind_the_run_to_its_config(config, tasks, tmp_path):
    long_prompt = Task("long", [TaskRecord("x" * 300, "y")], "long.json")
    with pytest.raises(ValueError, match="no record keeps a response token within max_length=256"):
        collect(config, [long_prompt], tmp_path / "run")
    assert (tmp_path / "run" / "checkpoints" / "collect.json").is_file()
    # the corrected recipe (longer max_length, another rank) collects into the same folder
    fixed = replace(config, max_length=400, lora=LoraSpec(rank=4, alpha=8.0))
    records = collect(fixed, [long_prompt, tasks[0]], tmp_path / "run")
    assert {r["task"] for r in records} == {"long", "add_numbers"}
    meta = json.loads((tmp_path / "run" / "checkpoints" / "collect.json").read_text())
    assert meta["config"]["max_length"] == 400 and meta["config"]["lora"]["rank"] == 4
    # once a task is finished, the run is bound to its config
    with pytest.raises(ValueError, match=r"another config \(max_length: 400 -> 256"):
        collect(replace(fixed, max_length=256), [tasks[1]], tmp_path / "run")


@pytest.mark.parametrize("numel", [1, 2, 31, 1000, 151936 * 896, 2**40 + 3], ids=lambda n: f"n{n}")
def test_identity_sample_positions_are_exact_and_in_range(numel):
    """A float32 linspace put the last sample of a 0.5B model's embedding (151936 x 896) past its
    end on CUDA; the positions are exact integers: round-half-up of i * (n - 1) / 31."""
    positions = sample_positions(numel, 32).tolist()
    assert positions == [(2 * i * (numel - 1) + 31) // 62 for i in range(32)]
    assert positions[0] == 0 and positions[-1] == numel - 1 and positions == sorted(positions)
