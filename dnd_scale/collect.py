"""`dnd collect`: train one LoRA per task on the frozen base model and keep a trajectory of checkpoints.

For each task, a fresh LoRA (peft, `layout.to_peft_config()`) is trained with AdamW on the task's
prompt/response records, with the loss on the response tokens only, and the adapter is saved every
`save_every` steps over the last `save_last` steps, into the run's checkpoint store
(`<run>/checkpoints`; its files are listed in `store`).

A random-init base model (source = a config.json) is also written to `<run>/base_model` so that the
later stages load the very weights the checkpoints were trained on.

Crash safety: every file is written to a temporary name and renamed into place; a manifest line is
appended only after its checkpoint file exists; `complete.json` only after the task's last line. A
re-run skips finished tasks. An unfinished task resumes from its resume state, written (one file,
atomically) at each of its checkpoints and every `resume_every` steps: the LoRA, the AdamW moments,
the dropout RNG state, the step (the data order is replayed up to it), the losses, skipped steps and
manifest lines so far; its files after that step are dropped. Without a usable resume state the task
restarts from scratch. Either way the result equals that of an uninterrupted run (bit for bit on CPU,
where training is deterministic for a seed). Until the task is finished its manifest lines are
dropped on every re-run and appended again, so the manifest lists finished tasks only.

Several processes: under a launcher that sets RANK, WORLD_SIZE and LOCAL_RANK (`deepspeed
--num_gpus N $(which dnd) collect ...`, with or without `--no_local_rank`; `torchrun --nproc_per_node
N -- $(which dnd) collect ...`, the `--` keeping torchrun from reading `--run` as its `--run-path`;
srun with the variables exported as `launchers/slurm_train.sh` does for `dnd train`), every rank
loads the base model on its own device (cuda:LOCAL_RANK for device "auto" or "cuda") and the tasks
are split across the ranks:

1. Rank 0 alone prepares the run folder exactly as a single process does (lock, leftovers, base
   model, collect.json, manifest repair) and lists the unfinished tasks in the order given; it sends
   that list (or the reason it could not start) to every rank. Nobody writes before that.
2. The unfinished tasks are dealt round robin in that order — rank r of N trains the tasks at
   positions r, r+N, r+2N, ... of the list (from 0). Every task trains the same number of steps at
   the same batch size, so counts balance the work, and the split is a pure function of the
   folder's state and the world size. Only the rank that owns a task writes into `<task>/`; no rank
   appends to manifest.jsonl meanwhile.
3. When every rank is done, rank 0 gathers the new manifest lines and rewrites manifest.jsonl once,
   atomically: the lines it already held, then the tasks of this job in the order given — the very
   file a single process writes for the same tasks, whichever rank finished first.

A task's LoRA does not depend on who trains it: the init seed is `seed` and the data order and
dropout seed derive from (seed, task name), never from the rank. If a job dies before step 3, the
finished tasks keep their checkpoints and complete.json (lines included): the next run, with any
number of processes, merges them in and trains only what is left. Coordination goes through a gloo
process group (MASTER_ADDR and MASTER_PORT from the launcher) on CPU memory, whatever the device; a
rank that dies makes the others fail at their next message rather than wait. The run folder must be
on a filesystem that every node sees at the same path.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import math
import os
import shutil
import socket
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
import torch.distributed as dist
from peft import get_peft_model, get_peft_model_state_dict
from safetensors import safe_open
from tqdm.auto import tqdm

from dnd_scale.basemodel import BaseModel, base_identity, load_base_model, save_base_model
from dnd_scale.io import (
    TMP_SUFFIX,
    ArtifactError,
    append_jsonl,
    atomic_path,
    exclusive_folder,
    load_safetensors,
    read_jsonl,
    remove_stale_builds,
    save_safetensors,
    sha256_file,
    sha256_text,
    write_json,
)
from dnd_scale.layout import LayoutError, LoraLayout, LoraSpec
from dnd_scale.rundir import RunDir
from dnd_scale.store import (
    COLLECT_META,
    MANIFEST,
    PROMPTS,
    RESUME,
    completion_marker,
    completion_markers,
    is_complete,
    read_collect_meta,
    read_completion,
    read_manifest,
    save_layout,
    store_dir,
    write_checkpoint,
    write_completion,
    write_manifest,
)
from dnd_scale.tasks import Task, TaskRecord, check_answers_vary, load_tasks

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100  # label value that torch's cross-entropy (and HF's causal-LM loss) skips


@dataclass
class CollectConfig:
    """How to collect LoRA checkpoints for every task."""

    base_model: str = ""
    """Base model: a Hugging Face model folder, a .gguf file, or a model config.json (random-init model)."""
    lora: LoraSpec = field(default_factory=LoraSpec)
    """The LoRA to train (rank, alpha, target modules, layers); it fixes the checkpoint layout."""
    steps: int = 200
    """Optimizer steps per task."""
    lr: float = 1e-4
    """AdamW learning rate, constant over the run."""
    weight_decay: float = 0.0
    """AdamW weight decay on the LoRA parameters."""
    max_grad_norm: float = 1.0
    """Gradient clipping by global norm; 0 turns clipping off."""
    batch_size: int = 8
    """Records per optimizer step (sampled without replacement within each pass over the task)."""
    max_length: int = 512
    """Tokens per example after the chat template; longer examples are cut at the end."""
    save_every: int = 1
    """Save a checkpoint every this many steps within the trajectory window."""
    save_last: int = 50
    """Trajectory window: checkpoints are taken over the last this many steps (the final step always)."""
    seed: int = 0
    """Seed of the LoRA initialization (the same for every task), of data order and dropout (per task,
    derived from seed and task name) and of a random-init base model."""
    device: str = "auto"
    """"auto" (cuda when available, else cpu), "cpu", "cuda", "cuda:1", ... Under a launcher with several
    ranks, "auto" and "cuda" mean each rank's own GPU (cuda:LOCAL_RANK, or cuda:0 when each rank sees only
    its own); an explicit index is taken as is."""
    dtype: str = "auto"
    """Base model dtype: "auto" (bfloat16 on a GPU that has it, else float32), "float32", "bfloat16",
    "float16". LoRA parameters and checkpoints are float32 in every case."""
    resume_every: int = 50
    """Save the resume state of a task (LoRA, optimizer, RNG, step) every this many steps, besides at each
    checkpoint, so that a killed task loses at most this many steps. It does not change the checkpoints."""

    def __post_init__(self) -> None:
        if isinstance(self.lora, dict):
            self.lora = LoraSpec(**self.lora)
        problems = []
        if self.steps < 1:
            problems.append(f"steps must be >= 1, got {self.steps}")
        if not 1 <= self.save_last <= self.steps:
            problems.append(f"save_last must be between 1 and steps={self.steps}, got {self.save_last}")
        if self.save_every < 1:
            problems.append(f"save_every must be >= 1, got {self.save_every}")
        if self.batch_size < 1:
            problems.append(f"batch_size must be >= 1, got {self.batch_size}")
        if self.max_length < 2:
            problems.append(f"max_length must be >= 2, got {self.max_length}")
        if self.lr <= 0:
            problems.append(f"lr must be > 0, got {self.lr}")
        if self.resume_every < 1:
            problems.append(f"resume_every must be >= 1, got {self.resume_every}")
        if problems:
            raise ValueError("invalid collect config: " + "; ".join(problems))

    def checkpoint_steps(self) -> list[int]:
        """The steps that get a checkpoint: every `save_every` steps back from the last, within `save_last`."""
        first = self.steps - self.save_last + 1
        return [step for step in range(first, self.steps + 1) if (self.steps - step) % self.save_every == 0]


# ----------------------------------------------------------------------------------------------------
# examples: chat template, loss on the response only


def encode_record(tokenizer: Any, record: TaskRecord) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one record, uncut; labels are IGNORE_INDEX on every prompt token.

    The prompt (system + user turn + generation prompt) and the response are tokenized separately
    and concatenated, so the boundary is exact and the model learns to continue exactly the prompt it
    will see at inference. Without a chat template: "system\\n\\nprompt\\n" then response + EOS.
    """
    if record.response is None:
        raise ValueError("record has no response")
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "system", "content": record.system}] if record.system else []
        messages.append({"role": "user", "content": record.prompt})
        prompt_text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        full_text = tokenizer.apply_chat_template(
            messages + [{"role": "assistant", "content": record.response}], tokenize=False
        )
        if not full_text.startswith(prompt_text):
            raise ValueError(
                "the tokenizer's chat template renders the conversation so that it does not start with the "
                "generation prompt; the response tokens cannot be separated from the prompt"
            )
        prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
        response_ids = tokenizer(full_text[len(prompt_text):], add_special_tokens=False)["input_ids"]
    else:
        prompt_text = (f"{record.system}\n\n" if record.system else "") + f"{record.prompt}\n"
        prompt_ids = tokenizer(prompt_text, add_special_tokens=True)["input_ids"]
        response_ids = tokenizer(record.response, add_special_tokens=False)["input_ids"]
        if tokenizer.eos_token_id is not None:
            response_ids = response_ids + [tokenizer.eos_token_id]
    return prompt_ids + response_ids, [IGNORE_INDEX] * len(prompt_ids) + response_ids


