"""What `dnd train` logs: per-step metrics from rank 0 and the damaged data all ranks skipped.

`MetricsLog` writes METRICS (JSONL, the record tests compare) and TensorBoard events (TENSORBOARD);
on resume it cuts both back to the checkpoint so they read like one uninterrupted run. `skip_totals`
sums every rank's skipped-data counts (`loader.SKIP_KINDS`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from dnd_scale.io import append_jsonl, atomic_path, read_jsonl, reporting_full_disk
from dnd_scale.loader import SKIP_KINDS
from dnd_scale.train_data import BatchStream

METRICS = "metrics.jsonl"
TENSORBOARD = "tensorboard"  # the folder of the TensorBoard event files


class MetricsLog:
    """Per-step metrics from rank 0: JSONL (the record tests compare) and TensorBoard."""

    def __init__(self, out_dir: Path, start_step: int, enabled: bool) -> None:
        self.enabled = enabled
        self.path = out_dir / METRICS
        self.tb = None
        if not enabled:
            return
        if start_step > 0:
            # Drop what was logged after the checkpoint (a killed run's lost steps) so the log
            # reads like one uninterrupted run.
            kept = [r for r in read_jsonl(self.path) if r["step"] <= start_step]
            with atomic_path(self.path) as tmp:
                tmp.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in kept))
        elif self.path.exists():
            self.path.unlink()
        from torch.utils.tensorboard import SummaryWriter

        self.tb = SummaryWriter(str(out_dir / TENSORBOARD), purge_step=start_step + 1 if start_step else None)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        append_jsonl(self.path, record)
        with reporting_full_disk(self.path.parent / TENSORBOARD):  # its writer thread's error surfaces here
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tb.add_scalar(f"train/{key}", value, record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def skip_totals(stream: BatchStream, device: torch.device) -> dict[str, int]:
    """The damaged data every rank's stream skipped so far, summed over ranks ({kind: count} of
    SKIP_KINDS); collective. Each rank's counts are part of its data position, so they survive a resume."""
    import deepspeed.comm as dist

    mine = getattr(stream, "skipped", None) or {}
    counts = torch.tensor([float(mine.get(kind, 0)) for kind in SKIP_KINDS], dtype=torch.float64, device=device)
    dist.all_reduce(counts)
    return {kind: int(n) for kind, n in zip(SKIP_KINDS, counts.tolist())}
