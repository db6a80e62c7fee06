#!/usr/bin/env bash
# Two builds of Flotilla side by side in one device call: each `git archive`
# tarball is built on the GPU machine, then every configuration runs
# REPEATS times (default 3), the builds interleaved, and the medians print
# per build. For before/after figures in docs/PERF.md.
#
# Usage (on the GPU machine): A=a.tar B=b.tar CONFIGS=configs.txt OUT=dir
#   scripts/ab_batching.sh
#   CONFIGS: scripts/batching_sweep.sh's format (`label: options` per line).
#   Labels come out as a-<label> and b-<label>; raw lines in $OUT/ab.jsonl.
set -u -o pipefail
here=$(cd "$(dirname "$0")" && pwd)
for v in a b; do
  tar=$A; [ $v = b ] && tar=$B
  rm -rf /tmp/ab-src-$v && mkdir -p /tmp/ab-src-$v && tar -xf "$tar" -C /tmp/ab-src-$v
  (cd /tmp/ab-src-$v && SRC=/tmp/ab-src-$v BUILD=/tmp/ab-build-$v OUT=/tmp \
    scripts/gpu_check.sh build >"$OUT/build-$v.log" 2>&1) || { tail -20 "$OUT/build-$v.log"; exit 1; }
  echo "built $v"
done
for ((rep = 1; rep <= ${REPEATS:-3}; rep++)); do
  for v in a b; do
    REPEATS=1 SECONDS_PER_RUN=${SECONDS_PER_RUN:-2} "$here/batching_sweep.sh" \
      /tmp/ab-build-$v/flotilla "$CONFIGS" | sed "s/^{\"label\":\"/{\"label\":\"$v-/" >>"$OUT/ab.jsonl"
  done
done
"$here/sweep_summary.py" "$OUT/ab.jsonl" --sort-by-config | tee "$OUT/ab.txt"
