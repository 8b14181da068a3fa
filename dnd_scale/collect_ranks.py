"""`Ranks`: this process's place among the processes of one `dnd collect` job, from what the launcher
exports (one process without a launcher), and the device that place gives it."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Ranks:
    """This process's place among the processes of one `dnd collect` job."""

    rank: int = 0
    """RANK: 0 prepares the run folder and writes the merged manifest."""
    local_rank: int = 0
    """LOCAL_RANK: the rank's index on its node, which picks its GPU."""
    world_size: int = 1
    """WORLD_SIZE: how many processes share the tasks."""

    @classmethod
    def from_environment(cls) -> Ranks:
        """What the deepspeed launcher, torchrun and srun (launchers/) export; a world of one without them."""
        names = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
        found = {name: os.environ[name] for name in names if name in os.environ}
        if not found:
            return cls()
        if "RANK" not in found or "WORLD_SIZE" not in found:
            raise RuntimeError(
                f"the environment sets {', '.join(f'{k}={v}' for k, v in found.items())} but not both RANK and "
                "WORLD_SIZE; start several ranks through deepspeed, torchrun or srun with RANK, WORLD_SIZE and "
                "LOCAL_RANK exported (see launchers/), or unset them to collect in one process"
            )
        try:
            ranks = cls(int(found["RANK"]), int(found.get("LOCAL_RANK", 0)), int(found["WORLD_SIZE"]))
        except ValueError:
            raise RuntimeError(f"RANK, WORLD_SIZE and LOCAL_RANK must be integers, got {found}") from None
        if not 0 <= ranks.rank < ranks.world_size or ranks.local_rank < 0:
            raise RuntimeError(f"RANK must be in [0, WORLD_SIZE) and LOCAL_RANK >= 0, got {found}")
        return ranks

    def device(self, device: str) -> str:
        """The device this rank trains on: with several ranks, "auto" and "cuda" mean cuda:LOCAL_RANK,
        or cuda:0 where the launcher shows each rank only its own GPU (srun --gpus-per-task=1)."""
        if self.world_size == 1 or device not in ("auto", "cuda") or not torch.cuda.is_available():
            return device  # "auto" without a GPU is the CPU; "cuda" without one fails in resolve_device
        count = torch.cuda.device_count()
        index = 0 if count == 1 else self.local_rank
        if index >= count:
            raise RuntimeError(
                f"rank {self.rank} has LOCAL_RANK {self.local_rank}, but it sees {count} GPUs "
                f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); start at most {count} "
                "ranks per node, one per GPU, or show each rank only its own GPU"
            )
        torch.cuda.set_device(index)  # stray allocations land on this rank's GPU too
        return f"cuda:{index}"