def encode_task(tokenizer: Any, task: Task, max_length: int) -> list[tuple[list[int], list[int]]]:
    """Every record of a task encoded and cut to max_length; records left without a response token are
    dropped. Both are counted in a warning."""
    examples, cut, dropped = [], 0, 0
    for index, record in enumerate(task.records):
        if record.response is None:
            raise ValueError(
                f"task {task.name!r} ({task.source}) record {index} has no response; collect trains on "
                "responses, so every record needs one (prompt-only sets serve generate/eval only)"
            )
        input_ids, labels = encode_record(tokenizer, record)
        if len(input_ids) > max_length:
            cut += 1
            input_ids, labels = input_ids[:max_length], labels[:max_length]
        if all(label == IGNORE_INDEX for label in labels):
            dropped += 1
            continue
        examples.append((input_ids, labels))
    if not examples:
        raise ValueError(
            f"task {task.name!r}: no record keeps a response token within max_length={max_length}; raise max_length"
        )
    if cut:
        logger.warning(
            "task %s: %d of %d records are longer than max_length=%d and were cut (%d lost their whole response "
            "and are skipped)", task.name, cut, len(task.records), max_length, dropped,
        )
    return examples


def _collate(examples: list[tuple[list[int], list[int]]], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Right-padded batch; padding is masked out of attention and of the loss."""
    length = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), length), pad_id, dtype=torch.long)  # (B, L)
    labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)  # (B, L)
    attention_mask = torch.zeros((len(examples), length), dtype=torch.long)  # (B, L)
    for row, (ids, labs) in enumerate(examples):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(labs)] = torch.tensor(labs)
        attention_mask[row, : len(ids)] = 1
    return {"input_ids": input_ids.to(device), "labels": labels.to(device), "attention_mask": attention_mask.to(device)}


def _index_stream(count: int, generator: torch.Generator) -> Iterator[int]:
    """Record indices: one random permutation after another, so every record is seen once per pass."""
    while True:
        yield from torch.randperm(count, generator=generator).tolist()


def _task_seed(seed: int, task_name: str) -> int:
    # Derived from the name, not the position, so a task trains the same whatever tasks surround it.
    return int(sha256_text(str(seed), task_name)[:8], 16)


# ----------------------------------------------------------------------------------------------------
# ranks: one process, or one of several started by a launcher

# How long a rank waits for the others: at the end, for the slowest rank's share (the shares differ
# by at most one task, but a task at 70B can take hours). Gloo fails at once when a peer process
# dies (its sockets close), so this only bounds a peer that hangs alive.
PEER_TIMEOUT = timedelta(days=7)


@dataclass(frozen=True)
class Ranks:
    """This process's place among the processes of one `dnd collect` job."""

    rank: int = 0
    """RANK: 0 prepares the run folder and writes the merged manifest."""
    local_rank: int = 0
    """LOCAL_RANK: the rank's index on its node, which picks its GPU."""
    world_size: int = 1
    """WORLD_SIZE: how many processes share the tasks."""

    @classmethod
    def from_environment(cls) -> Ranks:
        """What the deepspeed launcher, torchrun and srun (launchers/) export; a world of one without them."""
        names = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
        found = {name: os.environ[name] for name in names if name in os.environ}
        if not found:
            return cls()
        if "RANK" not in found or "WORLD_SIZE" not in found:
            raise RuntimeError(
                f"the environment sets {', '.join(f'{k}={v}' for k, v in found.items())} but not both RANK and "
                "WORLD_SIZE; start several ranks through deepspeed, torchrun or srun with RANK, WORLD_SIZE and "
                "LOCAL_RANK exported (see launchers/), or unset them to collect in one process"
            )
        try:
            ranks = cls(int(found["RANK"]), int(found.get("LOCAL_RANK", 0)), int(found["WORLD_SIZE"]))
        except ValueError:
            raise RuntimeError(f"RANK, WORLD_SIZE and LOCAL_RANK must be integers, got {found}") from None
        if not 0 <= ranks.rank < ranks.world_size or ranks.local_rank < 0:
            raise RuntimeError(f"RANK must be in [0, WORLD_SIZE) and LOCAL_RANK >= 0, got {found}")
        return ranks

    def device(self, device: str) -> str:
        """The device this rank trains on: with several ranks, "auto" and "cuda" mean cuda:LOCAL_RANK,
        or cuda:0 where the launcher shows each rank only its own GPU (srun --gpus-per-task=1)."""
        if self.world_size == 1 or device not in ("auto", "cuda") or not torch.cuda.is_available():
            return device  # "auto" without a GPU is the CPU; "cuda" without one fails in resolve_device
        count = torch.cuda.device_count()
        index = 0 if count == 1 else self.local_rank
        if index >= count:
            raise RuntimeError(
                f"rank {self.rank} has LOCAL_RANK {self.local_rank}, but it sees {count} GPUs "
                f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); start at most {count} "
                "ranks per node, one per GPU, or show each rank only its own GPU"
            )
        torch.cuda.set_device(index)  # stray allocations land on this rank's GPU too
        return f"cuda:{index}"


