"""The DeepSpeed side of `dnd train`: the process group, the engine, and the generator's parameters
as DeepSpeed holds them.

`init_distributed` joins the launch (or makes this process a world of one); `build_engine` builds
the generator (under `deepspeed.zero.Init` for ZeRO-3, so no rank ever holds it whole) with torch
AdamW (no JIT-compiled ops, so CPU ranks with gloo work) and the warmup-cosine `LambdaLR`;
`gather_fp32_state` collects every parameter's fp32 master copy for the export.
"""

from __future__ import annotations

import os
import socket

import torch
from torch import Tensor

from dnd_scale.generator import HyperConvGenerator
from dnd_scale.train_checkpoint import weights_only_checkpoint_engine
from dnd_scale.train_config import TrainConfig, WarmupCosine


# The launcher variables of a world of one that this process made itself. DeepSpeed reads them while
# a run lasts; afterwards they are removed, or subprocesses started later (another launch, the demo)
# would take themselves for rank 0 of a launch on this port.
_STANDALONE_ENV: dict[str, str] = {}


def drop_standalone_env() -> None:
    """Remove the launcher variables this process set for a world of one (`train` calls it when it ends)."""
    for key in _STANDALONE_ENV:
        os.environ.pop(key, None)


def init_distributed() -> tuple[int, int, int]:
    """(rank, local rank, world size), initializing DeepSpeed's process group.

    Without a launcher (no RANK in the environment) this process is a world of one.
    """
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    if torch.distributed.is_initialized():  # a second run in the same process (tests, notebooks)
        import deepspeed.comm as dist

        os.environ.update(_STANDALONE_ENV)

        if not dist.is_initialized():
            deepspeed.init_distributed(dist_backend=accelerator.communication_backend_name())
        return dist.get_rank(), int(os.environ.get("LOCAL_RANK", 0)), dist.get_world_size()
    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        _STANDALONE_ENV.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        os.environ.update(_STANDALONE_ENV)
    if accelerator.device_name() == "cpu":
        # DeepSpeed's TorchBackend JIT-compiles a shared-memory all-reduce on CPU at its first
        # init (~55 s, a C++ toolchain needed) when the op counts as compatible. Only inference
        # all-reduce uses it; training collectives go through gloo. `deepspeed.ops.__compatible_ops__`
        # is the probed table `comm.torch.build_shm_op` consults (its module keeps edits), so
        # marking the op incompatible skips the build.
        import deepspeed.ops
        from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder

        deepspeed.ops.__compatible_ops__[ShareMemCommBuilder.NAME] = False
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if accelerator.device_name() != "cpu":
        accelerator.set_device(local_rank)
    deepspeed.init_distributed(dist_backend=accelerator.communication_backend_name())
    import deepspeed.comm as dist

    return dist.get_rank(), local_rank, dist.get_world_size()


def _decays(param: torch.nn.Parameter) -> bool:
    # Only the k×k convolution kernels (4-D) decay; LayerNorm affines and biases do not.
    # Under ZeRO-3 a parameter's local tensor is a 1-D shard: its true shape is ds_shape.
    return len(getattr(param, "ds_shape", param.shape)) == 4


def build_engine(config: TrainConfig, ds_config: dict, condition_shape, token_shape, num_tokens):
    """(engine, generator module) with torch AdamW and the warmup-cosine LambdaLR inside."""
    import deepspeed

    torch.manual_seed(config.seed)  # same initial weights on every rank (and in every run of this seed)
    with deepspeed.zero.Init(config_dict_or_path=ds_config, enabled=config.zero_stage == 3):
        model = HyperConvGenerator(config.generator, condition_shape, token_shape, num_tokens)
    params = list(model.parameters())
    groups = [
        {"params": [p for p in params if _decays(p)], "weight_decay": config.weight_decay},
        {"params": [p for p in params if not _decays(p)], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=config.lr, betas=config.betas, eps=config.adam_eps)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, WarmupCosine(config.warmup_steps, config.steps, config.min_lr_ratio)
    )
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=schedule, config=ds_config)
    engine.checkpoint_engine = weights_only_checkpoint_engine(engine)
    return engine, model


def _local_numel(param: torch.nn.Parameter) -> int:
    """Elements this rank stores of a parameter (its ZeRO-3 shard, or all of it)."""
    return param.ds_tensor.numel() if hasattr(param, "ds_tensor") else param.numel()


def _full_numel(param: torch.nn.Parameter) -> int:
    return param.ds_numel if hasattr(param, "ds_numel") else param.numel()


def parameter_counts(model: torch.nn.Module, device: torch.device) -> tuple[int, list[int]]:
    """(parameters of the whole generator, parameters each rank stores); collective."""
    import deepspeed.comm as dist

    local = torch.tensor([sum(_local_numel(p) for p in model.parameters())], dtype=torch.long, device=device)
    per_rank = [torch.zeros_like(local) for _ in range(dist.get_world_size())]  # NCCL gathers into device tensors
    dist.all_gather(per_rank, local)
    return sum(_full_numel(p) for p in model.parameters()), [int(t.item()) for t in per_rank]


def gather_fp32_state(model: torch.nn.Module, keep: bool) -> dict[str, Tensor]:
    """Every parameter's fp32 master value, whole: ZeRO shards gathered. Collective: every rank
    calls it (parameter by parameter, so peak memory is one parameter); only `keep` ranks return it."""
    from deepspeed.utils import safe_get_full_fp32_param

    state = {}
    for name, param in model.named_parameters():
        full = safe_get_full_fp32_param(param)  # ZeRO 1/2/3 and bf16: gathered master weights
        if full is None:
            full = param.detach()  # ZeRO-0 in fp32: the parameter is the master copy
        if keep:
            state[name] = full.float().cpu().reshape(getattr(param, "ds_shape", param.shape)).clone()
    return state
