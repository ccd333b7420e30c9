# Shared by the MAR-FL job scripts (sourced, not run). Needs SLURM_* from the job and the job's arguments in ARGS.

# ---------------- site-specific setup: edit this block for your cluster ----------------
# module load python/3.11            # e.g. a module system
# source ~/miniconda3/bin/activate marfl
# ----------------------------------------------------------------------------------------

cd "${SLURM_SUBMIT_DIR:-$PWD}"
PY=${MARFL_PYTHON:-.venv/bin/python}
if [ ! -x "$PY" ]; then
  echo "mar-fl: $PY not found: run 'bash scripts/setup_env.sh' in the project root first, or set MARFL_PYTHON" >&2
  exit 2
fi

has_flag() {  # has_flag NAME...: is any of these flags among the job's arguments?
  local a n
  for a in "${ARGS[@]}"; do for n in "$@"; do [ "$a" = "$n" ] && return 0; done; done
  return 1
}
flag_value() {  # flag_value DEFAULT NAME...: the value given for a flag, else DEFAULT
  local default=$1; shift
  local i n
  for ((i = 0; i < ${#ARGS[@]} - 1; i++)); do
    for n in "$@"; do [ "${ARGS[i]}" = "$n" ] && { echo "${ARGS[i+1]}"; return; }; done
  done
  echo "$default"
}

# one run dir per job (per array task): a requeued job finds it again and resumes
JOB=${SLURM_ARRAY_JOB_ID:-${SLURM_JOB_ID:-local}}
RUN_DIR=${MARFL_RUN_DIR:-runs/slurm-${JOB}${SLURM_ARRAY_TASK_ID:+_$SLURM_ARRAY_TASK_ID}}
if [ -n "${SLURM_ARRAY_TASK_ID:-}" ] && ! has_flag -sd --sd --seed; then
  ARGS+=(-sd "$SLURM_ARRAY_TASK_ID")  # seed sweeps: --array=0-4 runs seeds 0..4
fi

# how many peers: as many as the allocation has CPUs (GPUs with --dv cuda) times --pp, unless --np is given
default_peers() {
  local per_launcher pp
  pp=$(flag_value 1 --pp --peers-per-core)
  if [ "$(flag_value cpu --dv --device)" = "cuda" ] && [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then
    per_launcher=$(echo "$CUDA_VISIBLE_DEVICES" | tr ',' '\n' | grep -c .)
  else
    per_launcher=${SLURM_CPUS_PER_TASK:-${SLURM_CPUS_ON_NODE:-$(nproc)}}
  fi
  echo $(( per_launcher * pp * ${1:-1} ))
}

# run "$@" in the background so that Slurm's warning signal reaches this shell and is passed on
run_forwarding_usr1() {
  "$@" &
  local child=$!
  trap 'kill -USR1 $child 2>/dev/null' USR1
  trap 'kill -TERM $child 2>/dev/null' TERM
  local rc=0
  while :; do
    wait $child && rc=0 || rc=$?
    kill -0 $child 2>/dev/null || break  # wait also returns when a trapped signal arrives
  done
  return $rc
}

# exit status 75 = cut short with every peer checkpointed: requeue, and the next start resumes
finish() {
  local rc=$1
  if [ "$rc" -eq 75 ] && [ "${MARFL_REQUEUE:-1}" = "1" ] && [ -n "${SLURM_JOB_ID:-}" ]; then
    echo "mar-fl: cut short at the time limit; requeueing job $SLURM_JOB_ID to resume $RUN_DIR"
    scontrol requeue "$SLURM_JOB_ID" || true
  fi
  exit "$rc"
}
