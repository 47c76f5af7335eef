# Sourced by the memtrain sbatch templates: environment shared by every launcher.
# Inputs: MEMTRAIN_CONFIG (required), MEMTRAIN_ARGS (extra `memtrain train` arguments, e.g. --set ...),
# MEMTRAIN_PYTHON (default: python), MEMTRAIN_WORKDIR (default: the submission directory),
# MEMTRAIN_RUN_DIR (default: read from the config), MEMTRAIN_LOG_DIR (default: logs).
set -uo pipefail
: "${MEMTRAIN_CONFIG:?set MEMTRAIN_CONFIG to the run config (YAML)}"
cd "${MEMTRAIN_WORKDIR:-${SLURM_SUBMIT_DIR:-.}}" || exit 1
PY=${MEMTRAIN_PYTHON:-python}
MEMTRAIN_ARGS=${MEMTRAIN_ARGS:-}
LOG_DIR=${MEMTRAIN_LOG_DIR:-logs}
mkdir -p "$LOG_DIR"
if [ -z "${MEMTRAIN_RUN_DIR:-}" ]; then
  # shellcheck disable=SC2086
  MEMTRAIN_RUN_DIR=$("$PY" -m memtrain config-get "$MEMTRAIN_CONFIG" run.out_dir $MEMTRAIN_ARGS) || exit 2
fi
export MEMTRAIN_RUN_DIR
# Rendezvous: the first node of the allocation; a port derived from the job id (same after a requeue).
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MASTER_PORT=${MASTER_PORT:-$(( 20000 + SLURM_JOB_ID % 20000 ))}
export MASTER_ADDR MASTER_PORT
# One OpenMP thread pool per rank of the size Slurm gave the task; NCCL warnings only; faulthandler on.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
export NCCL_DEBUG=${NCCL_DEBUG:-WARN} PYTHONFAULTHANDLER=1 PYTHONUNBUFFERED=1
# Uncomment / adapt for your fabric:
# export NCCL_SOCKET_IFNAME=ib0 NCCL_IB_HCA=mlx5 NCCL_BUFFSIZE=2097152
echo "memtrain: job ${SLURM_JOB_ID} (restart ${SLURM_RESTART_COUNT:-0}) on ${SLURM_JOB_NODELIST}," \
     "head ${MASTER_ADDR}:${MASTER_PORT}, run dir ${MEMTRAIN_RUN_DIR}"

# After the launcher returns: a preempted run (every rank checkpointed and left PREEMPTED in the run
# directory) requeues itself; the requeued job resumes from the newest complete checkpoint.
memtrain_finish() {
  local rc=$1
  if [ -f "$MEMTRAIN_RUN_DIR/PREEMPTED" ] && [ "${MEMTRAIN_REQUEUE:-1}" = 1 ]; then
    echo "memtrain: preempted ($(cat "$MEMTRAIN_RUN_DIR/PREEMPTED")); requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
  fi
  exit "$rc"
}
