"""`dnd <stage> ...`: one command line for the whole pipeline.

    dnd plan      size a run from a model config (no weights needed)
    dnd collect   train a LoRA per task and keep a trajectory of checkpoints
    dnd pack      tokenize every checkpoint once; criterion weights; layout
    dnd shard     pair prompt batches with checkpoints in WebDataset shards
    dnd train     train the generator with DeepSpeed (launch with `deepspeed` for several GPUs)
    dnd generate  prompts of a new task -> PEFT adapter folder
    dnd eval      accuracy of base / training LoRAs / generated adapters
    dnd demo      the whole pipeline at tiny scale on CPU
    dnd bench     data | kernels: throughput benchmarks

Each stage is a module with a `main(argv)`; this file only dispatches, so `dnd <stage> --help`
documents the stage next to its code.
"""

from __future__ import annotations

import importlib
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
    stage, rest = argv[0], argv[1:]
    if stage not in STAGES:
        print(f"dnd: unknown stage {stage!r}; stages: {', '.join(STAGES)}", file=sys.stderr)
        return 2
    module = importlib.import_module(STAGES[stage])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
