// A CPU-time sampling profiler to LD_PRELOAD, for machines without perf
// (the GPU machines have no perf, and no hardware events for one).
//
//   gcc -O2 -shared -fPIC -o /tmp/sampler.so scripts/sampler.c -ldl
//   SAMPLER_OUT=/tmp/prof.txt LD_PRELOAD=/tmp/sampler.so flotilla run --in-process ...
//   scripts/sampler_report.py /tmp/prof.txt --exe path/to/flotilla
//
// A process-wide ITIMER_PROF timer (SAMPLER_US of CPU time, default 200)
// sends SIGPROF to the thread that was running when it expired, so samples
// fall on threads in proportion to the CPU they use. The handler records the
// thread's name and its stack (the interrupted instruction, then the return
// addresses glibc's backtrace() unwinds) into a preallocated array; at exit
// each address is named with dladdr(): "exe+0xOFFSET" for the program (the
// report names those with addr2line), "lib:symbol+0xOFF" for shared
// libraries. One line a sample: name|frame0|frame1|... (innermost first).
// The program must end through exit() (flotilla run --in-process does).
#define _GNU_SOURCE
#include <dlfcn.h>
#include <execinfo.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/time.h>
#include <ucontext.h>

enum { kFrames = 10, kMaxSamples = 1 << 19 };

struct Sample {
  char name[16];
  int n;
  void* pc[kFrames];
};

static struct Sample* samples;
static atomic_int next_sample;
static const char* out_path;

static void on_prof(int sig, siginfo_t* info, void* ctx) {
  (void)sig;
  (void)info;
  const int i = atomic_fetch_add_explicit(&next_sample, 1, memory_order_relaxed);
  if (i >= kMaxSamples) return;
  struct Sample* s = &samples[i];
  prctl(PR_GET_NAME, s->name, 0, 0, 0);
  void* pc = (void*)((ucontext_t*)ctx)->uc_mcontext.gregs[REG_RIP];
  void* raw[kFrames + 4];
  const int got = backtrace(raw, kFrames + 4);
  int from = -1;
  for (int k = 0; k < got; ++k)
    if (raw[k] == pc) {
      from = k;
      break;
    }
  s->pc[0] = pc;
  s->n = 1;
  if (from >= 0)
    for (int k = from + 1; k < got && s->n < kFrames; ++k) s->pc[s->n++] = raw[k];
}

static void name_of(void* addr, int is_return, char* buf, size_t len) {
  // A return address names its call: look up the byte before it.
  void* at = (char*)addr - (is_return ? 1 : 0);
  Dl_info d;
  if (!dladdr(at, &d) || !d.dli_fname) {
    snprintf(buf, len, "?%p", addr);
    return;
  }
  const char* lib = strrchr(d.dli_fname, '/');
  lib = lib ? lib + 1 : d.dli_fname;
  if (d.dli_sname && d.dli_saddr)
    snprintf(buf, len, "%s:%s+0x%lx", lib, d.dli_sname,
             (unsigned long)((char*)at - (char*)d.dli_saddr));
  else
    snprintf(buf, len, "%s+0x%lx", lib, (unsigned long)((char*)at - (char*)d.dli_fbase));
}

__attribute__((constructor)) static void sampler_start(void) {
  out_path = getenv("SAMPLER_OUT");
  if (!out_path) return;
  samples = mmap(NULL, sizeof(struct Sample) * kMaxSamples, PROT_READ | PROT_WRITE,
                 MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (samples == MAP_FAILED) {
    out_path = NULL;
    return;
  }
  void* warm[4];
  backtrace(warm, 4);  // loads the unwinder now, not in the handler
  struct sigaction sa;
  memset(&sa, 0, sizeof sa);
  sa.sa_sigaction = on_prof;
  sa.sa_flags = SA_SIGINFO | SA_RESTART;
  sigemptyset(&sa.sa_mask);
  sigaction(SIGPROF, &sa, NULL);
  const char* us = getenv("SAMPLER_US");
  const long period = us ? atol(us) : 200;
  struct itimerval it = {{0, period}, {0, period}};
  setitimer(ITIMER_PROF, &it, NULL);
}

static int cmp_key(const void* a, const void* b) {
  const uintptr_t x = *(const uintptr_t*)a, y = *(const uintptr_t*)b;
  return x < y ? -1 : x > y;
}

__attribute__((destructor)) static void sampler_stop(void) {
  if (!out_path) return;
  struct itimerval off = {{0, 0}, {0, 0}};
  setitimer(ITIMER_PROF, &off, NULL);
  int n = atomic_load(&next_sample);
  if (n > kMaxSamples) n = kMaxSamples;
  // Name each distinct (address, is-return) once: dladdr scans symbol
  // tables. Key: address * 2 + is_return.
  size_t total = 0;
  for (int i = 0; i < n; ++i) total += (size_t)samples[i].n;
  uintptr_t* keys = malloc(sizeof(uintptr_t) * (total ? total : 1));
  size_t m = 0;
  for (int i = 0; i < n; ++i)
    for (int k = 0; k < samples[i].n; ++k) keys[m++] = (uintptr_t)samples[i].pc[k] * 2 + (k > 0);
  qsort(keys, m, sizeof *keys, cmp_key);
  size_t u = 0;
  for (size_t i = 0; i < m; ++i)
    if (u == 0 || keys[u - 1] != keys[i]) keys[u++] = keys[i];
  char** names = malloc(sizeof(char*) * (u ? u : 1));
  char buf[512];
  for (size_t i = 0; i < u; ++i) {
    name_of((void*)(keys[i] / 2), (int)(keys[i] & 1), buf, sizeof buf);
    names[i] = strdup(buf);
  }
  FILE* f = fopen(out_path, "w");
  if (!f) return;
  for (int i = 0; i < n; ++i) {
    const struct Sample* s = &samples[i];
    fprintf(f, "%.16s", s->name);
    for (int k = 0; k < s->n; ++k) {
      const uintptr_t key = (uintptr_t)s->pc[k] * 2 + (k > 0);
      const uintptr_t* hit = bsearch(&key, keys, u, sizeof *keys, cmp_key);
      fprintf(f, "|%s", hit ? names[hit - keys] : "?");
    }
    fputc('\n', f);
  }
  fclose(f);
}
