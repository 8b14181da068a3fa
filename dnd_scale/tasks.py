"""Task sources: prompt/response records from JSON/JSONL files, HF `datasets`, or synthetic families.

A task spec is one string:
- a path to a `.json` file (a list of records, the format of the DnD data) or a `.jsonl` file (one
  record per line); the task is named after the file stem;
- `hf:<dataset name>[:<split>]` — a Hugging Face dataset (needs the `datasets` package and network);
- `synthetic:<family>` — a built-in family from `dnd_scale.synthetic`.

A record is `{prompt, response?, system?, options?, answer?}`. Records of a multiple-choice or
True/False task carry `options` (the candidate responses, e.g. `["[A]", "[B]", "[C]", "[D]"]`) and
`answer` (the correct one); files may give them explicitly, otherwise they are inferred from the
DnD convention (options as `A: ...` lines in the prompt, responses `[A]`, `[True]`, `[False]`).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

from dnd_scale.io import read_text

# Task names become folder names under <run>/checkpoints: keep them portable.
_TASK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
# Option labels in DnD prompts: "A: ..." on its own line, or inline after "choices:" separated by ", ".
_OPTION_LABEL = re.compile(r"(?:^|\n|choices:\s*|,\s)([A-Z]|[1-9]): ")
_BRACKETED = re.compile(r"^\[(.+)\]$")
_PROMPT_KEYS = ("prompt", "question", "instruction", "input")
_RESPONSE_KEYS = ("response", "answer", "output", "completion")


@dataclass(frozen=True)
class TaskRecord:
    """One example of a task."""

    prompt: str
    """The user's message; the only field the parameter generator ever sees."""
    response: str | None = None
    """The target answer; collect trains on it. None for prompt-only sets (e.g. hidden test labels)."""
    system: str | None = None
    """Optional system message placed before the prompt by the chat template."""
    options: list[str] | None = None
    """Candidate responses of a multiple-choice / True-False item, scored by log-likelihood in eval."""
    answer: str | None = None
    """The correct member of `options`; None when the item has no options or no known answer."""

    def to_dict(self) -> dict[str, Any]:
        """The record as JSON-ready dict, without the fields that are None."""
        return {key: value for key, value in asdict(self).items() if value is not None}


