#!/usr/bin/env bash
# `dnd train` through the deepspeed launcher: one rank per GPU, on this machine or on several nodes.
#
#   launchers/train_multinode.sh RUN_DIR RECIPE [--train.field=value ...]
#
# Three ways (launchers/README.md):
#   this machine         no HOSTFILE: every visible GPU (NUM_GPUS to use fewer)
#   nodes over ssh       HOSTFILE=hosts, run once on the first node: deepspeed reaches the others by ssh
#   one launch per node  HOSTFILE=hosts NODE_RANK=n, run on every node (n = 0 .. nodes-1): no ssh
#
# Environment:
#   HOSTFILE     deepspeed hostfile, one "hostname slots=GPUS" line per node (launchers/hostfile.example);
#                every node sees RUN_DIR and this environment at the same paths.
#   NODE_RANK    this node's line of HOSTFILE, from 0: start one launcher per node, without ssh.
#   MASTER_ADDR  node 0's address, where the ranks meet (default: its name in HOSTFILE).
#   MASTER_PORT  rendezvous port on node 0 (default 29500).
#   NUM_GPUS     GPUs per node to use (default: all visible, or the hostfile's slots).
#   SSH_PORT     ssh port of the nodes (nodes over ssh).
#   RESUME=1     continue from the newest checkpoint (`dnd train --resume`).
# On a CPU-only machine, DS_ACCELERATOR=cpu NUM_GPUS=2 runs two CPU ranks (gloo).
set -euo pipefail

if [[ $# -lt 2 ]]; then
    sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
fi
run_dir=$1
recipe=$2
shift 2

die() {
    echo "train_multinode.sh: $*" >&2
    exit 2
}

command -v dnd >/dev/null || die "no 'dnd' on PATH; activate the environment dnd_scale is installed in"
launcher_args=(--master_port "${MASTER_PORT:-29500}" --no_local_rank)
[[ -n "${NUM_GPUS:-}" ]] && launcher_args+=(--num_gpus "$NUM_GPUS")

if [[ -n "${HOSTFILE:-}" ]]; then
    [[ -f "$HOSTFILE" ]] || die "HOSTFILE=$HOSTFILE is not a file; write one 'hostname slots=GPUS' line per node"
    hosts=()
    while read -r host _; do
        [[ -z "$host" || "$host" == \#* ]] || hosts+=("$host")
    done <"$HOSTFILE"
    [[ ${#hosts[@]} -gt 0 ]] || die "HOSTFILE=$HOSTFILE names no node; write one 'hostname slots=GPUS' line per node"
    # Before any rank starts: a name no node can resolve would only show up as a rendezvous timeout.
    for host in "${hosts[@]}"; do
        [[ $(printf '%s\n' "${hosts[@]}" | grep -cxF -- "$host") -eq 1 ]] ||
            die "host '$host' is named twice in $HOSTFILE: name each node once (two launchers on one machine need two of its names, e.g. localhost and 127.0.0.1)"
        getent ahosts "$host" >/dev/null ||
            die "host '$host' in $HOSTFILE does not resolve to an address: write the name or IP by which the nodes reach it, or add it to DNS or /etc/hosts"
    done
    launcher_args+=(--hostfile "$HOSTFILE")
    [[ -n "${MASTER_ADDR:-}" ]] && launcher_args+=(--master_addr "$MASTER_ADDR")
    if [[ -n "${NODE_RANK:-}" ]]; then
        [[ "$NODE_RANK" =~ ^[0-9]+$ && "$NODE_RANK" -lt ${#hosts[@]} ]] ||
            die "NODE_RANK=$NODE_RANK is out of range: $HOSTFILE names ${#hosts[@]} nodes, so NODE_RANK is 0 to $((${#hosts[@]} - 1)), a different one on each node"
        launcher_args+=(--no_ssh --node_rank "$NODE_RANK")
        [[ -n "${MASTER_ADDR:-}" ]] || launcher_args+=(--master_addr "${hosts[0]}")
    else
        ssh_args=(-o BatchMode=yes -o ConnectTimeout=10 ${SSH_PORT:+-p "$SSH_PORT"})
        [[ -n "${SSH_PORT:-}" ]] && launcher_args+=(--ssh_port "$SSH_PORT")
        for host in "${hosts[@]}"; do
            ssh "${ssh_args[@]}" "$host" true </dev/null ||
                die "host '$host' in $HOSTFILE is not reachable by passwordless ssh${SSH_PORT:+ on port $SSH_PORT}: set up ssh keys to every node, or start one launcher per node with NODE_RANK=0..$((${#hosts[@]} - 1)) (no ssh)"
        done
    fi
elif [[ -n "${NODE_RANK:-}" ]]; then
    die "NODE_RANK=$NODE_RANK needs HOSTFILE, the list of nodes it indexes"
fi

train_args=(train --run "$run_dir" --config "$recipe")
[[ "${RESUME:-0}" == 1 ]] && train_args+=(--resume)

# Not exec'd: this shell stays to pass a SIGTERM (`kill` of this pid) or SIGINT on to the ranks, so
# every rank saves a checkpoint at its next step boundary and exits 0, and this script exits when
# they have. On one node, and with NODE_RANK, the deepspeed runner has no signal handler: signalled
# itself it would die and leave its ranks training on. The ranks are the runner's grandchildren
# (runner -> deepspeed.launcher.launch -> one process per rank); launch.py is not signalled, since
# it answers a signal by killing its ranks 30 s later and exiting 1. Over ssh the runner itself
# stops the remote ranks (through pdsh), so it gets the signal.
children_of() {
    local stat fields
    for stat in /proc/[0-9]*/stat; do
        { read -r fields <"$stat"; } 2>/dev/null || continue
        fields=${fields##*) } # after the command name, which may hold spaces: state, ppid, ...
        if [[ ${fields#* } == "$1 "* ]]; then
            pid=${stat#/proc/}
            echo "${pid%/stat}"
        fi
    done
}
forward() {
    local ranks=()
    if [[ -z "${HOSTFILE:-}" || -n "${NODE_RANK:-}" ]]; then
        for launch in $(children_of "$runner"); do ranks+=($(children_of "$launch")); done
    fi
    echo "train_multinode.sh: SIG$1 received, passing it on to ${ranks[*]:-the deepspeed runner}" >&2
    kill -s "$1" "${ranks[@]:-$runner}" 2>/dev/null || true
}
deepspeed "${launcher_args[@]}" "$(command -v dnd)" "${train_args[@]}" "$@" &
runner=$!
trap 'forward TERM' TERM
trap 'forward INT' INT
while true; do
    status=0
    wait "$runner" || status=$?
    kill -0 "$runner" 2>/dev/null || exit "$status" # a trap ends the wait, not the runner
done
