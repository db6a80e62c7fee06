#!/usr/bin/env bash
# One device call that profiles `flotilla run` with scripts/sampler.c (the GPU
# machines have no perf): a binary-only build, then for each configuration a
# plain run and a sampled one. Usage (on the GPU machine, from a checkout
# whose .snap/flotilla.tar is `git archive HEAD`): OUT=dir CONFIGS_FILE=path
# scripts/h100_profile_call.sh. Writes $OUT/flotilla (the binary, for
# addr2line here), $OUT/prof-LABEL.txt and $OUT/runs.jsonl. Environment:
# SECONDS_PER_RUN (default 4), SAMPLER_US (default 200), PREBUILT_BIN (a
# flotilla binary built elsewhere, e.g. .snap/bin/b/flotilla from
# scripts/prepare_ab_call.sh with PREBUILT=1: no build, no .snap/flotilla.tar).
set -u
R=$PWD
if [ -n "${PREBUILT_BIN:-}" ]; then
  mkdir -p /tmp/fb && cp "$PREBUILT_BIN" /tmp/fb/flotilla || exit 1
else
  mkdir -p /tmp/src && tar -xf $R/.snap/flotilla.tar -C /tmp/src
  cd /tmp/src
  t0=$SECONDS
  cmake -S . -B /tmp/fb -G Ninja -DCMAKE_BUILD_TYPE=Release -DFLOTILLA_CUDA=ON \
    -DFLOTILLA_BUILD_TESTS=OFF > /tmp/build.log 2>&1 && ninja -C /tmp/fb flotilla >> /tmp/build.log 2>&1 ||
    { tail -30 /tmp/build.log; exit 1; }
  echo "build ok in $((SECONDS - t0)) s"
fi
gcc -O2 -shared -fPIC -o /tmp/sampler.so $R/scripts/sampler.c -ldl || exit 1
cp /tmp/fb/flotilla $OUT/flotilla
secs=${SECONDS_PER_RUN:-4}
while IFS= read -r line; do
  line=${line%%#*}
  [ -z "${line// /}" ] && continue
  label=${line%%:*}
  read -r -a words <<<"${line#*:}"
  for mode in plain sampled; do
    if [ $mode = sampled ]; then
      pre=(env SAMPLER_OUT=$OUT/prof-$label.txt SAMPLER_US=${SAMPLER_US:-200} LD_PRELOAD=/tmp/sampler.so)
    else
      pre=(env)
    fi
    json=$("${pre[@]}" /tmp/fb/flotilla run --backend cuda --batching --in-process --seconds $secs \
      --json --no-progress "${words[@]}" 2>/dev/null | tail -1)
    echo "{\"label\":\"$label\",\"mode\":\"$mode\",\"result\":${json:-null}}" >> $OUT/runs.jsonl
    python3 -c "import json,sys; d=json.loads(sys.argv[1]); r=d['result'] or {}; print(d['label'], d['mode'], round(r.get('samples_per_s',0)/1e3,1), 'k/s p99', round(r.get('p99_us',0)), 'mean_batch', round(r.get('mean_batch',0),1), 'wrong', r.get('wrong_results'))" "$(tail -1 $OUT/runs.jsonl)"
  done
done < "${CONFIGS_FILE}"
ls -la $OUT
