// The seed's Figure 1. See legacy.h: the races here are deliberate.
#include "flotilla/runtime/legacy.h"

#include "flotilla/runtime/device.h"

namespace flotilla {

LegacyStream::LegacyStream(Device& device)
    : device_(device), queue_(device.driver("LegacyStream").new_queue()) {}

LegacyStream::~LegacyStream() = default;

LegacyStream::Current LegacyStream::load() const {
  MutexLock lock(mu_);
  return current_;
}

void LegacyStream::store(Current c) {
  MutexLock lock(mu_);
  current_ = std::move(c);
}

void LegacyStream::dispatch(std::string_view kernel, const backend::KernelArgs& args) {
  const auto& pipeline = device_.pipeline(kernel);
  // Check-then-act: two threads can both see "no buffer" and both make one
  // (one is orphaned, its work lost), or both see "no encoder" and both open
  // one on the same buffer (encoder-already-open).
  Current cur = load();
  if (!cur.cb) {
    cur.cb = queue_->new_command_buffer();
    cur.encoder = nullptr;
    store(cur);
  }
  if (!cur.encoder || !cur.encoder->is_encoding()) {
    cur.encoder = &cur.cb->compute_encoder();
    store(cur);
  }
  // The buffer may have been committed by another thread meanwhile
  // (encode-after-commit), or its encoder ended (encoder-ended).
  cur.encoder->dispatch(pipeline, args);
}

void LegacyStream::commit() {
  Current cur = load();
  if (!cur.cb) return;
  if (cur.encoder && cur.encoder->is_encoding()) cur.encoder->end_encoding();
  // Two threads can commit the same buffer (commit-twice), or commit while
  // another thread has just opened an encoder (commit-with-open-encoder).
  cur.cb->commit();
  {
    MutexLock lock(mu_);
    last_ = cur.cb;
  }
  store(Current{});
}

void LegacyStream::synchronize() {
  commit();
  std::shared_ptr<backend::CommandBuffer> last;
  {
    MutexLock lock(mu_);
    last = last_;
  }
  // Waits for whichever buffer was committed last, which need not hold the
  // caller's work: the seed's lost-work race.
  if (last) last->wait_until_completed();
}

}  // namespace flotilla
