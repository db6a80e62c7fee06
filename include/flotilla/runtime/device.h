// Device: one per physical device, shared safely by every thread (the seed's
// MPSDevice, made safe).
//
// Device::get(backend, index) returns the process-wide device, created once
// (a lock-free check, then creation under a mutex) by whichever thread asks
// first, with the Config passed to that first call (or Config::from_env()).
// If that creation throws, every caller waiting on it gets the error and the
// next call tries again. Device::create() makes a private
// device with its own driver, pool and threads, for tests and tools that
// compare configurations in one process.
//
// Shutdown: shutdown() commits every stream, lets all committed work finish,
// stops the driver's threads; it is idempotent. Any later call that needs
// the driver throws ShutDown. Process-wide devices are shut down in order by
// an atexit handler, so a process that exits with work in flight drains it
// first (Note [Process exit]).
//
// fork(): the driver's threads do not exist in a child. A child that uses a
// device created before the fork gets InvalidState on first use, saying so;
// devices created in the child work.
//
// Thread safety: all members may be called from any thread.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "flotilla/backend/driver.h"
#include "flotilla/common/config.h"
#include "flotilla/runtime/encoding_lock.h"
#include "flotilla/runtime/stream.h"
#include "flotilla/runtime/stream_pool.h"

namespace flotilla {

class Allocator;
namespace detail {
class EventPool;
}

class Device : public std::enable_shared_from_this<Device> {
 public:
  // The process-wide device; `config` is used only by the call that creates it.
  static Device& get(std::string_view backend = "cpu", int index = 0);
  static Device& get(std::string_view backend, int index, const Config& config);
  // A private device (not shared, not shut down at exit unless destroyed).
  static std::shared_ptr<Device> create(std::string_view backend, int index, const Config& config);
  // Devices of a backend (0 if it is built in but finds none); throws
  // InvalidArgument for an unknown backend.
  static int count(std::string_view backend);
  // Backends compiled into this build.
  static std::vector<std::string> backends();
  // Shuts down every process-wide device.
  static void shutdown_all();

  ~Device();
  Device(const Device&) = delete;
  Device& operator=(const Device&) = delete;

  const std::string& backend() const { return backend_; }
  int index() const { return index_; }
  // "cpu:0", "cuda:1"
  std::string name() const;
  const Config& config() const { return config_; }
  const backend::DeviceInfo& info() const { return driver_->info(); }

  // The driver, after checking the device is usable (not shut down, not a
  // fork child, not lost). `api` names the caller in the error.
  backend::Driver& driver(const char* api = "Device::driver");
  StreamPool& streams() { return *streams_; }
  EncodingLock& encoding_lock() { return encoding_lock_; }
  detail::EventPool& events() { return *events_; }
  // The device's caching allocator (runtime/allocator.h).
  Allocator& allocator() { return *allocator_; }
  const backend::Pipeline& pipeline(std::string_view kernel);

  Stream default_stream() { return streams_->default_stream(); }
  // The calling thread's current stream; on first use, one from the pool by
  // the configured policy (kept for the thread's life).
  Stream current_stream();
  void set_current_stream(const Stream& stream);

  // Commits and waits for every stream (synchronize_all).
  void synchronize();
  void shutdown();
  bool is_shut_down() const { return state_.load(std::memory_order_acquire) != kRunning; }

  // Throws ShutDown / InvalidState (fork child) / DeviceLost if unusable.
  void check_usable(const char* api) const;
  // A process-unique id (thread-local state is keyed by it).
  uint64_t id() const { return id_; }

 private:
  Device(std::string_view backend, int index, const Config& config);
  static std::shared_ptr<Device> make(std::string_view backend, int index, const Config& config);

  enum State { kRunning, kShuttingDown, kShutDown };

  const std::string backend_;
  const int index_;
  const uint64_t id_;
  const Config config_;
  std::unique_ptr<backend::Driver> driver_;
  EncodingLock encoding_lock_;
  std::unique_ptr<StreamPool> streams_;
  std::unique_ptr<detail::EventPool> events_;
  std::unique_ptr<Allocator> allocator_;  // after streams_ and events_: destroyed before them
  // acquire/release: shutdown publishes its completion through it.
  std::atomic<int> state_{kRunning};
  const uint64_t fork_generation_;  // g_fork_generation when created
  Mutex shutdown_mu_;               // serialises shutdown() callers (guards the drain itself)
};

// The calling thread's current stream on the process-wide cpu device.
Stream current_stream();

}  // namespace flotilla
