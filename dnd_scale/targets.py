"""Packed targets: every checkpoint of every task tokenized once, stored memory-mappable.

`dnd pack` writes, under `<run>/targets/`:

    index.json              {"format", "layout_fingerprint", "token_shape": [H, W], "num_tokens": T,
                             "tasks": {task: {"file", "num_checkpoints": K, "sha256"}},
                             "common": {"file", "sha256"}, "layout": {"file", "sha256"}, "extra": {...}}
    <task>.safetensors      "tokens" float32 (K, T, H, W)
    common.safetensors      "mask" bool (T, H, W), "weights" float32 (T,)
    layout.json             the LoraLayout JSON, verbatim (LoraLayout.from_json reads it)

The loader gathers one checkpoint's tokens by (task, checkpoint index) through a safetensors slice,
so a training process never holds a whole task file in memory, and the file is opened once per
process (DataLoader workers reopen it after fork instead of sharing the parent's handle).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dnd_scale.io import ArtifactError, atomic_path, canonical_json_sha256, sha256_file, write_json

INDEX_FILE = "index.json"
COMMON_FILE = "common.safetensors"
LAYOUT_FILE = "layout.json"
FORMAT_VERSION = 1

# Task names become file names (`<task>.safetensors`, `prompts/<task>.jsonl`): keep them portable
# and unable to escape the folder.
_TASK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
# "common" would overwrite common.safetensors.
_RESERVED_TASKS = {Path(COMMON_FILE).stem}


class TargetsError(ArtifactError):
    """Packed targets are missing, incomplete, corrupt or made for another layout."""


def check_task_name(task: str) -> str:
    """Return `task` if it can serve as a file name in the artifact folders, else raise."""
    if not isinstance(task, str) or not _TASK_NAME.match(task) or task in _RESERVED_TASKS:
        raise ValueError(
            f"task name {task!r} cannot be used as a file name: expected 1-128 characters of "
            f"letters, digits, '.', '_' or '-' starting with a letter or digit, and not one of "
            f"{sorted(_RESERVED_TASKS)}; rename the task"
        )
    return task


def is_packed(directory: str | os.PathLike) -> bool:
    """Whether `directory` holds packed targets (their index); nothing is checked."""
    return (Path(directory) / INDEX_FILE).is_file()


def _read_index(directory: Path) -> dict:
    path = directory / INDEX_FILE
    if not path.exists():
        return {"format": FORMAT_VERSION, "tasks": {}}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _check_geometry(index: dict, num_tokens: int, token_shape: Sequence[int], what: str) -> None:
    """Record (T, H, W) in the index on first write; refuse a later write that disagrees."""
    if "num_tokens" not in index:
        index["num_tokens"] = int(num_tokens)
        index["token_shape"] = [int(s) for s in token_shape]
        return
    if index["num_tokens"] != num_tokens or list(index["token_shape"]) != list(token_shape):
        raise TargetsError(
            f"{what} has T={num_tokens}, token shape {list(token_shape)}, but this targets folder "
            f"holds T={index['num_tokens']}, token shape {index['token_shape']}: every file of one "
            f"pack must come from the same tokenizer; write to an empty folder or re-run `dnd pack`"
        )


def write_task_targets(directory: str | os.PathLike, task: str, tokens: torch.Tensor) -> str:
    """Store the tokens of every checkpoint of `task` and register the file in `INDEX_FILE`.

    tokens: float32 (K, T, H, W), checkpoint order = the order the loader indexes by.
    Returns the file's sha256. Writing the same task again replaces it.
    """
    directory = Path(directory)
    check_task_name(task)
    if tokens.dim() != 4 or tokens.dtype != torch.float32 or tokens.shape[0] < 1:
        raise TargetsError(
            f"tokens of task {task!r} must be float32 (K, T, H, W) with K >= 1 checkpoints; "
            f"found {tokens.dtype} {tuple(tokens.shape)}"
        )
    if not torch.isfinite(tokens).all():
        raise TargetsError(f"tokens of task {task!r} contain NaN or Inf; check its checkpoints")
    index = _read_index(directory)
    _check_geometry(index, tokens.shape[1], tokens.shape[2:], f"task {task!r}")
    file = f"{task}.safetensors"
    with atomic_path(directory / file) as tmp:
        save_file({"tokens": tokens.detach().cpu().contiguous()}, str(tmp))
    sha = sha256_file(directory / file)
    index["tasks"][task] = {"file": file, "num_checkpoints": int(tokens.shape[0]), "sha256": sha}
    write_json(directory / INDEX_FILE, index)
    return sha


def link_task_targets(directory: str | os.PathLike, task: str, source: "PackedTargets") -> str:
    """Register the tokens `source` (another pack of the same geometry) holds for `task` in
    `directory` without rewriting them: a hard link where the file system allows, else a copy.
    Returns the file's sha256 (the source index's, checked against the file)."""
    directory = Path(directory)
    check_task_name(task)
    entry = source.index["tasks"][task]
    index = _read_index(directory)
    _check_geometry(index, source.num_tokens, source.token_shape, f"task {task!r}")
    src = source.directory / entry["file"]
    if sha256_file(src) != entry["sha256"]:
        raise TargetsError(f"{src} does not match the sha256 of its index; re-run `dnd pack` for {source.directory}")
    file = f"{task}.safetensors"
    with atomic_path(directory / file) as tmp:
        tmp.unlink(missing_ok=True)
        try:
            os.link(src, tmp)
        except OSError:  # another file system, or links not allowed
            shutil.copyfile(src, tmp)
    index["tasks"][task] = {"file": file, "num_checkpoints": int(entry["num_checkpoints"]), "sha256": entry["sha256"]}
    write_json(directory / INDEX_FILE, index)
    return entry["sha256"]


def write_common(
    directory: str | os.PathLike,
    mask: torch.Tensor,
    weights: torch.Tensor,
    layout_json: dict,
    extra: dict | None = None,
    *,
    fingerprint: str | None = None,
) -> None:
    """Store what every task shares: padding mask, per-token loss weights and the layout.

    mask: bool (T, H, W); weights: float32 (T,); layout_json: the LoraLayout as a JSON dict
    (written verbatim to `LAYOUT_FILE`); extra: JSON metadata kept in `INDEX_FILE` under "extra"
    (tokenizer parameters, the pack's config, checkpoint hashes); fingerprint: the layout's
    fingerprint, by default the sha256 of layout_json's canonical JSON (sorted keys, no spaces),
    which is how `LoraLayout.fingerprint()` is defined; pass it explicitly to be sure they agree.
    """
    directory = Path(directory)
    if mask.dim() != 3 or mask.dtype != torch.bool:
        raise TargetsError(f"mask must be bool (T, H, W); found {mask.dtype} {tuple(mask.shape)}")
    if weights.shape != (mask.shape[0],) or weights.dtype != torch.float32:
        raise TargetsError(
            f"weights must be float32 (T,) = ({mask.shape[0]},) to match the mask; "
            f"found {weights.dtype} {tuple(weights.shape)}"
        )
    if not torch.isfinite(weights).all():
        raise TargetsError("criterion weights contain NaN or Inf; check the packed checkpoints")
    index = _read_index(directory)
    _check_geometry(index, mask.shape[0], mask.shape[1:], "the mask")
    with atomic_path(directory / COMMON_FILE) as tmp:
        save_file({"mask": mask.cpu().contiguous(), "weights": weights.detach().cpu().contiguous()}, str(tmp))
    write_json(directory / LAYOUT_FILE, layout_json)
    index["layout_fingerprint"] = fingerprint or canonical_json_sha256(layout_json)
    index["common"] = {"file": COMMON_FILE, "sha256": sha256_file(directory / COMMON_FILE)}
    index["layout"] = {"file": LAYOUT_FILE, "sha256": sha256_file(directory / LAYOUT_FILE)}
    index["extra"] = extra or {}
    write_json(directory / INDEX_FILE, index)


class PackedTargets:
    """Read side of the packed targets: validated index, lazy per-process memory maps.

    `get(task, k)` reads one (T, H, W) slice; nothing else of the task file is loaded. The object
    pickles without its file handles, and a process that finds handles opened by another process
    (DataLoader workers after fork) opens its own.
    """

    def __init__(self, directory: str | os.PathLike, expected_fingerprint: str | None = None):
        """Open `directory` (a `<run>/targets` folder) and check it is complete.

        expected_fingerprint: the layout fingerprint of the model being trained or generated for;
        a pack made for another layout is refused.
        """
        self.directory = Path(directory)
        index_path = self.directory / INDEX_FILE
        if not index_path.exists():
            raise TargetsError(f"no packed targets at {self.directory} (no {INDEX_FILE}); run `dnd pack`")
        with open(index_path, encoding="utf-8") as f:
            self.index = json.load(f)
        if self.index.get("format") != FORMAT_VERSION:
            raise TargetsError(
                f"{index_path} has format {self.index.get('format')!r}, this code reads format "
                f"{FORMAT_VERSION}; re-run `dnd pack`"
            )
        missing = [key for key in ("common", "layout", "layout_fingerprint") if key not in self.index]
        if missing or not self.index["tasks"]:
            raise TargetsError(
                f"packed targets at {self.directory} are incomplete (missing: "
                f"{missing + ([] if self.index['tasks'] else ['tasks'])}); re-run `dnd pack`"
            )
        for rel in self._files().values():
            if not (self.directory / rel).exists():
                raise TargetsError(f"packed targets file {self.directory / rel} is missing; re-run `dnd pack`")
        if expected_fingerprint is not None and expected_fingerprint != self.layout_fingerprint:
            raise TargetsError(
                f"packed targets at {self.directory} were made for layout {self.layout_fingerprint[:12]}, "
                f"but the current model's LoRA layout is {expected_fingerprint[:12]} (different base "
                f"model, rank or target modules); re-run `dnd pack` for this layout"
            )
        self._pid: int | None = None
        self._handles: dict[str, tuple[Any, Any]] = {}
        with safe_open(self.directory / self.index["common"]["file"], framework="pt") as f:
            self.mask = f.get_tensor("mask")  # (T, H, W) bool
            self.weights = f.get_tensor("weights")  # (T,) float32

    def _files(self) -> dict[str, str]:
        files = {task: entry["file"] for task, entry in self.index["tasks"].items()}
        files["common"] = self.index["common"]["file"]
        files["layout"] = self.index["layout"]["file"]
        return files

    @property
    def tasks(self) -> list[str]:
        """Task names, sorted."""
        return sorted(self.index["tasks"])

    @property
    def num_checkpoints(self) -> dict[str, int]:
        """Checkpoints per task (K)."""
        return {task: entry["num_checkpoints"] for task, entry in self.index["tasks"].items()}

    @property
    def num_tokens(self) -> int:
        """T, tokens per checkpoint."""
        return self.index["num_tokens"]

    @property
    def token_shape(self) -> tuple[int, int]:
        """(H, W) of one token."""
        return tuple(self.index["token_shape"])

    @property
    def layout_fingerprint(self) -> str:
        """Fingerprint of the LoRA layout the targets were tokenized with."""
        return self.index["layout_fingerprint"]

    @property
    def extra(self) -> dict:
        """Metadata stored by `write_common` (tokenizer parameters, pack config, ...)."""
        return self.index.get("extra", {})

    def layout_json(self) -> dict:
        """The LoRA layout as stored in `LAYOUT_FILE`."""
        with open(self.directory / self.index["layout"]["file"], encoding="utf-8") as f:
            return json.load(f)

    def verify(self) -> None:
        """Hash every file and compare with `INDEX_FILE`; raise naming each file that differs."""
        expected = {task: entry["sha256"] for task, entry in self.index["tasks"].items()}
        expected["common"] = self.index["common"]["sha256"]
        expected["layout"] = self.index["layout"]["sha256"]
        bad = [
            rel for name, rel in self._files().items() if sha256_file(self.directory / rel) != expected[name]
        ]
        if bad:
            raise TargetsError(
                f"packed targets at {self.directory}: content of {bad} does not match the sha256 in "
                f"{INDEX_FILE} (changed or corrupted since packing); re-run `dnd pack`"
            )

    def _tokens(self, task: str):
        """The (K, T, H, W) "tokens" slice of a task file, opened once per process."""
        # A safetensors handle is a memory map plus native state; after fork the child must not
        # use the parent's, so handles are tied to the process that opened them.
        if self._pid != os.getpid():
            self._handles = {}
            self._pid = os.getpid()
        opened = self._handles.get(task)
        if opened is None:
            path = self.directory / self.index["tasks"][task]["file"]
            try:
                handle = safe_open(path, framework="pt")
                opened = (handle, handle.get_slice("tokens"))  # the slice needs its handle alive
            except Exception as exn:  # safetensors raises its own error type, or OSError
                # Checked at the start of a run, so the file changed under it (a DataLoader worker
                # opens its own handle later, maybe hours later).
                raise TargetsError(f"packed targets file {path} cannot be read ({exn}); it changed since "
                                   "the run checked it: re-run `dnd pack`, then restart") from exn
            self._handles[task] = opened
        return opened[1]

    def get(self, task: str, checkpoint: int) -> torch.Tensor:
        """Tokens of checkpoint `checkpoint` of `task`: float32 (T, H, W), read through the memory map."""
        entry = self.index["tasks"].get(task)
        if entry is None:
            raise TargetsError(f"task {task!r} is not in the packed targets ({self.tasks}); re-run `dnd pack`")
        if not 0 <= checkpoint < entry["num_checkpoints"]:
            raise IndexError(
                f"checkpoint index {checkpoint} out of range for task {task!r} with {entry['num_checkpoints']} checkpoints"
            )
        return self._tokens(task)[checkpoint]

    def gather(self, tasks: Sequence[str], checkpoints: Sequence[int]) -> torch.Tensor:
        """Tokens of several (task, checkpoint) pairs: float32 (B, T, H, W)."""
        out = torch.empty((len(tasks), self.num_tokens, *self.token_shape), dtype=torch.float32)
        for row, (task, checkpoint) in enumerate(zip(tasks, checkpoints, strict=True)):
            out[row] = self.get(task, checkpoint)
        return out

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_handles"], state["_pid"] = {}, None
        return state
