// StreamPool: the streams of one device (the seed's MPSStreamPool).
//
// `pool_size` streams (32 by default): stream 0 is the default stream, 1..N-1
// are pooled. Streams are created lazily, on first use, exactly once even
// when many threads race to use one first.
//
// Two policies hand out pooled streams (Config::policy):
//  - round-robin (the seed's Figure 3): an atomic counter modulo the pooled
//    count. Lock-free. Threads may share a stream; the stream serialises them.
//  - exclusive: a free slot is bound to the calling thread until it exits,
//    then recycled. A lock-free bitmask of free slots. When every slot is
//    bound, Config::exclusive_when_full decides: wait up to
//    Config::exclusive_wait then throw Timeout, or share a stream
//    round-robin.
//
// Thread safety: all members may be called from any thread.
// Blocking: acquire() may block under exclusive/wait; synchronize_all blocks.
#pragma once

#include <array>
#include <atomic>
#include <cstdint>
#include <memory>

#include "flotilla/common/config.h"
#include "flotilla/common/sync.h"
#include "flotilla/runtime/stream.h"

namespace flotilla {

class StreamPool {
 public:
  static constexpr int kMaxStreams = 64;

  StreamPool(Device& device, const Config& config);
  ~StreamPool();
  StreamPool(const StreamPool&) = delete;
  StreamPool& operator=(const StreamPool&) = delete;

  int size() const { return size_; }
  int pooled() const { return size_ - 1; }
  StreamPolicy policy() const { return policy_; }

  Stream default_stream() { return Stream(device_, 0); }
  // A pooled stream by the configured policy.
  Stream acquire();
  // Round-robin: the next pooled stream; never blocks.
  Stream acquire_round_robin();
  // Exclusive: the calling thread's bound slot, binding a free one if it has
  // none. Blocks or shares when all are bound (see above).
  Stream acquire_exclusive();
  // The stream at `index` (0..size-1).
  Stream at(int index);

  // Exclusive slots bound to live threads now.
  int bound() const;
  // Streams created so far (lazy creation).
  int created() const;

  // Commits every stream's pending work (never waits).
  void commit_all();
  // Commits and waits for every stream; rethrows the first stream error.
  void synchronize_all();

  // Internal: the state of stream `index`, created on first use.
  detail::StreamState& state(int index);
  // Internal: returns an exclusive slot (thread exit).
  void release_exclusive(int slot);

 private:
  detail::StreamState* create_state(int index) FL_EXCLUDES(create_mu_);

  Device& device_;
  const int size_;
  const StreamPolicy policy_;
  const WhenFull when_full_;
  const std::chrono::milliseconds wait_;

  struct Slot {
    // acquire/release: published once under create_mu_; the fast path reads
    // it without the lock.
    std::atomic<detail::StreamState*> state{nullptr};
  };
  std::array<Slot, kMaxStreams> slots_;
  // Lazy creation is serialised by a mutex, not std::call_once: a creation
  // that throws must leave the slot empty for the next caller without
  // stranding the threads waiting on it (ThreadSanitizer's pthread_once
  // strands them; libstdc++ PR 66146).
  Mutex create_mu_;
  std::array<std::unique_ptr<detail::StreamState>, kMaxStreams> owners_ FL_GUARDED_BY(create_mu_);
  // Relaxed: only the distribution of indices matters; nothing is published.
  std::atomic<uint32_t> rr_counter_{0};
  // acq_rel: a slot's bit is the hand-off of the slot between threads.
  std::atomic<uint64_t> free_mask_{0};
  std::atomic<int> created_{0};  // relaxed: statistic

  Mutex wait_mu_;  // pairs with slot_freed_ for threads waiting for a free slot
  CondVar slot_freed_;
};

}  // namespace flotilla
