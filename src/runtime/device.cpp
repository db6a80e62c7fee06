#include "flotilla/runtime/device.h"

#include <pthread.h>

#include <array>
#include <cstdlib>
#include <mutex>
#include <utility>
#include <vector>

#include "flotilla/common/error.h"
#include "flotilla/runtime/allocator.h"
#include "runtime/event_state.h"
#include "runtime/stream_state.h"
#include "runtime/thread_streams.h"

namespace flotilla {

namespace {

// Note [Process exit]
// Process-wide devices live in a table that is never destroyed, so no static
// destructor can touch a dead device. The first Device::get registers an
// atexit handler that shuts them all down: pending work is committed and
// drained, completion handlers run, the driver threads are joined. Private
// devices are shut down by their destructor. In a fork() child the handler
// does nothing (the parent's driver threads do not exist there).

// Relaxed: ids only need to be unique.
std::atomic<uint64_t> g_next_device_id{1};
// Incremented in every fork() child; a device made in an older generation is
// unusable. Relaxed: read and written by the one thread of a fresh child.
std::atomic<uint64_t> g_fork_generation{0};

// Creation of process-wide devices is serialised by this mutex, not
// std::call_once: a creation that throws (a bad Config) must leave the slot
// empty for the next caller without stranding the threads waiting on it
// (ThreadSanitizer's pthread_once strands them; libstdc++ PR 66146). Leaked,
// like the tables (Note [Process exit]).
Mutex& g_create_mu = *new Mutex;

// fork() waits for a device being created, so the child never inherits
// g_create_mu locked by a thread that does not exist there.
void on_fork_prepare() FL_NO_THREAD_SAFETY_ANALYSIS { g_create_mu.lock(); }
void on_fork_parent() FL_NO_THREAD_SAFETY_ANALYSIS { g_create_mu.unlock(); }
void on_fork_child() FL_NO_THREAD_SAFETY_ANALYSIS {
  g_create_mu.unlock();
  g_fork_generation.fetch_add(1, std::memory_order_relaxed);
}

constexpr int kMaxGlobalDevices = 16;

struct GlobalSlot {
  // acquire/release: published once under g_create_mu; readers need no lock.
  std::atomic<Device*> ready{nullptr};
  std::shared_ptr<Device> device FL_GUARDED_BY(g_create_mu);  // owns *ready
};

// One table per backend, allocated once and never freed (Note [Process exit]).
std::array<GlobalSlot, kMaxGlobalDevices>& global_slots(std::string_view backend) {
  static auto* tables = [] {
    auto* t =
        new std::vector<std::array<GlobalSlot, kMaxGlobalDevices>>(backend::backends().size());
    std::atexit(&Device::shutdown_all);
    return t;
  }();
  const auto& list = backend::backends();
  for (size_t i = 0; i < list.size(); ++i)
    if (backend == list[i].name) return (*tables)[i];
  backend::find_backend(backend);  // throws the helpful error
  FL_INTERNAL_CHECK(false, "unreachable");
  std::abort();
}

}  // namespace

// ---- Thread bindings ---------------------------------------------------------------

namespace detail {
namespace {

struct ThreadBindings {
  std::vector<ThreadBinding> entries;

