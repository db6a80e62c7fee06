// LegacyStream: the seed's Figure 1, kept only to show what Flotilla fixes.
//
// One shared stream with one command buffer and one encoder and no
// serialisation: every caller does check-then-act on the shared command
// buffer and encoder. Each field is accessed atomically on its own (so it is
// free of C++ data races and memory-safe under TSan and ASan), but nothing
// makes the sequence of steps atomic. The races that follow are the seed's:
// "commit an already committed command buffer", "encoder already encoding",
// encoding into a committed buffer, work lost in a command buffer that
// nobody commits. The CPU driver's validation reports each as a
// ValidationError; lost work shows as wrong results.
//
// Do not use it for anything but the stress tool's comparison.
#pragma once

#include <atomic>
#include <memory>
#include <string_view>

#include "flotilla/backend/driver.h"
#include "flotilla/common/sync.h"

namespace flotilla {

class Device;

class LegacyStream {
 public:
  explicit LegacyStream(Device& device);
  ~LegacyStream();

  void dispatch(std::string_view kernel, const backend::KernelArgs& args);
  void commit();
  void synchronize();

 private:
  struct Current {
    std::shared_ptr<backend::CommandBuffer> cb;
    backend::ComputeEncoder* encoder = nullptr;  // owned by cb
  };
  Current load() const;
  void store(Current c);

  Device& device_;
  std::unique_ptr<backend::Queue> queue_;
  // Each access is atomic on its own (a short lock, like an atomic
  // shared_ptr); the check-then-act sequences between them are the point.
  mutable Mutex mu_;  // guards current_ and last_ for single loads and stores only
  Current current_ FL_GUARDED_BY(mu_);
  std::shared_ptr<backend::CommandBuffer> last_ FL_GUARDED_BY(mu_);
};

}  // namespace flotilla
