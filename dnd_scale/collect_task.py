"""One task's LoRA trajectory: train a fresh LoRA on the frozen base and save its checkpoints into the
checkpoint store, resumably.

The LoRA (peft, `layout.to_peft_config()`) is trained with AdamW on the task's examples
(`collect_examples`: the loss on the response tokens only) and saved at `CollectConfig.checkpoint_steps`.
Every task's LoRA starts from the same initialization (seed `seed`); its data order and dropout
derive from (seed, task name), never from its position or the rank that trains it.

Resume: the task's resume state (`store.RESUME`, one file, written atomically) is saved at each of
its checkpoints and every `resume_every` steps: the LoRA, the AdamW moments, the dropout RNG state,
the step (the data order is replayed up to it), the losses, skipped steps and manifest lines so
far. A re-run restores it and drops the task's files saved after that step; without a usable resume
state the task restarts from scratch. Either way the result equals that of an uninterrupted run (bit
for bit on CPU, where training is deterministic for a seed). The completion marker
(`store.COMPLETE`) is written after the last checkpoint, with the task's prompt pool
(`store.PROMPTS`) beside it.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import socket
from pathlib import Path
from typing import Any, Iterator

import torch
from peft import get_peft_model, get_peft_model_state_dict
from safetensors import safe_open
from tqdm.auto import tqdm

from dnd_scale.collect_config import CollectConfig
from dnd_scale.collect_examples import collate, encode_task
from dnd_scale.collect_ranks import Ranks
from dnd_scale.io import ArtifactError, append_jsonl, atomic_path, load_safetensors, save_safetensors, sha256_file, sha256_text
from dnd_scale.layout import LoraLayout
from dnd_scale.store import PROMPTS, RESUME, completion_marker, read_completion, write_checkpoint, write_completion
from dnd_scale.tasks import Task

logger = logging.getLogger(__name__)


def _index_stream(count: int, generator: torch.Generator) -> Iterator[int]:
    """Record indices: one random permutation after another, so every record is seen once per pass."""
    while True:
        yield from torch.randperm(count, generator=generator).tolist()


def _task_seed(seed: int, task_name: str) -> int:
    # Derived from the name, not the position, so a task trains the same whatever tasks surround it.
    return int(sha256_text(str(seed), task_name)[:8], 16)


def train_task(
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
                    "config": config.checkpoint_fields()}
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
                batch = collate([examples[next(order)] for _ in range(config.batch_size)], pad_id, device)
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
            "prompt_pool": save_prompt_pool(task_dir, task),
            "collected_by": {"rank": ranks.rank, "world_size": ranks.world_size, "host": socket.gethostname()},
        })
        (task_dir / RESUME).unlink(missing_ok=True)
    finally:
        # The next task starts from the untouched base whether or not this one succeeded.
        model = peft_model.unload()
        model.eval()
    return model, lines


def save_prompt_pool(task_dir: Path, task: Task) -> dict[str, Any]:
    """Write the task's prompt pool (prompts only); return its entry in the completion marker."""
    path = task_dir / PROMPTS
    with atomic_path(path) as tmp:
        tmp.write_text("".join(json.dumps({"prompt": p}, ensure_ascii=False) + "\n" for p in task.prompts),
                       encoding="utf-8")
    return {"file": PROMPTS, "size": len(task.prompts), "sha256": sha256_file(path)}


def keep_prompt_pool(checkpoints: Path, task: Task) -> None:
    """A finished task whose prompt pool is missing or damaged (collected before collect kept pools,
    or the file was removed) gets it again: the pool is a function of the task's records, which
    `collect_folder.is_finished` checked against the task fingerprint."""
    done = read_completion(completion_marker(checkpoints, task.name))
    entry, path = done.get("prompt_pool"), checkpoints / task.name / PROMPTS
    if entry is None or not path.is_file() or sha256_file(path) != entry["sha256"]:
        write_completion(checkpoints, task.name, {**done, "prompt_pool": save_prompt_pool(checkpoints / task.name, task)})


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
