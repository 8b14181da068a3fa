"""A task's records as causal-LM training examples for its LoRA: the chat template, the loss on the
response tokens only, and right-padded batches."""

from __future__ import annotations

import logging
from typing import Any

import torch

from dnd_scale.tasks import Task, TaskRecord

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100  # label value that torch's cross-entropy (and HF's causal-LM loss) skips


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


def collate(examples: list[tuple[list[int], list[int]]], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
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
