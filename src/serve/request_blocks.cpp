#include "serve/request_blocks.h"

#include <atomic>
#include <new>
#include <utility>
#include <vector>

#include "flotilla/common/sync.h"

#if defined(__SANITIZE_ADDRESS__)
#define FL_BLOCK_POOL 0
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define FL_BLOCK_POOL 0
#endif
#endif
#ifndef FL_BLOCK_POOL
#define FL_BLOCK_POOL 1
#endif

namespace flotilla::serve::detail {

namespace {

std::atomic<uint64_t> g_from_heap{0};
std::atomic<uint64_t> g_to_heap{0};

void* from_heap(size_t bytes) {
  g_from_heap.fetch_add(1, std::memory_order_relaxed);
  return ::operator new(bytes);
}

void to_heap(void* block) noexcept {
  g_to_heap.fetch_add(1, std::memory_order_relaxed);
  ::operator delete(block);
}

// Batches of blocks that threads handed over (Note [Pooled request blocks]).
class SharedBlocks {
 public:
  SharedBlocks() { batches_.reserve(kSharedBatches); }
  // Adds `batch` (kBlockBatch blocks); false, and `batch` left as it was, if
  // the pool is full.
  bool put(std::vector<void*>& batch) FL_EXCLUDES(mu_) {
    MutexLock lock(mu_);
    if (batches_.size() >= kSharedBatches) return false;
    batches_.push_back(std::move(batch));  // reserved: no allocation, no throw
    return true;
  }
  // Moves a batch into `into` (empty); false if there is none.
  bool get(std::vector<void*>& into) FL_EXCLUDES(mu_) {
    MutexLock lock(mu_);
    if (batches_.empty()) return false;
    into.swap(batches_.back());
    batches_.pop_back();
    return true;
  }

 private:
  Mutex mu_;
  std::vector<std::vector<void*>> batches_ FL_GUARDED_BY(mu_);  // each kBlockBatch blocks
};

// Never destroyed: threads may exit (and free their blocks) during the
// process's own exit, after static objects are gone.
SharedBlocks& shared_blocks() {
  static SharedBlocks* const blocks = new SharedBlocks;
  return *blocks;
}

// Set when this thread's ThreadBlocks is destroyed (at its exit): blocks
// freed later (by another thread_local's destructor) go to the heap.
thread_local bool t_blocks_gone = false;

// A thread's own free blocks, the most recently freed last (the warmest in
// this core's cache, taken first). At most 2 x kBlockBatch.
struct ThreadBlocks {
  std::vector<void*> free;
  ~ThreadBlocks() {
    t_blocks_gone = true;
    for (void* b : free) to_heap(b);
  }
  void* take() {
    if (free.empty() && !shared_blocks().get(free)) return from_heap(kPooledBlockBytes);
    void* b = free.back();
    free.pop_back();
    return b;
  }
  // False if `b` was not kept (no memory for the list).
  bool give(void* b) noexcept {
    if (free.size() >= 2 * kBlockBatch) hand_over();
    if (free.size() == free.capacity()) {
      try {
        free.reserve(2 * kBlockBatch);
      } catch (...) {
        return false;
      }
    }
    free.push_back(b);  // within the capacity: no throw
    return true;
  }
  // The oldest kBlockBatch blocks go to the shared pool, or to the heap if
  // it is full.
  void hand_over() noexcept {
    const auto first = free.begin(), last = free.begin() + kBlockBatch;
    bool kept = false;
    try {
      std::vector<void*> batch(first, last);
      kept = shared_blocks().put(batch);
    } catch (...) {  // no memory for the batch's list
    }
    if (!kept)
      for (auto it = first; it != last; ++it) to_heap(*it);
    free.erase(first, last);
  }
};

thread_local ThreadBlocks t_blocks;

}  // namespace

void* take_block(size_t bytes) {
  if (FL_BLOCK_POOL && bytes <= kPooledBlockBytes && !t_blocks_gone) return t_blocks.take();
  return bytes <= kPooledBlockBytes ? from_heap(kPooledBlockBytes) : ::operator new(bytes);
}

void give_block(void* block, bool small) noexcept {
  if (!small) return ::operator delete(block);
  if (!FL_BLOCK_POOL || t_blocks_gone || !t_blocks.give(block)) to_heap(block);
}

BlockCounts block_counts_for_testing() {
  return {g_from_heap.load(std::memory_order_relaxed), g_to_heap.load(std::memory_order_relaxed)};
}

bool block_pool_enabled() { return FL_BLOCK_POOL != 0; }

size_t thread_blocks_for_testing() { return t_blocks_gone ? 0 : t_blocks.free.size(); }

}  // namespace flotilla::serve::detail
