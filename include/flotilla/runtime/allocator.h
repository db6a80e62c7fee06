// Allocator: a stream-aware caching allocator, one per Device (Device::allocator()).
//
// Memory comes from the backend driver (Driver::allocate / allocate_host) and
// goes back to a cache when freed, so steady-state serving never calls the
// driver. Frees are stream-ordered, as in PyTorch's CUDA caching allocator:
//
// - A block belongs to the stream it was allocated on. Freeing it does not
//   wait for the device: work already encoded on that stream may still use
//   it, and only later work on the same stream can be given the block again,
//   which the stream's ordering makes safe. So a freed block is reused on
//   its own stream at once.
// - A block used on other streams (record_stream, which the ops do for every
//   tensor they touch on a stream other than its own) waits, after the free,
//   for an Event on each of those streams; it becomes reusable only once
//   every such event is reached (checked on the host, never waited for).
//   The events are recorded by the next allocation on the block's stream,
//   not inside the free, which may run in a stream callback (Note
//   [Cross-stream reuse] in allocator.cpp); later only covers more work.
// - A block is reused on a different stream only after an Event says the
//   device is done with it: under memory pressure an allocation on stream B
//   may take a block cached on stream A; it records an Event on A and makes
//   B wait for it on the device before B's next work.
// - Host staging blocks (allocate_host: pinned memory for copies) are written
//   by the host, not in stream order, so a freed host block waits for an
//   event on its own stream too, or for synchronize_stream() of that stream
//   (Tensor::to_host calls it, so serving loops recycle staging without
//   events).
//
// Size classes: requests round up to 512 B below 1 MiB, and above it to a
// quarter of a power of two (1, 1.25, 1.5, 1.75 x 2^k), so at most 25% is
// wasted; blocks are reused only by requests of the same class (no splitting).
//
// Out of memory: when the driver refuses, the allocator first takes a block
// of the class from another stream's cache (as above), then frees every
// cached block back to the driver (waiting for the streams they were last
// used on) and retries once; if that fails too it throws OutOfMemory saying
// how much was asked, in use, cached, and the device's limit.
//
// No caching (Config::allocator_caching = false, FLOTILLA_ALLOCATOR_CACHING=0,
// set in the sanitizer lanes): a freed block goes back to the driver once
// the device is done with it: at the next allocation on any stream after its
// events are reached, at synchronize_stream() of its stream, or in
// empty_cache(). Nothing is reused, so ASan sees a use after free of a
// tensor's memory.
//
// Holds (for Stream::record): between begin_hold(stream) and end_hold(stream),
// every block the calling thread allocates on that stream is tagged with the
// returned AllocationHold; when its Allocation is freed, the hold keeps the
// block instead of caching it, until the hold is released (a recording's
// replays keep using the addresses its kernels were recorded with). Released
// blocks are freed to their stream as usual, stream-ordered. Held blocks
// count as in use, and as held_bytes.
//
// Thread safety: all members may be called from any thread. The state is
// sharded per stream (one short Mutex per stream and kind), so threads on
// different streams never contend; driver calls, event records and waits
// happen outside every lock. Statistics are relaxed atomics: each figure is
// exact once the threads touching the allocator have joined.
//
// What blocks: allocate() and free never wait for the device, except on the
// out-of-memory path (emptying the cache waits for the streams that used the
// cached blocks) and in empty_cache().
//
// Lifetime: the Device owns its allocator. Every Allocation (and so every
// Tensor) must be destroyed before its Device; at process exit the
// process-wide devices are never destroyed (Note [Process exit]), so live
// tensors there are harmless.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "flotilla/backend/driver.h"
#include "flotilla/common/sync.h"
#include "flotilla/runtime/stream.h"

namespace flotilla {

class Device;
class Allocator;

namespace detail {
struct Block;
}

// See "Holds" above. Destroying it releases it.
class AllocationHold {
 public:
  explicit AllocationHold(Allocator& allocator);
  ~AllocationHold();
  AllocationHold(const AllocationHold&) = delete;
  AllocationHold& operator=(const AllocationHold&) = delete;
  // Frees every held block (stream-ordered); later frees of tagged blocks
  // are ordinary. Idempotent.
  void release() noexcept;
  // Blocks held now, and their bytes.
  size_t blocks() const;
  size_t bytes() const;

 private:
  friend class Allocator;
  // Takes `block` if not released yet; true if it did.
  bool keep(std::unique_ptr<detail::Block>& block);
  Allocator& allocator_;
  mutable Mutex mu_;  // guards the fields below
  bool released_ FL_GUARDED_BY(mu_) = false;
  std::vector<std::unique_ptr<detail::Block>> blocks_ FL_GUARDED_BY(mu_);
  size_t bytes_ FL_GUARDED_BY(mu_) = 0;
};

// Figures of one allocator; all bytes are block (rounded) sizes.
struct AllocatorStats {
  size_t in_use_bytes = 0;       // held by live Allocations
  size_t cached_bytes = 0;       // free blocks kept for reuse (incl. those awaiting events)
  size_t reserved_bytes = 0;     // taken from the driver and not yet given back
  size_t peak_in_use_bytes = 0;  // highest in_use_bytes so far (reset_peak() restarts it)
  uint64_t allocations = 0;      // allocate() calls that succeeded
  uint64_t cache_hits = 0;       // ... of which served from the cache
  uint64_t driver_allocations = 0;
  uint64_t driver_frees = 0;
  uint64_t cross_stream_reuses = 0;  // blocks taken from another stream's cache
  uint64_t cache_flushes = 0;        // empty_cache() calls, including the out-of-memory retry
  uint64_t oom_retries = 0;          // driver refusals that led to a flush and retry
  uint64_t deferred_frees = 0;  // frees that had to record events (other streams, host, no caching)
  size_t held_bytes = 0;        // freed blocks kept by holds (recordings); counted in use too