@contextlib.contextmanager
def _process_group(ranks: Ranks) -> Iterator[None]:
    """A gloo process group over the ranks: the few messages collect sends are small Python objects
    in CPU memory, and unlike NCCL gloo waits for a slow peer without a watchdog killing the job."""
    missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
    if missing:
        raise RuntimeError(
            f"rank {ranks.rank} of {ranks.world_size}: {' and '.join(missing)} not set; the ranks meet at "
            "MASTER_ADDR:MASTER_PORT (the deepspeed launcher and torchrun set them; under srun export them, "
            "see launchers/slurm_train.sh)"
        )
    if dist.is_initialized():
        # This process already belongs to a group (e.g. an earlier training in the same process): use it
        # when it is the same world, and leave it as it was found.
        if (dist.get_rank(), dist.get_world_size()) != (ranks.rank, ranks.world_size):
            raise RuntimeError(
                f"this process already is rank {dist.get_rank()} of {dist.get_world_size()} in a process group, "
                f"but collect was launched as rank {ranks.rank} of {ranks.world_size}; run collect in its own process"
            )
        yield
        return
    dist.init_process_group("gloo", rank=ranks.rank, world_size=ranks.world_size, timeout=PEER_TIMEOUT)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _deal(pending: Sequence[str], ranks: Ranks) -> list[str]:
    """This rank's share of the unfinished tasks: round robin over their order."""
    return list(pending[ranks.rank :: ranks.world_size])


