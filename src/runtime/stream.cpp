#include "flotilla/runtime/stream.h"

#include <algorithm>
#include <utility>

#include "flotilla/common/error.h"
#include "flotilla/runtime/allocator.h"
#include "flotilla/runtime/device.h"
#include "runtime/stream_state.h"
#include "runtime/thread_streams.h"

namespace flotilla {

// ---- Stream (handle) -----------------------------------------------------------

detail::StreamState& Stream::state() const { return device_->streams().state(index_); }

void Stream::dispatch(const backend::Pipeline& pipeline, const backend::KernelArgs& args) {
  device_->check_usable("Stream::dispatch");
  state().dispatch(pipeline, args);
}

void Stream::dispatch(std::string_view kernel, const backend::KernelArgs& args) {
  dispatch(device_->pipeline(kernel), args);
}

void Stream::commit() {
  device_->check_usable("Stream::commit");
  state().commit();
}

void Stream::synchronize() {
  device_->check_usable("Stream::synchronize");
  state().synchronize();
}

StreamFence Stream::fence() {
  device_->check_usable("Stream::fence");
  detail::StreamState& st = state();
  auto [cb, seq] = st.commit_for_fence();
  return StreamFence(&st, std::move(cb), seq);
}

bool StreamFence::reached() const {
  if (!cb_) return true;
  const auto s = cb_->status();
  return s == backend::CommandBufferStatus::kCompleted || s == backend::CommandBufferStatus::kError;
}

void StreamFence::wait() const {
  if (!cb_) return;
  cb_->wait_until_completed();
  state_->rethrow_error_upto(seq_);
  if (cb_->status() == backend::CommandBufferStatus::kError) {
    // Its error was recorded on the stream and already rethrown to a
    // synchronize() or an earlier wait: the work is still lost, say so.
    if (std::exception_ptr e = cb_->error()) std::rethrow_exception(e);
  }
}

// Note [Recording]
// Stream::record() turns what a body encodes on a stream into a replayable
// list (driver.h, "Recording"; a CUDA graph on CUDA, where one replay is one
// launch instead of one per kernel). Three things make that safe:
// - The stream is the recording thread's alone meanwhile: begin_recording()
//   commits and waits for the stream's work (a CUDA capture forbids the
//   stream queries the completion thread makes on a stalled buffer), other
//   threads' encodes, commits and events on the stream wait until the
//   recording ends, and the recording thread may only dispatch.
// - Addresses are fixed: the memory the body allocates on the stream stays
//   with the Recording (an allocator hold) until it is destroyed, so no
//   other tensor is ever given a block a replay writes.
// - A list replays only on its stream: on CUDA the graph also names the
//   queue's cuBLASLt workspace, which only stream order keeps private.

namespace detail {
struct RecordingState {
  Device* device = nullptr;
  int index = 0;
  std::unique_ptr<backend::CommandList> list;
  std::shared_ptr<AllocationHold> hold;  // released when the last copy goes
  ~RecordingState() {
    list.reset();  // CUDA frees a graph still running once it completes
    if (hold) hold->release();
  }
};
}  // namespace detail

Recording Stream::record(const std::function<void()>& body) {
  device_->check_usable("Stream::record");
  FL_CHECK_ARG(body != nullptr,
               "[Stream::record] the body is empty; pass a function that "
               "encodes the work to record");
  auto rec = std::make_shared<detail::RecordingState>();
  rec->device = device_;
  rec->index = index_;
  detail::StreamState& st = state();
  st.begin_recording();
  Allocator& allocator = device_->allocator();
  try {
    rec->hold = allocator.begin_hold(*this);
  } catch (...) {
    st.abort_recording();
    throw;
  }
  try {
    body();
  } catch (...) {
    allocator.end_hold(*this);
    st.abort_recording();
    throw;  // rec goes, releasing what the body allocated
  }
  allocator.end_hold(*this);
  rec->list = st.end_recording();
  return Recording(std::move(rec));
}

void Stream::replay(const Recording& recording) {
  device_->check_usable("Stream::replay");
  FL_CHECK_ARG(recording.valid(),
               "[Stream::replay] the recording is empty; replay one that "
               "Stream::record() returned");
  const detail::RecordingState& r = *recording.state_;
  FL_CHECK_ARG(r.device == device_ && r.index == index_,
               "[Stream::replay] the recording was made "
               "on stream ",
               r.index, " of ", r.device->name(), " but is replayed on stream ", index_, " of ",
               device_->name(), "; replay a recording on the stream that made it");
  state().replay(*r.list);
}

size_t Recording::kernels() const { return state_ ? state_->list->kernel_count() : 0; }

Stream Recording::stream() const {
  FL_CHECK_STATE(state_ != nullptr, "[Recording::stream] the recording is empty");
  return Stream(*state_->device, state_->index);
}

bool Stream::query() const {
  device_->check_usable("Stream::query");
  return state().query();
}

void Stream::add_callback(std::function<void()> fn) {
  device_->check_usable("Stream::add_callback");
  state().add_callback(std::move(fn));
}

namespace {
void check_share(int streams, const char* api) {
  FL_CHECK_ARG(streams >= 1, "[", api, "] ", streams,
               " streams; the hint counts the streams running at once, this one included (>= 1; "
               "1 plans for the whole device)");
}
}  // namespace

void Stream::set_device_share(int streams) {
  check_share(streams, "Stream::set_device_share");
  state().set_device_share(streams);
}

DeviceShareClaim Stream::claim_device_share(int streams) {
  check_share(streams, "Stream::claim_device_share");
  detail::StreamState& s = state();
  s.add_share_claim(streams);
  return DeviceShareClaim(&s, streams);
}

int Stream::device_share() const { return state().device_share(); }

// ---- DeviceShareClaim ------------------------------------------------------------------

DeviceShareClaim::DeviceShareClaim(DeviceShareClaim&& o) noexcept
    : state_(std::exchange(o.state_, nullptr)), share_(o.share_) {}

DeviceShareClaim& DeviceShareClaim::operator=(DeviceShareClaim&& o) noexcept {
  if (this != &o) {
    release();
    state_ = std::exchange(o.state_, nullptr);
    share_ = o.share_;
  }
  return *this;
}

void DeviceShareClaim::release() noexcept {
  if (state_) std::exchange(state_, nullptr)->remove_share_claim(share_);
}

uint64_t Stream::kernels_encoded() const { return state().kernels(); }
uint64_t Stream::commits() const { return state().commits(); }

// ---- StreamGuard -------------------------------------------------------------------

StreamGuard::StreamGuard(const Stream& stream)
    : device_(&stream.device()),
      previous_(detail::swap_current_stream_index(*device_, stream.index())) {}

StreamGuard::~StreamGuard() {
  // Restoring only swaps a thread-local index: it cannot fail.
  detail::swap_current_stream_index(*device_, previous_);
}

// ---- StreamState ---------------------------------------------------------------------

namespace detail {

StreamState::StreamState(Device& device, int index, std::unique_ptr<backend::Queue> queue)
    : device_(device),
      encoding_lock_(device.encoding_lock()),
      index_(index),
      queue_(std::move(queue)) {}

StreamState::~StreamState() = default;

// Stream::set_device_share / claim_device_share: the backend queue plans
// with the largest of the stream's own setting and its claims.
void StreamState::set_device_share(int streams) {
  MutexLock lock(share_mu_);
  base_share_ = streams;
  apply_share();
}

void StreamState::add_share_claim(int streams) {
  MutexLock lock(share_mu_);
  share_claims_.insert(streams);
  apply_share();
}

void StreamState::remove_share_claim(int streams) noexcept {
  MutexLock lock(share_mu_);
  const auto it = share_claims_.find(streams);
  if (it != share_claims_.end()) share_claims_.erase(it);
  apply_share();
}

void StreamState::apply_share() {
  const int share =
      share_claims_.empty() ? base_share_ : std::max(base_share_, *share_claims_.rbegin());
  queue_->set_device_share(share);  // an atomic store in the drivers that use it
  share_.store(share, std::memory_order_relaxed);
}

void StreamState::ensure_buffer(const char* api) {
  if (!cb_) {
    // Checked again under mu_: Device::shutdown() marks the device before it
    // commits each stream under this lock, so a buffer opened after that
    // commit, which nothing would ever commit, is refused instead of lost.
    device_.check_usable(api);
    cb_ = queue_->new_command_buffer();
    kernels_in_cb_ = 0;
  }
}

void StreamState::ensure_encoder(const char* api) {
  ensure_buffer(api);
  if (!encoder_) {
    EncodingLock::Guard guard(encoding_lock_);
    encoder_ = &cb_->compute_encoder();
  }
}

void StreamState::end_encoder() {
  if (encoder_) {
    EncodingLock::Guard guard(encoding_lock_);
    encoder_->end_encoding();
    encoder_ = nullptr;
  }
}

std::shared_ptr<backend::CommandBuffer> StreamState::commit_locked() {
  if (!cb_) return last_committed_;
  end_encoder();
  // The handler captures only `this`: a StreamState lives until its device is
  // destroyed, which happens after the driver has drained (Device::~Device).
  const uint64_t seq = ++committed_seq_;
  cb_->add_completed_handler([this, seq](backend::CommandBuffer& cb) {
    if (cb.status() == backend::CommandBufferStatus::kError) record_error(cb.error(), seq);
  });
  auto cb = std::move(cb_);
  cb_.reset();
  kernels_in_cb_ = 0;
  cb->commit();
  commits_total_.fetch_add(1, std::memory_order_relaxed);
  last_committed_ = cb;
  return cb;
}

void StreamState::wait_not_recording(const char* api) {
  if (!recording_) [[likely]]
    return;
  FL_CHECK_STATE(recording_thread_ != std::this_thread::get_id(), "[", api, "] stream ", index_,
                 " is recording on this thread (Stream::record); only kernels may be encoded "
                 "inside a recording: commit, wait, replay and use events outside it");
  not_recording_.wait(mu_, [&]() FL_REQUIRES(mu_) { return !recording_; });
}

std::shared_ptr<backend::CommandBuffer> StreamState::after_encode() {
  const Config& c = device_.config();
  switch (c.sync_mode) {
    case SyncMode::kNone: break;
    case SyncMode::kCommit: commit_locked(); break;
    case SyncMode::kCommitAndWait: return commit_locked();
    case SyncMode::kAdaptive:
      if (kernels_in_cb_ >= c.adaptive_commit_kernels) commit_locked();
      break;
  }
  return nullptr;
}

void StreamState::stop_recording() {
  recording_ = false;
  not_recording_.notify_all();
}

void StreamState::wait_after_encode(const std::shared_ptr<backend::CommandBuffer>& cb) {
  if (!cb) return;
  cb->wait_until_completed();
  rethrow_error();
}

void StreamState::dispatch(const backend::Pipeline& pipeline, const backend::KernelArgs& args) {
  std::shared_ptr<backend::CommandBuffer> wait_for;
  {
    MutexLock lock(mu_);
    if (recording_ && recording_thread_ == std::this_thread::get_id()) {
      // Recorded, not run (Note [Recording]); the sync mode does not apply.
      FL_INTERNAL_CHECK(recorder_ != nullptr, "stream ", index_, " records without a recorder");
      EncodingLock::Guard guard(encoding_lock_);
      recorder_->dispatch(pipeline, args);
      return;
    }
    wait_not_recording("Stream::dispatch");
    ensure_encoder("Stream::dispatch");
    {
      EncodingLock::Guard guard(encoding_lock_);
      encoder_->dispatch(pipeline, args);
    }
    ++kernels_in_cb_;
    kernels_total_.fetch_add(1, std::memory_order_relaxed);
    wait_for = after_encode();
  }
  wait_after_encode(wait_for);
}

void StreamState::replay(const backend::CommandList& list) {
  std::shared_ptr<backend::CommandBuffer> wait_for;
  {
    MutexLock lock(mu_);
    wait_not_recording("Stream::replay");
    ensure_encoder("Stream::replay");
    {
      EncodingLock::Guard guard(encoding_lock_);
      encoder_->execute(list);
    }
    const auto n = static_cast<int>(list.kernel_count());
    kernels_in_cb_ += n;
    kernels_total_.fetch_add(list.kernel_count(), std::memory_order_relaxed);
    wait_for = after_encode();
  }
  wait_after_encode(wait_for);
}

void StreamState::begin_recording() {
  std::shared_ptr<backend::CommandBuffer> last;
  {
    MutexLock lock(mu_);
    wait_not_recording("Stream::record");
    recording_ = true;  // from here other threads' encodes wait
    recording_thread_ = std::this_thread::get_id();
    try {
      last = commit_locked();
    } catch (...) {
      stop_recording();
      throw;
    }
  }
  // The stream must be idle before its capture begins: on CUDA a stalled
  // buffer makes the completion thread query the stream, which a capture
  // forbids (Note [Recording]).
  if (last) last->wait_until_completed();
  MutexLock lock(mu_);
  try {
    device_.check_usable("Stream::record");
    EncodingLock::Guard guard(encoding_lock_);
    recorder_ = queue_->new_recorder();
  } catch (...) {
    stop_recording();
    throw;
  }
}

std::unique_ptr<backend::CommandList> StreamState::end_recording() {
  MutexLock lock(mu_);
  FL_INTERNAL_CHECK(recording_ && recording_thread_ == std::this_thread::get_id() && recorder_,
                    "end_recording without a recording on this thread");
  auto recorder = std::move(recorder_);
  stop_recording();
  EncodingLock::Guard guard(encoding_lock_);
  return recorder->finish();  // a throw destroys the recorder, which ends it
}

void StreamState::abort_recording() {
  MutexLock lock(mu_);
  if (!recording_ || recording_thread_ != std::this_thread::get_id()) return;
  recorder_.reset();
  stop_recording();
}

void StreamState::commit() {
  MutexLock lock(mu_);
  wait_not_recording("Stream::commit");
  commit_locked();
}

std::pair<std::shared_ptr<backend::CommandBuffer>, uint64_t> StreamState::commit_for_fence() {
  MutexLock lock(mu_);
  wait_not_recording("Stream::fence");
  auto cb = commit_locked();
  return {std::move(cb), committed_seq_};
}

void StreamState::synchronize() {
  std::shared_ptr<backend::CommandBuffer> last;
  {
    MutexLock lock(mu_);
    wait_not_recording("Stream::synchronize");
    last = commit_locked();
  }
  // Waiting outside the lock lets threads sharing the stream keep encoding;
  // the queue runs in order, so the last buffer finishing means all did.
  if (last) last->wait_until_completed();
  rethrow_error();
}

bool StreamState::query() const {
  MutexLock lock(mu_);
  if (!last_committed_) return true;
  auto s = last_committed_->status();
  return s == backend::CommandBufferStatus::kCompleted || s == backend::CommandBufferStatus::kError;
}

void StreamState::add_callback(std::function<void()> fn) {
  MutexLock lock(mu_);
  wait_not_recording("Stream::add_callback");
  ensure_buffer("Stream::add_callback");
  const uint64_t seq = committed_seq_ + 1;  // the number commit_locked() gives this buffer
  cb_->add_completed_handler([this, seq, fn = std::move(fn)](backend::CommandBuffer&) {
    try {
      fn();
    } catch (...) {
      record_error(std::current_exception(), seq);
    }
  });
  commit_locked();
}

void StreamState::encode_signal(backend::SharedEvent& event, uint64_t value) {
  MutexLock lock(mu_);
  wait_not_recording("Event::record");
  ensure_buffer("Event::record");
  end_encoder();
  {
    EncodingLock::Guard guard(encoding_lock_);
    cb_->encode_signal(event, value);
  }
  commit_locked();
}

void StreamState::encode_wait(backend::SharedEvent& event, uint64_t value) {
  MutexLock lock(mu_);
  wait_not_recording("Event::wait");
  ensure_buffer("Event::wait");
  end_encoder();
  EncodingLock::Guard guard(encoding_lock_);
  cb_->encode_wait(event, value);
}

void StreamState::record_error(std::exception_ptr e, uint64_t seq) {
  MutexLock lock(mu_);
  if (!error_) {
    error_ = std::move(e);
    error_seq_ = seq;
  }
}

void StreamState::rethrow_error_upto(uint64_t seq) {
  std::exception_ptr e;
  {
    MutexLock lock(mu_);
    if (error_ && error_seq_ <= seq) e = std::exchange(error_, nullptr);
  }
  if (e) std::rethrow_exception(e);
}

void StreamState::rethrow_error() {
  std::exception_ptr e;
  {
    MutexLock lock(mu_);
    e = std::exchange(error_, nullptr);
  }
  if (e) std::rethrow_exception(e);
}

}  // namespace detail
}  // namespace flotilla
