// Per-thread stream bindings. Internal.
//
// Each thread keeps, per device it used, its current stream and its bound
// exclusive slot. Lookups are a scan of a short thread-local vector keyed by
// the device id: no lock, no atomic. At thread exit the bindings are undone
// (Note [Uncommitted work at thread exit] in stream.h): the current stream is
// committed and the exclusive slot returned, if the device is still alive.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>

namespace flotilla {
class Device;
}

namespace flotilla::detail {

struct ThreadBinding {
  uint64_t device_id = 0;
  std::weak_ptr<Device> device;
  int current = -1;    // current stream index, -1 if none yet
  int exclusive = -1;  // bound exclusive slot, -1 if none
};

// The calling thread's binding for `device`, created on first use.
ThreadBinding& thread_binding(Device& device);
// Bindings the calling thread holds (live and dead devices): for tests.
size_t thread_binding_count() noexcept;
// Sets the current stream index (-1 clears it); returns the previous one.
int swap_current_stream_index(Device& device, int index) noexcept;

}  // namespace flotilla::detail
