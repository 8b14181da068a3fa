"""`dnd eval`: accuracy of the base model, training LoRAs and generated adapters on held-out tasks.

Scoring (mode "loglik", the default, deterministic): each scorable record is a multiple-choice or
True/False item with `options` and an `answer` (see below). Every option is placed as the
assistant's reply in the conversation the tokenizer's chat template renders (system message when
the record has one), and its log-likelihood is the sum of the log-probabilities of the option's own
tokens — the prompt and whatever the template appends after the reply (end-of-turn) are context,
never scored. Prediction = the option with the highest sum ("accuracy"); the option with the highest
mean per token is reported beside it ("accuracy_norm"). Ties go to the first option. Without a chat
template the prompt is rendered as `dnd collect` trains on it ("system\\n\\nprompt\\n").

Mode "generate": greedy decoding from the generation prompt. A multiple-choice or True/False item
is correct when the option parsed from the reply (`parse_choice`: the first bracketed option such as
`[B]`, else a reply that opens with an option's bare label, e.g. `B.` or `true`) is its answer; a
reply naming no option counts as wrong and is counted as "unparsed". A free-text item is correct
when the generated text equals its response after normalization (whitespace collapsed, case folded).

Options of the DnD data files (../shared/data/dnd) are derived from the prompt by
`dnd_scale.tasks.infer_options`, only when the response is bracketed; the scored options are the
bracketed labels the models are trained to reply with (`[A]`, `[True]`), not the option texts:

- ARC-c, ARC-e: `A: ...` lines after the question, response `[C]`; a few items label 1–4 instead of
  A–D (options `[1]`…`[4]`), a few have 3 or 5 options — the run of consecutive labels is kept.
- OBQA: four `A: ...` lines; the trailing "choosing from [A]/[B]/[C]/[D]" sentence is not an option.
- WinoGrande: two lines `A:`/`B:`, so two options even though the instruction names [C]/[D];
  WinoGrande_test has no responses (counted as "no_answer").
- PIQA: two lines `A:`/`B:`. PIQA_test's labels are hidden (all `[A]`): a warning says so.
- BoolQ: no options in the prompt; a `[True]`/`[False]` response gives the options `[True]`, `[False]`.
- science-dataset: inline after `choices:` as `A: x, B: y, ...`.

A record that cannot be scored is counted by reason in results.json and skipped, never guessed:
"no_answer" (no response, e.g. hidden test labels), "no_options" (loglik mode: a free-text response,
or a bracketed answer whose options cannot be read from the prompt), "too_long" (context + option
over `max_length` tokens; never cut, since a cut prompt would change the question).

Adapters are PEFT folders (`adapter_config.json` + `adapter_model.safetensors`, optionally
`provenance.json`) or `dnd collect` checkpoints (`<run>/checkpoints/<task>/<step>.safetensors`, whose
layout is `<run>/checkpoints/layout.json`). The base model is loaded once; each adapter is applied
with `PeftModel.from_pretrained` and removed again with `unload()`. Before any scoring, every
adapter's layout (keys, shapes, and the fingerprint in provenance.json) is checked against the
layout the base model gives for that adapter's LoRA spec, and the base model it was made for (its
family and a sample of its weights, `basemodel.base_identity`, which collect records in collect.json
and generate copies into provenance.json) against this base model: an adapter of another seed or
family of the same shapes is refused unless `allow_other_base` (`--allow-other-base`).

Outputs (`write_report`): results.json (every number, the config, the adapters), results.md (a table
per metric: base / each adapter group as mean ± std (best) per task) and accuracy.png.
"""

from __future__ import annotations

import argparse
import glob
import contextlib
import logging
import math
import os
import random
import re
import statistics
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal, Mapping, Sequence

import torch
from tqdm.auto import tqdm

from dnd_scale.basemodel import BaseModel, base_identity, identity_mismatch, load_base_model
from dnd_scale.collect import COLLECT_META
from dnd_scale.export import ADAPTER_CONFIG, ADAPTER_WEIGHTS, PROVENANCE, write_adapter
from dnd_scale.io import ArtifactError, atomic_path, load_safetensors, read_json, read_jsonl, sha256_file, write_json
from dnd_scale.layout import LayoutError, LoraLayout, LoraSpec
from dnd_scale.tasks import Task, TaskRecord, load_task

logger = logging.getLogger(__name__)

BASE_LABEL = "base"
SKIP_REASONS = ("no_answer", "no_options", "too_long")
METRICS = {"loglik": ("accuracy", "accuracy_norm", "answer_logprob_mean"), "generate": ("accuracy",)}
REPORT_FILES = ("results.json", "results.md", "accuracy.png")
# A collect checkpoint's layout and manifest live two folders up: <run>/checkpoints/<task>/<step>.safetensors.
COLLECT_LAYOUT = "layout.json"
COLLECT_MANIFEST = "manifest.jsonl"
# PEFT key of one adapted linear layer of a decoder layer: ...<layers>.<i>.<self_attn|mlp>.<name>.lora_<A|B>.weight
_PEFT_KEY = re.compile(r"\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_[AB]\.weight$")
_LABEL = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]*$")
# Tasks whose answers are all the same label this often are most likely hidden labels (PIQA_test).
_HIDDEN_LABELS_MIN_RECORDS = 20


