"""Artifact I/O: atomic writes of files and folders, safetensors with clear errors, content hashes,
JSONL manifests, exclusive folder locks.

Every file goes through a temporary file in the destination folder and `os.replace`, and every
folder that is written whole through a staging folder beside it (`atomic_folder`), so an
interrupted run leaves either the old artifact or the new one, never half of one.

A write can be held back until the process writes its first artifact (`defer_write`): that is how a
stage records its recipe only once it has passed its checks and starts work, so a refused stage
leaves its run folder as it was.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

logger = logging.getLogger(__name__)

TMP_SUFFIX = ".tmp"
LOCK_FILE = ".lock"
_UMASK = os.umask(0o022)
os.umask(_UMASK)


class ArtifactError(ValueError):
    """An input artifact is missing, unreadable or inconsistent; the message says what to do."""


class DiskFullError(OSError):
    """A write failed because its file system is full; the message names where and what to do."""


# Below this many free bytes, a write that failed without saying why failed for lack of space.
_NEARLY_FULL_BYTES = 16 << 20


def _free_bytes(path: Path) -> int:
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def _is_disk_full(err: BaseException, path: Path) -> bool:
    """ENOSPC (or a quota) anywhere in the exception's chain, a library's message of it
    (safetensors), or, for errors that say nothing (torch.save: "unexpected pos"), no space left."""
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(seen) or "os error 28" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    if not isinstance(err, (OSError, RuntimeError)):
        return False  # a refusal raised inside a write (bad values) stays what it is
    try:
        return _free_bytes(path) < _NEARLY_FULL_BYTES
    except OSError:
        return False


@contextlib.contextmanager
def reporting_full_disk(path: str | os.PathLike) -> Iterator[None]:
    """Turn an error of a write under `path` that a full disk caused into a DiskFullError that says so."""
    try:
        yield
    except DiskFullError:
        raise
    except Exception as err:
        if not _is_disk_full(err, Path(path)):
            raise
        try:
            free = f"{_free_bytes(Path(path)) / 2**20:.1f} MiB free"
        except OSError:
            free = "free space unknown"
        raise DiskFullError(
            errno.ENOSPC,
            f"no space left on the device of {path} ({free}) while writing it: free space there, or write to "
            f"another disk, then run the stage again ({type(err).__name__}: {err})",
        ) from err


_deferred: list[Callable[[], None]] = []


def defer_write(write: Callable[[], None]) -> None:
    """Hold `write` back until this process writes its next artifact (`atomic_path`, `atomic_folder`,
    `append_jsonl`), which runs it first; `flush_deferred_writes` runs it at once and
    `drop_deferred_writes` forgets it. A stage defers what it records about itself this way (its
    recipe): checks that refuse the stage come before its first write, so a refused stage writes nothing."""
    _deferred.append(write)


def flush_deferred_writes() -> None:
    """Run the writes `defer_write` held back, in order, once each."""
    while _deferred:
        _deferred.pop(0)()


def drop_deferred_writes() -> None:
    """Forget the writes `defer_write` held back (the stage that deferred them ended without writing)."""
    _deferred.clear()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds.
    A full disk is reported as a DiskFullError naming ``path``."""
    flush_deferred_writes()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    os.close(fd)
    try:
        with reporting_full_disk(path):
            yield Path(tmp)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; artifacts are as readable as any file
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


class FolderBusyError(RuntimeError):
    """Another process holds a folder's exclusive lock; the message names the folder and what to do."""


@contextlib.contextmanager
def exclusive_folder(folder: str | os.PathLike, writer: str, remedy: str, name: str = LOCK_FILE) -> Iterator[None]:
    """Hold `folder`'s exclusive lock for the block, or fail at once if another process holds it.

    `writer` names the stage (``dnd collect``) and `remedy` says what to do instead, for the message.
    An flock on `<folder>/<name>` (`.lock`; a stage whose output folder is swapped whole locks a
    file of its own beside it): the OS drops it when its process dies, so a killed run never leaves
    a stale lock behind (the file itself stays and means nothing).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / name, "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise FolderBusyError(f"another `{writer}` is writing to {folder}; {remedy}") from None
        yield


@contextlib.contextmanager
def building(folder: str | os.PathLike) -> Iterator[Path]:
    """Hold an flock on a staging folder while a stage builds it (the lock follows the folder through
    renames and dies with the process), so `remove_stale_staging` of a later run tells a killed
    run's leftovers from a folder another run is building now."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield Path(folder)
    finally:
        os.close(fd)


