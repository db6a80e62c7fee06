// Process-wide CUDA set-up: CUDA_DEVICE_MAX_CONNECTIONS and the device count.
// Internal to the CUDA backend.
//
// Note [CUDA_DEVICE_MAX_CONNECTIONS]
// A CUDA context feeds the GPU through a fixed number of hardware work
// queues ("connections"), 8 by default; streams are hashed onto them, so
// with more busy streams than connections, kernels of unrelated streams
// queue behind one another (false dependencies) and only about 8 overlap.
// CUDA reads the variable when it initialises (cuInit, which the first
// CUDA call of the process makes), so Flotilla sets it just before its own
// first CUDA call, in cuda_device_count() (every device creation counts
// first), to Config::from_env().cuda_max_connections (the variable
// FLOTILLA_CUDA_MAX_CONNECTIONS) or, when that is 0, to
// kDefaultMaxConnections. A value the user already put in the environment
// always wins. Measured on the H100 (scripts/gpu_check.sh): setting the
// variable after CUDA initialised has no effect, so a Config passed to a
// later Device::create cannot change it; DeviceInfo::name shows the value in
// effect, and says so when a device asked for another.
//
// kDefaultMaxConnections is 32, chosen from measurements on an H100
// (docs/PERF.md): 32 streams each running a chain of kernels ran about 8
// chains at once with 8 connections and about 23 with 32; tiny-kernel
// submission and the stress tool ran at the same rate with either (within
// the run-to-run noise).
#pragma once

namespace flotilla::backend::cuda {

inline constexpr int kDefaultMaxConnections = 32;

// The first call applies the note's rule for `requested` (0: the default);
// every call returns the value in effect. Thread-safe.
int apply_max_connections(int requested);
// True in a fork() child of a process that had initialised CUDA, where CUDA
// cannot be used at all.
bool cuda_initialised_before_fork();

}  // namespace flotilla::backend::cuda
