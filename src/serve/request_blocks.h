// Note [Pooled request blocks]
// Every request is one heap block (Note [One allocation per request]) that
// a client thread allocates and, under load, a worker frees: glibc serves
// the client from its arena and takes the worker's free back into that
// arena under the arena's lock, so clients and workers meet on the arenas'
// locks and every allocation and free walks the arena. On the H100 with 64
// clients on a tiny model (where the host's work per request is all there
// is), malloc was 14 % of a client's samples and free 24 % of a worker's
// (docs/PERF.md, "Pooled request blocks"). So small blocks (a request with a
// borrowed input, or a short copied one: at most kPooledBlockBytes) come
// from a pool: each thread keeps the blocks it freed in a list of its own
// and allocates from it; a thread whose list grows past 2 x kBlockBatch
// hands the oldest kBlockBatch to a shared pool, and one whose list is
// empty takes a batch from there (one lock per kBlockBatch blocks). The
// shared pool keeps at most kSharedBatches batches (2 MiB) and a thread at
// most 2 x kBlockBatch blocks (64 KiB); beyond that blocks go back to the
// heap, as do a thread's blocks when it exits. A block in a pool was
// destroyed before it got there: only its memory is reused.
// Under AddressSanitizer the pool is off (every block comes from the heap
// and goes back to it), so that a use after free of a request is still
// caught there.
#pragma once

#include <cstddef>
#include <cstdint>

namespace flotilla::serve::detail {

inline constexpr size_t kPooledBlockBytes = 512;
inline constexpr size_t kBlockBatch = 64;
inline constexpr size_t kSharedBatches = 64;

// A block of at least `bytes` bytes (16-byte aligned): a small one (`bytes`
// <= kPooledBlockBytes) from the pool when it is on. give_block() takes it
// back, told whether it was small.
void* take_block(size_t bytes);
void give_block(void* block, bool small) noexcept;

// Tests: blocks the pool took from the heap and gave back to it, since the
// process began (relaxed counts); whether the pool is on in this build; and
// how many blocks this thread's list holds.
struct BlockCounts {
  uint64_t from_heap = 0;
  uint64_t to_heap = 0;
};
BlockCounts block_counts_for_testing();
bool block_pool_enabled();
size_t thread_blocks_for_testing();

}  // namespace flotilla::serve::detail
