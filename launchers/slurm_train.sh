#!/usr/bin/env bash
# `dnd train` under SLURM: srun starts one task per GPU (no ssh, no hostfile). A job stopped at its
# time limit or preempted saves a checkpoint, requeues itself and resumes.
#
#   sbatch --nodes=2 --gpus-per-node=8 launchers/slurm_train.sh RUN_DIR RECIPE [--train.field=value ...]
#
# SLURM sends every task SIGTERM 120 s before the time limit (--signal below), as it does when it
# preempts the job: each rank saves a full-state checkpoint at its next step boundary and exits 0.
# Training that stopped before its last step (no export written) makes this script call
# `scontrol requeue`; the requeued job runs it again, and it passes --resume because a checkpoint
# exists. A task that fails is not requeued (it would fail again). OUTPUT_DIR is train.output_dir
# when the recipe changes it (a --train.output_dir=... argument is read by itself).
#SBATCH --job-name=dnd-train
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --signal=TERM@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.log
set -euo pipefail

if [[ $# -lt 2 ]]; then
    sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
fi
run_dir=$1
recipe=$2
shift 2

out_dir=${OUTPUT_DIR:-generator}
for arg in "$@"; do
    [[ "$arg" == --train.output_dir=* ]] && out_dir=${arg#--train.output_dir=}
done
[[ "$out_dir" == /* ]] || out_dir=$run_dir/$out_dir

# torch.distributed's env:// rendezvous (what deepspeed.init_distributed reads): the first node
# of the allocation hosts it, on a port of this job's own.
export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
export WORLD_SIZE=$SLURM_NTASKS
export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}

resume=()
if [[ -f "$out_dir/checkpoints/latest" ]]; then
    resume=(--resume)
    echo "slurm_train.sh: continuing from checkpoint $(cat "$out_dir/checkpoints/latest") (restart ${SLURM_RESTART_COUNT:-0})" >&2
fi

# RANK and LOCAL_RANK differ per task, so they are set inside each task.
srun --kill-on-bad-exit=1 bash -c 'RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID exec dnd train "$@"' dnd \
    --run "$run_dir" --config "$recipe" "${resume[@]}" "$@"

if [[ ! -f "$out_dir/export/config.json" ]]; then
    echo "slurm_train.sh: training stopped before its last step (time limit or preemption); checkpoint" \
        "$(cat "$out_dir/checkpoints/latest") saved, requeueing job $SLURM_JOB_ID to resume" >&2
    scontrol requeue "$SLURM_JOB_ID"
fi
