#include "flotilla/runtime/allocator.h"

#include <algorithm>
#include <bit>
#include <map>
#include <optional>
#include <thread>
#include <utility>
#include <vector>

#include "flotilla/common/error.h"
#include "flotilla/common/sync.h"
#include "flotilla/runtime/device.h"
#include "flotilla/runtime/event.h"

namespace flotilla {

// Note [Cross-stream reuse]
// A cached block is only ever handed out again when the device cannot still
// be using it for anything else:
// - on its own stream at once: later work on the stream runs after the work
//   that used it (stream order);
// - after record_stream(B), only once an Event recorded on B after the free
//   is reached (checked with query(), never waited for on the host);
// - on another stream B (only when the driver is out of memory): an Event is
//   recorded on the owner stream A and B waits for it on the device, so B's
//   next work runs after everything A had encoded when the block moved.
// Events are recorded lazily, by the next thread that allocates on the
// block's stream, never inside free: a free may run inside a driver
// callback (a tensor captured by a stream callback), where recording an event
// on that stream would take the stream's lock again. Recording later is only
// more conservative: the event then covers more work, and nobody can use
// the block in between.

namespace detail {

struct Block {
  std::unique_ptr<backend::Buffer> buffer;
  size_t cls = 0;  // the size class, the block's size
  int stream = 0;  // the owner stream's index
  bool host = false;
  // Bit i: used on stream i besides the owner (record_stream). Relaxed: the
  // bits are set before the last owner drops the Allocation, and that drop
  // (a shared_ptr release or a move) orders them before the free reads them.
  std::atomic<uint64_t> used_on{0};
  // Set at allocation under a hold (see allocator.h); read by the free.
  std::shared_ptr<AllocationHold> hold;
};

}  // namespace detail

namespace {

constexpr size_t kSmallGranularity = 512;
constexpr size_t kSmallLimit = size_t{1} << 20;

// A freed block waiting for events before it can be reused (or, without
// caching, before it can go back to the driver).
struct PendingBlock {
  std::unique_ptr<detail::Block> block;
  uint64_t streams = 0;       // streams to record an event on (bit per index)
  std::vector<Event> events;  // recorded; empty until then
  bool recorded = false;
  uint64_t seq = 0;  // the shard's free counter at the free (synchronize_stream)
};

}  // namespace

// Cache-line aligned: threads on neighbouring streams do not share a line.
struct alignas(64) Allocator::Shard {
  Mutex mu;  // short: only container operations run under it
  std::map<size_t, std::vector<std::unique_ptr<detail::Block>>> ready FL_GUARDED_BY(mu);
  std::vector<PendingBlock> pending FL_GUARDED_BY(mu);
  uint64_t next_seq FL_GUARDED_BY(mu) = 1;
};

struct Allocator::HoldSlot {
  Mutex mu;  // guards the fields below
  std::shared_ptr<AllocationHold> hold FL_GUARDED_BY(mu);
  std::thread::id thread FL_GUARDED_BY(mu);
};

struct Allocator::Counters {
  // All relaxed: statistics, exact once the threads using the allocator are
  // joined (their joins order every update before the read).
  // The ones every allocation and free touches get a cache line each.
  alignas(64) std::atomic<size_t> in_use{0};
  alignas(64) std::atomic<size_t> cached{0};
  std::atomic<size_t> reserved{0};
  alignas(64) std::atomic<size_t> peak{0};
  alignas(64) std::atomic<uint64_t> allocations{0};
  alignas(64) std::atomic<uint64_t> cache_hits{0};
  std::atomic<uint64_t> driver_allocations{0};
  std::atomic<uint64_t> driver_frees{0};
  std::atomic<uint64_t> cross_stream_reuses{0};
  std::atomic<uint64_t> cache_flushes{0};
  std::atomic<uint64_t> oom_retries{0};
  std::atomic<uint64_t> deferred_frees{0};
  std::atomic<size_t> held{0};

