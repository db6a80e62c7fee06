#!/usr/bin/env bash
# Builds Flotilla with the CUDA backend on a GPU machine, runs the gpu-labelled
# tests, the CUDA micro-benchmarks beside the raw-CUDA peer, and (on request)
# the stress tool and compute-sanitizer. Every log goes under $OUT.
#
# Usage: scripts/gpu_check.sh [STEP...]          (default: build test bench connections)
#   build        Release build, FLOTILLA_CUDA=ON, sm_90 (ninja -k 0: a broken target
#                elsewhere does not stop the rest)
#   test         ctest -L gpu: tests/cuda and the runtime suite's cuda variant
#   bench        bench/micro_cuda, then the peer (cuda_limits.cu) in the same command
#   connections  CUDA_DEVICE_MAX_CONNECTIONS=8 vs 32: kernel overlap, submission,
#                round trips, and flotilla stress at 32 threads
#   stress       flotilla stress --backend cuda, pool, at 8, 32 and 64 threads,
#                STRESS_OPS (default 1000000) ops each, both policies at 64
#   sanitize     compute-sanitizer memcheck and racecheck over a short stress run
#   pack-deps    (on a Debian 12 machine, not the GPU one) writes .deps/deps.tar.gz:
#                the Debian packages the build needs, for a machine that lacks them
#
# Environment:
#   OUT     log folder (the device tool sets it; default ./gpu-out)
#   BUILD   build folder (default /tmp/flotilla-gpu-build)
#   SRC     source tree (default: this repository); a .tar of `git archive` is unpacked
#   PEER    folder holding cuda_limits.cu (default: .peer, else ../shared/peer)
#   STRESS_OPS  ops per stress run (default 1000000)
# Dependencies: if the machine lacks GoogleTest, Google Benchmark, CLI11,
# nlohmann-json, OpenBLAS or pkg-config, carry .deps/deps.tar.gz (pack-deps)
# with the call; it is unpacked under /tmp and CMake pointed at it.
#
# Logs (at most 8 files, for the device tool): build.log test.log bench.log
# peer.log connections.log stress.log sanitize.log summary.txt.
set -u -o pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-$ROOT/gpu-out}
BUILD=${BUILD:-/tmp/flotilla-gpu-build}
SRC=${SRC:-$ROOT}
STRESS_OPS=${STRESS_OPS:-1000000}
mkdir -p "$OUT"
SUMMARY=$OUT/summary.txt
note() { echo "$*" | tee -a "$SUMMARY"; }

steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(build test bench connections)

pack_deps() {
  local root L
  root=$(mktemp -d)
  L=usr/lib/x86_64-linux-gnu
  mkdir -p "$root/$L/cmake" "$root/$L/pkgconfig" "$root/$L/openblas-pthread" \
    "$root/usr/include/x86_64-linux-gnu" "$root/usr/share/cmake" "$root/usr/bin"
  cp -a /usr/include/{gtest,gmock,benchmark,CLI,nlohmann} "$root/usr/include/"
  cp -a /usr/include/x86_64-linux-gnu/openblas-pthread "$root/usr/include/x86_64-linux-gnu/"
  cp -a /$L/libgtest*.a /$L/libgmock*.a /$L/libbenchmark* "$root/$L/"
  cp -a /$L/cmake/GTest /$L/cmake/benchmark "$root/$L/cmake/"
  cp -a /usr/share/cmake/CLI11 /usr/share/cmake/nlohmann_json "$root/usr/share/cmake/"
  cp -a /$L/openblas-pthread/libopenblas*.so* "$root/$L/openblas-pthread/"
  cp "$(find /usr/lib -name openblas.pc | head -1)" "$root/$L/pkgconfig/"
  cp -L /lib/x86_64-linux-gnu/{libgfortran.so.5,libquadmath.so.0,libpkgconf.so.3} "$root/$L/"
  cp -L "$(command -v pkgconf)" "$root/usr/bin/pkg-config"
  mkdir -p "$ROOT/.deps"
  tar -czf "$ROOT/.deps/deps.tar.gz" -C "$root" usr
  rm -rf "$root"
  echo "wrote $ROOT/.deps/deps.tar.gz; name .deps in the device call's carry"
}

