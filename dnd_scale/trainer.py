"""`dnd train`: fit the hyper-convolutional generator with DeepSpeed on (prompts → checkpoint) pairs.

The whole flow, top to bottom, is this module (`train` → `_train` → `_fit`); each step's parts live
in a module of their own:

1. Config (`train_config`): `TrainConfig` → the DeepSpeed JSON (`deepspeed_config`), saved beside
   the run, never hand-edited: global batch = micro batch × gradient accumulation × world size.
2. Data (`train_data`): the packed targets and the shard set of `<run>/`; each rank streams its own
   micro-batches (`PairStream` around `dnd_scale.loader.PairLoader`), conditions come from the
   memory-mapped prompt-pool caches (`ConditionSource`; no encoder work per step) or from the
   encoder on the fly.
3. Engine (`train_engine`): `HyperConvGenerator` (built under `deepspeed.zero.Init` for ZeRO-3, so
   no rank ever holds the whole generator), torch AdamW (no JIT-compiled ops, so CPU ranks with gloo
   work), linear warmup + cosine as a `LambdaLR` that the engine steps identically on every rank;
   refused before anything is built when `dnd plan`'s estimate, plus the data `train.resident` puts
   on the GPU, does not fit it.
4. Loop (`_fit`): masked, per-token-weighted MSE; one collective per step averages the loss over
   ranks and tells every rank whether any of them received SIGTERM; rank 0 logs (`train_metrics`).
5. Checkpoints (`train_checkpoint`) every K steps and on SIGTERM (at the step boundary, then a clean
   exit): the engine's full state plus, per rank, the data-stream position and RNG states, and the
   run they belong to (resolved train config, data identity), checked on resume; loaded with
   `weights_only=True`. `resume=True` continues the same trajectory; logs are cut back to the
   checkpoint so they read like one uninterrupted run.
6. Export (`export_generator`; `generator_export` names the files): every parameter's fp32 master
   copy gathered (ZeRO-3 shards included) into one `export/model.safetensors` + `export/config.json`
   (generator, layout, tokenizer, encoder) on rank 0.

Outputs, under `<run>/<output_dir>/` (default `<run>/generator/`), each named by its writer's constant:
    here: TRAIN_CONFIG, DEEPSPEED_CONFIG, TRAIN_INFO;  `train_metrics`: METRICS, TENSORBOARD/;
    `train_checkpoint`: CHECKPOINTS_DIR/<tag>/ + CHECKPOINTS_DIR/LATEST;  `generator_export`: export/

Launch: `dnd train --run RUN` runs one process; `deepspeed [--hostfile H] --no_local_rank $(which dnd)
train --run RUN` runs one rank per GPU (see launchers/).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from tqdm import tqdm

from dnd_scale.config import save_config, to_dict
from dnd_scale.encoder import resolve_encoder_path
from dnd_scale.generator import generator_loss, resolve_features, resolve_impl
from dnd_scale.generator_export import export_folder, write_export
from dnd_scale.io import FolderBusyError, exclusive_folder, read_json, write_json
from dnd_scale.plan import PlanError, check_gpu_memory
from dnd_scale.resident import ResidentData, resident_bytes, resolve_resident
from dnd_scale.rundir import RunDir
from dnd_scale.store import collected_base, store_dir
from dnd_scale.train_checkpoint import (
    CHECKPOINTS_DIR,
    StopRequest,
    check_resume_config,
    checkpoint_tag,
    latest_checkpoint,
    load_checkpoint,
    run_identity,
    save_checkpoint,
)
from dnd_scale.train_config import TrainConfig, TrainError, condition_length, deepspeed_config
from dnd_scale.train_data import BatchStream, ConditionSource, StreamFactory, TrainingData, condition_source, pair_stream
from dnd_scale.train_engine import (
    build_engine,
    drop_standalone_env,
    gather_fp32_state,
    init_distributed,
    parameter_counts,
)
from dnd_scale.train_metrics import MetricsLog, skip_totals

TRAIN_CONFIG = "train_config.yaml"  # the resolved train config; a resumption must match it
DEEPSPEED_CONFIG = "deepspeed_config.json"  # derived from the train config, for the record
TRAIN_INFO = "train_info.json"  # world size, batch, device, parameters, features; read by experiment and bench


# --------------------------------------------------------------------------------------------------
# The run


def train(
    config: TrainConfig,
    run_dir: str | os.PathLike,
    resume: bool = False,
    *,
    export_only: bool = False,
    make_stream: StreamFactory = pair_stream,
) -> Path:
    """Train (or continue, or only export) the generator of `run_dir`; returns the output folder.

    Reads `<run>/targets` and `<run>/shards`; writes `<run>/<config.output_dir>`. Every rank of a
    launch calls it. `make_stream` builds each rank's micro-batch stream (default: the shard loader).
    """
    try:
        with contextlib.ExitStack() as held:
            return _train(config, run_dir, resume, export_only, make_stream, held)
    finally:
        drop_standalone_env()


# DeepSpeed trains bf16 without ZeRO through its fp16-style optimizer (FP16_UnfusedOptimizer with a
# loss scale), with ZeRO 1-3 through optimizers that keep fp32 gradients; the first departs from the
# fp32 loss curve, the others track it (tests/test_trainer.py; on an H200 the 7B-target generator's
# fifth-step loss was 0.773 under ZeRO-0 against 0.742 under ZeRO-2/3, benchmarks/results/scale_h200.json).
BF16_ZERO0_WARNING = (
    "train.bf16 with train.zero_stage=0 trains through DeepSpeed's fp16-style optimizer, whose loss curve "
    "departs from fp32's; ZeRO 1-3 keep fp32 gradients and track it. On one GPU train.zero_stage=1 costs "
    "no communication: prefer it (or 2) for bf16"
)


def _train(
    config: TrainConfig,
    run_dir: str | os.PathLike,
    resume: bool,
    export_only: bool,
    make_stream: StreamFactory,
    held: contextlib.ExitStack,
) -> Path:
    """The body of `train` (which removes a world-of-one's launcher variables afterwards and releases
    what `held` holds: the output folder's lock)."""
    import deepspeed.comm as dist
    from deepspeed.accelerator import get_accelerator

    run_dir = Path(run_dir)
    out_dir = RunDir(run_dir).train_output(config.output_dir)
    checkpoint_dir = out_dir / CHECKPOINTS_DIR
    rank, _, world = init_distributed()
    ds_config = deepspeed_config(config, world)  # first: a world size the global batch refuses stops here
    if config.bf16 and config.zero_stage == 0 and rank == 0:
        print(f"dnd train: warning: {BF16_ZERO0_WARNING}", file=sys.stderr)
    device = torch.device(get_accelerator().current_device_name())
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = config.cudnn_benchmark

    held.enter_context(_own_output(out_dir, rank, device))  # released when train() returns or raises
    if resume or export_only:
        check_resume_config(config, out_dir / TRAIN_CONFIG)
    elif latest_checkpoint(checkpoint_dir) is not None:
        raise TrainError(
            f"{out_dir} already holds checkpoints ({latest_checkpoint(checkpoint_dir)}); pass --resume to "
            "continue that run, or set train.output_dir to a new folder (nothing was overwritten)"
        )
    data = TrainingData.open(run_dir)
    length = condition_length(config)
    conditions = condition_source(config.encoder, length, data.pools, run_dir, rank, device)
    condition_shape = (data.num_prompts, length, conditions.dim)
    features = resolve_features(config.generator, condition_shape, data.targets.token_shape, data.targets.num_tokens)
    resident_size = resident_bytes(data.targets, conditions.caches)
    try:
        on_device = resolve_resident(config.resident, device, resident_size, conditions.caches is not None)
    except ValueError as exn:
        raise TrainError(str(exn)) from None
    if on_device and config.resident == "auto":
        # The generator's room comes first: data that would not leave it room is streamed instead.
        try:
            check_gpu_memory(config, features, world, device, resident_bytes=resident_size)
        except PlanError:
            on_device = False
            if rank == 0:
                print(f"dnd train: train.resident=auto: the generator would not fit beside the "
                      f"{resident_size / 2**30:.1f} GiB of targets and condition caches on the GPU; they are "
                      "streamed from the host", file=sys.stderr)  # fmt: skip
    # Fail before, not during: dnd plan's estimate, plus the data train.resident puts on the GPU.
    check_gpu_memory(config, features, world, device, resident_bytes=resident_size if on_device else 0)
    if on_device:
        data.resident = ResidentData(data.targets, conditions.caches, device)
    engine, model = build_engine(config, ds_config, condition_shape, data.targets.token_shape, data.targets.num_tokens)
    stream = make_stream(data, config, rank, world)

    run = run_identity(config, data)
    start_step = load_checkpoint(engine, checkpoint_dir, stream, run) if (resume or export_only) else 0
    if resume and start_step > config.steps:
        raise TrainError(
            f"--resume: the newest checkpoint of {out_dir} is at step {start_step}, past train.steps={config.steps}; "
            f"set train.steps to {start_step} or more (more steps continue the run), or export it with --export-only"
        )
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, out_dir / TRAIN_CONFIG)
        write_json(out_dir / DEEPSPEED_CONFIG, ds_config)
    parameters, per_rank = parameter_counts(model, device)
    if rank == 0:
        write_json(out_dir / TRAIN_INFO, {
            "world_size": world,
            "global_batch": ds_config["train_batch_size"],
            "device": str(device),
            "impl": resolve_impl(config.generator.impl, device),  # the stages' implementation that ran
            "cudnn_benchmark": torch.backends.cudnn.benchmark if device.type == "cuda" else None,
            "parameters": parameters,
            "parameters_per_rank": per_rank,
            "features": [list(s) for s in model.features],
            "conditions": "cache" if conditions.caches is not None else "encoder",
            "resident": {"on_device": on_device, "bytes": resident_size},
            "resumed_from": start_step if resume else None,
        })

    step = start_step
    if not export_only:
        step = _fit(config, engine, stream, conditions, data, out_dir, start_step, run)
    if step >= config.steps or export_only:
        meta = {
            "generator": to_dict(model.config),
            "layout": data.targets.layout_json(),
            "tokenizer": data.targets.extra["tokenizer"],
            "encoder": {"name": resolve_encoder_path(config.encoder.name)[0], "length": length, "dim": conditions.dim},
            "num_prompts": data.num_prompts,
            **_base_model(run_dir),
            "step": step,
            "train_config": to_dict(config),
        }
        export_generator(model, out_dir, meta, rank)
    dist.barrier()
    return out_dir


