#!/usr/bin/env bash
# `dnd train` on several GPUs or nodes through the deepspeed launcher (one rank per GPU).
#
#   launchers/train_multinode.sh RUN_DIR RECIPE [--train.field=value ...]
#
# Environment:
#   HOSTFILE     deepspeed hostfile, one "hostname slots=GPUS" line per node; nodes reach each
#                other by passwordless ssh and see RUN_DIR at the same path. Unset: this machine only.
#   NUM_GPUS     GPUs per node to use (default: all visible).
#   MASTER_PORT  rendezvous port on the first node (default 29500).
#   RESUME=1     continue from the newest checkpoint (`dnd train --resume`).
# On a CPU-only machine, DS_ACCELERATOR=cpu NUM_GPUS=2 runs two CPU ranks (gloo) for a dry run.
#
# The global batch is micro_batch_size x grad_accum_steps x (number of ranks); the DeepSpeed JSON is
# generated from the recipe and saved in the output folder. SIGTERM (e.g. Ctrl-C of the launcher
# is SIGINT; `kill` of the launcher is SIGTERM) makes every rank save a checkpoint and exit.
set -euo pipefail

if [[ $# -lt 2 ]]; then
    sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
fi
run_dir=$1
recipe=$2
shift 2

launcher_args=(--master_port "${MASTER_PORT:-29500}" --no_local_rank)
[[ -n "${HOSTFILE:-}" ]] && launcher_args+=(--hostfile "$HOSTFILE")
[[ -n "${NUM_GPUS:-}" ]] && launcher_args+=(--num_gpus "$NUM_GPUS")
train_args=(train --run "$run_dir" --config "$recipe")
[[ "${RESUME:-0}" == 1 ]] && train_args+=(--resume)

exec deepspeed "${launcher_args[@]}" "$(command -v dnd)" "${train_args[@]}" "$@"
