#!/usr/bin/env bash
# One device call for before/after figures and their evidence, for a session
# with little device time: builds A, B and (if given) C in parallel (the
# flotilla binary; the last build also the GPU test binaries named in
# TEST_TARGETS), runs the last build's GPU tests (TEST_CMD), then every
# configuration of CONFIGS_FILE on each build, and those of
# EXTRA_CONFIGS_FILE (if given) on the last build only (with the libtorch
# peer once, after the first round), REPEATS
# rounds with the builds interleaved in each (batching_sweep.sh's format;
# a run is killed after RUN_TIMEOUT s, so a hang costs one run, not the
# call). Medians print per build and configuration; every log goes to $OUT.
#
# Usage (on the GPU machine, from a checkout that carries .snap/a.tar,
# .snap/b.tar and optionally .snap/c.tar (or only .snap/b.tar: one build), `git archive` of the commits, or
# .snap/bin/a/, .snap/bin/b/ (and c/) with binaries built elsewhere (below);
# .deps/deps.tar.gz from `scripts/gpu_check.sh pack-deps`; and .peer/ from
# ../shared/peer):
#   CONFIGS_FILE=scripts/....txt OUT=dir scripts/h100_ab_call.sh
# Environment: REPEATS (3), SECONDS_PER_RUN (2), RUN_TIMEOUT (30),
#   EXTRA_CONFIGS_FILE, TEST_TARGETS (cuda_concurrency_test), TEST_CMD (its
#   CudaServe.* tests, run in the last build's folder).
set -u -o pipefail
R=$PWD
t0=$SECONDS
say() { echo "[$((SECONDS - t0)) s] $*"; }

# The Debian packages the GPU machine lacks (gpu_check.sh's use_deps, for
# plain cmake calls: CMake reads CMAKE_PREFIX_PATH from the environment).
D=/tmp/flotilla-deps
mkdir -p $D && tar -xzf "$R/.deps/deps.tar.gz" -C $D &&
  sed -i "s#/usr/#$D/usr/#g" $D/usr/lib/x86_64-linux-gnu/pkgconfig/openblas.pc || exit 1
L=$D/usr/lib/x86_64-linux-gnu
export PATH=$D/usr/bin:$PATH PKG_CONFIG_PATH=$L/pkgconfig
export LD_LIBRARY_PATH=$L:$L/openblas-pthread:${LD_LIBRARY_PATH:-}
export CMAKE_PREFIX_PATH="$D/usr;$L/cmake;$D/usr/share/cmake"
nvidia-smi --query-gpu=name,driver_version,clocks.sm --format=csv,noheader
echo "host: $(nproc) cores, $(lscpu | sed -n 's/^Model name: *//p')"

# The builds present (one alone, b, runs CONFIGS_FILE on one binary: probes
# without a comparison).
builds=""
for v in a b c; do
  [ -f "$R/.snap/$v.tar" ] || [ -d "$R/.snap/bin/$v" ] && builds="${builds:+$builds }$v"