@contextlib.contextmanager
def _own_output(out_dir: Path, rank: int, device: torch.device) -> Iterator[None]:
    """Rank 0 holds the output folder's exclusive lock for the whole run; collective.

    Two runs writing one folder would interleave their metrics and overwrite each other's config,
    checkpoints and export. Rank 0 takes the lock before anything is written (the other ranks never
    write before the barriers that follow), and every rank learns at once whether it got it.
    """
    import deepspeed.comm as dist

    with contextlib.ExitStack() as held:
        busy: FolderBusyError | None = None
        if rank == 0:
            try:
                held.enter_context(exclusive_folder(
                    out_dir, "dnd train",
                    "wait for that run to finish, or set train.output_dir to another folder (two runs in one "
                    "folder would mix their metrics, checkpoints and export)",
                ))
            except FolderBusyError as err:
                busy = err
        flag = torch.tensor([float(busy is not None)], device=device)
        dist.all_reduce(flag)  # only rank 0 adds to it
        if flag.item() > 0:
            raise TrainError(str(busy) if busy else f"rank 0 could not lock {out_dir}: another `dnd train` writes "
                             "there (see rank 0's error)")
        yield


def _fit(
    config: TrainConfig,
    engine,
    stream: BatchStream,
    conditions: ConditionSource,
    data: TrainingData,
    out_dir: Path,
    start_step: int,
    run: Mapping,
) -> int:
    """The training loop; returns the step it stopped at (config.steps, or earlier on SIGTERM)."""
    import deepspeed.comm as dist

    rank, world, device = dist.get_rank(), dist.get_world_size(), engine.device
    checkpoint_dir = out_dir / CHECKPOINTS_DIR
    dtype = torch.bfloat16 if config.bf16 else torch.float32
    mask = data.targets.mask.to(device)  # (T, H, W)
    weights = data.targets.weights.to(device)  # (T,)
    log = MetricsLog(out_dir, start_step, enabled=rank == 0)
    accumulation = config.accumulation_steps(world)
    samples_per_step = config.micro_batch_size * accumulation * world
    step = start_step
    bar = tqdm(total=config.steps, initial=start_step, desc="dnd train", unit="step", disable=rank != 0)
    with StopRequest() as stop:
        while step < config.steps:
            t0 = time.perf_counter()
            lr = engine.get_lr()[0]  # the LR this step's update uses
            loss_sum = torch.zeros((), device=device)
            for _ in range(accumulation):
                batch = next(stream)
                if "tokens" in batch:  # streamed from the host (a custom stream always is)
                    cond = conditions(batch).to(device, dtype)  # (B, N, L, D)
                    target = batch["tokens"].to(device)  # (B, T, H, W)
                else:  # indices only: the rows are gathered on the device
                    cond, target = data.resident.batch(batch)
                    cond = cond.to(dtype)
                loss = generator_loss(engine(cond), target, mask, weights)
                engine.backward(loss)
                engine.step()  # updates only at the accumulation boundary
                loss_sum += loss.detach().float()
            step += 1
            # One collective per step: the mean loss over ranks, and whether any rank got SIGTERM.
            stats = torch.stack([loss_sum / accumulation, torch.tensor(float(stop.requested), device=device)])
            dist.all_reduce(stats)
            loss_value, stopping = stats[0].item() / world, stats[1].item() > 0
            if not math.isfinite(loss_value):
                # Every rank holds the same all-reduced value, so every rank stops here, before this
                # step's diverged weights reach a checkpoint or the export.
                bar.close()
                log.close()
                last = latest_checkpoint(checkpoint_dir)
                raise TrainError(
                    f"the training loss became {loss_value} at step {step} (a finite loss was expected): the "
                    f"generator diverged; nothing of step {step} was saved (last checkpoint: {last or 'none'}). "
                    "Lower train.lr, raise train.warmup_steps or set train.grad_clip, and train into a new "
                    "train.output_dir; if the targets hold NaN/inf, re-run `dnd pack`"
                )
            bar.update(1)
            if step % config.log_every == 0 or step == config.steps or stopping:
                grad_norm = engine.get_global_grad_norm()
                elapsed = time.perf_counter() - t0
                log.write({
                    "step": step, "loss": loss_value, "lr": lr,
                    "grad_norm": float(grad_norm) if grad_norm is not None else None,
                    "samples": step * samples_per_step, "step_time_s": elapsed,
                    "samples_per_s": samples_per_step / elapsed,
                    **skip_totals(stream, device),  # collective: every rank logs at the same steps
                })
                bar.set_postfix(loss=f"{loss_value:.4g}")
            if step % config.checkpoint_every == 0 or step == config.steps or stopping:
                save_checkpoint(engine, checkpoint_dir, step, stream, config.keep_checkpoints, run)
            if stopping:
                if rank == 0:
                    print(f"dnd train: SIGTERM received; checkpoint {checkpoint_tag(step)} saved, exiting (continue "
                          "with --resume)", file=sys.stderr)
                break
    bar.close()
    log.close()
    skipped = skip_totals(stream, device)
    if rank == 0:
        info = read_json(out_dir / TRAIN_INFO, TRAIN_INFO)
        write_json(out_dir / TRAIN_INFO, {**info, "skipped": skipped})
        print(f"dnd train: damaged data skipped over all ranks: {skipped['corrupt_shards']} corrupt shards "
              f"({skipped['lost_samples']} pairs lost), {skipped['bad_samples']} bad pairs", file=sys.stderr)
    return step


