#!/usr/bin/env python3
# Per-thread-group CPU and context switches of a flotilla run (docs/PERF.md,
# "Where a worker's time goes"). Usage: thread_stats.py MODE -- flotilla run ...
# Cores: CPU time; runnable: time waiting on a run queue (schedstat), per second.
# MODE: base; nice5 / nice19 (client threads at that nice value); wnice (workers
# and CUDA completion threads at nice -10); fifo (workers SCHED_FIFO, needs the
# privilege). Samples /proc over [1.0, 2.5] s after the 64th client thread starts.
import os, sys, subprocess, time, json, re
mode = sys.argv[1]; cmd = sys.argv[sys.argv.index('--')+1:]
p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
HZ = os.sysconf('SC_CLK_TCK')
def group(name):
    for g in ('fl-client', 'fl-queue-w', 'fl-cuda0-done'):
        if name.startswith(g): return g
    return 'other'
def sample():
    d = {}
    pids = [p.pid]
    try: pids += [int(c) for c in open(f'/proc/{p.pid}/task/{p.pid}/children').read().split()]
    except Exception: pass
    tids = []
    for pid in pids:
        try: tids += [(pid, t) for t in os.listdir(f'/proc/{pid}/task')]
        except FileNotFoundError: pass
    for pid, t in tids:
        base = f'/proc/{pid}/task'
        try:
            name = open(f'{base}/{t}/comm').read().strip()
            st = open(f'{base}/{t}/stat').read()
            f = st[st.rindex(')')+2:].split()
            cpu = (int(f[11]) + int(f[12])) / HZ
            s = open(f'{base}/{t}/status').read()
            v = int(re.search(r'^voluntary_ctxt_switches:\s+(\d+)', s, re.M).group(1))
            nv = int(re.search(r'^nonvoluntary_ctxt_switches:\s+(\d+)', s, re.M).group(1))
        except Exception: continue
        try: rq = int(open(f'{base}/{t}/schedstat').read().split()[1]) / 1e9
        except Exception: rq = 0.0
        d[t] = (name, cpu, v, nv, rq)
    return d
done = set()
t0 = time.time()
while time.time() - t0 < 30:
    s = sample()
    clients = [t for t, x in s.items() if x[0].startswith('fl-client')]
    workers = [t for t, x in s.items() if x[0].startswith('fl-queue-w')]
    if len(clients) >= 64 and workers: break
    time.sleep(0.01)
def adj(t, g):
    if mode == 'nice5' and g == 'fl-client': os.setpriority(os.PRIO_PROCESS, int(t), 5)
    if mode == 'nice19' and g == 'fl-client': os.setpriority(os.PRIO_PROCESS, int(t), 19)
    if mode == 'wnice' and g in ('fl-queue-w', 'fl-cuda0-done'): os.setpriority(os.PRIO_PROCESS, int(t), -10)
    if mode == 'fifo' and g in ('fl-queue-w',):
        os.sched_setscheduler(int(t), os.SCHED_FIFO, os.sched_param(1))
for t, x in s.items():
    try: adj(t, group(x[0]))
    except Exception as e: print('adj failed', e, file=sys.stderr)
ts = time.time(); time.sleep(1.0)
a = sample(); ta = time.time(); time.sleep(1.5); b = sample(); tb = time.time()
out = p.stdout.read(); p.wait()
agg = {}
for t in b:
    if t not in a: continue
    g = group(b[t][0]); e = agg.setdefault(g, [0, 0.0, 0, 0, 0.0])
    e[0] += 1; e[1] += b[t][1]-a[t][1]; e[2] += b[t][2]-a[t][2]; e[3] += b[t][3]-a[t][3]
    e[4] += b[t][4]-a[t][4]
dt = tb - ta
r = None
for l in out.splitlines():
    if l.startswith('{'): r = json.loads(l)
line = f'{mode:7s} '
if r: line += f"rps {r['requests_per_s']/1e3:.1f}k p99 {r['p99_us']:.0f} mb {r.get('mean_batch',0):.1f} wrong {r['wrong_results']} err {r['errors']} |"
for g, e in sorted(agg.items()):
    line += f" {g}: n{e[0]} cores {e[1]/dt:.2f} runnable {e[4]/dt:.2f} vol/s {e[2]/dt/1e3:.1f}k inv/s {e[3]/dt/1e3:.1f}k;"
print(line, flush=True)
