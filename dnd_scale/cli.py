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

A user error (a bad recipe or override, a missing file or folder, an unsupported model family, an
artifact that fails its checks) prints one paragraph, `dnd <stage>: error: <what to do>`, and exits
with status 1; `--debug` anywhere on the command line shows the traceback instead.

DND_LOG_LEVEL=INFO (or DEBUG) in the environment prints dnd_scale's log records at that level,
e.g. which shards each rank and loader worker reads.
"""

from __future__ import annotations

import importlib
import logging
import os
import signal
import sys
import traceback
from pathlib import Path

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


_PACKAGE = Path(__file__).resolve().parent
_PATH_ERRORS = (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError, PermissionError)


def is_user_error(error: BaseException) -> bool:
    """An error whose message is meant for the user: one of dnd_scale's own error types (a bad
    recipe, artifact, layout, ...), a path that does not exist or cannot be used, or a ValueError /
    RuntimeError that dnd_scale itself raised with a message saying what to do. A ValueError raised
    deep inside torch or transformers is not: that one is a bug to report, with its traceback."""
    try:
        from dnd_scale.config import ConfigError
        from dnd_scale.io import ArtifactError, FolderBusyError
    except ImportError:  # the installation itself is broken: show everything
        return False
    if isinstance(error, (ConfigError, ArtifactError, FolderBusyError, *_PATH_ERRORS)):
        return True
    frames = traceback.extract_tb(error.__traceback__)
    raised_here = bool(frames) and Path(frames[-1].filename).resolve().is_relative_to(_PACKAGE)
    return isinstance(error, (ValueError, RuntimeError, ImportError)) and raised_here


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [arg for arg in argv if arg != "--debug"]
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
    # SIGTERM (`kill`, a scheduler) ends a stage as Ctrl-C does, through its cleanup (staging folders,
    # temporary files, locks), where Python by default dies at once and leaves them behind.
    # `dnd train` checkpoints on it instead while it trains (trainer.StopRequest).
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    from dnd_scale.io import drop_deferred_writes, flush_deferred_writes

    try:
        module = importlib.import_module(STAGES[stage])
        status = int(module.main(rest) or 0)
        if status == 0:  # a stage that ends well records what it deferred even if it wrote nothing (its recipe)
            flush_deferred_writes()
        return status
    except Exception as error:  # noqa: BLE001 - sorted into user errors and bugs right here
        if debug or not is_user_error(error):
            raise
        print(f"dnd {stage}: error: {error}\n(run again with --debug to see where it was raised)", file=sys.stderr)
        return 1
    finally:
        drop_deferred_writes()  # a refused stage records nothing


def _exit_on_sigterm(signum: int, frame) -> None:
    raise SystemExit(128 + signum)


if __name__ == "__main__":
    sys.exit(main())
