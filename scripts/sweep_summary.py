#!/usr/bin/env python3
"""Medians of scripts/batching_sweep.sh's JSON lines, one line per label.

Usage: scripts/sweep_summary.py SWEEP.jsonl [--sort-by-config]
  --sort-by-config: order labels by what follows their first '-' (so
  a-<cfg> and b-<cfg>, or before/after runs of one configuration, sit
  together), as scripts/ab_batching.sh prints them.
"""
import json
import statistics as st
import sys

rows = {}
for line in open(sys.argv[1]):
    j = json.loads(line)
    r = j['result']
    if not r:
        print(j['label'], 'FAILED')
        continue
    rows.setdefault(j['label'], []).append(r)
items = list(rows.items())
if '--sort-by-config' in sys.argv[2:]:
    items.sort(key=lambda kv: (kv[0].split('-', 1)[-1], kv[0]))
width = max([18] + [len(k) for k, _ in items])
for k, v in items:
    rps = [r['requests_per_s'] for r in v]
    print(f"{k:{width}s} {[round(x / 1e3, 1) for x in rps]} med {st.median(rps) / 1e3:7.1f}k"
          f" p50 {st.median([r['p50_us'] for r in v]):6.0f} p99 {st.median([r['p99_us'] for r in v]):6.0f}"
          f" mb {st.median([r.get('mean_batch', 0) for r in v]):5.1f} checks {sum(r['checks'] for r in v)}"
          f" wrong {sum(r['wrong_results'] for r in v)} err {sum(r['errors'] for r in v)}")