# --------------------------------------------------------------------------------------------------
# Export


def export_generator(model: torch.nn.Module, out_dir: Path, meta: dict, rank: int) -> Path | None:
    """Write the generator export under `out_dir` (rank 0; `generator_export`); returns the folder there."""
    import deepspeed.comm as dist

    state = gather_fp32_state(model, keep=rank == 0)
    folder = export_folder(out_dir)
    if rank == 0:
        write_export(folder, state, meta)
    dist.barrier()
    return folder if rank == 0 else None


def _base_model(run_dir: Path) -> dict[str, Any]:
    """What `dnd collect` trained on, so adapters name their base model and carry its identity
    (`basemodel.base_identity`, checked by `dnd eval`): {"base_model": path or None, "base_identity": ... or None}."""
    collected = collected_base(store_dir(run_dir))
    base = collected.get("base_model", {})
    source = str((run_dir / base["saved_to"]).resolve()) if base.get("saved_to") else base.get("source")
    return {"base_model": source, "base_identity": collected.get("base_identity")}


# --------------------------------------------------------------------------------------------------
# Command line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="dnd train",
        description="Train the parameter generator with DeepSpeed. Overrides: --train.field=value "
                    "(e.g. --train.zero_stage=3 --train.generator.preset=auto).",
    )
    parser.add_argument("--run", required=True, help="run folder holding targets/ (dnd pack) and shards/ (dnd shard)")
    parser.add_argument("--config", help="YAML recipe; its `train:` section is read (default: the recipe saved in "
                                         "the run folder)")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint of the output folder")
    parser.add_argument("--export-only", action="store_true", help="load the newest checkpoint and only export it")
    parser.add_argument("--no-cache", action="store_true",
                        help="encode prompts on the fly instead of caching each pool's embeddings once under "
                             "<run>/conditions/ (= --train.encoder.cache=false; for pools too large to cache)")
    # The deepspeed launcher appends --local_rank unless given --no_local_rank; the rank comes from
    # the environment either way.
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    from dnd_scale.recipe import parse_stage_args

    args, run = parse_stage_args(parser, argv, "train",
                                 lambda args: {"train.encoder.cache": False if args.no_cache else None})
    config = run.train
    launched = "RANK" in os.environ
    out = train(config, args.run, resume=args.resume, export_only=args.export_only)
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"dnd train: outputs in {out}")
    if launched:  # the process ends here; NCCL wants an orderly shutdown of a launched group
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
