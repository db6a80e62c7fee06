// Hints to the CPU's caches, shared by the layers.
#pragma once

#include <cstddef>
#include <cstdint>

namespace flotilla::detail {

// Asks the CPU to move the cache lines of [p, p + bytes) out of this core's
// private caches into the shared last-level cache (x86's CLDEMOTE), so that
// their next reader, another core or a device reading host memory, finds
// them there instead of in this core. Only a hint: what memory holds does not
// change. CLDEMOTE is in x86's hint-NOP space, so CPUs without it (and other
// architectures, where this is empty) do nothing.
inline void demote_to_shared_cache(const void* p, size_t bytes) {
#if defined(__x86_64__)
  if (bytes == 0) return;
  constexpr uintptr_t kLine = 64;
  const uintptr_t end = reinterpret_cast<uintptr_t>(p) + bytes;
  for (uintptr_t a = reinterpret_cast<uintptr_t>(p) & ~(kLine - 1); a < end; a += kLine)
    // cldemote (%rax), as bytes: assemblers older than the instruction take it too.
    asm volatile(".byte 0x0f, 0x1c, 0x00" : : "a"(a) : "memory");
#else
  (void)p;
  (void)bytes;
#endif
}

}  // namespace flotilla::detail
