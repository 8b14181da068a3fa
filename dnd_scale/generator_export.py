"""The generator export: what `dnd train` writes when training ends and `dnd generate` loads.

    <train output folder>/export/
        model.safetensors   the generator's fp32 weights (safetensors metadata: the format tag)
        config.json         the format tag, generator config, layout, tokenizer config, encoder,
                            prompts per condition, base model and its identity, step, the training
                            config, and the sha256 of model.safetensors

The folder is written whole (`io.atomic_folder`). A reader checks the format tag first, then the
weights against the recorded sha256: an export of another format, or weights replaced after the
export, are refused with what to do.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import torch

from dnd_scale.io import (
    ArtifactError,
    atomic_folder,
    load_safetensors,
    read_json,
    save_safetensors,
    sha256_file,
    write_json,
)

EXPORT_DIR = "export"  # in the training output folder
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
FORMAT = "dnd-generator-1"

_REEXPORT = "re-export the generator with `dnd train --export-only`"


def export_folder(train_dir: str | os.PathLike) -> Path:
    """The export folder of a training output folder."""
    return Path(train_dir) / EXPORT_DIR


def is_exported(folder: str | os.PathLike) -> bool:
    """Whether `folder` holds an export's weights (a finished training run); nothing is checked."""
    return (Path(folder) / WEIGHTS).is_file()


def write_export(folder: str | os.PathLike, state: Mapping[str, torch.Tensor], meta: Mapping[str, Any],
                 writer: str = "dnd train") -> Path:
    """Write the export folder whole: the weights, and `meta` with the format tag and the weights' sha256."""
    folder = Path(folder)
    with atomic_folder(folder, writer) as staging:
        save_safetensors(state, staging / WEIGHTS, metadata={"format": FORMAT})
        write_json(staging / CONFIG, {"format": FORMAT, **meta, "weights_sha256": sha256_file(staging / WEIGHTS)})
    return folder


def read_export_config(folder: str | os.PathLike) -> dict[str, Any]:
    """The export's `CONFIG`, after checking its format tag."""
    folder = Path(folder)
    config = read_json(folder / CONFIG, "generator config")
    found = config.get("format") if isinstance(config, dict) else None
    if found != FORMAT:
        what = "has no format tag" if found is None else f"has format {found!r}"
        raise ArtifactError(
            f"{folder / CONFIG} {what}, so it is not a generator export this version reads (format {FORMAT!r}); "
            f"pass the `export` folder that `dnd train` wrote, or {_REEXPORT}"
        )
    return config


def load_export_weights(folder: str | os.PathLike, config: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], str]:
    """(the weights, their sha256), after checking them against the sha256 `config` records."""
    folder = Path(folder)
    recorded = config.get("weights_sha256")
    state = load_safetensors(folder / WEIGHTS, "exported generator")
    sha256 = sha256_file(folder / WEIGHTS)
    if recorded is None:
        raise ArtifactError(f"{folder / CONFIG} records no weights_sha256, so the weights cannot be checked; {_REEXPORT}")
    if sha256 != recorded:
        raise ArtifactError(
            f"{folder / WEIGHTS} has sha256 {sha256[:12]}, but its {CONFIG} records {recorded[:12]}: the weights "
            f"changed after `dnd train` exported them (or are corrupt); {_REEXPORT}"
        )
    return state, sha256


def weights_misfit(folder: str | os.PathLike, missing: list[str], unexpected: list[str]) -> ArtifactError:
    """The error for weights that do not fit the generator the export's config describes."""
    return ArtifactError(
        f"{Path(folder) / WEIGHTS} does not fit its {CONFIG}: missing {missing[:3]}, unexpected {unexpected[:3]}; "
        f"{_REEXPORT}"
    )