@dataclass
class EvalConfig:
    """How `dnd eval` scores the base model and the adapters."""

    mode: Literal["loglik", "generate"] = "loglik"
    """"loglik": compare the log-likelihood of each option (deterministic, the main number);
    "generate": greedy decoding, exact match with the reference after normalization."""
    max_records: int | None = None
    """Score at most this many scorable records per task: a seeded random subsample, the same for
    every model. None scores them all."""
    seed: int = 0
    """Seed of the subsample (combined with the task name, so tasks get independent subsamples)."""
    batch_size: int = 32
    """Sequences per forward pass: (record, option) pairs in loglik mode, prompts in generate mode."""
    max_length: int = 2048
    """Most tokens of context + option (or prompt + generated tokens); longer records are skipped and
    counted as "too_long"."""
    max_new_tokens: int = 16
    """Generate mode: the most tokens generated per prompt (generation also stops at end-of-turn)."""
    dtype: str = "auto"
    """Base model dtype: "auto" (bfloat16 on a GPU that has it, else float32), "float32", "bfloat16",
    "float16". Log-probabilities are always computed in float32 from the logits."""
    device: str = "auto"
    """"auto" (cuda when available, else cpu), "cpu", "cuda", "cuda:1", ..."""
    task_records: int = 256
    """Records per synthetic family (`synthetic:<family>` specs only; files are read whole)."""
    task_seed: int = 1
    """Seed of synthetic family records; keep it different from collect's seed, so that eval items
    are not the items the training LoRAs saw."""
    base_seed: int = 0
    """Init seed of a random-init base model (base given as a config.json). Prefer the HF folder
    `dnd collect` writes to <run>/base_model, which holds the exact weights the LoRAs were trained on."""
    allow_other_base: bool = False
    """Score adapters whose recorded base model (provenance.json, or collect.json of a checkpoint)
    is another model of the same shapes (another seed or family) anyway, with a warning; off: refused."""

    def __post_init__(self) -> None:
        problems = []
        if self.mode not in METRICS:
            problems.append(f"mode must be one of {sorted(METRICS)}, got {self.mode!r}")
        if self.max_records is not None and self.max_records < 1:
            problems.append(f"max_records must be >= 1 or None, got {self.max_records}")
        for name in ("batch_size", "max_new_tokens", "task_records"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_length < 2:
            problems.append(f"max_length must be >= 2, got {self.max_length}")
        if problems:
            raise ValueError("invalid eval config: " + "; ".join(problems))


# ----------------------------------------------------------------------------------------------------
# records: which ones can be scored, and their tokens


@dataclass(frozen=True)
class EvalItem:
    """One scorable record, tokenized once and scored under every model."""

    record: int
    """Index of the record in its task."""
    options: tuple[str, ...]
    """Candidate replies (empty for a free-text item in generate mode)."""
    answer: int | None
    """Index of the correct option; None for a free-text item."""
    reference: str
    """Generate mode: the text a correct generation equals after normalization."""
    contexts: tuple[tuple[int, ...], ...]
    """Loglik mode, per option: token ids of the conversation up to where the reply starts."""
    continuations: tuple[tuple[int, ...], ...]
    """Loglik mode, per option: token ids of the option itself (the only scored tokens)."""
    prompt: tuple[int, ...]
    """Generate mode: token ids of the generation prompt."""


@dataclass
class PreparedTask:
    """A task's scorable records, tokenized, and the count of the ones that were skipped."""

    task: Task
    """The task."""
    items: list[EvalItem]
    """The records that are scored, in record order."""
    skipped: dict[str, int]
    """Records not scored, by reason (SKIP_REASONS)."""
    scorable: int
    """Records this mode could score before the subsample (and before "too_long")."""
    warnings: list[str] = field(default_factory=list)
    """What the reader of the results must know (e.g. labels that look hidden)."""


def select_records(task: Task, mode: str) -> tuple[list[int], dict[str, int]]:
    """Indices of the records `mode` can score, and the number of the others by reason."""
    selected, skipped = [], dict.fromkeys(SKIP_REASONS, 0)
    for index, record in enumerate(task.records):
        if record.answer is None and record.response is None:
            skipped["no_answer"] += 1
        elif mode == "loglik" and (record.options is None or record.answer is None):
            skipped["no_options"] += 1
        else:
            selected.append(index)
    return selected, skipped


def subsample(indices: list[int], max_records: int | None, seed: int, task_name: str) -> list[int]:
    """A seeded random subset of at most `max_records` indices, in their original order."""
    if max_records is None or len(indices) <= max_records:
        return list(indices)
    # A string seed is hashed with sha512 by `random`: stable across processes and platforms.
    rng = random.Random(f"{seed}/{task_name}")
    return sorted(rng.sample(indices, max_records))


def render_context(tokenizer: Any, record: TaskRecord, reply: str | None) -> str:
    """The conversation's text before the assistant's reply (the generation prompt when `reply` is None).

    With a reply, the conversation is rendered with it and cut where the reply's text starts, so any
    text a template puts in front of the reply (e.g. an empty thinking block) stays in the context.
    """
    messages = [{"role": "system", "content": record.system}] if record.system else []
    messages.append({"role": "user", "content": record.prompt})
    prompt_text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if reply is None:
        return prompt_text
    full_text = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": reply}], tokenize=False)
    start = full_text.find(reply, len(prompt_text)) if full_text.startswith(prompt_text) else -1
    if start < 0:
        raise ValueError(
            f"the tokenizer's chat template does not render the assistant reply {reply!r} verbatim after the "
            "generation prompt, so its tokens cannot be scored; use a tokenizer whose template keeps the reply text"
        )
    return full_text[:start]


def encode_context(tokenizer: Any, record: TaskRecord, reply: str | None) -> list[int]:
    """Token ids of the context of `reply` (see `render_context`); without a chat template, the plain
    rendering `dnd collect` trains on: "system\\n\\nprompt\\n" with the tokenizer's special tokens."""
    if getattr(tokenizer, "chat_template", None):
        # The template writes its own special tokens (BOS included) into the text.
        return tokenizer(render_context(tokenizer, record, reply), add_special_tokens=False)["input_ids"]
    text = (f"{record.system}\n\n" if record.system else "") + f"{record.prompt}\n"
    return tokenizer(text, add_special_tokens=True)["input_ids"]


def encode_item(tokenizer: Any, index: int, record: TaskRecord, mode: str) -> EvalItem:
    """Tokenize one selected record for `mode`."""
    options = tuple(record.options or ())
    answer = options.index(record.answer) if record.answer is not None and options else None
    reference = record.answer if record.answer is not None else record.response
    contexts: list[tuple[int, ...]] = []
    continuations: list[tuple[int, ...]] = []
    prompt: tuple[int, ...] = ()
    if mode == "loglik":
        for option in options:
            contexts.append(tuple(encode_context(tokenizer, record, option)))
            continuations.append(tuple(tokenizer(option, add_special_tokens=False)["input_ids"]))
            if not contexts[-1] or not continuations[-1]:
                raise ValueError(f"record {index}: option {option!r} or its prompt tokenizes to no tokens")
    else:
        prompt = tuple(encode_context(tokenizer, record, None))
    return EvalItem(index, options, answer, str(reference), tuple(contexts), tuple(continuations), prompt)


def item_length(item: EvalItem, config: EvalConfig) -> int:
    """Tokens the item needs in one sequence (its longest option, or the prompt plus the generation)."""
    if config.mode == "loglik":
        return max(len(c) + len(o) for c, o in zip(item.contexts, item.continuations))
    return len(item.prompt) + config.max_new_tokens


def prepare_task(task: Task, tokenizer: Any, config: EvalConfig) -> PreparedTask:
    """Select, subsample and tokenize the records of one task (once, for every model)."""
    selected, skipped = select_records(task, config.mode)
    if not selected:
        raise ValueError(
            f"task {task.name!r} ({task.source}) has no record that {config.mode} mode can score "
            f"(of {len(task.records)}: {skipped}); loglik mode needs multiple-choice or True/False records with "
            "answers (options as 'A: ...' lines and responses like '[B]'), generate mode needs responses"
        )
    items = []
    for index in subsample(selected, config.max_records, config.seed, task.name):
        item = encode_item(tokenizer, index, task.records[index], config.mode)
        if item_length(item, config) > config.max_length:
            skipped["too_long"] += 1
            continue
        items.append(item)
    if not items:
        raise ValueError(
            f"task {task.name!r}: every selected record is longer than max_length={config.max_length} tokens; "
            "raise max_length"
        )
    prepared = PreparedTask(task, items, skipped, scorable=len(selected))
    answers = {item.reference for item in items}
    if config.mode == "loglik" and len(items) >= _HIDDEN_LABELS_MIN_RECORDS and len(answers) == 1:
        prepared.warnings.append(
            f"all {len(items)} scored answers of task {task.name!r} are {answers.pop()!r}: the labels look hidden "
            "(as in PIQA_test); its accuracy measures a bias towards that option, not the task"
        )
    if skipped["too_long"]:
        prepared.warnings.append(
            f"{skipped['too_long']} records of task {task.name!r} are longer than max_length={config.max_length} "
            "tokens and were skipped"
        )
    for warning in prepared.warnings:
        logger.warning(warning)
    return prepared


# ----------------------------------------------------------------------------------------------------
# scoring


def _model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _pad_id(tokenizer: Any) -> int:
    # Padding is masked out of attention and never scored; any valid id serves.
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return int(token_id)
    return 0


def _left_padded(sequences: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Left-padded batch, so that every sequence ends at the last column; positions restart at each row's
    first real token, so padding changes no position."""
    length = max(len(seq) for seq in sequences)
    input_ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)  # (B, L)
    attention_mask = torch.zeros((len(sequences), length), dtype=torch.long)  # (B, L)
    for row, seq in enumerate(sequences):
        input_ids[row, length - len(seq):] = torch.tensor(seq, dtype=torch.long)
        attention_mask[row, length - len(seq):] = 1
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # (B, L)
    return {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device),
            "position_ids": position_ids.to(device)}


@torch.inference_mode()
def score_continuations(
    model: torch.nn.Module,
    pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
    *,
    batch_size: int,
    pad_id: int,
    desc: str = "scoring",
) -> list[tuple[float, int]]:
    """(sum of log p(continuation token | everything before it), number of continuation tokens) per
    (context, continuation) pair; only the continuation's tokens are scored."""
    device = _model_device(model)
    # Similar lengths share a batch (less padding); the stable sort keeps the batches reproducible.
    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][0]) + len(pairs[i][1]))
    scores: list[tuple[float, int]] = [(0.0, 0)] * len(pairs)
    for start in tqdm(range(0, len(order), batch_size), desc=desc, leave=False, disable=len(order) <= batch_size):
        rows = order[start:start + batch_size]
        batch = _left_padded([list(pairs[i][0]) + list(pairs[i][1]) for i in rows], pad_id, device)
        counts = torch.tensor([len(pairs[i][1]) for i in rows], device=device)  # (B,)
        # Only the last `keep` positions' logits are needed: those predicting the continuations.
        keep = int(counts.max()) + 1
        logits = model(**batch, logits_to_keep=keep, use_cache=False).logits  # (B, keep, V)
        logprobs = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # (B, keep-1, V): predicts the last keep-1 tokens
        targets = batch["input_ids"][:, -(keep - 1):]  # (B, keep-1)
        token_logprobs = logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (B, keep-1)
        scored = torch.arange(keep - 1, device=device) >= (keep - 1 - counts)[:, None]  # (B, keep-1)
        sums = torch.where(scored, token_logprobs, 0.0).sum(-1)  # (B,)
        for row, index in enumerate(rows):
            scores[index] = (float(sums[row]), int(counts[row]))
    return scores