# ----------------------------------------------------------------------------------------------------
# run folder bookkeeping


def _exclusive(checkpoints: Path) -> contextlib.AbstractContextManager[None]:
    """Refuse a second collect on the same run folder."""
    return exclusive_folder(checkpoints, "dnd collect", "wait for it or use another run folder")


def _remove_temporaries(run_dir: Path) -> None:
    """Temporary files left by a killed run; nothing refers to them (renames never happened). Also the
    resume state of a task killed after its complete.json was written."""
    run = RunDir(run_dir)
    for path in run.checkpoints.rglob(f"*{TMP_SUFFIX}"):
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    remove_stale_builds(run.base_model, "dnd collect")
    for marker in completion_markers(run.checkpoints):
        (marker.parent / RESUME).unlink(missing_ok=True)


def _comparable(config: CollectConfig) -> dict[str, Any]:
    """The config fields that shape the checkpoints (the device and resume_every do not), as plain JSON."""
    fields = asdict(config)
    fields.pop("device")
    fields.pop("resume_every")
    return json.loads(json.dumps(fields))


def _weights_sha256(model: torch.nn.Module) -> str:
    """Hash of a model's weights: proves a re-run re-created the same random-init base."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        # Raw bytes through a uint8 view: exact for every dtype, bfloat16 included (numpy has none).
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _prepare_run(config: CollectConfig, base: BaseModel, layout: LoraLayout, run_dir: Path) -> None:
    """Write collect.json and layout.json on the first run; on a re-run, refuse anything that changed.

    collect.json binds the run once a task is finished (its checkpoints are kept). Before that, a
    collect that failed (a record without a response, an lr that diverges) kept nothing, so the next
    attempt writes collect.json anew from its corrected config.
    """
    checkpoints, base_folder = RunDir(run_dir).checkpoints, RunDir(run_dir).base_model
    meta_path = checkpoints / COLLECT_META
    base_sha = _weights_sha256(base.model) if base.kind == "random-init" else None
    if meta_path.exists() and completion_markers(checkpoints):
        meta = read_collect_meta(checkpoints)
        if meta["layout_fingerprint"] != layout.fingerprint():
            raise LayoutError(
                f"{checkpoints} holds checkpoints of LoRA layout {meta['layout_fingerprint'][:12]} "
                f"(rank {meta['config']['lora']['rank']}), but the base model {config.base_model!r} with LoRA "
                f"spec rank {layout.rank}, modules {list(layout.spec.modules)} gives layout "
                f"{layout.fingerprint()[:12]}; collect into a new run folder, or use the base model and LoRA "
                "spec recorded in collect.json"
            )
        changed = {key: (old, new) for key, new in _comparable(config).items()
                   if (old := meta["config"].get(key)) != new}
        if changed:
            details = ", ".join(f"{key}: {old!r} -> {new!r}" for key, (old, new) in changed.items())
            raise ValueError(
                f"{checkpoints} was collected with another config ({details}); checkpoints of one run must "
                "share it. Use the recorded values or a new run folder."
            )
        if meta.get("base_weights_sha256") != base_sha:
            raise ValueError(
                f"the random-init base model re-created from {config.base_model!r} differs from the one the "
                f"checkpoints in {checkpoints} were trained on (saved in {base_folder}); "
                f"pass {base_folder} as base_model"
            )
        return
    if base.kind == "random-init":
        # Without collect.json nothing refers to a base_model folder yet: it may be stale, so replace it.
        shutil.rmtree(base_folder, ignore_errors=True)
        save_base_model(base, base_folder)
    save_layout(checkpoints, layout)
    write_json(meta_path, {
        "config": _comparable(config),
        "base_model": {"source": base.source, "kind": base.kind,
                       "saved_to": base_folder.name if base.kind == "random-init" else None},
        "base_weights_sha256": base_sha,
        "base_identity": base_identity(base.model),  # carried into the generator's adapters, checked by eval
        "layout_fingerprint": layout.fingerprint(),
    })


def _reconcile_manifest(
    checkpoints: Path, fingerprint: str, names: Sequence[str]
) -> tuple[list[dict[str, Any]], dict[str, list[dict[str, Any]]]]:
    """(manifest lines kept, lines to add per task): keep the lines of finished tasks only (an
    interrupted task is collected again), and find the finished tasks the manifest lacks.

    A task lacks its lines when a multi-process job stopped before rank 0 merged them; its
    complete.json holds them. Those of the tasks in `names` are returned, to be added at their place
    in `names`; any others are added now, by name, after the kept lines.
    """
    path = checkpoints / MANIFEST
    records = read_jsonl(path)
    finished = {task for task in {r["task"] for r in records} if is_complete(checkpoints, task)}
    kept = [r for r in records if r["task"] in finished]
    missing = {}
    for marker in completion_markers(checkpoints):
        if marker.parent.name in finished:
            continue
        lines = read_completion(marker).get("manifest")
        if lines is not None:  # None: a marker without lines, which _is_finished reports
            missing[marker.parent.name] = lines
    foreign = [r for r in [*kept, *(r for lines in missing.values() for r in lines)]
               if r["layout_fingerprint"] != fingerprint]
    if foreign:
        raise LayoutError(
            f"{path}: {len(foreign)} checkpoints (e.g. task {foreign[0]['task']!r} step {foreign[0]['step']}) have "
            f"layout {foreign[0]['layout_fingerprint'][:12]}, not this run's {fingerprint[:12]}; "
            "the folder mixes runs — collect into a new run folder"
        )
    kept += [r for task in sorted(set(missing) - set(names)) for r in missing.pop(task)]
    if path.exists() or kept:
        write_manifest(checkpoints, kept)
    return kept, missing


def _is_finished(task: Task, config: CollectConfig, checkpoints: Path, manifest: list[dict[str, Any]]) -> bool:
    if not is_complete(checkpoints, task.name):
        return False
    done = read_completion(completion_marker(checkpoints, task.name))
    if done["task_fingerprint"] != task.fingerprint():
        raise ValueError(
            f"task {task.name!r} was collected from other records than {task.source!r} gives now; "
            f"delete {checkpoints / task.name} to collect it again, or give the new data another task name"
        )
    steps = [r["step"] for r in manifest if r["task"] == task.name]
    if steps != config.checkpoint_steps():
        raise ArtifactError(
            f"{checkpoints / MANIFEST} lists steps {steps} for finished task {task.name!r}, expected "
            f"{config.checkpoint_steps()}; delete {checkpoints / task.name} to collect it again"
        )
    return True


# ----------------------------------------------------------------------------------------------------
# training


def _train_task(
    model: torch.nn.Module, tokenizer: Any, layout: LoraLayout, task: Task, config: CollectConfig, checkpoints: Path,
    ranks: Ranks, manifest: Path | None,
) -> tuple[torch.nn.Module, list[dict[str, Any]]]:
    """Train one LoRA on `model` and save its trajectory; return the base model with the LoRA removed
    and the task's manifest lines. Each line is appended to `manifest` (a single process) as soon as
    its checkpoint exists; with several ranks `manifest` is None and rank 0 merges the lines later."""
    examples = encode_task(tokenizer, task, config.max_length)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    device = next(model.parameters()).device
    task_seed = _task_seed(config.seed, task.name)
    task_dir = checkpoints / task.name
    save_steps = set(config.checkpoint_steps())
    fingerprint = layout.fingerprint()

    # Every task's LoRA starts from the SAME initialization (kaiming-uniform lora_A from `seed`): the
    # checkpoints of all tasks then share one coordinate system, which is what lets a generator learn
    # across tasks — with per-task inits the lora_A of different tasks are unrelated random matrices
    # and their average, the best a generator can do for an unseen task, is close to zero.
    torch.manual_seed(config.seed)
    peft_model = get_peft_model(model, layout.to_peft_config())
    torch.manual_seed(task_seed)  # dropout: per task
    try:
        named = {name: p for name, p in peft_model.named_parameters() if p.requires_grad}
        params = list(named.values())
        optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
        identity = {"task_fingerprint": task.fingerprint(), "layout_fingerprint": fingerprint,
                    "config": _comparable(config)}
        resumed = _load_resume_state(task_dir, identity, named, optimizer, device)
        if resumed is None:
            shutil.rmtree(task_dir, ignore_errors=True)  # leftovers of an attempt that left no resume state
            start, losses, skipped, lines = 0, [], [], []
        else:
            start, losses, skipped, lines = (resumed["step"], resumed["losses"], resumed["skipped_steps"],
                                             resumed["manifest"])
            kept = {RESUME, *(Path(line["file"]).name for line in lines)}
            for path in task_dir.iterdir():  # checkpoints saved after the resume state are made again
                if path.name not in kept:
                    path.unlink()
            if manifest is not None:  # the re-run dropped the unfinished task's lines; they hold again
                for line in lines:
                    append_jsonl(manifest, line)
            logger.info("task %s: resumed at step %d of %d", task.name, start, config.steps)
        order = _index_stream(len(examples), torch.Generator().manual_seed(task_seed))
        for _ in range(start * config.batch_size):  # the data order is replayed, not stored
            next(order)
        peft_model.train()
        desc = f"collect {task.name}" if ranks.world_size == 1 else f"[rank {ranks.rank}] collect {task.name}"
        with tqdm(total=config.steps, initial=start, desc=desc, unit="step") as bar:
            for step in range(start + 1, config.steps + 1):
                batch = _collate([examples[next(order)] for _ in range(config.batch_size)], pad_id, device)
                loss = peft_model(**batch, use_cache=False).loss  # mean over the batch's response tokens
                loss.backward()
                norm = torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm if config.max_grad_norm > 0 else math.inf)
                losses.append(loss.item())
                if math.isfinite(losses[-1]) and math.isfinite(float(norm)):
                    optimizer.step()
                else:
                    # A non-finite loss or gradient (bf16 overflow on one batch) would turn every weight into
                    # NaN: skip that update, as mixed-precision loss scaling does, and count it.
                    skipped.append(step)
                    if len(skipped) > max(2, config.steps // 20):
                        raise FloatingPointError(
                            f"task {task.name!r}: {len(skipped)} of {step} steps had a non-finite loss or gradient "
                            f"(steps {skipped[:8]}); the LoRA diverges. Lower collect.lr, or collect with dtype float32"
                        )
                optimizer.zero_grad(set_to_none=True)
                bar.set_postfix(loss=f"{losses[-1]:.4f}")
                bar.update()
                if step in save_steps:
                    state = get_peft_model_state_dict(peft_model)
                    layout.check_state_dict(state, f"task {task.name} step {step}")
                    file, sha256 = write_checkpoint(checkpoints, task.name, step, state)
                    # `loss` is the training loss of this step's batch, computed before its update.
                    lines.append({
                        "task": task.name, "step": step, "loss": losses[-1], "seed": config.seed,
                        "layout_fingerprint": fingerprint, "file": file, "sha256": sha256,
                    })
                    if manifest is not None:
                        append_jsonl(manifest, lines[-1])
                if step < config.steps and (step in save_steps or step % config.resume_every == 0):
                    _save_resume_state(task_dir, identity, named, optimizer, device,
                                       {"step": step, "losses": losses, "skipped_steps": skipped, "manifest": lines})
        write_completion(checkpoints, task.name, {
            "task": task.name, "source": task.source, "task_fingerprint": task.fingerprint(),
            "num_records": len(task.records), "steps": config.checkpoint_steps(), "losses": losses,
            "skipped_steps": skipped,
            "manifest": lines,
            "prompt_pool": _save_prompt_pool(task_dir, task),
            "collected_by": {"rank": ranks.rank, "world_size": ranks.world_size, "host": socket.gethostname()},
        })
        (task_dir / RESUME).unlink(missing_ok=True)
    finally:
        # The next task starts from the untouched base whether or not this one succeeded.
        model = peft_model.unload()
        model.eval()
    return model, lines


def _save_prompt_pool(task_dir: Path, task: Task) -> dict[str, Any]:
    """Write the task's prompt pool (prompts only); return its entry in complete.json."""
    path = task_dir / PROMPTS
    with atomic_path(path) as tmp:
        tmp.write_text("".join(json.dumps({"prompt": p}, ensure_ascii=False) + "\n" for p in task.prompts),
                       encoding="utf-8")
    return {"file": PROMPTS, "size": len(task.prompts), "sha256": sha256_file(path)}