  void add_in_use(size_t n) {
    const size_t now = in_use.fetch_add(n, std::memory_order_relaxed) + n;
    size_t p = peak.load(std::memory_order_relaxed);
    while (now > p && !peak.compare_exchange_weak(p, now, std::memory_order_relaxed)) {
    }
  }
};

std::string AllocatorStats::to_string() const {
  return detail::str_cat(
      "in_use=", in_use_bytes, " cached=", cached_bytes, " reserved=", reserved_bytes,
      " peak=", peak_in_use_bytes, " allocations=", allocations, " cache_hits=", cache_hits,
      " driver_allocations=", driver_allocations, " driver_frees=", driver_frees,
      " cross_stream_reuses=", cross_stream_reuses, " cache_flushes=", cache_flushes,
      " oom_retries=", oom_retries, " deferred_frees=", deferred_frees);
}

// ---- Allocation ----------------------------------------------------------------------

Allocation::Allocation(Allocation&& o) noexcept
    : allocator_(std::exchange(o.allocator_, nullptr)),
      block_(std::exchange(o.block_, nullptr)),
      size_(std::exchange(o.size_, 0)) {}

Allocation& Allocation::operator=(Allocation&& o) noexcept {
  if (this != &o) {
    reset();
    allocator_ = std::exchange(o.allocator_, nullptr);
    block_ = std::exchange(o.block_, nullptr);
    size_ = std::exchange(o.size_, 0);
  }
  return *this;
}

void* Allocation::device_ptr() const { return block_ ? block_->buffer->device_ptr() : nullptr; }
void* Allocation::host_ptr() const { return block_ ? block_->buffer->host_ptr() : nullptr; }
size_t Allocation::capacity() const { return block_ ? block_->cls : 0; }
bool Allocation::is_host() const { return block_ && block_->host; }

Stream Allocation::stream() const {
  FL_CHECK_STATE(block_, "[Allocation::stream] the allocation is empty");
  return Stream(allocator_->device_, block_->stream);
}

void Allocation::record_stream(const Stream& stream) {
  FL_CHECK_STATE(block_, "[Allocation::record_stream] the allocation is empty");
  FL_CHECK_ARG(&stream.device() == &allocator_->device_,
               "[Allocation::record_stream] the stream is on ", stream.device().name(),
               " but the memory belongs to ", allocator_->device_.name());
  if (stream.index() == block_->stream) return;
  // Relaxed: see Block::used_on. Read first: shared weights are recorded by
  // every op on every stream, and a read keeps their cache line shared.
  const uint64_t bit = uint64_t{1} << stream.index();
  if ((block_->used_on.load(std::memory_order_relaxed) & bit) == 0)
    block_->used_on.fetch_or(bit, std::memory_order_relaxed);
}

void Allocation::reset() noexcept {
  if (!block_) return;
  allocator_->free_block(std::exchange(block_, nullptr), /*idle=*/false);
  allocator_ = nullptr;
  size_ = 0;
}

void Allocation::release_idle() noexcept {
  if (!block_) return;
  allocator_->free_block(std::exchange(block_, nullptr), /*idle=*/true);
  allocator_ = nullptr;
  size_ = 0;
}

// ---- Allocator -----------------------------------------------------------------------

Allocator::Allocator(Device& device)
    : device_(device),
      caching_(device.config().allocator_caching),
      num_streams_(device.config().pool_size),
      shards_(new Shard[static_cast<size_t>(2 * num_streams_)]),
      counters_(std::make_unique<Counters>()),
      holds_(new HoldSlot[static_cast<size_t>(num_streams_)]) {}

Allocator::~Allocator() {
  // The device has drained (Device::~Device shuts it down first), so nothing
  // can still use a cached block: give them back without waiting.
  for (int i = 0; i < 2 * num_streams_; ++i) {
    Shard& s = shards_[static_cast<size_t>(i)];
    MutexLock lock(s.mu);
    for (auto& [cls, blocks] : s.ready)
      for (auto& b : blocks) release_to_driver(std::move(b));
    for (auto& p : s.pending) release_to_driver(std::move(p.block));
    s.ready.clear();
    s.pending.clear();
  }
}

size_t Allocator::size_class(size_t bytes) {
  if (bytes == 0) return kSmallGranularity;
  if (bytes <= kSmallLimit)
    return (bytes + kSmallGranularity - 1) / kSmallGranularity * kSmallGranularity;
  // A quarter of the power of two below: at most 25% waste.
  const size_t base = std::bit_floor(bytes);
  const size_t step = base / 4;
  return (bytes + step - 1) / step * step;
}

Allocator::Shard& Allocator::shard(int stream_index, bool host) {
  return shards_[static_cast<size_t>(stream_index + (host ? num_streams_ : 0))];
}

AllocatorStats Allocator::stats() const {
  const Counters& c = *counters_;
  AllocatorStats s;
  s.in_use_bytes = c.in_use.load(std::memory_order_relaxed);
  s.cached_bytes = c.cached.load(std::memory_order_relaxed);
  s.reserved_bytes = c.reserved.load(std::memory_order_relaxed);
  s.peak_in_use_bytes = c.peak.load(std::memory_order_relaxed);
  s.allocations = c.allocations.load(std::memory_order_relaxed);
  s.cache_hits = c.cache_hits.load(std::memory_order_relaxed);
  s.driver_allocations = c.driver_allocations.load(std::memory_order_relaxed);
  s.driver_frees = c.driver_frees.load(std::memory_order_relaxed);
  s.cross_stream_reuses = c.cross_stream_reuses.load(std::memory_order_relaxed);
  s.cache_flushes = c.cache_flushes.load(std::memory_order_relaxed);
  s.oom_retries = c.oom_retries.load(std::memory_order_relaxed);
  s.deferred_frees = c.deferred_frees.load(std::memory_order_relaxed);
  s.held_bytes = c.held.load(std::memory_order_relaxed);
  return s;
}

// ---- Holds ---------------------------------------------------------------------------

AllocationHold::AllocationHold(Allocator& allocator) : allocator_(allocator) {}
AllocationHold::~AllocationHold() { release(); }

bool AllocationHold::keep(std::unique_ptr<detail::Block>& block) {
  MutexLock lock(mu_);
  if (released_) return false;
  bytes_ += block->cls;
  allocator_.counters_->held.fetch_add(block->cls, std::memory_order_relaxed);
  blocks_.push_back(std::move(block));  // on a throw the block stays with the caller
  return true;
}

void AllocationHold::release() noexcept {
  std::vector<std::unique_ptr<detail::Block>> blocks;
  {
    MutexLock lock(mu_);
    released_ = true;
    blocks.swap(blocks_);
    allocator_.counters_->held.fetch_sub(bytes_, std::memory_order_relaxed);
    bytes_ = 0;
  }
  for (auto& b : blocks) allocator_.free_block(b.release(), /*idle=*/false);
}

size_t AllocationHold::blocks() const {
  MutexLock lock(mu_);
  return blocks_.size();
}

size_t AllocationHold::bytes() const {
  MutexLock lock(mu_);
  return bytes_;
}

std::shared_ptr<AllocationHold> Allocator::begin_hold(const Stream& stream) {
  FL_CHECK_ARG(&stream.device() == &device_, "[Allocator::begin_hold] the stream is on ",
               stream.device().name(), " but this allocator belongs to ", device_.name());
  HoldSlot& slot = holds_[static_cast<size_t>(stream.index())];
  auto hold = std::make_shared<AllocationHold>(*this);
  MutexLock lock(slot.mu);
  FL_CHECK_STATE(slot.hold == nullptr, "[Allocator::begin_hold] stream ", stream.index(),
                 " already has a hold (one recording at a time per stream)");
  slot.hold = hold;
  slot.thread = std::this_thread::get_id();
  holding_.fetch_or(uint64_t{1} << stream.index(), std::memory_order_acq_rel);
  return hold;
}

void Allocator::end_hold(const Stream& stream) noexcept {
  HoldSlot& slot = holds_[static_cast<size_t>(stream.index())];
  MutexLock lock(slot.mu);
  slot.hold.reset();
  holding_.fetch_and(~(uint64_t{1} << stream.index()), std::memory_order_acq_rel);
}

void Allocator::reset_peak() {
  counters_->peak.store(counters_->in_use.load(std::memory_order_relaxed),
                        std::memory_order_relaxed);
}

void Allocator::release_to_driver(std::unique_ptr<detail::Block> block) noexcept {
  if (!block) return;
  counters_->reserved.fetch_sub(block->cls, std::memory_order_relaxed);
  counters_->driver_frees.fetch_add(1, std::memory_order_relaxed);
  block.reset();  // the Buffer's destructor gives the memory back
}

Allocation Allocator::allocate(size_t bytes, const Stream& stream) {
  return allocate_impl(bytes, stream, /*host=*/false);
}

Allocation Allocator::allocate_host(size_t bytes, const Stream& stream) {
  return allocate_impl(bytes, stream, /*host=*/true);
}

std::unique_ptr<detail::Block> Allocator::take_ready(Shard& s, size_t cls) {
  MutexLock lock(s.mu);
  auto it = s.ready.find(cls);
  if (it == s.ready.end() || it->second.empty()) return nullptr;
  auto block = std::move(it->second.back());
  it->second.pop_back();
  counters_->cached.fetch_sub(block->cls, std::memory_order_relaxed);
  return block;
}

// Records the missing events of `s`'s pending blocks and moves those whose
// events are reached to the ready lists (or, without caching, to the driver).
// Event work happens outside the lock (Note [Cross-stream reuse]).
void Allocator::reap(Shard& s) {
  std::vector<PendingBlock> work;
  {
    MutexLock lock(s.mu);
    if (s.pending.empty()) return;
    work.swap(s.pending);
  }
  std::vector<PendingBlock> keep;
  std::vector<std::unique_ptr<detail::Block>> done;
  // One event per stream covers every block of this pass that waits for it.
  std::vector<std::optional<Event>> marks(static_cast<size_t>(num_streams_));
  const uint64_t holding = holding_.load(std::memory_order_acquire);
  for (auto& p : work) {
    if (!p.recorded && (p.streams & holding)) {  // a recording stream takes no events now
      keep.push_back(std::move(p));
      continue;
    }
    if (!p.recorded) {
      try {
        for (uint64_t bits = p.streams; bits; bits &= bits - 1) {
          auto& mark = marks[static_cast<size_t>(std::countr_zero(bits))];
          if (!mark) {
            mark.emplace(device_);
            mark->record(Stream(device_, std::countr_zero(bits)));
          }
          p.events.push_back(*mark);
        }
        p.recorded = true;
      } catch (...) {
        // Shut down (its work has drained: the block is idle) or lost (the
        // block may never be idle: drop it from the cache for good).
        if (device_.is_shut_down()) {
          counters_->cached.fetch_sub(p.block->cls, std::memory_order_relaxed);
          release_to_driver(std::move(p.block));
        } else {
          leak(std::move(p.block));
        }
        continue;
      }
    }
    const bool reached =
        std::all_of(p.events.begin(), p.events.end(), [](const Event& e) { return e.query(); });
    if (reached)
      done.push_back(std::move(p.block));
    else
      keep.push_back(std::move(p));
  }
  if (!caching_) {
    for (auto& b : done) {
      counters_->cached.fetch_sub(b->cls, std::memory_order_relaxed);
      release_to_driver(std::move(b));
    }
    done.clear();
  }
  MutexLock lock(s.mu);
  for (auto& p : keep) s.pending.push_back(std::move(p));
  for (auto& b : done) {
    b->used_on.store(0, std::memory_order_relaxed);
    s.ready[b->cls].push_back(std::move(b));
  }
}

Allocation Allocator::allocate_impl(size_t bytes, const Stream& stream, bool host) {
  const char* api = host ? "Allocator::allocate_host" : "Allocator::allocate";
  FL_CHECK_ARG(bytes > 0, "[", api, "] asked for 0 bytes; ask for at least 1");
  FL_CHECK_ARG(&stream.device() == &device_, "[", api, "] the stream is on ",
               stream.device().name(), " but this allocator belongs to ", device_.name(),
               "; allocate on a stream of the tensor's device");
  FL_CHECK_ARG(stream.index() >= 0 && stream.index() < num_streams_, "[", api, "] stream index ",
               stream.index(), " is outside the device's pool of ", num_streams_);
  device_.check_usable(api);
  const size_t cls = size_class(bytes);
  Shard& s = shard(stream.index(), host);

  std::unique_ptr<detail::Block> block;
  if (caching_) {
    block = take_ready(s, cls);
    if (!block) {
      reap(s);
      block = take_ready(s, cls);
    }
  } else {
    // Without caching, deferred frees are finished by the next allocation on
    // any stream, so memory goes back promptly.
    for (int i = 0; i < 2 * num_streams_; ++i) reap(shards_[static_cast<size_t>(i)]);
  }
  if (block) {
    counters_->cache_hits.fetch_add(1, std::memory_order_relaxed);
  } else {
    block = new_block(cls, bytes, stream, host);
  }
  block->stream = stream.index();
  block->used_on.store(0, std::memory_order_relaxed);
  block->hold.reset();
  if (holding_.load(std::memory_order_acquire) & (uint64_t{1} << stream.index())) [[unlikely]] {
    HoldSlot& slot = holds_[static_cast<size_t>(stream.index())];
    MutexLock lock(slot.mu);
    if (slot.hold && slot.thread == std::this_thread::get_id()) block->hold = slot.hold;
  }
  counters_->add_in_use(cls);
  counters_->allocations.fetch_add(1, std::memory_order_relaxed);
  return Allocation(this, block.release(), bytes);
}

std::unique_ptr<backend::Buffer> Allocator::driver_allocate(size_t cls, bool host) {
  auto& driver = device_.driver(host ? "Allocator::allocate_host" : "Allocator::allocate");
  auto buffer = host ? driver.allocate_host(cls) : driver.allocate(cls);
  counters_->reserved.fetch_add(cls, std::memory_order_relaxed);
  counters_->driver_allocations.fetch_add(1, std::memory_order_relaxed);
  return buffer;
}

std::unique_ptr<detail::Block> Allocator::new_block(size_t cls, size_t bytes, const Stream& stream,
                                                    bool host) {
  auto block = std::make_unique<detail::Block>();
  block->cls = cls;
  block->host = host;
  try {
    block->buffer = driver_allocate(cls, host);
    return block;
  } catch (const OutOfMemory&) {
  }
  // Out of memory: a block of the class cached on another stream first.
  if (caching_ && !host) {
    if (auto stolen = take_from_other_streams(cls, stream)) {
      counters_->cross_stream_reuses.fetch_add(1, std::memory_order_relaxed);
      return stolen;
    }
  }
  // Then everything cached goes back to the driver, and one more try.
  counters_->oom_retries.fetch_add(1, std::memory_order_relaxed);
  empty_cache();
  try {
    block->buffer = driver_allocate(cls, host);
    return block;
  } catch (const OutOfMemory& e) {
    const AllocatorStats st = stats();
    throw OutOfMemory(detail::str_cat(
        "[", host ? "Allocator::allocate_host" : "Allocator::allocate", "] ", device_.name(),
        " is out of memory: asked for ", bytes, " bytes (", cls, " with rounding) with ",
        st.in_use_bytes, " in use, ", st.cached_bytes, " cached (after freeing the cache), ",
        st.reserved_bytes, " reserved, device limit ", device_.info().memory_bytes,
        "; free tensors, use smaller batches or raise the memory limit. Driver: ", e.what()));
  }
}

std::unique_ptr<detail::Block> Allocator::take_from_other_streams(size_t cls,
                                                                  const Stream& stream) {
  for (int i = 0; i < num_streams_; ++i) {
    if (i == stream.index()) continue;
    auto block = take_ready(shard(i, false), cls);
    if (!block) continue;
    // Note [Cross-stream reuse]: `stream` waits, on the device, for all the
    // work the owner stream had encoded when the block moved.
    try {
      Event e(device_);
      e.record(Stream(device_, i));
      e.wait(stream);
    } catch (...) {
      release_to_driver(std::move(block));
      throw;
    }
    return block;
  }
  return nullptr;
}

void Allocator::free_block(detail::Block* raw, bool idle) noexcept {
  std::unique_ptr<detail::Block> block(raw);
  if (block->hold) [[unlikely]] {
    // A recording still uses the block (see "Holds" in allocator.h).
    std::shared_ptr<AllocationHold> hold = std::move(block->hold);
    try {
      if (hold->keep(block)) return;
    } catch (...) {  // could not keep it: never cache memory a replay may use
      counters_->in_use.fetch_sub(block->cls, std::memory_order_relaxed);
      counters_->cached.fetch_add(block->cls, std::memory_order_relaxed);
      leak(std::move(block));
      return;
    }
  }
  counters_->in_use.fetch_sub(block->cls, std::memory_order_relaxed);
  counters_->cached.fetch_add(block->cls, std::memory_order_relaxed);
  Shard& s = shard(block->stream, block->host);
  // Relaxed: see Block::used_on.
  const uint64_t others = block->used_on.load(std::memory_order_relaxed);
  const uint64_t own = uint64_t{1} << block->stream;
  if (!caching_ && idle) {
    counters_->cached.fetch_sub(block->cls, std::memory_order_relaxed);
    release_to_driver(std::move(block));
    return;
  }
  try {
    if (caching_ && (idle || (others == 0 && !block->host))) {
      MutexLock lock(s.mu);
      s.ready[block->cls].push_back(std::move(block));  // strong guarantee: kept on throw
      return;
    }
  } catch (...) {
    leak(std::move(block));
    return;
  }
  counters_->deferred_frees.fetch_add(1, std::memory_order_relaxed);
  PendingBlock p;
  // Host blocks are written by the host, so even their own stream must be
  // done with them; without caching the owner stream must be done too.
  p.streams = idle ? 0 : others | ((block->host || !caching_) ? own : 0);
  p.block = std::move(block);
  try {
    MutexLock lock(s.mu);
    p.seq = s.next_seq++;
    s.pending.push_back(std::move(p));  // strong guarantee: kept on throw
  } catch (...) {
    leak(std::move(p.block));
  }
}

// Drops a cached block whose memory may still be in use (a lost device, or
// out of memory inside a free, which cannot fail): leaked on purpose.
void Allocator::leak(std::unique_ptr<detail::Block> block) noexcept {
  if (!block) return;
  counters_->cached.fetch_sub(block->cls, std::memory_order_relaxed);
  counters_->reserved.fetch_sub(block->cls, std::memory_order_relaxed);
  (void)block.release();
}

void Allocator::synchronize_stream(const Stream& stream) {
  FL_CHECK_ARG(&stream.device() == &device_, "[Allocator::synchronize_stream] the stream is on ",
               stream.device().name(), " but this allocator belongs to ", device_.name());
  const uint64_t own = uint64_t{1} << stream.index();
  uint64_t before[2];
  for (int host = 0; host < 2; ++host) {
    Shard& s = shard(stream.index(), host != 0);
    MutexLock lock(s.mu);
    before[host] = s.next_seq;
  }
  Stream(stream).synchronize();
  // Every block freed to this stream before the synchronize began, and
  // waiting for this stream only, has had all its uses run.
  for (int host = 0; host < 2; ++host) {
    Shard& s = shard(stream.index(), host != 0);
    std::vector<std::unique_ptr<detail::Block>> idle;
    {
      MutexLock lock(s.mu);
      auto keep = s.pending.begin();
      for (auto it = s.pending.begin(); it != s.pending.end(); ++it) {
        if (it->seq < before[host] && (it->streams & ~own) == 0) {
          it->block->used_on.store(0, std::memory_order_relaxed);
          if (caching_)
            s.ready[it->block->cls].push_back(std::move(it->block));
          else
            idle.push_back(std::move(it->block));
        } else {
          if (keep != it) *keep = std::move(*it);
          ++keep;
        }
      }
      s.pending.erase(keep, s.pending.end());
    }
    for (auto& b : idle) {
      counters_->cached.fetch_sub(b->cls, std::memory_order_relaxed);
      release_to_driver(std::move(b));
    }
  }
}

void Allocator::empty_cache() {
  counters_->cache_flushes.fetch_add(1, std::memory_order_relaxed);
  for (int i = 0; i < 2 * num_streams_; ++i) {
    Shard& s = shards_[static_cast<size_t>(i)];
    std::vector<std::unique_ptr<detail::Block>> ready;
    std::vector<PendingBlock> pending;
    {
      MutexLock lock(s.mu);
      for (auto& [cls, blocks] : s.ready)
        for (auto& b : blocks) ready.push_back(std::move(b));
      s.ready.clear();
      pending.swap(s.pending);
    }
    if (ready.empty() && pending.empty()) continue;
    const int stream_index = i % num_streams_;
    bool idle = true;
    try {
      // Ready blocks were last used on their own stream: wait for it.
      if (!ready.empty()) {
        Event e(device_);
        e.record(Stream(device_, stream_index));
        e.synchronize();
      }
      for (auto& p : pending) {
        if (!p.recorded) {
          for (uint64_t bits = p.streams; bits; bits &= bits - 1) {
            Event e(device_);
            e.record(Stream(device_, std::countr_zero(bits)));
            p.events.push_back(std::move(e));
          }
          p.recorded = true;
        }
        for (auto& e : p.events) e.synchronize();
      }
    } catch (...) {
      // A shut-down device has drained: its blocks are idle. A lost one may
      // never finish: keep its memory out of the driver (leaked on purpose).
      idle = device_.is_shut_down();
    }
    for (auto& p : pending) ready.push_back(std::move(p.block));
    for (auto& b : ready) {
      if (!b) continue;
      if (idle) {
        counters_->cached.fetch_sub(b->cls, std::memory_order_relaxed);
        release_to_driver(std::move(b));
      } else {
        leak(std::move(b));
      }
    }
  }
}

}  // namespace flotilla
