"""The run folder: one place that names its parts, so every stage finds the others' artifacts.

    <run>/
        checkpoints/    the checkpoint store of `dnd collect` (`store`)
        base_model/     a random-init base model, saved by `dnd collect` (`basemodel.save_base_model`)
        targets/        the packed targets of `dnd pack` (`targets`)
        shards/         the shard set of `dnd shard` (`shards`)
        conditions/     the condition caches of `dnd train` (`train_data.condition_cache_dir`)
        generator/      `dnd train`'s output folder (`train.output_dir`), its export in `export/`
                        (`generator_export`)
        adapters/       adapters generated for the run (`dnd demo`, `dnd experiment`)

Each part's files are named by the module that owns it; this module names the parts alone.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RunDir:
    """The parts of the run folder `root`."""

    root: Path
    """The run folder (``--run``)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def base_model(self) -> Path:
        return self.root / "base_model"

    @property
    def targets(self) -> Path:
        return self.root / "targets"

    @property
    def shards(self) -> Path:
        return self.root / "shards"

    @property
    def conditions(self) -> Path:
        return self.root / "conditions"

    @property
    def adapters(self) -> Path:
        return self.root / "adapters"

    def train_output(self, output_dir: str | os.PathLike) -> Path:
        """`dnd train`'s output folder: `output_dir` (train.output_dir) under the run, or as is when absolute."""
        return Path(output_dir) if os.path.isabs(output_dir) else self.root / output_dir
