#!/usr/bin/env bash
# One device call for the batching figures of docs/PERF.md ("Recorded batches"):
# build, the GPU tests, bench/micro_batch, a batching sweep, the libtorch peer.
# Usage (on the GPU machine, from a checkout whose .snap/flotilla.tar is `git
# archive HEAD` and whose .peer/ holds ../shared/peer): OUT=dir
# scripts/h100_batching_call.sh runs scripts/h100-recorded-configs.txt (or
# CONFIGS="label: options\\n...", a list of its own, or CONFIGS_FILE=path, a
# file of them). LIBTORCH_RUNS (default 1): runs of the libtorch peer, one
# before the sweep and the rest after it, to show the peer's own spread.
# CPU_CONFIGS_FILE (optional): a CPU-backend sweep at the end (see there).
set -u
R=$PWD
mkdir -p /tmp/src && tar -xf $R/.snap/flotilla.tar -C /tmp/src
cd /tmp/src
SRC=/tmp/src BUILD=/tmp/fb OUT=$OUT scripts/gpu_check.sh build > $OUT/build.log 2>&1 || { tail -30 $OUT/build.log; exit 1; }
echo "build ok at $(git -C /tmp/src log -1 --format=%h 2>/dev/null || echo tar)"
(cd /tmp/fb && timeout 240 ctest -L gpu -j4 2>&1 | tail -15) > $OUT/ctest-gpu.log; tail -6 $OUT/ctest-gpu.log
/tmp/fb/bench/micro_batch 2>&1 | grep -E "micro_batch|median" > $OUT/micro_batch.txt; cat $OUT/micro_batch.txt | sed -E 's/min_time:0.300\/repeats:3\/real_time_median//'
if [ -n "${CONFIGS_FILE:-}" ]; then cp "$CONFIGS_FILE" /tmp/configs.txt; elif [ -n "${CONFIGS:-}" ]; then printf "%b\n" "$CONFIGS" > /tmp/configs.txt; else cp scripts/h100-recorded-configs.txt /tmp/configs.txt; fi
if [ "${LIBTORCH_RUNS:-1}" -gt 1 ]; then
  bash $R/.peer/run_libtorch.sh 1 > $OUT/libtorch-before.log 2>&1; grep -E "graph" $OUT/libtorch-before.log | tail -8
fi
REPEATS=3 SECONDS_PER_RUN=2 scripts/batching_sweep.sh /tmp/fb/flotilla /tmp/configs.txt > $OUT/sweep.jsonl
scripts/sweep_summary.py $OUT/sweep.jsonl | tee $OUT/sweep.txt
bash $R/.peer/run_libtorch.sh 1 > $OUT/libtorch.log 2>&1; grep -E "graph" $OUT/libtorch.log | tail -8
# CPU_CONFIGS_FILE: the CPU backend's gain from batching on this host (same
# format; a `pool` label runs per-thread streams), after the GPU figures.
if [ -n "${CPU_CONFIGS_FILE:-}" ]; then
  echo "cpu backend on $(nproc) cores ($(lscpu | sed -n 's/^Model name: *//p'))"
  BACKEND=cpu REPEATS=3 SECONDS_PER_RUN=3 scripts/batching_sweep.sh /tmp/fb/flotilla \
    "$CPU_CONFIGS_FILE" > $OUT/cpu-sweep.jsonl
  scripts/sweep_summary.py $OUT/cpu-sweep.jsonl --sort-by-config | tee $OUT/cpu-sweep.txt
fi
