#!/usr/bin/env python3
# Runs a command and says how much CPU it used: its own user and system
# seconds (getrusage of the child), the wall seconds, and the whole
# machine's busy share from /proc/stat over the same span. Usage:
#   scripts/cpu_use.py LABEL -- COMMAND ARGS...
# Prints the command's stdout, then one line "cpu_use {json}" on stderr.
import json, os, resource, subprocess, sys, time


def stat():
    with open('/proc/stat') as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + v[4]  # idle + iowait
    return sum(v), idle


label = sys.argv[1]
cmd = sys.argv[sys.argv.index('--') + 1:]
t0, (tot0, idle0) = time.monotonic(), stat()
p = subprocess.run(cmd)
t1, (tot1, idle1) = time.monotonic(), stat()
ru = resource.getrusage(resource.RUSAGE_CHILDREN)
wall = t1 - t0
cores = os.cpu_count()
print('cpu_use ' + json.dumps({
    'label': label, 'rc': p.returncode, 'wall_s': round(wall, 3),
    'user_s': round(ru.ru_utime, 3), 'sys_s': round(ru.ru_stime, 3),
    'process_cores': round((ru.ru_utime + ru.ru_stime) / wall, 2),
    'machine_busy': round(1 - (idle1 - idle0) / max(1, tot1 - tot0), 3),
    'machine_cores': cores,
    'vol_ctx': ru.ru_nvcsw, 'invol_ctx': ru.ru_nivcsw}), file=sys.stderr)
sys.exit(p.returncode)
