#!/usr/bin/env bash
# Lays out, on this Debian 12 machine, what scripts/h100_ab_call.sh needs on
# the GPU machine, for one device call: .snap/a.tar, .snap/b.tar (and
# .snap/c.tar) as `git archive` of the given commits; with PREBUILT=1 also
# .snap/bin/VERSION/ (the flotilla binary of each, and the last one's CUDA
# test binaries, built here with CUDA on: the call then skips its build,
# about two minutes of device time); .deps/ (gpu_check.sh pack-deps, and
# Debian's libjemalloc2 as .deps/libjemalloc.so.2 for the jemalloc probe);
# and .peer/ (../shared/peer). All three folders are git-ignored; name them
# in the call's carry.
#
# Usage: scripts/prepare_ab_call.sh A_COMMIT B_COMMIT [C_COMMIT]
#   then, in the device call (carry .snap .deps .peer):
#   CONFIGS_FILE=... [EXTRA_CONFIGS_FILE=...] bash scripts/h100_ab_call.sh
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 2 ] || { sed -n 2,15p "$0"; exit 2; }
grep -qx '/.snap/' .git/info/exclude 2>/dev/null || echo /.snap/ >>.git/info/exclude
grep -qx '/.deps/' .git/info/exclude 2>/dev/null || echo /.deps/ >>.git/info/exclude
rm -rf .snap && mkdir -p .snap
versions=(a b c)
i=0
for commit in "$@"; do
  v=${versions[$i]}
  git archive "$commit" >.snap/$v.tar
  echo "$v = $(git log -1 --format='%h %s' "$commit" | cut -c1-80)"
  i=$((i + 1))
done
last=${versions[$((i - 1))]}
if [ "${PREBUILT:-0}" = 1 ]; then
  for ((k = 0; k < i; k++)); do
    v=${versions[$k]}
    src=/tmp/ab-prep-src-$v build=/tmp/ab-prep-build-$v
    rm -rf $src && mkdir -p $src && tar -xf .snap/$v.tar -C $src
    targets=flotilla
    [ $v = "$last" ] && targets="flotilla cuda_backend_test cuda_concurrency_test"
    cmake -S $src -B $build -G Ninja -DCMAKE_BUILD_TYPE=Release -DFLOTILLA_CUDA=ON \
      -DFLOTILLA_BUILD_BENCH=OFF >/dev/null
    # shellcheck disable=SC2086
    ninja -C $build $targets >/dev/null
    mkdir -p .snap/bin/$v/tests/cuda
    cp $build/flotilla .snap/bin/$v/
    [ $v = "$last" ] && cp $build/tests/cuda/cuda_backend_test $build/tests/cuda/cuda_concurrency_test \
      .snap/bin/$v/tests/cuda/
    echo "built $v"
  done
fi
scripts/gpu_check.sh pack-deps >/dev/null
(cd /tmp && rm -f libjemalloc2_*.deb && apt-get download libjemalloc2 >/dev/null 2>&1 &&
  rm -rf /tmp/jemalloc-x && dpkg -x libjemalloc2_*.deb /tmp/jemalloc-x)
cp /tmp/jemalloc-x/usr/lib/x86_64-linux-gnu/libjemalloc.so.2 .deps/
mkdir -p .peer && cp ../shared/peer/* .peer/
du -sh .snap .deps .peer
