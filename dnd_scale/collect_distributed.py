"""`dnd collect` in several processes: the tasks split across ranks, and one merged manifest.

Under a launcher that sets RANK, WORLD_SIZE and LOCAL_RANK (`deepspeed --num_gpus N $(which dnd)
collect ...`, with or without `--no_local_rank`; `torchrun --nproc_per_node N -- $(which dnd) collect
...`, the `--` keeping torchrun from reading `--run` as its `--run-path`; srun with the variables
exported as `launchers/slurm_train.sh` does for `dnd train`), every rank loads the base model on its
own device (cuda:LOCAL_RANK for device "auto" or "cuda", `Ranks.device`) and the tasks are split
across the ranks:

1. Rank 0 alone prepares the run folder exactly as a single process does (`collect_folder`: lock,
   leftovers, base model, `store.COLLECT_META`, manifest repair) and lists the unfinished tasks in
   the order given; it sends that list (or the reason it could not start) to every rank. Nobody
   writes before that.
2. The unfinished tasks are dealt round robin in that order — rank r of N trains the tasks at
   positions r, r+N, r+2N, ... of the list (from 0). Every task trains the same number of steps at
   the same batch size, so counts balance the work, and the split is a pure function of the
   folder's state and the world size. Only the rank that owns a task writes into `<task>/`; no rank
   appends to the manifest (`store.MANIFEST`) meanwhile.
3. When every rank is done, rank 0 gathers the new manifest lines and rewrites the manifest once,
   atomically: the lines it already held, then the tasks of this job in the order given — the very
   file a single process writes for the same tasks, whichever rank finished first.

A task's LoRA does not depend on who trains it: the init seed is `seed` and the data order and
dropout seed derive from (seed, task name), never from the rank. If a job dies before step 3, the
finished tasks keep their checkpoints and completion markers (lines included): the next run, with
any number of processes, merges them in and trains only what is left. Coordination goes through a
gloo process group (MASTER_ADDR and MASTER_PORT from the launcher) on CPU memory, whatever the
device; a rank that dies makes the others fail at their next message rather than wait. The run
folder must be on a filesystem that every node sees at the same path.
"""

from __future__ import annotations

import contextlib
import os
from datetime import timedelta
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch.distributed as dist

from dnd_scale.collect_config import CollectConfig
from dnd_scale.collect_folder import exclusive_collect, is_finished, load_base, prepare_folder
from dnd_scale.collect_ranks import Ranks
from dnd_scale.collect_task import keep_prompt_pool, train_task
from dnd_scale.store import store_dir, write_manifest
from dnd_scale.tasks import Task


# How long a rank waits for the others: at the end, for the slowest rank's share (the shares differ
# by at most one task, but a task at 70B can take hours). Gloo fails at once when a peer process
# dies (its sockets close), so this only bounds a peer that hangs alive.
PEER_TIMEOUT = timedelta(days=7)


@contextlib.contextmanager
def _process_group(ranks: Ranks) -> Iterator[None]:
    """A gloo process group over the ranks: the few messages collect sends are small Python objects
    in CPU memory, and unlike NCCL gloo waits for a slow peer without a watchdog killing the job."""
    missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
    if missing:
        raise RuntimeError(
            f"rank {ranks.rank} of {ranks.world_size}: {' and '.join(missing)} not set; the ranks meet at "
            "MASTER_ADDR:MASTER_PORT (the deepspeed launcher and torchrun set them; under srun export them, "
            "see launchers/slurm_train.sh)"
        )
    if dist.is_initialized():
        # This process already belongs to a group (e.g. an earlier training in the same process): use it
        # when it is the same world, and leave it as it was found.
        if (dist.get_rank(), dist.get_world_size()) != (ranks.rank, ranks.world_size):
            raise RuntimeError(
                f"this process already is rank {dist.get_rank()} of {dist.get_world_size()} in a process group, "
                f"but collect was launched as rank {ranks.rank} of {ranks.world_size}; run collect in its own process"
            )
        yield
        return
    dist.init_process_group("gloo", rank=ranks.rank, world_size=ranks.world_size, timeout=PEER_TIMEOUT)
    try:
        yield
    finally:
        dist.destroy_process_group()


def deal_tasks(pending: Sequence[str], ranks: Ranks) -> list[str]:
    """This rank's share of the unfinished tasks: round robin over their order."""
    return list(pending[ranks.rank :: ranks.world_size])


def collect_as_rank(config: CollectConfig, tasks: Sequence[Task], run_dir: Path, ranks: Ranks) -> list[dict[str, Any]]:
    """One rank's part of a multi-process collect: rank 0 prepares, every rank trains its share, rank 0 merges."""
    checkpoints = store_dir(run_dir)
    names = [task.name for task in tasks]
    device = ranks.device(config.device)
    with _process_group(ranks), contextlib.ExitStack() as held:
        # 1. Rank 0 prepares the folder as a single process would; the others load the base meanwhile
        #    and wait for its list of unfinished tasks, so nobody writes into an unprepared folder.
        plan: list[Any] = [None]
        if ranks.rank == 0:
            try:
                checkpoints.mkdir(parents=True, exist_ok=True)
                held.enter_context(exclusive_collect(checkpoints))  # held until the merged manifest is written
                base, layout, manifest, missing = prepare_folder(config, run_dir, names, device)
                pending = []
                for task in tasks:
                    if is_finished(task, config, checkpoints, manifest + missing.get(task.name, [])):
                        keep_prompt_pool(checkpoints, task)
                    else:
                        pending.append(task.name)
                plan = [{"pending": pending}]
            except Exception as error:
                dist.broadcast_object_list([{"error": f"{type(error).__name__}: {error}"}], src=0)
                raise
            dist.broadcast_object_list(plan, src=0)
        else:
            base, layout = load_base(config, device)
            dist.broadcast_object_list(plan, src=0)
            if "error" in plan[0]:
                raise RuntimeError(f"rank 0 could not start the collection in {checkpoints}: {plan[0]['error']}")
        pending = plan[0]["pending"]

        # 2. This rank's share; only the owner of a task writes into its folder.
        by_name = {task.name: task for task in tasks}
        model, collected = base.model, {}
        for name in deal_tasks(pending, ranks):
            model, collected[name] = train_task(model, base.tokenizer, layout, by_name[name], config, checkpoints,
                                                ranks, manifest=None)

        # 3. Rank 0 writes the manifest once: the lines it kept, then this job's tasks in the order given.
        #    The lines travel through the process group, not the filesystem, so a shared filesystem that
        #    shows another node's new files late cannot drop them.
        parts: list[Any] | None = [None] * ranks.world_size if ranks.rank == 0 else None
        dist.gather_object(collected, parts, dst=0)
        if ranks.rank != 0:
            return [record for lines in collected.values() for record in lines]
        new = {name: lines for part in parts for name, lines in part.items()}
        manifest += [record for name in names for record in missing.get(name, new.get(name, []))]
        write_manifest(checkpoints, manifest)
    return [record for record in manifest if record["task"] in names]
