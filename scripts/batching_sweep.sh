#!/usr/bin/env bash
# Runs `flotilla run --batching` over a list of configurations, each for a few
# seconds, interleaved REPEATS times, and prints one JSON line per run (the
# configuration's label, then the run's --json object). For the figures of
# docs/PERF.md's batching section and for tuning the queue's defaults.
#
# Usage: scripts/batching_sweep.sh FLOTILLA_BINARY CONFIG_FILE
#   CONFIG_FILE: one configuration per line, `label: flotilla-run-options`,
#   e.g. `64c-w64: --threads 64 --window 64 --max-batch 1024`; `#` comments.
#   A label starting with `pool` runs without --batching (per-thread streams),
#   for side-by-side figures. Leading VAR=value words set the run's
#   environment: `1ct: FLOTILLA_CUDA_COMPLETION_THREADS=1 --threads 64`.
# Environment: BACKEND (default cuda), SECONDS_PER_RUN (default 2), REPEATS
#   (default 1), RUN_TIMEOUT (seconds after which a run is killed and counts
#   as failed; default 0: never).
set -u -o pipefail
bin=$1
configs=$2
backend=${BACKEND:-cuda}
secs=${SECONDS_PER_RUN:-2}
repeats=${REPEATS:-1}
for ((rep = 1; rep <= repeats; rep++)); do
  while IFS= read -r line; do
    line=${line%%#*}
    [ -z "${line// /}" ] && continue
    label=${line%%:*}
    opts=${line#*:}
    mode=--batching
    [[ $label == pool* ]] && mode=
    # Leading VAR=value words are the run's environment (e.g.
    # FLOTILLA_CUDA_COMPLETION_THREADS=1), the rest its options.
    envs=()
    read -r -a words <<<"$opts"
    while [ ${#words[@]} -gt 0 ] && [[ ${words[0]} == [A-Z]*=* ]]; do
      envs+=("${words[0]}")
      words=("${words[@]:1}")
    done
    json=$(timeout "${RUN_TIMEOUT:-0}" env "${envs[@]}" "$bin" run --backend "$backend" $mode --seconds "$secs" --json \
      --no-progress "${words[@]}" 2>/dev/null | tail -1)
    echo "{\"label\":\"$label\",\"repeat\":$rep,\"opts\":\"${opts# }\",\"result\":${json:-null}}"
  done <"$configs"
done
