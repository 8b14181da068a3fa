#!/usr/bin/env bash
# `dnd train` under SLURM: one task per GPU, started by srun (no ssh, no hostfile).
#
#   sbatch --nodes=2 --gpus-per-node=8 launchers/slurm_train.sh RUN_DIR RECIPE [--train.field=value ...]
#
# SLURM sends SIGTERM two minutes before the time limit (--signal below): every rank saves a
# checkpoint at its next step boundary and exits cleanly. The script passes --resume by itself when
# the output folder already holds a checkpoint, so the same command (or `sbatch --requeue`)
# continues the run. OUTPUT_DIR must match train.output_dir if the recipe changes it.
#SBATCH --job-name=dnd-train
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --signal=TERM@120
#SBATCH --requeue
#SBATCH --output=%x-%j.log
set -euo pipefail

if [[ $# -lt 2 ]]; then
    sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
fi
run_dir=$1
recipe=$2
shift 2

# torch.distributed's env:// rendezvous (what deepspeed.init_distributed reads): the first node
# of the allocation hosts it.
export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MASTER_PORT=${MASTER_PORT:-29500}
export WORLD_SIZE=$SLURM_NTASKS
export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}

resume=()
if [[ -f "$run_dir/${OUTPUT_DIR:-generator}/checkpoints/latest" ]]; then
    resume=(--resume)
fi

# RANK and LOCAL_RANK differ per task, so they are set inside each task.
srun --kill-on-bad-exit=1 bash -c 'RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID exec dnd train "$@"' dnd \
    --run "$run_dir" --config "$recipe" "${resume[@]}" "$@"