def _keep_prompt_pool(checkpoints: Path, task: Task) -> None:
    """A finished task whose prompt pool is missing or damaged (collected before collect kept pools,
    or the file was removed) gets it again: the pool is a function of the task's records, which
    `_is_finished` checked against the task fingerprint."""
    done = read_completion(completion_marker(checkpoints, task.name))
    entry, path = done.get("prompt_pool"), checkpoints / task.name / PROMPTS
    if entry is None or not path.is_file() or sha256_file(path) != entry["sha256"]:
        write_completion(checkpoints, task.name, {**done, "prompt_pool": _save_prompt_pool(checkpoints / task.name, task)})


def _save_resume_state(
    task_dir: Path, identity: dict[str, Any], params: dict[str, torch.nn.Parameter], optimizer: torch.optim.Optimizer,
    device: torch.device, progress: dict[str, Any],
) -> None:
    """Write an unfinished task's training state as one safetensors file (atomically): the LoRA
    parameters, AdamW's moments and step counts, the global RNG state (dropout) and, as JSON metadata,
    `identity` (what the state is valid for) and `progress` (step, losses, skipped steps, manifest lines)."""
    tensors = {f"lora/{name}": param for name, param in params.items()}
    for name, param in params.items():
        for key, value in optimizer.state[param].items():  # empty for a parameter never stepped yet
            tensors[f"adam/{name}/{key}"] = torch.as_tensor(value)
    tensors["rng/cpu"] = torch.get_rng_state()
    if device.type == "cuda":
        tensors["rng/cuda"] = torch.cuda.get_rng_state(device)
    save_safetensors(tensors, task_dir / RESUME, {"resume": json.dumps({**identity, **progress})})


