"""`dnd <stage> ...`: one command line for the whole pipeline.

    dnd plan      size a run from a model config (no weights needed)
    dnd collect   train a LoRA per task and keep a trajectory of checkpoints
    dnd pack      tokenize every checkpoint once; criterion weights; layout
    dnd shard     pair prompt batches with checkpoints in WebDataset shards
    dnd train     train the generator with DeepSpeed (launch with `deepspeed` for several GPUs)
    dnd generate  prompts of a new task -> PEFT adapter folder
    dnd eval      accuracy of base / training LoRAs / generated adapters
    dnd demo      the whole pipeline at tiny scale on CPU
    dnd experiment  a leave-one-out study: do generated adapters help on unseen tasks?
    dnd bench     data | kernels | scale: throughput and scale benchmarks

Each stage is a module with a `main(argv)`; this file only dispatches, so `dnd <stage> --help`
documents the stage next to its code.

DND_LOG_LEVEL=INFO (or DEBUG) in the environment prints dnd_scale's log records at that level,
e.g. which shards each rank and loader worker reads.
"""

from __future__ import annotations

import importlib
import logging
import os
import signal
import sys

STAGES = {
    "plan": "dnd_scale.plan",
    "collect": "dnd_scale.collect",
    "pack": "dnd_scale.pack",
    "shard": "dnd_scale.shards",
    "train": "dnd_scale.trainer",
    "generate": "dnd_scale.generate",
    "eval": "dnd_scale.evaluate",
    "demo": "dnd_scale.demo",
    "experiment": "dnd_scale.experiment",
    "bench": "dnd_scale.bench",
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0].startswith(("--local_rank=", "--local-rank=")):
        # `deepspeed $(which dnd) <stage> ...` without --no_local_rank puts the flag before the stage;
        # the stages that run under a launcher (train, collect) take it, after their name.
        argv = [*argv[1:2], argv[0], *argv[2:]]
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    level = os.environ.get("DND_LOG_LEVEL", "").upper()
    if level:
        if not isinstance(logging.getLevelName(level), int):
            print(f"dnd: DND_LOG_LEVEL={level!r} is not a log level; use DEBUG, INFO, WARNING or ERROR", file=sys.stderr)
            return 2
        logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        logging.getLogger("dnd_scale").setLevel(level)
    stage, rest = argv[0], argv[1:]
    if stage not in STAGES:
        print(f"dnd: unknown stage {stage!r}; stages: {', '.join(STAGES)}", file=sys.stderr)
        return 2
    module = importlib.import_module(STAGES[stage])
    # SIGTERM (`kill`, a scheduler) ends a stage as Ctrl-C does, through its cleanup (staging folders,
    # temporary files, locks), where Python by default dies at once and leaves them behind.
    # `dnd train` checkpoints on it instead while it trains (trainer.StopRequest).
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    return int(module.main(rest) or 0)


def _exit_on_sigterm(signum: int, frame) -> None:
    raise SystemExit(128 + signum)


if __name__ == "__main__":
    sys.exit(main())
