#!/usr/bin/env bash
# Sourced by the GPU evidence scripts (never run on its own):
#   run_each PARALLEL LOG_DIR FUNCTION NAME...   (and speed_counts, below)
# calls `FUNCTION NAME` for each NAME: one after another (PARALLEL=0), or all at once as separate
# processes with one CPU thread each, output in LOG_DIR/NAME.run.log, then each one's exit status and
# last log lines (PARALLEL=1). Returns 1 if any run failed.
#
# A stop (Ctrl-C, the GPU session's `timeout`) signals the whole process group: each trainer saves
# a checkpoint and exits on its own (a second signal would make it abort without saving), so the
# shell does not forward it; it keeps waiting until every run has exited.

# wait_run PID: its exit status; a wait cut short by a signal is resumed until the run has exited
wait_run() {
  while kill -0 "$1" 2>/dev/null; do wait "$1" && return 0; done
  wait "$1"
}

# speed_counts TOTAL TRAINED: SHARING (how many runs this invocation trained at once: TRAINED with
# PARALLEL=1, else 1), SKIPPED (runs done by earlier invocations, not trained now) and SPEED_HEADING
# (the tokens/s column's heading, which says when the card was shared).
speed_counts() {
  SHARING=1
  if [ "${PARALLEL:-0}" = 1 ] && [ "$2" -gt 0 ]; then SHARING=$2; fi
  SKIPPED=$(( $1 - $2 ))
  if [ "$SKIPPED" -gt 0 ]; then  # runs trained by earlier invocations: their tokens/s are their own batch's
    SPEED_HEADING="train tokens/s (as each run measured it; runs trained at once shared the card)"
  elif [ "$SHARING" -gt 1 ]; then
    SPEED_HEADING="train tokens/s ($SHARING runs sharing the card)"
  else
    SPEED_HEADING="train tokens/s"
  fi
}

run_each() {
  local parallel=$1 log_dir=$2 fn=$3 name failed=0 status
  shift 3
  if [ "$parallel" != 1 ]; then
    for name in "$@"; do "$fn" "$name" || return 1; done
    return 0
  fi
  local pids=()
  for name in "$@"; do
    OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} "$fn" "$name" > "$log_dir/$name.run.log" 2>&1 &
    pids+=($!)
  done
  trap 'echo "stopping: each run saves a checkpoint and exits"' INT TERM
  local i=0
  for name in "$@"; do
    if wait_run "${pids[$i]}"; then status=ok; else status="FAILED ($?)"; failed=1; fi
    i=$((i + 1))
    echo "--- $name: $status; last lines of $log_dir/$name.run.log"
    tail -n 4 "$log_dir/$name.run.log"
  done
  trap - INT TERM
  [ "$failed" = 0 ] || { echo "error: a run failed (logs in $log_dir)" >&2; return 1; }
}