  std::string to_string() const;
};

// Memory from an Allocator: move-only; destroying it (or reset()) frees the
// block to its stream, stream-ordered (see above). Thread safety: one
// Allocation is one owner's value; record_stream may be called from several
// threads at once (it is an atomic bit-set). Tensors share one through a
// shared_ptr.
class Allocation {
 public:
  Allocation() = default;
  ~Allocation() { reset(); }
  Allocation(Allocation&& o) noexcept;
  Allocation& operator=(Allocation&& o) noexcept;
  Allocation(const Allocation&) = delete;
  Allocation& operator=(const Allocation&) = delete;

  explicit operator bool() const { return block_ != nullptr; }
  // The address kernels use.
  void* device_ptr() const;
  // A host-visible address of the same bytes, or nullptr (CUDA device memory).
  void* host_ptr() const;
  // Bytes asked for, and the block's (size-class) size.
  size_t size() const { return size_; }
  size_t capacity() const;
  bool is_host() const;
  // The stream it was allocated on (and is freed to).
  Stream stream() const;

  // Marks the block as used on `stream` too: the free waits (with an event
  // recorded then) for the work `stream` has at that moment before reuse.
  // No-op for the allocation's own stream. Never blocks.
  void record_stream(const Stream& stream);

  // Frees now (stream-ordered). Never throws: a block whose device is lost
  // (so it may never be idle) is kept out of the cache for good.
  void reset() noexcept;
  // Frees a block the caller knows the device is done with (it synchronized
  // every stream that used it): reusable at once on any path.
  void release_idle() noexcept;

 private:
  friend class Allocator;
  Allocation(Allocator* allocator, detail::Block* block, size_t size)
      : allocator_(allocator), block_(block), size_(size) {}
  Allocator* allocator_ = nullptr;
  detail::Block* block_ = nullptr;
  size_t size_ = 0;
};

class Allocator {
 public:
  // Made by the Device; `device` must outlive it.
  explicit Allocator(Device& device);
  ~Allocator();  // returns every cached block to the driver; live Allocations must be gone
  Allocator(const Allocator&) = delete;
  Allocator& operator=(const Allocator&) = delete;

  // Device memory for use on `stream` (of this allocator's device), at least
  // `bytes` (> 0). Throws InvalidArgument (0 bytes, another device's
  // stream), OutOfMemory (see above), ShutDown/DeviceLost from the device.
  Allocation allocate(size_t bytes, const Stream& stream);
  // Host memory the device copies from and to asynchronously (pinned on
  // CUDA), for copies encoded on `stream`; reused only once the device is
  // done with it.
  Allocation allocate_host(size_t bytes, const Stream& stream);

  // Synchronizes `stream` (blocks the host; rethrows its asynchronous
  // error), then makes every block freed to it before the call and waiting
  // for it alone (host staging blocks, no-caching frees) reusable at once,
  // without the events they would otherwise wait for. Tensor::to_host uses it.
  void synchronize_stream(const Stream& stream);

  // Gives every cached block back to the driver, first waiting (on the host)
  // for the streams that last used them, and waits for deferred no-caching
  // frees to finish. Blocks in use are untouched.
  void empty_cache();

  // Holds (see above). begin_hold: InvalidState if `stream` already has one.
  std::shared_ptr<AllocationHold> begin_hold(const Stream& stream);
  void end_hold(const Stream& stream) noexcept;

  AllocatorStats stats() const;
  void reset_peak();
  bool caching() const { return caching_; }

  // The size class `bytes` rounds up to.
  static size_t size_class(size_t bytes);

 private:
  friend class Allocation;
  friend class AllocationHold;
  struct Shard;
  struct Counters;
  struct HoldSlot;
  Allocation allocate_impl(size_t bytes, const Stream& stream, bool host);
  std::unique_ptr<detail::Block> take_ready(Shard& shard, size_t cls);
  void reap(Shard& shard);
  std::unique_ptr<detail::Block> new_block(size_t cls, size_t bytes, const Stream& stream,
                                           bool host);
  std::unique_ptr<backend::Buffer> driver_allocate(size_t cls, bool host);
  std::unique_ptr<detail::Block> take_from_other_streams(size_t cls, const Stream& stream);
  void free_block(detail::Block* block, bool idle) noexcept;
  void release_to_driver(std::unique_ptr<detail::Block> block) noexcept;
  void leak(std::unique_ptr<detail::Block> block) noexcept;
  Shard& shard(int stream_index, bool host);

  Device& device_;
  const bool caching_;
  const int num_streams_;
  std::unique_ptr<Shard[]> shards_;  // [num_streams_ device shards][num_streams_ host shards]
  std::unique_ptr<Counters> counters_;
  std::unique_ptr<HoldSlot[]> holds_;  // one per stream
  // Bit i: stream i has a hold (its thread is recording there): reap() then
  // records no event on it, which a recording stream refuses.
  std::atomic<uint64_t> holding_{0};
};

}  // namespace flotilla