def _being_built(folder: Path) -> bool:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def remove_stale_staging(parent: str | os.PathLike, patterns: Sequence[str]) -> list[Path]:
    """Remove the staging folders (glob `patterns` under `parent`) that killed runs left behind; none
    while any of them is being built (`building`): another run of the stage is at work there."""
    found = sorted({p for pattern in patterns for p in Path(parent).glob(pattern) if p.is_dir()})
    if any(_being_built(p) for p in found):
        return []
    for path in found:
        shutil.rmtree(path, ignore_errors=True)
    return found


def _staging_patterns(dest: Path) -> list[str]:
    return [f".{dest.name}-staging-*", f".{dest.name}-old-*"]


def remove_stale_builds(dest: str | os.PathLike, writer: str) -> list[Path]:
    """Remove what an `atomic_folder` of `dest` killed by SIGKILL left beside it (its staging folder,
    or the retired old folder); nothing while another run builds `dest` now. `writer` names the stage
    for the warning."""
    dest = Path(dest)
    stale = remove_stale_staging(dest.parent, _staging_patterns(dest))
    if stale:
        logger.warning("removed what a killed `%s` left: %s", writer, ", ".join(p.name for p in stale))
    return stale


@contextlib.contextmanager
def atomic_folder(dest: str | os.PathLike, writer: str) -> Iterator[Path]:
    """Yield an empty staging folder beside `dest`; put it in place of `dest` only if the block succeeds.

    The staging folder `.<name>-staging-XXXX` is held with `building` while the block fills it, so a
    later run tells a killed run's leftovers (removed on entry, see `remove_stale_builds`) from a
    folder another run builds now. On success an existing `dest` is renamed to `.<name>-old-XXXX`,
    the staging folder to `dest`, and the old folder is removed last: a crash between the two renames
    leaves no `dest` at all, which readers refuse, never a mix of the old and the new. On error (or
    SIGTERM) the staging folder is removed and `dest` is as it was. A full disk is reported as a
    DiskFullError naming `dest`. `dest` itself is swapped, so a lock that serializes its writers
    (`exclusive_folder`) must live outside it. `writer` names the stage (``dnd pack``) in warnings.
    """
    flush_deferred_writes()
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_builds(dest, writer)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}-staging-", dir=dest.parent))
    try:
        os.chmod(staging, 0o777 & ~_UMASK)  # mkdtemp makes 0700; artifacts are as readable as any folder
        with building(staging), reporting_full_disk(dest):
            yield staging
        _swap_in(staging, dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _swap_in(staging: Path, dest: Path) -> None:
    """Put the complete folder `staging` in place of `dest` (two renames on one file system)."""
    if not dest.exists():
        os.replace(staging, dest)
        return
    retired = Path(tempfile.mkdtemp(prefix=f".{dest.name}-old-", dir=dest.parent))
    os.rmdir(retired)
    os.replace(dest, retired)
    try:
        os.replace(staging, dest)
    except BaseException:
        os.replace(retired, dest)
        raise
    shutil.rmtree(retired, ignore_errors=True)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_text(path: str | os.PathLike, what: str = "file") -> str:
    """The text of a UTF-8 file; a file that is not UTF-8 is an ArtifactError naming it."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ArtifactError(
            f"{what} {str(path)!r} is not UTF-8 text (byte {err.object[err.start]:#04x} at offset {err.start}); "
            "save it as UTF-8"
        ) from None


def read_json(path: str | os.PathLike, what: str = "file") -> Any:
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{what} {str(path)!r} not found")
    try:
        return json.loads(read_text(path, what))
    except json.JSONDecodeError as err:
        raise ArtifactError(f"{what} {str(path)!r} is not valid JSON ({err})") from None


def append_jsonl(path: str | os.PathLike, record: Mapping[str, Any]) -> None:
    """Append one line and fsync it (a manifest line is written only after its artifact exists)."""
    flush_deferred_writes()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with reporting_full_disk(path), open(path, "a") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Records of a JSONL file; a torn last line (killed writer) is dropped, any other bad line raises."""
    path = Path(path)
    if not path.exists():
        return []
    lines = read_text(path).splitlines()
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise ArtifactError(f"{path}: line {i + 1} is not valid JSON; the manifest is corrupt") from None
    return records


def save_safetensors(
    tensors: Mapping[str, torch.Tensor], path: str | os.PathLike, metadata: Mapping[str, str] | None = None
) -> None:
    contiguous = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(contiguous, str(tmp), metadata=dict(metadata) if metadata else None)


_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


def save_flat_safetensors(
    flat: torch.Tensor,
    entries: list[tuple[str, tuple[int, ...], int]],
    path: str | os.PathLike,
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write a 1-D CPU buffer that already holds every tensor back to back as a safetensors file.

    `entries` = (name, shape, element offset) for each tensor, in buffer order, tiling the whole
    buffer. The file is the format's header followed by the buffer itself, written in one call:
    no per-tensor copies (a generated adapter is one detokenized buffer laid out this way).
    """
    if flat.dim() != 1 or not flat.is_contiguous() or flat.device.type != "cpu" or flat.dtype not in _SAFETENSORS_DTYPES:
        raise ValueError(
            f"save_flat_safetensors needs a contiguous 1-D CPU tensor of {sorted(map(str, _SAFETENSORS_DTYPES))}, "
            f"got shape {tuple(flat.shape)} {flat.dtype} on {flat.device}"
        )
    size = flat.element_size()
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    expected = 0
    for name, shape, offset in entries:
        numel = 1
        for d in shape:
            numel *= int(d)
        if offset != expected:
            raise ValueError(f"save_flat_safetensors: {name} starts at element {offset}, expected {expected} (no gaps)")
        header[name] = {"dtype": _SAFETENSORS_DTYPES[flat.dtype], "shape": [int(d) for d in shape],
                        "data_offsets": [offset * size, (offset + numel) * size]}  # fmt: skip
        expected = offset + numel
    if expected != flat.numel():
        raise ValueError(f"save_flat_safetensors: the entries cover {expected} of the buffer's {flat.numel()} elements")
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        f.write(flat.view(torch.uint8).numpy().data)


def _check_safetensors_file(path: Path, what: str) -> None:
    """Refuse clearly what is not a safetensors file: missing, a pickle .bin/.pt, a bad header."""
    if not path.is_file():
        raise ArtifactError(f"{what} {str(path)!r} not found")
    with open(path, "rb") as f:
        head = f.read(9)
    # a safetensors file opens with the u64 length of its JSON header, then "{"
    looks_safetensors = len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < path.stat().st_size
    if not looks_safetensors:
        kind = "it looks like a torch.save pickle/zip" if head[:2] == b"PK" or head[:1] == b"\x80" else "bad header"
        raise ArtifactError(
            f"{what} {str(path)!r} is not safetensors ({kind}); dnd_scale never unpickles inputs. "
            "Convert it with safetensors.torch.save_file (after torch.load(..., weights_only=True))."
        )


def load_safetensors(path: str | os.PathLike, what: str = "tensor file") -> dict[str, torch.Tensor]:
    """Load a safetensors file; anything else (a pickle .bin/.pt, a truncated file) is refused clearly."""
    path = Path(path)
    _check_safetensors_file(path, what)
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise ArtifactError(f"{what} {str(path)!r} is not a readable safetensors file ({err})") from None


def safetensors_keys(path: str | os.PathLike, what: str = "tensor file") -> list[str]:
    """The tensor names of a safetensors file, read from its header alone (no tensor data)."""
    path = Path(path)
    _check_safetensors_file(path, what)
    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    except (SafetensorError, OSError, ValueError) as err:
        raise ArtifactError(f"{what} {str(path)!r} is not a readable safetensors file ({err})") from None


def sha256_file(path: str | os.PathLike, block: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def sha256_text(*parts: str) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()


def canonical_json_sha256(obj: Any) -> str:
    """sha256 of the canonical JSON text of `obj` (sorted keys, no spaces)."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
