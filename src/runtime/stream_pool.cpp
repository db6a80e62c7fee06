#include "flotilla/runtime/stream_pool.h"

#include <bit>

#include "flotilla/common/error.h"
#include "flotilla/runtime/device.h"
#include "runtime/stream_state.h"
#include "runtime/thread_streams.h"

namespace flotilla {

StreamPool::StreamPool(Device& device, const Config& config)
    : device_(device),
      size_(config.pool_size),
      policy_(config.policy),
      when_full_(config.exclusive_when_full),
      wait_(config.exclusive_wait) {
  FL_CHECK_ARG(size_ >= 2 && size_ <= kMaxStreams, "[StreamPool] pool_size=", size_,
               " is out of range; use 2..", kMaxStreams);
  uint64_t mask = 0;
  for (int i = 1; i < size_; ++i) mask |= uint64_t{1} << i;
  free_mask_.store(mask, std::memory_order_relaxed);
}

StreamPool::~StreamPool() = default;

Stream StreamPool::at(int index) {
  FL_CHECK_ARG(index >= 0 && index < size_, "[StreamPool::at] stream index ", index,
               " is out of range; this pool has streams 0..", size_ - 1);
  return Stream(device_, index);
}

detail::StreamState& StreamPool::state(int index) {
  FL_CHECK_ARG(index >= 0 && index < size_, "[StreamPool::state] stream index ", index,
               " is out of range; this pool has streams 0..", size_ - 1);
  auto* s = slots_[static_cast<size_t>(index)].state.load(std::memory_order_acquire);
  return s ? *s : *create_state(index);
}

detail::StreamState* StreamPool::create_state(int index) {
  Slot& slot = slots_[static_cast<size_t>(index)];
  // Lazy creation, exactly once even when many threads race here first. If
  // the driver throws, the slot stays empty and the next caller retries.
  // Checked before the lock too: a fork child gets its error even if a
  // parent thread held the lock at fork().
  device_.check_usable("StreamPool::state");
  MutexLock lock(create_mu_);
  if (auto* s = slot.state.load(std::memory_order_acquire)) return s;
  auto queue = device_.driver("StreamPool::state").new_queue();
  auto& owner = owners_[static_cast<size_t>(index)];
  owner = std::make_unique<detail::StreamState>(device_, index, std::move(queue));
  slot.state.store(owner.get(), std::memory_order_release);
  created_.fetch_add(1, std::memory_order_relaxed);
  return owner.get();
}

Stream StreamPool::acquire() {
  return policy_ == StreamPolicy::kRoundRobin ? acquire_round_robin() : acquire_exclusive();
}

Stream StreamPool::acquire_round_robin() {
  // The seed's Figure 3: raw_idx++ modulo the pooled count.
  const uint32_t raw = rr_counter_.fetch_add(1, std::memory_order_relaxed);
  return Stream(device_, 1 + static_cast<int>(raw % static_cast<uint32_t>(pooled())));
}

namespace {
int take_free_slot(std::atomic<uint64_t>& mask) {
  uint64_t m = mask.load(std::memory_order_acquire);
  while (m != 0) {
    const uint64_t bit = m & (~m + 1);  // lowest free slot
    if (mask.compare_exchange_weak(m, m & ~bit, std::memory_order_acq_rel,
                                   std::memory_order_acquire))
      return std::countr_zero(bit);
  }
  return -1;
}
}  // namespace

Stream StreamPool::acquire_exclusive() {
  auto& binding = detail::thread_binding(device_);
  if (binding.exclusive > 0) return Stream(device_, binding.exclusive);
  int slot = take_free_slot(free_mask_);
  if (slot < 0) {
    if (when_full_ == WhenFull::kShare) return acquire_round_robin();
    MutexLock lock(wait_mu_);
    const bool got = slot_freed_.wait_for(wait_mu_, wait_, [&] {
      slot = take_free_slot(free_mask_);
      return slot > 0;
    });
    if (!got)
      throw Timeout(detail::str_cat(
          "[StreamPool::acquire] all ", pooled(), " exclusive streams of ", device_.name(),
          " are bound to live threads and none was freed within ", wait_.count(),
          " ms; raise pool_size (up to ", kMaxStreams,
          "), let idle threads exit, raise exclusive_wait, or use exclusive_when_full=share"));
  }
  binding.exclusive = slot;
  return Stream(device_, slot);
}

void StreamPool::release_exclusive(int slot) {
  FL_INTERNAL_CHECK(slot > 0 && slot < size_, "slot ", slot);
  const uint64_t bit = uint64_t{1} << slot;
  const uint64_t before = free_mask_.fetch_or(bit, std::memory_order_acq_rel);
  FL_INTERNAL_CHECK((before & bit) == 0, "exclusive slot ", slot, " released twice");
  { MutexLock lock(wait_mu_); }  // a waiter is either before its check or asleep
  slot_freed_.notify_one();
}

int StreamPool::bound() const {
  return pooled() - std::popcount(free_mask_.load(std::memory_order_acquire));
}

int StreamPool::created() const { return created_.load(std::memory_order_relaxed); }

void StreamPool::commit_all() {
  for (int i = 0; i < size_; ++i)
    if (auto* s = slots_[static_cast<size_t>(i)].state.load(std::memory_order_acquire)) s->commit();
}

void StreamPool::synchronize_all() {
  std::exception_ptr first;
  for (int i = 0; i < size_; ++i) {
    auto* s = slots_[static_cast<size_t>(i)].state.load(std::memory_order_acquire);
    if (!s) continue;
    try {
      s->synchronize();
    } catch (...) {
      if (!first) first = std::current_exception();
    }
  }
  if (first) std::rethrow_exception(first);
}

}  // namespace flotilla