def score_loglik(model: torch.nn.Module, tokenizer: Any, prepared: PreparedTask, config: EvalConfig) -> dict[str, Any]:
    """Accuracy of one model on one task by option log-likelihood (sum, and mean per token)."""
    pairs = [(c, o) for item in prepared.items for c, o in zip(item.contexts, item.continuations)]
    scores = iter(score_continuations(model, pairs, batch_size=config.batch_size, pad_id=_pad_id(tokenizer),
                                      desc=prepared.task.name))
    predictions, predictions_norm, answer_logprobs = [], [], []
    for item in prepared.items:
        option_scores = [next(scores) for _ in item.options]
        sums = [total for total, _ in option_scores]
        means = [total / count for total, count in option_scores]
        # max() over indices returns the first maximum: ties go to the first option.
        predictions.append(max(range(len(sums)), key=sums.__getitem__))
        predictions_norm.append(max(range(len(means)), key=means.__getitem__))
        answer_logprobs.append(sums[item.answer])
    answers = [item.answer for item in prepared.items]
    correct = sum(p == a for p, a in zip(predictions, answers))
    correct_norm = sum(p == a for p, a in zip(predictions_norm, answers))
    count = len(prepared.items)
    return {
        "count": count,
        "correct": correct,
        "accuracy": correct / count,
        "ci95": wilson_interval(correct, count),
        "correct_norm": correct_norm,
        "accuracy_norm": correct_norm / count,
        "answer_logprob_mean": statistics.fmean(answer_logprobs),
        "predictions": predictions,
        "predictions_norm": predictions_norm,
    }