done
[ -n "$builds" ] || { echo "no .snap/{a,b,c}.tar or .snap/bin/{a,b,c}/"; exit 1; }
last=${builds##* }
build() {  # build VERSION TARGETS...
  local v=$1
  shift
  rm -rf /tmp/ab-src-$v && mkdir -p /tmp/ab-src-$v && tar -xf "$R/.snap/$v.tar" -C /tmp/ab-src-$v
  cmake -S /tmp/ab-src-$v -B /tmp/ab-build-$v -G Ninja -DCMAKE_BUILD_TYPE=Release \
    -DFLOTILLA_CUDA=ON -DFLOTILLA_BUILD_BENCH=OFF -DPKG_CONFIG_EXECUTABLE=$D/usr/bin/pkg-config \
    >"$OUT/build-$v.log" 2>&1 && ninja -C /tmp/ab-build-$v "$@" >>"$OUT/build-$v.log" 2>&1
}
# Binaries built elsewhere (.snap/bin/VERSION/: flotilla and tests/cuda/...,
# built on Debian 12: they need libstdc++ from GCC 12 or later) save the build's
# device time: they need the carried Debian libraries and the machine's
# cuBLASLt. If the last one does not run here, it is built here instead,
# alone (no A/B then).
prebuilt=0
if [ -d "$R/.snap/bin" ]; then
  lt=$(find /usr/local/cuda* /usr/lib /opt -name 'libcublasLt.so.13*' 2>/dev/null | head -1)
  [ -n "$lt" ] && export LD_LIBRARY_PATH=$(dirname "$lt"):$LD_LIBRARY_PATH
  for v in $builds; do mkdir -p /tmp/ab-build-$v && cp -r "$R/.snap/bin/$v/." /tmp/ab-build-$v/; done
  if /tmp/ab-build-$last/flotilla info >"$OUT/build-$last.log" 2>&1; then
    prebuilt=1
    say "prebuilt binaries run here (cuBLASLt: ${lt:-none found})"
  else
    say "prebuilt binaries do not run here; building $last alone"
    ldd /tmp/ab-build-$last/flotilla | grep -i "not found"
    builds=$last
  fi
fi
if [ $prebuilt = 0 ]; then
  pids=()
  for v in $builds; do
    if [ $v = $last ]; then
      build $v flotilla ${TEST_TARGETS:-cuda_concurrency_test} &
    else
      build $v flotilla &
    fi
    pids+=($!)
  done
  i=0
  for v in $builds; do
    wait "${pids[$i]}" || { say "build $v FAILED"; tail -20 "$OUT/build-$v.log"; exit 1; }
    i=$((i + 1))
  done
  say "built $builds"
fi

(cd /tmp/ab-build-$last &&
  eval "timeout 300 ${TEST_CMD:-tests/cuda/cuda_concurrency_test --gtest_filter='CudaServe.*'}") \
  >"$OUT/tests.log" 2>&1
say "build $last's GPU tests: exit $?"
grep -E "^\[  (PASSED|FAILED|SKIPPED) |tests? ran|FAILED" "$OUT/tests.log" | head -20

sweep() {  # sweep VERSION CONFIGS
  RUN_TIMEOUT=${RUN_TIMEOUT:-30} REPEATS=1 SECONDS_PER_RUN=${SECONDS_PER_RUN:-2} \
    "$R/scripts/batching_sweep.sh" /tmp/ab-build-$1/flotilla "$2" |
    sed "s/^{\"label\":\"/{\"label\":\"$1-/" >>"$OUT/ab.jsonl"
}
# The peer runs after the first round, so a call cut short by its time
# limit still brings back one round beside it.
for ((rep = 1; rep <= ${REPEATS:-3}; rep++)); do
  for v in $builds; do sweep $v "$CONFIGS_FILE"; done
  [ -n "${EXTRA_CONFIGS_FILE:-}" ] && sweep $last "$EXTRA_CONFIGS_FILE"
  say "round $rep done"
  if [ $rep = 1 ]; then
    # The peer aborts at times in its own graph mode (a thread's randn while
    # another captures: "Offset increment outside graph capture"), before
    # its 8 x 64 line; it runs again, up to twice, until that line comes.
    for try in 1 2 3; do
      bash "$R/.peer/run_libtorch.sh" 1 >"$OUT/libtorch-$try.log" 2>&1
      cp "$OUT/libtorch-$try.log" "$OUT/libtorch.log"
      grep -qE "graph +threads= *8 batch= *64 " "$OUT/libtorch.log" && break
      say "libtorch peer try $try ended without its graph 8 x 64 line"
    done
    say "libtorch peer done"
    grep -E "graph +threads= *(1|8) " "$OUT/libtorch.log"
  fi
done
"$R/scripts/sweep_summary.py" "$OUT/ab.jsonl" --sort-by-config | tee "$OUT/ab.txt"
say "done"
