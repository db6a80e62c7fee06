// Process-wide CUDA set-up: CUDA_DEVICE_MAX_CONNECTIONS and the device count.
// Internal to the CUDA backend.
//
// Note [CUDA_DEVICE_MAX_CONNECTIONS]
// A CUDA context feeds the GPU through a fixed number of hardware work
// queues ("connections"), 8 by default; streams are hashed onto them, so
// with more busy streams than connections, kernels of unrelated streams
// queue behind one another (false dependencies) and only about 8 overlap.
// CUDA reads the variable when it initialises, so Flotilla sets it before
// its first CUDA call in the process (cuda_device_count(), which every
// device creation makes first), to Config::cuda_max_connections or, when
// that is 0, to kDefaultMaxConnections. A value the user already put in the
// environment always wins. A later device whose Config asks for another
// value re-sets the variable only if no CUDA context exists yet; otherwise
// the value in effect stays (DeviceInfo::name shows it).
//
// kDefaultMaxConnections is 32, chosen from measurements on an H100
// (docs/PERF.md, scripts/gpu_check.sh): with 8, 32 busy streams ran about
// 8 kernels at once; with 32, all of them.
#pragma once

namespace flotilla::backend::cuda {

inline constexpr int kDefaultMaxConnections = 32;

// Applies the note's rule for `requested` (0: the default) and returns the
// value in effect. Thread-safe.
int apply_max_connections(int requested);
// Called once a CUDA context exists: the value can no longer change.
void freeze_max_connections();

}  // namespace flotilla::backend::cuda
