# Sourced by the memtrain sbatch templates: environment shared by every launcher.
# Inputs: MEMTRAIN_CONFIG (required), MEMTRAIN_ARGS (extra `memtrain train` arguments, e.g. --set ..., split
# at white space, never globbed or evaluated), MEMTRAIN_PYTHON (default: python), MEMTRAIN_WORKDIR (default: the
# submission directory), MEMTRAIN_RUN_DIR (default: read from the config), MEMTRAIN_LOG_DIR (default: logs),
# MEMTRAIN_REQUEUE (1: a preempted job requeues itself), MEMTRAIN_MAX_REQUEUES (default 20: at most that many),
# MEMTRAIN_JOB_DIR (the job folder `memtrain submit` wrote, where `memtrain cancel` marks a job as cancelled).
# Every value is only ever expanded inside double quotes or as separate arguments: nothing is re-read by a shell.
set -uo pipefail
: "${MEMTRAIN_CONFIG:?set MEMTRAIN_CONFIG to the run config (YAML)}"
cd "${MEMTRAIN_WORKDIR:-${SLURM_SUBMIT_DIR:-.}}" || exit 1
PY=${MEMTRAIN_PYTHON:-python}
read -r -a MEMTRAIN_ARGV <<< "${MEMTRAIN_ARGS:-}"
LOG_DIR=${MEMTRAIN_LOG_DIR:-logs}
mkdir -p "$LOG_DIR"
if [ -z "${MEMTRAIN_RUN_DIR:-}" ]; then
  MEMTRAIN_RUN_DIR=$("$PY" -m memtrain config-get "$MEMTRAIN_CONFIG" run.out_dir \
                     ${MEMTRAIN_ARGV[@]+"${MEMTRAIN_ARGV[@]}"}) || exit 2
fi
export MEMTRAIN_RUN_DIR
# This attempt (job id and restart count): a PREEMPTED marker counts only when this attempt wrote it. A marker
# left by an earlier attempt is removed before anything starts, so an attempt that fails before training
# never requeues on the strength of an old preemption.
MEMTRAIN_ATTEMPT="${SLURM_JOB_ID:-0}.${SLURM_RESTART_COUNT:-0}"
export MEMTRAIN_ATTEMPT
if ! rm -f "$MEMTRAIN_RUN_DIR/PREEMPTED"; then
  echo "memtrain: cannot remove the old $MEMTRAIN_RUN_DIR/PREEMPTED; this attempt will not requeue itself"
fi
# Rendezvous: the first node of the allocation; a port derived from the job id (same after a requeue).
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MASTER_PORT=${MASTER_PORT:-$(( 20000 + SLURM_JOB_ID % 20000 ))}
export MASTER_ADDR MASTER_PORT
# CPUs: srun steps get the job's CPUs per task (Slurm 22.05 and later no longer pass them on by themselves),
# and each rank an OpenMP pool of its share of its task's CPUs (memtrain_threads RANKS_PER_TASK: one rank per
# srun task, the node's ranks under torchrun or DeepSpeed). An OMP_NUM_THREADS given to the job wins.
if [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then
  export SRUN_CPUS_PER_TASK=${SRUN_CPUS_PER_TASK:-$SLURM_CPUS_PER_TASK}
fi
MEMTRAIN_OMP=${OMP_NUM_THREADS:-}
memtrain_threads() {
  local ranks=$1 cpus=${SLURM_CPUS_PER_TASK:-1}
  export OMP_NUM_THREADS=${MEMTRAIN_OMP:-$(( cpus / ranks > 1 ? cpus / ranks : 1 ))}
  echo "memtrain: ${cpus} CPU(s) per task, ${ranks} rank(s) per task: OMP_NUM_THREADS=${OMP_NUM_THREADS}"
}
# NCCL warnings only; faulthandler on.
export NCCL_DEBUG=${NCCL_DEBUG:-WARN} PYTHONFAULTHANDLER=1 PYTHONUNBUFFERED=1
# Uncomment / adapt for your fabric:
# export NCCL_SOCKET_IFNAME=ib0 NCCL_IB_HCA=mlx5 NCCL_BUFFSIZE=2097152
echo "memtrain: job ${SLURM_JOB_ID} (restart ${SLURM_RESTART_COUNT:-0}) on ${SLURM_JOB_NODELIST}," \
     "head ${MASTER_ADDR}:${MASTER_PORT}, run dir ${MEMTRAIN_RUN_DIR}"

# `memtrain cancel` marks a job before it signals it: a job marked before its launch does not start training
# (a signal sent before the job step exists reaches nothing).
memtrain_cancelled() {
  local d=${MEMTRAIN_JOB_DIR:-/nonexistent}/cancelled
  [ -e "$d/${SLURM_JOB_ID:-}" ] || [ -e "$d/${SLURM_ARRAY_JOB_ID:-}" ] \
    || [ -e "$d/${SLURM_ARRAY_JOB_ID:-}_${SLURM_ARRAY_TASK_ID:-}" ]
}
if memtrain_cancelled; then
  echo "memtrain: cancelled by memtrain cancel before training started"
  exit 0
fi

# After the launcher returns: a run preempted in this attempt (every rank checkpointed and rank 0 left
# PREEMPTED, naming this attempt, in the run directory) requeues itself, at most MEMTRAIN_MAX_REQUEUES times;
# the requeued job resumes from the newest complete checkpoint.
# A job that `memtrain cancel` marked (MEMTRAIN_JOB_DIR/cancelled/<job id>) ends instead.
memtrain_finish() {
  local rc=$1 marker="$MEMTRAIN_RUN_DIR/PREEMPTED" restarts=${SLURM_RESTART_COUNT:-0}
  local max=${MEMTRAIN_MAX_REQUEUES:-20}
  if [ ! -f "$marker" ]; then
    exit "$rc"
  fi
  if memtrain_cancelled; then
    echo "memtrain: stopped by memtrain cancel at step $(grep -o '"step": [0-9]*' "$marker" | grep -o '[0-9]*');" \
         "not requeueing; resubmit to continue from the checkpoint"
    exit "$rc"
  fi
  if ! grep -qF "\"attempt\": \"$MEMTRAIN_ATTEMPT\"" "$marker"; then
    echo "memtrain: $marker was not written by this attempt ($MEMTRAIN_ATTEMPT); not requeueing"
    exit "$rc"
  fi
  [ "$rc" = 0 ] && rc=75
  if [ "${MEMTRAIN_REQUEUE:-1}" != 1 ]; then
    echo "memtrain: preempted ($(cat "$marker")); requeue is off: resubmit to continue from the checkpoint"
    exit "$rc"
  fi
  if [ "$restarts" -ge "$max" ]; then
    echo "memtrain: preempted ($(cat "$marker")); not requeueing: job $SLURM_JOB_ID was requeued $restarts" \
         "time(s), slurm.max_requeues is $max; resubmit to continue from the newest checkpoint"
    exit "$rc"
  fi
  echo "memtrain: preempted ($(cat "$marker")); requeueing job $SLURM_JOB_ID (requeue $((restarts + 1)) of $max)"
  if ! scontrol requeue "$SLURM_JOB_ID"; then
    echo "memtrain: scontrol requeue $SLURM_JOB_ID failed; resubmit to continue from the newest checkpoint"
    exit "$rc"
  fi
  exit 0
}
