// The pooled state behind an Event handle. Internal.
#pragma once

#include <atomic>
#include <exception>
#include <memory>
#include <vector>

#include "flotilla/backend/driver.h"
#include "flotilla/common/sync.h"

namespace flotilla {
class Device;
}

namespace flotilla::detail {

class EventState {
 public:
  EventState(Device& device, std::unique_ptr<backend::SharedEvent> shared)
      : device(device), shared(std::move(shared)) {}

  Device& device;
  const std::unique_ptr<backend::SharedEvent> shared;
  // acquire/release: a thread that sees a recorded value sees the record.
  std::atomic<uint64_t> recorded{0};

  Mutex mu;  // guards the fields below
  CondVar callbacks_done;
  uint64_t next_value FL_GUARDED_BY(mu) = 0;  // survives reuse: the driver value only grows
  int pending_callbacks FL_GUARDED_BY(mu) = 0;
  std::exception_ptr error FL_GUARDED_BY(mu);

  void reset_for_reuse() FL_EXCLUDES(mu);
};

// Events kept for reuse. Handles return their state here when the last
// reference (including one held by a pending callback) goes away.
class EventPool {
 public:
  EventPool(Device& device, int keep);
  ~EventPool();
  std::shared_ptr<EventState> acquire();
  size_t cached() const;

 private:
  struct Core {
    Mutex mu;  // guards free
    std::vector<std::unique_ptr<EventState>> free FL_GUARDED_BY(mu);
    size_t keep = 0;
  };
  Device& device_;
  std::shared_ptr<Core> core_;  // the deleters hold it weakly
};

}  // namespace flotilla::detail
