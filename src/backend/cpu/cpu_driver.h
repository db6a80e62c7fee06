// The CPU driver: a strict GPU on the host (DESIGN.md §3).
//
// Committed command buffers run asynchronously on the driver's execution
// threads: each queue in commit order, queues in parallel (a queue is a
// strand on a shared pool of threads). Shared-event waits suspend a queue
// without holding a thread. Every misuse of a driver object is a
// ValidationError naming the rule (validation.h).
#pragma once

#include <memory>

#include "flotilla/backend/driver.h"

namespace flotilla::backend::cpu {

std::unique_ptr<Driver> make_cpu_driver(int index, const Config& config);
int cpu_device_count();

}  // namespace flotilla::backend::cpu
