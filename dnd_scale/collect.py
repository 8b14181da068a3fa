"""`dnd collect`: train one LoRA per task on the frozen base model and keep a trajectory of checkpoints.

For each task, a fresh LoRA is trained on the task's prompt/response records, with the loss on the
response tokens only (`collect_examples`), and the adapter is saved every `save_every` steps over
the last `save_last` steps (`collect_task`), into the run's checkpoint store (`<run>/checkpoints`;
its files are listed in `store`). The settings are a `CollectConfig` (`collect_config`).

A random-init base model (source = a config.json) is also written to `<run>/base_model` so that the
later stages load the very weights the checkpoints were trained on (`collect_folder`).

Crash safety: every file is written to a temporary name and renamed into place; a manifest line is
appended only after its checkpoint file exists; the task's completion marker (`store.COMPLETE`)
only after its last line. A re-run skips finished tasks. An unfinished task resumes from its resume
state (`store.RESUME`: the LoRA, optimizer, RNG state and step, saved at each checkpoint and every
`resume_every` steps; see `collect_task`), or restarts from scratch without a usable one; either way
the result equals that of an uninterrupted run (bit for bit on CPU, where training is deterministic
for a seed). Until the task is finished its manifest lines are dropped on every re-run and appended
again, so the manifest lists finished tasks only.

Several processes: under a launcher that sets RANK, WORLD_SIZE and LOCAL_RANK (deepspeed, torchrun,
srun; `collect_ranks`) the tasks are split across the ranks and rank 0 writes one merged manifest,
the very file a single process writes (`collect_distributed`).
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import Any, Sequence

from dnd_scale.collect_config import CollectConfig
from dnd_scale.collect_distributed import collect_as_rank
from dnd_scale.collect_folder import exclusive_collect, is_finished, prepare_folder
from dnd_scale.collect_ranks import Ranks
from dnd_scale.collect_task import keep_prompt_pool, train_task
from dnd_scale.io import append_jsonl
from dnd_scale.store import MANIFEST, read_manifest, store_dir
from dnd_scale.tasks import Task, check_answers_vary, load_tasks

logger = logging.getLogger(__name__)


def collect(config: CollectConfig, tasks: Sequence[Task], run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Collect the checkpoint trajectory of every task into `<run_dir>/checkpoints`; return their manifest lines.

    Finished tasks are skipped; an interrupted task resumes from its resume state (from scratch without one). Under a launcher
    (WORLD_SIZE > 1) every rank calls this with the same arguments and trains its share of the tasks
    (`collect_distributed`); rank 0 returns the manifest lines of all `tasks`, another rank those
    of the tasks it trained.
    """
    names = [task.name for task in tasks]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"task names must be unique within a run, found duplicates {duplicates}")
    if not config.base_model:
        raise ValueError("collect needs base_model: a model folder, a .gguf file or a model config.json")
    for task in tasks:
        check_answers_vary(task)
    ranks = Ranks.from_environment()
    if ranks.world_size > 1:
        return collect_as_rank(config, tasks, Path(run_dir), ranks)
    run_dir = Path(run_dir)
    checkpoints = store_dir(run_dir)
    checkpoints.mkdir(parents=True, exist_ok=True)
    with exclusive_collect(checkpoints):
        base, layout, manifest, missing = prepare_folder(config, run_dir, names, config.device)
        model = base.model
        for task in tasks:
            if is_finished(task, config, checkpoints, manifest + missing.get(task.name, [])):
                logger.info("task %s: already collected, skipped", task.name)
                keep_prompt_pool(checkpoints, task)
                for record in missing.get(task.name, []):  # finished by a rank of a job that stopped early
                    append_jsonl(checkpoints / MANIFEST, record)
                continue
            # An interrupted attempt's manifest lines were dropped above; train_task resumes it or clears it.
            model, _ = train_task(model, base.tokenizer, layout, task, config, checkpoints, ranks,
                                  manifest=checkpoints / MANIFEST)
    return [record for record in read_manifest(run_dir) if record["task"] in names]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="dnd collect",
        description="Train a LoRA per task and keep a trajectory of checkpoints in <run>/checkpoints. "
                    "Overrides: --collect.field=value (e.g. --collect.steps=300 --collect.lora.rank=16).",
    )
    parser.add_argument("--run", required=True, help="run folder; checkpoints go to <run>/checkpoints")
    parser.add_argument("--config", help="YAML recipe; its `collect:` section and `tasks:` list are read "
                                         "(default: the recipe saved in the run folder)")
    parser.add_argument("--tasks", nargs="+", metavar="SPEC",
                        help="task specs (default: the recipe's tasks): file.json, file.jsonl, hf:name[:split], "
                             "synthetic:family")
    parser.add_argument("--synthetic-records", type=int,
                        help="records per synthetic task (default: the recipe's synthetic_records)")
    # The deepspeed launcher appends --local_rank unless given --no_local_rank; the rank comes from
    # the environment either way.
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    # The recipe machinery imports every stage's config; only the command line needs it.
    from dnd_scale.recipe import parse_stage_args

    args, run = parse_stage_args(parser, argv, "collect", lambda args: {
        "tasks": args.tasks, "synthetic_records": args.synthetic_records})
    if not run.tasks:
        parser.error("no tasks: pass --tasks SPEC ... or list them under `tasks:` in the recipe")
    config = run.collect
    tasks = load_tasks(run.tasks, num_records=run.synthetic_records, seed=config.seed)
    records = collect(config, tasks, args.run)
    ranks = Ranks.from_environment()
    if ranks.rank == 0:
        print(f"dnd collect: {len(tasks)} tasks, {len(records)} checkpoints -> {store_dir(args.run)}")
    else:
        collected = len({record["task"] for record in records})
        print(f"dnd collect: rank {ranks.rank} of {ranks.world_size} collected {collected} tasks")
    return 0