def _load_resume_state(
    task_dir: Path, identity: dict[str, Any], params: dict[str, torch.nn.Parameter], optimizer: torch.optim.Optimizer,
    device: torch.device,
) -> dict[str, Any] | None:
    """Restore the state `_save_resume_state` wrote into the LoRA, the optimizer and the RNG, and return
    its progress; None (nothing restored) when there is none, or it is unreadable, made for another
    config, task or layout, or its checkpoints changed: the task then starts from scratch."""
    path = task_dir / RESUME
    if not path.is_file():
        return None
    try:
        tensors = load_safetensors(path, "resume state")  # safetensors only: never a pickle
        with safe_open(str(path), framework="pt") as f:
            state = json.loads((f.metadata() or {})["resume"])
    except (ArtifactError, KeyError, json.JSONDecodeError) as error:
        logger.warning("task %s: resume state %s is unusable (%s); starting from step 0", task_dir.name, path, error)
        return None
    problem = None
    if {key: state.get(key) for key in identity} != identity:
        problem = "it was saved for another config, task data or LoRA layout"
    elif any(tensors.get(f"lora/{name}", torch.empty(0)).shape != param.shape for name, param in params.items()):
        problem = "its LoRA parameters do not match this LoRA"
    elif any(not (task_dir.parent / line["file"]).is_file()
             or sha256_file(task_dir.parent / line["file"]) != line["sha256"] for line in state["manifest"]):
        problem = "a checkpoint it lists is missing or changed"
    if problem:
        logger.warning("task %s: resume state %s is not used: %s; starting from step 0", task_dir.name, path, problem)
        return None
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(tensors[f"lora/{name}"])
    optimizer_state = {}
    for index, name in enumerate(params):
        prefix = f"adam/{name}/"
        moments = {key[len(prefix):]: value for key, value in tensors.items() if key.startswith(prefix)}
        if moments:
            optimizer_state[index] = moments
    optimizer.load_state_dict({"state": optimizer_state, "param_groups": optimizer.state_dict()["param_groups"]})
    torch.set_rng_state(tensors["rng/cpu"])
    if device.type == "cuda" and "rng/cuda" in tensors:
        torch.cuda.set_rng_state(tensors["rng/cuda"], device)
    return state


