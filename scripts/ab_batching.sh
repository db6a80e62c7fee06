#!/usr/bin/env bash
# Two or three builds of Flotilla side by side in one device call: each
# `git archive` tarball's `flotilla` binary is built on the GPU machine (in
# parallel, without the tests), then every configuration runs REPEATS times
# (default 3), the builds interleaved in each round, and the medians print
# per build. For before/after figures in docs/PERF.md.
#
# Usage (on the GPU machine): A=a.tar B=b.tar [C=c.tar] CONFIGS=configs.txt
#   OUT=dir scripts/ab_batching.sh
#   CONFIGS: scripts/batching_sweep.sh's format (`label: options` per line).
#   Labels come out as a-<label>, b-<label> (and c-<label>); raw lines in
#   $OUT/ab.jsonl. SECONDS_PER_RUN (default 2) as in batching_sweep.sh.
set -u -o pipefail
here=$(cd "$(dirname "$0")" && pwd)
builds="a b"
[ -n "${C:-}" ] && builds="a b c"
build() {
  local v=$1 tar=$2
  rm -rf /tmp/ab-src-$v && mkdir -p /tmp/ab-src-$v && tar -xf "$tar" -C /tmp/ab-src-$v
  cmake -S /tmp/ab-src-$v -B /tmp/ab-build-$v -G Ninja -DCMAKE_BUILD_TYPE=Release \
    -DFLOTILLA_CUDA=ON -DFLOTILLA_BUILD_TESTS=OFF >"$OUT/build-$v.log" 2>&1 &&
    ninja -C /tmp/ab-build-$v flotilla >>"$OUT/build-$v.log" 2>&1
}
pids=()
for v in $builds; do
  tar=$A; [ $v = b ] && tar=$B; [ $v = c ] && tar=$C
  build $v "$tar" & pids+=($!)
done
for i in "${!pids[@]}"; do
  wait "${pids[$i]}" || { tail -20 "$OUT/build-$(echo $builds | cut -d' ' -f$((i + 1))).log"; exit 1; }
done
echo "built $builds"
for ((rep = 1; rep <= ${REPEATS:-3}; rep++)); do
  for v in $builds; do
    REPEATS=1 SECONDS_PER_RUN=${SECONDS_PER_RUN:-2} "$here/batching_sweep.sh" \
      /tmp/ab-build-$v/flotilla "$CONFIGS" | sed "s/^{\"label\":\"/{\"label\":\"$v-/" >>"$OUT/ab.jsonl"
  done
done
"$here/sweep_summary.py" "$OUT/ab.jsonl" --sort-by-config | tee "$OUT/ab.txt"