# Points the build at carried Debian packages when the machine lacks them.
use_deps() {
  CMAKE_EXTRA=()
  if [ -d /usr/include/gtest ] && [ -d /usr/include/benchmark ] && [ -d /usr/include/CLI ] &&
    command -v pkg-config >/dev/null && pkg-config --exists openblas 2>/dev/null; then
    return
  fi
  local tgz=$ROOT/.deps/deps.tar.gz D=/tmp/flotilla-deps
  if [ ! -f "$tgz" ]; then
    note "missing Debian packages and no $tgz: run 'scripts/gpu_check.sh pack-deps' on Debian"
    return
  fi
  if [ ! -d $D/usr ]; then
    mkdir -p $D && tar -xzf "$tgz" -C $D
    sed -i "s#/usr/#$D/usr/#g" $D/usr/lib/x86_64-linux-gnu/pkgconfig/openblas.pc
  fi
  export PATH=$D/usr/bin:$PATH
  export PKG_CONFIG_PATH=$D/usr/lib/x86_64-linux-gnu/pkgconfig
  export LD_LIBRARY_PATH=$D/usr/lib/x86_64-linux-gnu:$D/usr/lib/x86_64-linux-gnu/openblas-pthread:${LD_LIBRARY_PATH:-}
  CMAKE_EXTRA=(-DCMAKE_PREFIX_PATH="$D/usr;$D/usr/lib/x86_64-linux-gnu/cmake;$D/usr/share/cmake"
    -DPKG_CONFIG_EXECUTABLE=$D/usr/bin/pkg-config)
  note "using carried Debian packages from $tgz"
}

source_tree() {
  if [ -f "$SRC" ]; then  # a git archive
    local dir=/tmp/flotilla-src
    rm -rf $dir && mkdir -p $dir && tar -xf "$SRC" -C $dir
    SRC=$dir
  fi
}

step_build() {
  source_tree
  use_deps
  note "== build: $SRC -> $BUILD ($(nvcc --version | tail -1))"
  local t0=$SECONDS
  cmake -S "$SRC" -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release -DFLOTILLA_CUDA=ON \
    "${CMAKE_EXTRA[@]}" >"$OUT/build.log" 2>&1 || { note "configure FAILED (build.log)"; return 1; }
  ninja -C "$BUILD" -k 0 >>"$OUT/build.log" 2>&1 || note "some targets FAILED (build.log):"
  grep -E "^FAILED" "$OUT/build.log" | head -20 | tee -a "$SUMMARY"
  note "build took $((SECONDS - t0)) s"
}

step_test() {
  use_deps
  note "== test: ctest -L gpu"
  (cd "$BUILD" && timeout 420 ctest -L gpu -j4 --output-on-failure --timeout 180) \
    >"$OUT/test.log" 2>&1
  note "ctest exit $?"
  grep -E "tests passed|tests failed|Total Test time|\(Failed\)|\(Timeout\)|Not Run|\*\*\*" \
    "$OUT/test.log" | head -40 | tee -a "$SUMMARY"
}

peer_dir() {
  for d in "${PEER:-}" "$ROOT/.peer" "$ROOT/../shared/peer"; do
    [ -n "$d" ] && [ -f "$d/cuda_limits.cu" ] && { echo "$d"; return; }
  done
}

step_bench() {
  use_deps
  note "== bench: micro_cuda (defaults), then the raw-CUDA peer"
  nvidia-smi --query-gpu=name,driver_version,clocks.sm --format=csv,noheader | tee -a "$SUMMARY"
  timeout 240 "$BUILD/bench/micro_cuda" --benchmark_counters_tabular=true >"$OUT/bench.log" 2>&1
  note "micro_cuda exit $?"
  grep -E "micro_cuda:|_median" "$OUT/bench.log" | tee -a "$SUMMARY"
  # Completion threads per device (Config::cuda_completion_threads): 1 and 4
  # against the default, on the paths that finish many command buffers.
  for n in 1 4; do
    {
      echo "---- FLOTILLA_CUDA_COMPLETION_THREADS=$n"
      FLOTILLA_CUDA_COMPLETION_THREADS=$n timeout 120 "$BUILD/bench/micro_cuda" \
        --benchmark_filter='^roundtrip|^submit_commit_each' --benchmark_counters_tabular=true
    } >>"$OUT/bench.log" 2>&1
  done
  sed -n '/^---- FLOTILLA_CUDA_COMPLETION_THREADS/,$p' "$OUT/bench.log" |
    grep -E "^----|_median" | tee -a "$SUMMARY"
  local peer
  peer=$(peer_dir)
  if [ -z "$peer" ]; then
    note "no peer (cuda_limits.cu) found"
    return
  fi
  nvcc -O2 -std=c++17 -arch=sm_90 -o /tmp/cuda_limits "$peer/cuda_limits.cu" >"$OUT/peer.log" 2>&1 &&
    timeout 120 /tmp/cuda_limits >>"$OUT/peer.log" 2>&1
  note "peer exit $? (CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-unset})"
  grep -E "raw-cuda|device" "$OUT/peer.log" | tee -a "$SUMMARY"
}