def wilson_interval(correct: int, count: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of an accuracy `correct / count` (95% for z = 1.96): unlike the
    normal approximation it stays inside [0, 1] and is honest at accuracies near 0 or 1."""
    if count < 1:
        raise ValueError(f"an interval needs at least one scored record, got count={count}")
    p = correct / count
    centre = (p + z * z / (2 * count)) / (1 + z * z / count)
    half = z / (1 + z * z / count) * math.sqrt(p * (1 - p) / count + z * z / (4 * count * count))
    return max(0.0, centre - half), min(1.0, centre + half)


def normalize_answer(text: str) -> str:
    """Whitespace collapsed and case folded: what generate mode compares."""
    return " ".join(text.split()).casefold()


def _stop_token_ids(model: torch.nn.Module, tokenizer: Any) -> list[int]:
    """End-of-turn ids: the tokenizer's EOS and whatever the model's generation config lists."""
    ids = [] if tokenizer.eos_token_id is None else [int(tokenizer.eos_token_id)]
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for token_id in configured if isinstance(configured, list) else [configured]:
        if token_id is not None and int(token_id) not in ids:
            ids.append(int(token_id))
    return ids


@torch.inference_mode()
def generate_replies(
    model: torch.nn.Module, tokenizer: Any, prompts: Sequence[Sequence[int]], *, batch_size: int, max_new_tokens: int,
    desc: str = "generating",
) -> list[str]:
    """Greedy replies to token-id prompts, decoded without special tokens."""
    device, pad_id = _model_device(model), _pad_id(tokenizer)
    stop = _stop_token_ids(model, tokenizer)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    replies = [""] * len(prompts)
    for start in tqdm(range(0, len(order), batch_size), desc=desc, leave=False, disable=len(order) <= batch_size):
        rows = order[start:start + batch_size]
        batch = _left_padded([prompts[i] for i in rows], pad_id, device)
        batch.pop("position_ids")  # generate derives positions from the attention mask at every step
        output = model.generate(
            **batch, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, pad_token_id=pad_id,
            eos_token_id=stop or None,
        )  # (B, L + new)
        new_tokens = output[:, batch["input_ids"].shape[1]:]  # (B, new)
        for row, index in enumerate(rows):
            replies[index] = tokenizer.decode(new_tokens[row], skip_special_tokens=True)
    return replies


def parse_choice(reply: str, options: Sequence[str]) -> int | None:
    """Index of the option a greedy reply names, or None.

    Options are bracketed labels (`[A]`, `[True]`). The first bracketed label of an option found
    anywhere in the reply wins; otherwise a reply whose first word is an option's bare label (`B`,
    `B.`, `B:`, `(B)`, `True`) names it; case is ignored.
    """
    labels = [option[1:-1] if option.startswith("[") and option.endswith("]") else option for option in options]
    folded = [label.casefold() for label in labels]
    found = [(m.start(), folded.index(m.group(1).casefold()))
             for m in re.finditer(r"\[([^\[\]]+)\]", reply) if m.group(1).casefold() in folded]
    if found:
        return min(found)[1]
    first = re.match(r"\s*\(?([A-Za-z0-9]+)\b", reply)
    if first is not None and first.group(1).casefold() in folded:
        return folded.index(first.group(1).casefold())
    return None


def score_generate(
    model: torch.nn.Module, tokenizer: Any, prepared: PreparedTask, config: EvalConfig
) -> dict[str, Any]:
    """Accuracy of one model's greedy replies on one task: the parsed option for option items, exact
    match after normalization for free-text items."""
    replies = generate_replies(model, tokenizer, [item.prompt for item in prepared.items], batch_size=config.batch_size,
                               max_new_tokens=config.max_new_tokens, desc=prepared.task.name)
    hits, predictions = [], []
    for reply, item in zip(replies, prepared.items):
        if item.options:
            predictions.append(parse_choice(reply, item.options))
            hits.append(predictions[-1] is not None and predictions[-1] == item.answer)
        else:
            predictions.append(None)
            hits.append(normalize_answer(reply) == normalize_answer(item.reference))
    count = len(prepared.items)
    unparsed = sum(1 for item, p in zip(prepared.items, predictions) if item.options and p is None)
    return {"count": count, "correct": sum(hits), "accuracy": sum(hits) / count,
            "ci95": wilson_interval(sum(hits), count), "unparsed": unparsed,
            "predictions": predictions, "generations": replies}


def score_model(
    model: torch.nn.Module, tokenizer: Any, tasks: Sequence[PreparedTask], config: EvalConfig
) -> dict[str, Any]:
    """Metrics of one model (base or adapted) on every task."""
    model.eval()  # no dropout: scores are a deterministic function of the weights
    score = score_loglik if config.mode == "loglik" else score_generate
    return {prepared.task.name: score(model, tokenizer, prepared, config) for prepared in tasks}


# ----------------------------------------------------------------------------------------------------
# adapters: layout check against the base model, apply and remove


@dataclass(frozen=True)
class CheckedAdapter:
    """An adapter that fits the base model."""

    path: Path
    """A PEFT folder, or a `dnd collect` checkpoint (.safetensors)."""
    layout: LoraLayout
    """Its layout on the base model."""
    provenance: dict[str, Any] | None
    """provenance.json of a generated adapter (None when absent)."""


def _spec_from_peft(path: Path, adapter_config: Mapping[str, Any], keys: Sequence[str]) -> LoraSpec:
    """The LoraSpec an adapter was made with, from its adapter_config.json and its tensor keys."""
    if adapter_config.get("peft_type", "LORA") != "LORA":
        raise LayoutError(f"adapter {path} is a {adapter_config['peft_type']} adapter; dnd eval applies LoRA adapters")
    found = [_PEFT_KEY.search(key) for key in keys]
    foreign = [key for key, match in zip(keys, found) if match is None]
    if foreign:
        raise LayoutError(
            f"adapter {path} has tensors outside the decoder layers' linear modules, e.g. {foreign[:3]}; "
            "dnd eval checks adapters against a LoRA layout of q/k/v/o and gate/up/down projections"
        )
    try:
        return LoraSpec(
            rank=int(adapter_config["r"]),
            alpha=float(adapter_config.get("lora_alpha", adapter_config["r"])),
            target_modules=tuple(dict.fromkeys(match.group(2) for match in found)),
            layers=tuple(sorted({int(match.group(1)) for match in found})),
            use_rslora=bool(adapter_config.get("use_rslora", False)),
        )
    except KeyError as missing:
        raise LayoutError(
            f"adapter {path}: {ADAPTER_CONFIG} has no {missing} field; it is not a PEFT LoRA config"
        ) from None
    except LayoutError as error:
        raise LayoutError(f"adapter {path}: {error}") from None


def _check_collected_hash(path: Path) -> None:
    """A collect checkpoint must be the file its manifest line hashed (collect's manifest.jsonl)."""
    manifest = path.parent.parent / COLLECT_MANIFEST
    name = f"{path.parent.name}/{path.name}"
    records = [r for r in read_jsonl(manifest) if r.get("file") == name] if manifest.is_file() else []
    if not records:
        raise ArtifactError(
            f"checkpoint {path} has no line in {manifest}; only checkpoints that `dnd collect` finished are "
            "evaluated as files: pass a PEFT adapter folder for anything else"
        )
    if sha256_file(path) != records[-1]["sha256"]:
        raise ArtifactError(f"checkpoint {path} does not match the sha256 of its manifest line; the file changed "
                            "after collect: run `dnd collect` again for its task")  # fmt: skip


def check_adapter(
    path: str | os.PathLike, base_config: Any, base: dict[str, Any] | None = None, allow_other_base: bool = False
) -> CheckedAdapter:
    """Check that an adapter fits the base model: keys, shapes and finite values against the layout the
    base model gives for the adapter's LoRA spec, and the layout fingerprint its provenance.json records
    (a collect checkpoint: the layout of its run, and the sha256 of its manifest line). With `base`
    (the base model's `basemodel.base_identity`), also that the adapter was made for this very base
    model, not another of the same shapes, when its provenance.json (or its run's collect.json)
    records one; `allow_other_base` turns a mismatch into a warning.

    Raises LayoutError (what differs, what to do) or ArtifactError (missing / unreadable files).
    """
    path = Path(path)
    if path.is_file() and path.suffix == ".safetensors":
        layout_path = path.parent.parent / COLLECT_LAYOUT
        if not layout_path.is_file():
            raise FileNotFoundError(
                f"adapter {path} is a .safetensors file but {layout_path} does not exist; a checkpoint file must "
                "sit in <run>/checkpoints/<task>/ as `dnd collect` writes it, otherwise pass a PEFT adapter folder"
            )
        collected = LoraLayout.load(layout_path)
        spec, recorded, provenance = collected.spec, collected.fingerprint(), None
        _check_collected_hash(path)
        run_meta = path.parent.parent / COLLECT_META
        made_for = read_json(run_meta, "collect metadata").get("base_identity") if run_meta.is_file() else None
        state = load_safetensors(path, "checkpoint")
    elif path.is_dir():
        if not (path / ADAPTER_WEIGHTS).is_file():
            found = sorted(p.name for p in path.iterdir())
            raise FileNotFoundError(
                f"adapter folder {path} has no {ADAPTER_WEIGHTS} (found {found[:8]}); dnd eval reads safetensors "
                "adapters only: re-save the adapter with peft's save_pretrained(safe_serialization=True)"
            )
        state = load_safetensors(path / ADAPTER_WEIGHTS, "adapter weights")
        spec = _spec_from_peft(path, read_json(path / ADAPTER_CONFIG, "adapter config"), list(state))
        provenance = read_json(path / PROVENANCE, "provenance") if (path / PROVENANCE).is_file() else None
        recorded = (provenance or {}).get("layout_fingerprint")
        made_for = (provenance or {}).get("base_identity")
    else:
        raise FileNotFoundError(
            f"adapter {path} not found; expected a PEFT adapter folder or a `dnd collect` checkpoint .safetensors"
        )
    try:
        layout = LoraLayout.from_config(base_config, spec)
    except LayoutError as error:
        raise LayoutError(f"adapter {path} does not fit the base model: {error}") from None
    layout.check_state_dict(state, f"adapter {path}")
    if recorded is not None and recorded != layout.fingerprint():
        raise LayoutError(
            f"adapter {path} was made for LoRA layout {recorded[:12]}, but the base model with this adapter's LoRA "
            f"spec has layout {layout.fingerprint()[:12]}: the adapter belongs to another base model. Evaluate it "
            f"with the base model it was made for (provenance base_model: {(provenance or {}).get('base_model')!r})"
        )
    if base is not None and made_for is not None:
        _check_base_identity(path, made_for, base, allow_other_base, (provenance or {}).get("base_model"))
    return CheckedAdapter(path, layout, provenance)


def _check_base_identity(path: Path, made_for: dict, base: dict, allow_other_base: bool, named: str | None) -> None:
    """Refuse (or, allowed, warn about) an adapter made for another base model of the same shapes."""
    reason = identity_mismatch(made_for, base)
    if reason is None:
        if made_for.get("config_sha256") != base.get("config_sha256"):
            logger.warning("adapter %s: the base model's config differs from the one it was made for (same family "
                           "and weights; a transformers version may serialize it differently)", path)
        return
    message = f"adapter {path} was made for another base model of the same shapes: {reason}"
    if allow_other_base:
        logger.warning("%s; scoring it anyway (allow_other_base)", message)
        return
    raise LayoutError(
        f"{message}. Evaluate it with the base model it was made for (provenance base_model: {named!r}; a "
        "collect run's own is <run>/base_model), or pass --allow-other-base to score it on this one anyway"
    )


@contextlib.contextmanager
def applied_adapter(model: torch.nn.Module, adapter: CheckedAdapter) -> Iterator[torch.nn.Module]:
    """The base model with the adapter applied (peft), restored to the bare base model on exit."""
    from peft import PeftModel

    with contextlib.ExitStack() as stack:
        folder = adapter.path
        if folder.is_file():
            # A collect checkpoint becomes a PEFT folder first, so that every adapter loads the one way.
            staging = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="dnd-eval-")))
            state = load_safetensors(folder, "checkpoint")
            folder = write_adapter(state, adapter.layout, staging / "adapter")
        peft_model = PeftModel.from_pretrained(model, str(folder), is_trainable=False)
        try:
            yield peft_model.eval()
        finally:
            # unload() takes the LoRA layers out again and returns the same, unchanged base model object.
            peft_model.unload()


