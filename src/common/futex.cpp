#include "flotilla/common/futex.h"

#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <climits>

namespace flotilla::detail {

void futex_wait(const void* word, uint32_t expected, const timespec* timeout) noexcept {
  // EAGAIN (the word changed), EINTR and ETIMEDOUT all just return.
  (void)syscall(SYS_futex, word, FUTEX_WAIT_PRIVATE, expected, timeout, nullptr, 0);
}

void futex_wake_all(const void* word) noexcept {
  (void)syscall(SYS_futex, word, FUTEX_WAKE_PRIVATE, INT_MAX, nullptr, nullptr, 0);
}

}  // namespace flotilla::detail
