"""How `dnd eval` scores one model on one prepared task.

Mode "loglik" (the default, deterministic): every option of an item is scored as the assistant's
reply (`dnd_scale.eval_records`), and its log-likelihood is the sum of the log-probabilities of the
option's own tokens — the prompt and whatever the template appends after the reply (end-of-turn)
are context, never scored. Prediction = the option with the highest sum ("accuracy"); the option
with the highest mean per token is reported beside it ("accuracy_norm"). Ties go to the first option.

Mode "generate": greedy decoding from the generation prompt. A multiple-choice or True/False item
is correct when the option parsed from the reply (`parse_choice`: the first bracketed option such as
`[B]`, else a reply that opens with an option's bare label, e.g. `B.` or `true`) is its answer; a
reply naming no option counts as wrong and is counted as "unparsed". A free-text item is correct
when the generated text equals its response after normalization (whitespace collapsed, case folded).
"""

from __future__ import annotations

import math
import re
import statistics
from typing import TYPE_CHECKING, Any, Sequence

import torch
from tqdm.auto import tqdm

from dnd_scale.eval_records import PreparedTask

if TYPE_CHECKING:
    from dnd_scale.evaluate import EvalConfig

METRICS = {"loglik": ("accuracy", "accuracy_norm", "answer_logprob_mean"), "generate": ("accuracy",)}
"""The metrics each mode reports per task."""


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