stress() {  # threads ops [policy]
  local threads=$1 ops=$2 policy=${3:-round-robin} rounds=4
  local per=$(((ops + threads * rounds - 1) / (threads * rounds)))
  timeout 300 "$BUILD/flotilla" stress --backend cuda --arch pool --policy "$policy" \
    --threads "$threads" --ops-per-thread "$per" --rounds $rounds --json
}

step_connections() {
  use_deps
  note "== connections: CUDA_DEVICE_MAX_CONNECTIONS 8 vs 32"
  : >"$OUT/connections.log"
  for c in 8 32; do
    {
      echo "---- CUDA_DEVICE_MAX_CONNECTIONS=$c"
      CUDA_DEVICE_MAX_CONNECTIONS=$c timeout 180 "$BUILD/bench/micro_cuda" \
        --benchmark_filter='overlap|^submit/|roundtrip' --benchmark_counters_tabular=true
      echo "---- stress 32 threads, CUDA_DEVICE_MAX_CONNECTIONS=$c"
      CUDA_DEVICE_MAX_CONNECTIONS=$c stress 32 "$STRESS_OPS"
      if [ -x /tmp/cuda_limits ]; then  # built by the bench step
        echo "---- peer, CUDA_DEVICE_MAX_CONNECTIONS=$c"
        CUDA_DEVICE_MAX_CONNECTIONS=$c timeout 120 /tmp/cuda_limits
      fi
    } >>"$OUT/connections.log" 2>&1
  done
  {
    echo "---- Config only: --cuda_max_connections=8, variable unset"
    env -u CUDA_DEVICE_MAX_CONNECTIONS timeout 60 "$BUILD/bench/micro_cuda" \
      --cuda_max_connections=8 --benchmark_filter=overlap --benchmark_counters_tabular=true
  } >>"$OUT/connections.log" 2>&1
  grep -E "^----|micro_cuda:|_median|\"ops_per_s\"|raw-cuda (launch|roundtrip)" \
    "$OUT/connections.log" | tee -a "$SUMMARY"
}

step_stress() {
  use_deps
  note "== stress: --backend cuda, $STRESS_OPS ops per run"
  : >"$OUT/stress.log"
  for t in 8 32 64; do
    { echo "---- threads=$t round-robin"; stress $t "$STRESS_OPS"; } >>"$OUT/stress.log" 2>&1
  done
  { echo "---- threads=64 exclusive"; stress 64 "$STRESS_OPS" exclusive; } >>"$OUT/stress.log" 2>&1
  grep -E "^----|\"crashes\"|ops_per_s" "$OUT/stress.log" | tee -a "$SUMMARY"
}

step_sanitize() {
  use_deps
  note "== compute-sanitizer (memcheck, racecheck) over a short stress run"
  : >"$OUT/sanitize.log"
  for tool in memcheck racecheck; do
    {
      echo "---- $tool"
      timeout 300 compute-sanitizer --tool $tool --error-exitcode 9 --target-processes all \
        "$BUILD/flotilla" stress --backend cuda --arch pool --threads 8 --ops-per-thread 2000 \
        --rounds 1 --in-process --json
      echo "exit $?"
    } >>"$OUT/sanitize.log" 2>&1
  done
  grep -E "^----|ERROR SUMMARY|RACECHECK SUMMARY|^exit" "$OUT/sanitize.log" | tee -a "$SUMMARY"
}

for s in "${steps[@]}"; do
  case $s in
    pack-deps) pack_deps ;;
    build) step_build ;;
    test) step_test ;;
    bench) step_bench ;;
    connections) step_connections ;;
    stress) step_stress ;;
    sanitize) step_sanitize ;;
    *) echo "unknown step '$s' (build test bench connections stress sanitize pack-deps)"; exit 2 ;;
  esac
done
