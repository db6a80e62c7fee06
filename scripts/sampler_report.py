#!/usr/bin/env python3
# Summarises scripts/sampler.c's samples: per thread group, the share of its
# samples each function has on top of the stack (self) and anywhere on it
# (total). Usage: sampler_report.py PROF.txt --exe FLOTILLA [--top N]
#   [--group PREFIX ...] [--callers FUNC]
# Program frames ("exe+0xOFF") are named with addr2line -f -C -i on --exe
# (inlined functions count for each function of the chain); shared libraries'
# frames carry the exported symbol dladdr found, or lib+offset.
import argparse, collections, re, subprocess, sys

ap = argparse.ArgumentParser()
ap.add_argument('prof')
ap.add_argument('--exe', required=True)
ap.add_argument('--top', type=int, default=25)
ap.add_argument('--group', action='append',
                default=None, help='thread-name prefixes (default: fl-client, fl-queue-w, fl-cuda)')
ap.add_argument('--callers', action='append', default=[],
                help='also list who calls functions whose name contains this')
a = ap.parse_args()
groups = a.group or ['fl-client', 'fl-queue-w', 'fl-cuda']
exe_name = a.exe.rsplit('/', 1)[-1]

rows = []
for line in open(a.prof, errors='replace'):
    parts = line.rstrip('\n').split('|')
    rows.append((parts[0], parts[1:]))

offs = sorted({f.split('+', 1)[1] for _, fr in rows for f in fr
               if f.startswith(exe_name + '+0x')})
names = {}
if offs:
    # -a prints each address before its inline chain (function, file:line).
    out = subprocess.run(['addr2line', '-a', '-f', '-C', '-i', '-e', a.exe] + offs,
                         capture_output=True, text=True).stdout.split('\n')
    cur = None
    i = 0
    while i < len(out):
        l = out[i]
        if re.fullmatch(r'0x[0-9a-f]+', l):
            cur = '0x' + l[2:].lstrip('0') if l[2:].lstrip('0') else '0x0'
            names[cur] = []
            i += 1
            continue
        if cur is not None and l:
            names[cur].append(l)
            i += 2  # function, then file:line
            continue
        i += 1


def simplify(fn):
    fn = fn.replace('(anonymous namespace)', '{anon}')
    fn = re.sub(r'\(.*$', '', fn)  # drop the argument list
    fn = re.sub(r'<[^<>]*(<[^<>]*>[^<>]*)*>', '<>', fn)
    return fn


def chain(frame):
    """The function names of a frame, innermost first."""
    if frame.startswith(exe_name + '+0x'):
        off = frame.split('+', 1)[1]
        key = '0x' + off[2:].lstrip('0')
        got = names.get(key) or [frame]
        return [simplify(x) for x in got]
    m = re.match(r'([^:]+):(.+)\+0x[0-9a-f]+$', frame)
    if m:
        return [demangle(m.group(2)) + ' [' + m.group(1) + ']']
    return [frame]  # lib+offset: not an exported symbol


demangled = {}


def demangle(sym):
    if sym.startswith('_Z') and sym not in demangled:
        demangled[sym] = subprocess.run(['c++filt', sym], capture_output=True,
                                        text=True).stdout.strip() or sym
    return demangled.get(sym, sym)


def group_of(name):
    for g in groups:
        if name.startswith(g):
            return g
    return 'other'


by_group = collections.defaultdict(list)
for name, fr in rows:
    by_group[group_of(name)].append(fr)
total = len(rows)
print(f'{total} samples')
for g in groups + ['other']:
    samples = by_group.get(g, [])
    if not samples:
        continue
    self_c = collections.Counter()
    incl = collections.Counter()
    callers = collections.defaultdict(collections.Counter)
    for fr in samples:
        chains = [chain(f) for f in fr]
        self_c[chains[0][0]] += 1
        seen = set()
        flat = [fn for c in chains for fn in c]
        for fn in flat:
            if fn not in seen:
                seen.add(fn)
                incl[fn] += 1
        for pat in a.callers:
            for k, fn in enumerate(flat):
                if pat in fn:
                    callers[fn][' < '.join(flat[k + 1:k + 4]) or '(top)'] += 1
                    break
    n = len(samples)
    print(f'\n== {g}: {n} samples ({100.0 * n / total:.1f}% of all)')
    print('  self:')
    for fn, c in self_c.most_common(a.top):
        print(f'    {100.0 * c / n:5.1f}%  {fn}')
    print('  total (anywhere on the stack):')
    for fn, c in incl.most_common(a.top):
        print(f'    {100.0 * c / n:5.1f}%  {fn}')
    for fn, cs in callers.items():
        print(f'  callers of {fn}:')
        for who, c in cs.most_common(8):
            print(f'    {100.0 * c / n:5.1f}%  {who}')