@dataclass
class Task:
    """A named list of records and where they came from."""

    name: str
    """Task name: a folder name under <run>/checkpoints, unique within a run."""
    records: list[TaskRecord]
    """The task's examples (at least one)."""
    source: str
    """The spec the task was loaded from (path, `hf:...` or `synthetic:...`)."""

    @property
    def prompts(self) -> list[str]:
        return [record.prompt for record in self.records]

    def fingerprint(self) -> str:
        """sha256 of the records' canonical JSON: collect uses it to notice a task whose data changed."""
        canonical = json.dumps([record.to_dict() for record in self.records], sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def infer_options(prompt: str, response: str | None) -> tuple[list[str] | None, str | None]:
    """(options, answer) of a DnD-style multiple-choice or True/False item, or (None, None).

    Inferred only when the response is bracketed (`[B]`, `[True]`): free-text answers that happen to
    follow lines like "A: ..." must not become multiple-choice items.
    """
    if response is None:
        return None, None
    match = _BRACKETED.match(response.strip())
    if match is None:
        return None, None
    label = match.group(1)
    if label in ("True", "False"):
        return ["[True]", "[False]"], f"[{label}]"
    labels = _OPTION_LABEL.findall(prompt)
    # Keep the run of consecutive labels starting at A (or 1): "A, B, C, D" or "1, 2, 3, 4".
    run: list[str] = []
    for found in labels:
        expected = ("A" if found.isalpha() else "1") if not run else chr(ord(run[-1]) + 1)
        if found == expected:
            run.append(found)
        elif found in ("A", "1"):
            run = [found]
    if len(run) < 2 or label not in run:
        return None, None
    return [f"[{item}]" for item in run], f"[{label}]"


def _record_from_dict(raw: Any, where: str) -> TaskRecord:
    """Validate one raw record; `where` names it in errors ("tasks.jsonl line 7")."""
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: expected a JSON object with a 'prompt' field, found {type(raw).__name__}")
    prompt = raw.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(
            f"{where}: expected a non-empty string field 'prompt', found "
            f"{'no prompt' if prompt is None else repr(prompt)[:80]} (keys: {sorted(raw)}); "
            "every record needs {\"prompt\": ..., \"response\": ...}"
        )
    for key in ("response", "system", "answer"):
        if raw.get(key) is not None and not isinstance(raw[key], str):
            raise ValueError(f"{where}: field {key!r} must be a string, found {type(raw[key]).__name__}")
    response = raw.get("response")
    # The DnD files write an empty system message as "": that means no system message.
    system = raw.get("system") or None
    options, answer = raw.get("options"), raw.get("answer")
    if options is None:
        options, answer = infer_options(prompt, response)
    elif not (isinstance(options, list) and len(options) >= 2 and all(isinstance(o, str) for o in options)):
        raise ValueError(f"{where}: 'options' must be a list of at least two strings, found {options!r}")
    if answer is not None and options is not None and answer not in options:
        raise ValueError(f"{where}: 'answer' {answer!r} is not one of the options {options}")
    return TaskRecord(prompt=prompt, response=response, system=system, options=options, answer=answer)


def _records_from_file(path: Path) -> list[TaskRecord]:
    if not path.is_file():
        raise FileNotFoundError(f"task file {path} does not exist (expected a .json or .jsonl file of records)")
    text = read_text(path, "task file")
    if not text.strip():
        raise ValueError(f"task file {path} is empty; expected JSON records with 'prompt' and 'response'")
    if path.suffix == ".jsonl":
        records = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                raw = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(
                    f"{path} line {number}: not valid JSON ({error.msg} at column {error.colno})"
                ) from None
            records.append(_record_from_dict(raw, f"{path} line {number}"))
        return records
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(
            f"{path}: not valid JSON ({error.msg} at line {error.lineno}, column {error.colno}); "
            "a .json task file holds one list of records (use .jsonl for one record per line)"
        ) from None
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of records, found {type(data).__name__}")
    return [_record_from_dict(raw, f"{path} record {index}") for index, raw in enumerate(data)]


def _records_from_hf(name: str, split: str) -> list[TaskRecord]:
    try:
        import datasets  # only this source needs it; keep the import off every other path
    except ImportError:
        raise ImportError(
            f"loading the task 'hf:{name}' needs the `datasets` package, which is not installed; "
            "`pip install datasets`, or export the data to a .jsonl file of {prompt, response} records"
        ) from None
    rows = datasets.load_dataset(name, split=split)
    columns = list(rows.column_names)
    prompt_key = next((key for key in _PROMPT_KEYS if key in columns), None)
    response_key = next((key for key in _RESPONSE_KEYS if key in columns), None)
    if prompt_key is None:
        raise ValueError(
            f"hf:{name}:{split} has columns {columns}; expected one of {list(_PROMPT_KEYS)} for the prompt "
            "(export it to a .jsonl file of {prompt, response} records to map other columns)"
        )
    records = []
    for index, row in enumerate(rows):
        raw = {"prompt": row[prompt_key], "system": row.get("system")}
        if response_key is not None:
            raw["response"] = None if row[response_key] is None else str(row[response_key])
        records.append(_record_from_dict(raw, f"hf:{name}:{split} row {index}"))
    return records


def load_task(spec: str, *, num_records: int = 256, seed: int = 0) -> Task:
    """Load one task from a spec: a .json/.jsonl path, `hf:<name>[:split]` or `synthetic:<family>`.

    `num_records` and `seed` apply to synthetic families only (files and datasets are used whole).
    """
    if spec.startswith("synthetic:"):
        # Imported here because synthetic.py builds TaskRecords from this module.
        from dnd_scale.synthetic import generate_records

        family = spec.removeprefix("synthetic:")
        return Task(name=family, records=generate_records(family, num_records, seed), source=spec)
    if spec.startswith("hf:"):
        name, _, split = spec.removeprefix("hf:").partition(":")
        split = split or "train"
        records = _records_from_hf(name, split)
        task_name = f"{name.replace('/', '__')}-{split}"
    else:
        path = Path(spec)
        if path.suffix not in (".json", ".jsonl"):
            raise ValueError(
                f"task spec {spec!r} is not a .json/.jsonl file, 'hf:<name>[:split]' or 'synthetic:<family>'"
            )
        records = _records_from_file(path)
        task_name = path.stem
    if not records:
        raise ValueError(f"task {spec!r} has no records; a task needs at least one {{prompt, response}} record")
    if not _TASK_NAME.match(task_name):
        raise ValueError(
            f"task name {task_name!r} (from {spec!r}) must start with a letter or digit and use only "
            "letters, digits, '.', '_' and '-'; rename the file"
        )
    return Task(name=task_name, records=records, source=spec)


# Below this many answered records, one answer for all of them may be chance (16 two-option records
# agree by chance once in 2^15); above it, the set teaches a constant.
MIN_ANSWERS_TO_JUDGE = 16


def check_answers_vary(task: Task) -> None:
    """Refuse a training set whose records all give the same option: a LoRA trained on it learns to
    answer that option whatever the question (the DnD data's PIQA_test: 3084 records, all [A])."""
    answers = [record.answer for record in task.records if record.answer is not None]
    if len(answers) >= MIN_ANSWERS_TO_JUDGE and len(set(answers)) == 1:
        raise ValueError(
            f"task {task.name!r} ({task.source}): all {len(answers)} answers are {answers[0]}, so a LoRA trained "
            f"on it learns to answer {answers[0]} whatever the question; train on a set whose answers vary (e.g. "
            "the train split instead of a test split sorted by answer), or drop it from the recipe's tasks"
        )


def load_tasks(specs: Sequence[str], *, num_records: int = 256, seed: int = 0) -> list[Task]:
    """Load several tasks; their names must be unique because each names a checkpoint folder."""
    tasks = [load_task(spec, num_records=num_records, seed=seed) for spec in specs]
    seen: dict[str, str] = {}
    for task in tasks:
        if task.name in seen:
            raise ValueError(
                f"two task specs give the same task name {task.name!r}: {seen[task.name]!r} and {task.source!r}; "
                "rename one of the files"
            )
        seen[task.name] = task.source
    return tasks
