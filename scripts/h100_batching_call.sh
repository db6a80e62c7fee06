#!/usr/bin/env bash
# One device call for the batching figures of docs/PERF.md ("Recorded batches"):
# build, the GPU tests, bench/micro_batch, a batching sweep, the libtorch peer.
# Usage (on the GPU machine, from a checkout whose .snap/flotilla.tar is `git
# archive HEAD` and whose .peer/ holds ../shared/peer): OUT=dir
# scripts/h100_batching_call.sh runs scripts/h100-recorded-configs.txt (or
# CONFIGS="label: options\\n...", a list of its own).
set -u
R=$PWD
mkdir -p /tmp/src && tar -xf $R/.snap/flotilla.tar -C /tmp/src
cd /tmp/src
SRC=/tmp/src BUILD=/tmp/fb OUT=$OUT scripts/gpu_check.sh build > $OUT/build.log 2>&1 || { tail -30 $OUT/build.log; exit 1; }
echo "build ok at $(git -C /tmp/src log -1 --format=%h 2>/dev/null || echo tar)"
(cd /tmp/fb && timeout 240 ctest -L gpu -j4 2>&1 | tail -15) > $OUT/ctest-gpu.log; tail -6 $OUT/ctest-gpu.log
/tmp/fb/bench/micro_batch 2>&1 | grep -E "micro_batch|median" > $OUT/micro_batch.txt; cat $OUT/micro_batch.txt | sed -E 's/min_time:0.300\/repeats:3\/real_time_median//'
if [ -n "${CONFIGS:-}" ]; then printf "%b\n" "$CONFIGS" > /tmp/configs.txt; else cp scripts/h100-recorded-configs.txt /tmp/configs.txt; fi
REPEATS=3 SECONDS_PER_RUN=2 scripts/batching_sweep.sh /tmp/fb/flotilla /tmp/configs.txt > $OUT/sweep.jsonl
python3 - $OUT/sweep.jsonl <<'PY' | tee $OUT/sweep.txt
import json,sys,statistics as st
rows={}
for l in open(sys.argv[1]):
    j=json.loads(l); r=j['result']
    if not r: print(j['label'],'FAILED'); continue
    rows.setdefault(j['label'],[]).append(r)
for k,v in rows.items():
    rps=[r['requests_per_s'] for r in v]
    print(f"{k:18s} {[round(x/1e3,1) for x in rps]} med {st.median(rps)/1e3:7.1f}k p50 {st.median([r['p50_us'] for r in v]):6.0f} p99 {st.median([r['p99_us'] for r in v]):6.0f} mb {st.median([r.get('mean_batch',0) for r in v]):5.1f} checks {sum(r['checks'] for r in v)} wrong {sum(r['wrong_results'] for r in v)} err {sum(r['errors'] for r in v)}")
PY
bash $R/.peer/run_libtorch.sh 1 > $OUT/libtorch.log 2>&1; grep -E "graph" $OUT/libtorch.log | tail -8