# ----------------------------------------------------------------------------------------------------
# evaluate: base, then every adapter; summary


def spread(values: Sequence[float]) -> dict[str, Any]:
    """Mean, sample std (None for one value), best and worst of per-adapter accuracies."""
    return {
        "n": len(values),
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else None,
        "best": max(values),
        "worst": min(values),
        "values": list(values),
    }


def _versions() -> dict[str, str]:
    import peft
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}


def evaluate(
    base_model_source: str | os.PathLike | BaseModel,
    eval_tasks: Sequence[str | Task],
    adapters: Mapping[str, Sequence[str | os.PathLike]] | None = None,
    config: EvalConfig | None = None,
) -> dict[str, Any]:
    """Accuracy of the base model and of every adapter on every task; returns the results.json content.

    `base_model_source`: what `load_base_model` takes, or an already loaded BaseModel (left unchanged).
    `eval_tasks`: task specs (`load_task`) or Task objects. `adapters`: label → adapter paths; each label's
    accuracies are summarized as mean ± std and best (e.g. "train": the training LoRAs, "generated": adapters
    generated from independent prompt batches).
    """
    config = config or EvalConfig()
    adapters = dict(adapters or {})
    for label, paths in adapters.items():
        if label == BASE_LABEL or not _LABEL.match(label):
            raise ValueError(
                f"adapter label {label!r} must start with a letter, use letters, digits, '.', '_', '-', "
                f"and not be {BASE_LABEL!r}"
            )
        if not paths:
            raise ValueError(f"adapter label {label!r} has no adapter paths")
    if isinstance(base_model_source, BaseModel):
        base = base_model_source
    else:
        base = load_base_model(base_model_source, dtype=config.dtype, device=config.device, seed=config.base_seed)
    tasks = [t if isinstance(t, Task) else load_task(t, num_records=config.task_records, seed=config.task_seed)
             for t in eval_tasks]
    if not tasks:
        raise ValueError("no eval tasks given; pass task files (.json/.jsonl) or synthetic:<family> specs")
    names = [task.name for task in tasks]
    if len(set(names)) != len(names):
        raise ValueError(f"eval task names must be unique, got {names}")

    # Every adapter is checked before any scoring: a mismatch fails in seconds, not after the base pass.
    identity = base_identity(base.model)
    checked = {label: [check_adapter(path, base.model.config, identity, config.allow_other_base) for path in paths]
               for label, paths in adapters.items()}
    prepared = [prepare_task(task, base.tokenizer, config) for task in tasks]

    models = [{"label": BASE_LABEL, "path": None, "tasks": score_model(base.model, base.tokenizer, prepared, config)}]
    todo = [(label, adapter) for label, group in checked.items() for adapter in group]
    for label, adapter in tqdm(todo, desc="adapters", disable=not todo):
        with applied_adapter(base.model, adapter) as model:
            scores = score_model(model, base.tokenizer, prepared, config)
        models.append({"label": label, "path": str(adapter.path), "tasks": scores})

    summary: dict[str, Any] = {}
    for task in tasks:
        summary[task.name] = {}
        for label in [BASE_LABEL, *checked]:
            group = [m["tasks"][task.name] for m in models if m["label"] == label]
            summary[task.name][label] = {metric: spread([g[metric] for g in group]) for metric in METRICS[config.mode]}
    parameter = next(base.model.parameters())
    return {
        "mode": config.mode,
        "metrics": list(METRICS[config.mode]),
        "config": asdict(config),
        "base_model": {"source": base.source, "kind": base.kind, "dtype": str(parameter.dtype).removeprefix("torch."),
                       "device": str(parameter.device), "model_type": base.model.config.model_type},
        "adapters": {
            label: [{"path": str(a.path), "layout_fingerprint": a.layout.fingerprint(), "provenance": a.provenance}
                    for a in group]
            for label, group in checked.items()
        },
        "tasks": {
            p.task.name: {"source": p.task.source, "num_records": len(p.task.records), "scorable": p.scorable,
                          "evaluated": len(p.items), "skipped": p.skipped, "warnings": p.warnings,
                          "records": [item.record for item in p.items],
                          "answers": [item.answer if config.mode == "loglik" else item.reference for item in p.items]}
            for p in prepared
        },
        "models": models,
        "summary": summary,
        "versions": _versions(),
    }