  // Note [Uncommitted work at thread exit] in stream.h.
  ~ThreadBindings() {
    for (auto& e : entries) {
      auto device = e.device.lock();
      if (!device || device->is_shut_down()) continue;
      try {
        device->check_usable("thread exit");  // not in a fork child, not lost
        if (e.current >= 0) device->streams().state(e.current).commit();
        if (e.exclusive > 0) device->streams().release_exclusive(e.exclusive);
      } catch (...) {
        // The device failed or this is a fork child: nothing can run the
        // work, and a thread exit has no one to report to.
      }
    }
  }
};

thread_local ThreadBindings tls_bindings;

}  // namespace

ThreadBinding& thread_binding(Device& device) {
  for (auto& e : tls_bindings.entries)
    if (e.device_id == device.id()) return e;
  // First use of this device on this thread: drop the bindings of devices
  // that no longer exist, so a thread that outlives many private devices
  // keeps a short list (the hot path above scans it on every call).
  std::erase_if(tls_bindings.entries, [](const ThreadBinding& b) { return b.device.expired(); });
  auto& e = tls_bindings.entries.emplace_back();
  e.device_id = device.id();
  e.device = device.weak_from_this();
  return e;
}

size_t thread_binding_count() noexcept { return tls_bindings.entries.size(); }

int swap_current_stream_index(Device& device, int index) noexcept {
  for (auto& e : tls_bindings.entries)
    if (e.device_id == device.id()) return std::exchange(e.current, index);
  try {
    thread_binding(device).current = index;
  } catch (...) {
    // Out of memory growing a thread-local vector: the guard cannot fail, so
    // the thread keeps no current stream.
  }
  return -1;
}

}  // namespace detail

// ---- Device ------------------------------------------------------------------------

Device::Device(std::string_view backend, int index, const Config& config)
    : backend_(backend),
      index_(index),
      id_(g_next_device_id.fetch_add(1, std::memory_order_relaxed)),
      config_(config),
      driver_(backend::find_backend(backend).create(index, config)),
      encoding_lock_(
          config.encoding_lock == EncodingLockMode::kOn ||
          (config.encoding_lock == EncodingLockMode::kAuto && !driver_->encoding_thread_safe())),
      streams_(std::make_unique<StreamPool>(*this, config)),
      events_(std::make_unique<detail::EventPool>(*this, config.event_pool_size)),
      allocator_(std::make_unique<Allocator>(*this)),
      fork_generation_(g_fork_generation.load(std::memory_order_relaxed)) {}

std::shared_ptr<Device> Device::make(std::string_view backend, int index, const Config& config) {
  config.validate();
  static std::once_flag atfork_once;
  std::call_once(atfork_once,
                 [] { pthread_atfork(&on_fork_prepare, &on_fork_parent, &on_fork_child); });
  const int n = count(backend);
  FL_CHECK_ARG(
      index >= 0 && index<n, "[Device] ", backend, ":", index, " does not exist; this machine has ",
                          n, " ", backend, " device(s)", n> 0
          ? detail::str_cat(" (0..", n - 1, ")")
          : std::string());
  return std::shared_ptr<Device>(new Device(backend, index, config));
}

Device& Device::get(std::string_view backend, int index) {
  auto& slots = global_slots(backend);
  if (index >= 0 && index < kMaxGlobalDevices) {
    auto& slot = slots[static_cast<size_t>(index)];
    if (Device* d = slot.ready.load(std::memory_order_acquire)) return *d;
    MutexLock lock(g_create_mu);
    if (Device* d = slot.ready.load(std::memory_order_acquire)) return *d;
    slot.device = make(backend, index, Config::from_env());
    slot.ready.store(slot.device.get(), std::memory_order_release);
    return *slot.device;
  }
  return get(backend, index, Config{});
}

Device& Device::get(std::string_view backend, int index, const Config& config) {
  auto& slots = global_slots(backend);
  FL_CHECK_ARG(index >= 0 && index < kMaxGlobalDevices, "[Device::get] device index ", index,
               " is out of range; Flotilla supports ", kMaxGlobalDevices, " devices per backend");
  auto& slot = slots[static_cast<size_t>(index)];
  if (Device* d = slot.ready.load(std::memory_order_acquire)) return *d;
  MutexLock lock(g_create_mu);
  if (Device* d = slot.ready.load(std::memory_order_acquire)) return *d;
  slot.device = make(backend, index, config);
  slot.ready.store(slot.device.get(), std::memory_order_release);
  return *slot.device;
}

std::shared_ptr<Device> Device::create(std::string_view backend, int index, const Config& config) {
  return make(backend, index, config);
}

int Device::count(std::string_view backend) {
  return backend::find_backend(backend).device_count();
}

std::vector<std::string> Device::backends() {
  std::vector<std::string> out;
  for (const auto& b : backend::backends()) out.emplace_back(b.name);
  return out;
}

void Device::shutdown_all() {
  for (const auto& b : backend::backends()) {
    auto& slots = global_slots(b.name);
    for (auto& slot : slots) {
      if (Device* d = slot.ready.load(std::memory_order_acquire)) {
        try {
          d->shutdown();
        } catch (...) {
          // At exit there is no one to report to; the device is lost anyway.
        }
      }
    }
  }
}

Device::~Device() {
  if (fork_generation_ != g_fork_generation.load(std::memory_order_relaxed)) {
    // A fork child: the driver's threads do not exist here, so its objects
    // cannot be torn down (joining would hang). Leak them on purpose.
    (void)allocator_.release();
    (void)events_.release();
    (void)streams_.release();
    (void)driver_.release();
    return;
  }
  try {
    shutdown();
  } catch (...) {
  }
}

std::string Device::name() const { return detail::str_cat(backend_, ":", index_); }

void Device::check_usable(const char* api) const {
  if (fork_generation_ != g_fork_generation.load(std::memory_order_relaxed)) [[unlikely]]
    throw InvalidState(detail::str_cat(
        "[", api, "] ", name(),
        " was created before this process was fork()ed; its driver threads do not exist in the "
        "child. Create devices only after fork() (or exec() in the child)"));
  if (state_.load(std::memory_order_acquire) != kRunning) [[unlikely]]
    throw ShutDown(detail::str_cat("[", api, "] ", name(),
                                   " has been shut down; no more work can be submitted to it"));
  if (auto e = driver_->device_error()) [[unlikely]]
    std::rethrow_exception(e);
}

backend::Driver& Device::driver(const char* api) {
  check_usable(api);
  return *driver_;
}

const backend::Pipeline& Device::pipeline(std::string_view kernel) {
  return driver("Device::pipeline").pipeline(kernel);
}

Stream Device::current_stream() {
  auto& binding = detail::thread_binding(*this);
  if (binding.current < 0) binding.current = streams_->acquire().index();
  return Stream(*this, binding.current);
}

void Device::set_current_stream(const Stream& stream) {
  FL_CHECK_ARG(&stream.device() == this, "[Device::set_current_stream] the stream belongs to ",
               stream.device().name(), ", not ", name());
  detail::thread_binding(*this).current = stream.index();
}

void Device::synchronize() {
  check_usable("Device::synchronize");
  streams_->synchronize_all();
}

void Device::shutdown() {
  MutexLock lock(shutdown_mu_);
  if (state_.load(std::memory_order_acquire) != kRunning) return;
  state_.store(kShuttingDown, std::memory_order_release);
  if (fork_generation_ != g_fork_generation.load(std::memory_order_relaxed)) {
    state_.store(kShutDown, std::memory_order_release);
    return;
  }
  // Never lose work: commit what streams hold, then let the driver drain.
  try {
    streams_->commit_all();
  } catch (...) {
    // A stream whose commit fails has a failed device; draining goes on.
  }
  driver_->shutdown();
  state_.store(kShutDown, std::memory_order_release);
}

Stream current_stream() { return Device::get().current_stream(); }

}  // namespace flotilla
