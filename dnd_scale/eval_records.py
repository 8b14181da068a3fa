"""Which records of a task `dnd eval` scores, and their tokens (once, for every model).

A scorable record is a multiple-choice or True/False item with `options` and an `answer`, or (generate
mode only) a free-text item with a response. Options of the DnD data files (../shared/data/dnd) are
derived from the prompt by `dnd_scale.tasks.infer_options`, only when the response is bracketed; the
scored options are the bracketed labels the models are trained to reply with (`[A]`, `[True]`), not
the option texts:

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

Every option is placed as the assistant's reply in the conversation the tokenizer's chat template
renders (system message when the record has one); without a chat template the prompt is rendered
as `dnd collect` trains on it ("system\\n\\nprompt\\n").
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from dnd_scale.tasks import Task, TaskRecord

if TYPE_CHECKING:
    from dnd_scale.evaluate import EvalConfig

logger = logging.getLogger(__name__)

SKIP_REASONS = ("no_answer", "no_options", "too_long")
# Tasks whose answers are all the same label this often are most likely hidden labels (PIQA_test).
_HIDDEN_LABELS_MIN_RECORDS = 20


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