# ----------------------------------------------------------------------------------------------------
# report: results.json, results.md, accuracy.png


def _percent(value: float) -> str:
    return f"{100 * value:.1f}"


def _nats(value: float) -> str:
    return f"{value:.3f}"


def format_cell(stats: Mapping[str, Any], form=_percent) -> str:
    """"41.2" for one model, "41.2 ± 1.3 (best 43.0)" for a group (`form` writes one number)."""
    if stats["n"] == 1:
        return form(stats["mean"])
    return f"{form(stats['mean'])} ± {form(stats['std'])} (best {form(stats['best'])})"


def accuracy_tables(results: Mapping[str, Any]) -> list[str]:
    """Markdown lines: one accuracy table per metric (rows: tasks; columns: base and each adapter group)."""
    labels = [BASE_LABEL, *results["adapters"]]
    counts = {label: len(group) for label, group in results["adapters"].items()}
    headers = ["task", "records", *(label if label == BASE_LABEL else f"{label} (n={counts[label]})"
                                    for label in labels)]
    titles = {
        "accuracy": "accuracy (%), option with the highest summed log-likelihood" if results["mode"] == "loglik"
        else "accuracy (%), greedy generation, exact match after normalization",
        "accuracy_norm": "accuracy (%), option with the highest log-likelihood per token (secondary)",
        # At chance-level accuracy (a random-init base, a weak adapter) this still moves: the signal left.
        "answer_logprob_mean": "mean log-probability of the right answer (nats, summed over its tokens; higher is better)",
    }
    lines: list[str] = []
    for metric in results["metrics"]:
        form = _nats if metric == "answer_logprob_mean" else _percent
        lines += ["", f"## {titles[metric]}", "", "| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
        for task, groups in results["summary"].items():
            cells = [task, str(results["tasks"][task]["evaluated"]),
                     *(format_cell(groups[label][metric], form) for label in labels)]
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def markdown_report(results: Mapping[str, Any]) -> str:
    """results.md: the accuracy tables, the record counts (skips by reason), warnings and the adapters."""
    base = results["base_model"]
    lines = [
        "# dnd eval",
        "",
        f"Base model `{base['source']}` ({base['kind']}, {base['model_type']}, {base['dtype']}, {base['device']}); "
        f"mode {results['mode']}; at most {results['config']['max_records'] or 'all'} records per task "
        f"(seed {results['config']['seed']}). Groups of several adapters: mean ± sample std (best).",
    ]
    if base["kind"].startswith("random-init"):
        lines += ["", "The base model is random-init: it knows nothing, so accuracies near chance are expected; "
                      "the mean log-probability of the right answer is the signal that remains."]
    lines += accuracy_tables(results)
    lines += ["", "## records", "", "| task | records | scorable | evaluated | " + " | ".join(SKIP_REASONS) + " |",
              "|" + "---|" * (4 + len(SKIP_REASONS))]
    for task, info in results["tasks"].items():
        cells = [task, info["num_records"], info["scorable"], info["evaluated"],
                 *(info["skipped"][reason] for reason in SKIP_REASONS)]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    warnings = [w for info in results["tasks"].values() for w in info["warnings"]]
    if warnings:
        lines += ["", "## warnings", "", *(f"- {w}" for w in warnings)]
    lines += ["", "## adapters", ""]
    for label, group in results["adapters"].items():
        lines += [f"- {label}:", *(f"  - `{a['path']}`" for a in group)]
    if not results["adapters"]:
        lines.append("none (base model only)")
    return "\n".join(lines) + "\n"


def plot_report(results: Mapping[str, Any], path: str | os.PathLike) -> None:
    """accuracy.png: per task, a bar per model group (mean, std as error bar) and a dot per adapter."""
    # Figure + the Agg canvas directly: no pyplot global state, no display needed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    tasks = list(results["summary"])
    labels = [BASE_LABEL, *results["adapters"]]
    figure = Figure(figsize=(max(4.0, 1.2 + 1.1 * len(tasks) * len(labels) ** 0.5), 3.6), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    width = 0.8 / len(labels)
    for offset, label in enumerate(labels):
        x = [t + (offset - (len(labels) - 1) / 2) * width for t in range(len(tasks))]
        stats = [results["summary"][task][label]["accuracy"] for task in tasks]
        errors = [100 * (s["std"] or 0.0) for s in stats]
        axes.bar(x, [100 * s["mean"] for s in stats], width * 0.9, label=label, yerr=errors if any(errors) else None,
                 capsize=3)
        for xi, s in zip(x, stats):
            if s["n"] > 1:
                axes.scatter([xi] * s["n"], [100 * v for v in s["values"]], s=8, color="black", zorder=3)
    axes.set_xticks(range(len(tasks)), tasks, rotation=20 if len(tasks) > 3 else 0)
    axes.set_ylabel("accuracy (%)")
    axes.set_ylim(0, 100)
    axes.set_title(f"dnd eval ({results['mode']})")
    axes.legend(fontsize="small")
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=120)


def write_report(results: Mapping[str, Any], out_dir: str | os.PathLike) -> dict[str, Path]:
    """Write results.json, results.md and accuracy.png into `out_dir`, each file atomically."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {name: out_dir / name for name in REPORT_FILES}
    write_json(paths["results.json"], results)
    with atomic_path(paths["results.md"]) as tmp:
        tmp.write_text(markdown_report(results))
    plot_report(results, paths["accuracy.png"])
    return paths


# ----------------------------------------------------------------------------------------------------
# command line


def parse_adapter_groups(tokens: Sequence[str]) -> dict[str, list[str]]:
    """`["train=a", "b", "generated=c", "d"]` → {"train": ["a", "b"], "generated": ["c", "d"]}.

    A token starts a new group when it reads LABEL=PATH and is not itself an existing path.
    """
    groups: dict[str, list[str]] = {}
    label = None
    for token in tokens:
        name, sep, path = token.partition("=")
        if sep and _LABEL.match(name) and not os.path.exists(token):
            label = name
            groups.setdefault(label, [])
            token = path
        if label is None:
            raise ValueError(f"adapter path {token!r} comes before any LABEL=PATH; write e.g. --adapters train={token}")
        if token:
            groups[label].append(token)
    return groups


def expand_adapter_paths(paths: Sequence[str]) -> list[str]:
    """Adapter paths as a shell would not give them: a quoted glob (`run/checkpoints/*/200.safetensors`)
    is expanded, sorted; a folder that is not itself an adapter stands for the adapter folders and
    `*.safetensors` checkpoints directly inside it (`out/adapters`, `run/checkpoints/<task>`). A glob
    or folder that yields nothing is an error, never an empty group."""
    expanded: list[str] = []
    for path in paths:
        matches = sorted(glob.glob(path)) if glob.has_magic(path) else [path]
        if not matches:
            raise ValueError(f"adapter glob {path!r} matches no file or folder")
        for match in matches:
            folder = Path(match)
            if folder.is_dir() and not (folder / ADAPTER_CONFIG).is_file():
                inside = sorted(str(p) for p in folder.iterdir()
                                if (p / ADAPTER_CONFIG).is_file() or (p.is_file() and p.suffix == ".safetensors"))
                if not inside:
                    raise ValueError(f"adapter folder {match!r} holds no adapter folders ({ADAPTER_CONFIG}) or "
                                     "*.safetensors checkpoints")
                expanded += inside
            else:
                expanded.append(match)
    return expanded


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dnd eval", description=__doc__.splitlines()[0])
    defaults = EvalConfig()
    parser.add_argument("--base", required=True, help="base model: HF folder, .gguf file, or config.json (random init)")
    parser.add_argument("--tasks", nargs="+", required=True, help="task files (.json/.jsonl) or synthetic:<family>")
    parser.add_argument("--adapters", nargs="+", action="extend", default=[], metavar="LABEL=PATH [PATH ...]",
                        help="adapter groups, e.g. --adapters 'train=run/checkpoints/*/200.safetensors' "
                             "generated=out/adapters: a path is an adapter folder, a checkpoint, a glob (quoted, "
                             "dnd expands it) or a folder of adapters")
    parser.add_argument("--out", required=True, help="report folder (results.json, results.md, accuracy.png)")
    parser.add_argument("--mode", choices=sorted(METRICS), default=defaults.mode)
    parser.add_argument("--max-records", type=int, default=defaults.max_records, help="seeded subsample per task")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="subsample seed")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--max-length", type=int, default=defaults.max_length)
    parser.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens)
    parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default=defaults.dtype)
    parser.add_argument("--device", default=defaults.device)
    parser.add_argument("--task-records", type=int, default=defaults.task_records, help="records per synthetic family")
    parser.add_argument("--task-seed", type=int, default=defaults.task_seed, help="seed of synthetic family records")
    parser.add_argument("--base-seed", type=int, default=defaults.base_seed, help="init seed of a random-init base")
    parser.add_argument("--allow-other-base", action="store_true",
                        help="score adapters made for another base model of the same shapes anyway (a warning)")
    args = parser.parse_args(argv)
    config = EvalConfig(
        mode=args.mode, max_records=args.max_records, seed=args.seed, batch_size=args.batch_size,
        max_length=args.max_length, max_new_tokens=args.max_new_tokens, dtype=args.dtype, device=args.device,
        task_records=args.task_records, task_seed=args.task_seed, base_seed=args.base_seed,
        allow_other_base=args.allow_other_base,
    )
    try:
        adapters = {label: expand_adapter_paths(paths) for label, paths in parse_adapter_groups(args.adapters).items()}
    except ValueError as error:
        parser.error(str(error))
    results = evaluate(args.base, args.tasks, adapters, config)
    paths = write_report(results, args.out)
    print("\n".join(accuracy_tables(results)))
    print(f"report: {', '.join(str(p) for p in paths.values())}")
    return 0