def collect(config: CollectConfig, tasks: Sequence[Task], run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Collect the checkpoint trajectory of every task into `<run_dir>/checkpoints`; return their manifest lines.

    Finished tasks are skipped; an interrupted task resumes from its resume state (from scratch without one). Under a launcher
    (WORLD_SIZE > 1) every rank calls this with the same arguments and trains its share of the tasks
    (see the module docstring); rank 0 returns the manifest lines of all `tasks`, another rank those
    of the tasks it trained.
    """
    names = [task.name for task in tasks]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"task names must be unique within a run, found duplicates {duplicates}")
    if not config.base_model:
        raise ValueError("collect needs base_model: a model folder, a .gguf file or a model config.json")
    for task in tasks:
        check_answers_vary(task)
    ranks = Ranks.from_environment()
    if ranks.world_size > 1:
        return _collect_as_rank(config, tasks, Path(run_dir), ranks)
    run_dir = Path(run_dir)
    checkpoints = store_dir(run_dir)
    checkpoints.mkdir(parents=True, exist_ok=True)
    with _exclusive(checkpoints):
        _remove_temporaries(run_dir)
        base = load_base_model(config.base_model, dtype=config.dtype, device=config.device, seed=config.seed)
        layout = LoraLayout.from_config(base.model.config, config.lora)
        _prepare_run(config, base, layout, run_dir)
        manifest, missing = _reconcile_manifest(checkpoints, layout.fingerprint(), names)
        model = base.model
        for task in tasks:
            if _is_finished(task, config, checkpoints, manifest + missing.get(task.name, [])):
                logger.info("task %s: already collected, skipped", task.name)
                _keep_prompt_pool(checkpoints, task)
                for record in missing.get(task.name, []):  # finished by a rank of a job that stopped early
                    append_jsonl(checkpoints / MANIFEST, record)
                continue
            # An interrupted attempt's manifest lines were dropped above; _train_task resumes it or clears it.
            model, _ = _train_task(model, base.tokenizer, layout, task, config, checkpoints, ranks,
                                   manifest=checkpoints / MANIFEST)
    return [record for record in read_manifest(run_dir) if record["task"] in names]


def _collect_as_rank(config: CollectConfig, tasks: Sequence[Task], run_dir: Path, ranks: Ranks) -> list[dict[str, Any]]:
    """One rank's part of a multi-process collect: rank 0 prepares, every rank trains its share, rank 0 merges."""
    checkpoints = store_dir(run_dir)
    names = [task.name for task in tasks]
    device = ranks.device(config.device)
    with _process_group(ranks), contextlib.ExitStack() as held:
        # 1. Rank 0 prepares the folder as a single process would; the others load the base meanwhile
        #    and wait for its list of unfinished tasks, so nobody writes into an unprepared folder.
        plan: list[Any] = [None]
        if ranks.rank == 0:
            try:
                checkpoints.mkdir(parents=True, exist_ok=True)
                held.enter_context(_exclusive(checkpoints))  # held until the merged manifest is written
                _remove_temporaries(run_dir)
                base = load_base_model(config.base_model, dtype=config.dtype, device=device, seed=config.seed)
                layout = LoraLayout.from_config(base.model.config, config.lora)
                _prepare_run(config, base, layout, run_dir)
                manifest, missing = _reconcile_manifest(checkpoints, layout.fingerprint(), names)
                pending = []
                for task in tasks:
                    if _is_finished(task, config, checkpoints, manifest + missing.get(task.name, [])):
                        _keep_prompt_pool(checkpoints, task)
                    else:
                        pending.append(task.name)
                plan = [{"pending": pending}]
            except Exception as error:
                dist.broadcast_object_list([{"error": f"{type(error).__name__}: {error}"}], src=0)
                raise
            dist.broadcast_object_list(plan, src=0)
        else:
            base = load_base_model(config.base_model, dtype=config.dtype, device=device, seed=config.seed)
            layout = LoraLayout.from_config(base.model.config, config.lora)
            dist.broadcast_object_list(plan, src=0)
            if "error" in plan[0]:
                raise RuntimeError(f"rank 0 could not start the collection in {checkpoints}: {plan[0]['error']}")
        pending = plan[0]["pending"]

        # 2. This rank's share; only the owner of a task writes into its folder.
        by_name = {task.name: task for task in tasks}
        model, collected = base.model, {}
        for name in _deal(pending, ranks):
            model, collected[name] = _train_task(model, base.tokenizer, layout, by_name[name], config, checkpoints,
                                                 ranks, manifest=None)

        # 3. Rank 0 writes the manifest once: the lines it kept, then this job's tasks in the order given.
        #    The lines travel through the process group, not the filesystem, so a shared filesystem that
        #    shows another node's new files late cannot drop them.
        parts: list[Any] | None = [None] * ranks.world_size if ranks.rank == 0 else None
        dist.gather_object(collected, parts, dst=0)
        if ranks.rank != 0:
            return [record for lines in collected.values() for record in lines]
        new = {name: lines for part in parts for name, lines in part.items()}
        manifest += [record for name in names for record in missing.get(name, new.get(name, []))]
        write_manifest(checkpoints, manifest)
    return [record for record in manifest if record["task"] in names]


# ----------------------------------------------------------------------------------------------------
# command line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="dnd collect",
        description="Train a LoRA per task and keep a trajectory of checkpoints in <run>/checkpoints. "
                    "Overrides: --collect.field=value (e.g. --collect.steps=300 --collect.lora.rank=16).",
    )
    parser.add_argument("--run", required=True, help="run folder; checkpoints go to <run>/checkpoints")
    parser.add_argument("--config", help="YAML recipe; its `collect:` section and `tasks:` list are read "
                                         "(default: the recipe saved in the run folder)")
    parser.add_argument("--tasks", nargs="+", metavar="SPEC",
                        help="task specs (default: the recipe's tasks): file.json, file.jsonl, hf:name[:split], "
                             "synthetic:family")
    parser.add_argument("--synthetic-records", type=int,
                        help="records per synthetic task (default: the recipe's synthetic_records)")
    # The deepspeed launcher appends --local_rank unless given --no_local_rank; the rank comes from
    # the environment either way.
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    # The recipe machinery imports every stage's config; only the command line needs it.
    from dnd_scale.recipe import parse_stage_args

    args, run = parse_stage_args(parser, argv, "collect", lambda args: {
        "tasks": args.tasks, "synthetic_records": args.synthetic_records})
    if not run.tasks:
        parser.error("no tasks: pass --tasks SPEC ... or list them under `tasks:` in the recipe")
    config = run.collect
    tasks = load_tasks(run.tasks, num_records=run.synthetic_records, seed=config.seed)
    records = collect(config, tasks, args.run)
    ranks = Ranks.from_environment()
    if ranks.rank == 0:
        print(f"dnd collect: {len(tasks)} tasks, {len(records)} checkpoints -> {store_dir(args.run)}")
    else:
        collected = len({record["task"] for record in records})
        print(f"dnd collect: rank {ranks.rank} of {ranks.world_size} collected {collected} tasks")
    return 0
