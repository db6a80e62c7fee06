#include "backend/cuda/command_buffer.h"

#include <chrono>

#include "backend/cuda/completion.h"
#include "backend/cuda/spin.h"
#include "backend/encode_rules.h"
#include "flotilla/common/error.h"

namespace flotilla::backend::cuda {

namespace {

StreamHandle make_stream(DeviceCore& device) {
  DeviceGuard guard(device.index());
  cudaStream_t s = nullptr;
  // Non-blocking: never implicitly synchronised with the legacy stream 0.
  FL_CUDA_CHECK_DEV(device, cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  return StreamHandle(s);
}

}  // namespace

// ---- QueueCore ---------------------------------------------------------------------

QueueCore::QueueCore(std::shared_ptr<DeviceCore> device, int id, CompletionThread* completion)
    : device_(std::move(device)),
      id_(id),
      stream_(make_stream(*device_)),
      ctx_(*device_, stream_.get(), device_->index(), device_->sm_count(), resources_),
      completion_(completion) {
  FL_INTERNAL_CHECK(completion_ != nullptr, "a cuda queue made after its driver's shutdown");
  if (device_->words().enabled()) word_ = device_->words().take(*device_);
}

QueueCore::~QueueCore() {
  DeviceGuard guard(device_->index());
  // Kernel resources (workspaces) may still be in use by work on the stream,
  // and the GPU may still write the completion word.
  if (!device_->lost()) (void)cudaStreamSynchronize(stream_.get());
  resources_.clear();
  if (!device_->lost()) device_->words().give(word_);  // a lost device keeps it: the GPU may write
}

void QueueCore::submit(const std::shared_ptr<CudaCommandBuffer>& cb, cudaEvent_t reuse) {
  bool wake = false;
  {
    MutexLock lock(mu_);
    if (word_.host) {
      // Note [Completion words]: the GPU writes `seq` once all work before
      // it on the stream has run.
      const uint64_t seq = next_seq_ + 1;
      const CUresult r = device_->words().write()(stream_.get(), word_.device, seq, 0);
      if (r != CUDA_SUCCESS)  // driver and runtime error numbers agree for these calls
        device_->fail(static_cast<cudaError_t>(r), "cuStreamWriteValue64(stream, word, seq, 0)",
                      __FILE__, __LINE__);
      next_seq_ = seq;
      cb->completion_seq_ = seq;
    } else if (reuse) {
      cb->completion_event_ = reuse;
      cb->owns_completion_event_ = false;
    } else {
      cudaEvent_t e = device_->sync_events().take(*device_);
      const cudaError_t r = cudaEventRecord(e, stream_.get());
      if (r != cudaSuccess) {
        device_->sync_events().give(e);
        device_->fail(r, "cudaEventRecord(e, stream)", __FILE__, __LINE__);
      }
      cb->completion_event_ = e;
      cb->owns_completion_event_ = true;
    }
    in_flight_.push_back(cb);
    wake = !active_;
    active_ = true;
  }
  // Outside the lock: the completion thread takes the queue lock itself.
  if (wake) completion_->enqueue(shared_from_this());
}

std::shared_ptr<CudaCommandBuffer> QueueCore::front_or_idle() {
  MutexLock lock(mu_);
  if (in_flight_.empty()) {
    active_ = false;
    return nullptr;
  }
  return in_flight_.front();
}

void QueueCore::pop_front() {
  MutexLock lock(mu_);
  in_flight_.pop_front();
}

std::shared_ptr<CommandBuffer> CudaQueue::new_command_buffer() {
  core_->device().check_usable("Queue::new_command_buffer");
  return std::make_shared<CudaCommandBuffer>(
      core_, core_->device().next_buffer_id.fetch_add(1, std::memory_order_relaxed));
}

// ---- CudaEncoder ----------------------------------------------------------------------

void CudaEncoder::dispatch(const Pipeline& pipeline, const KernelArgs& args) {
  const auto* p = dynamic_cast<const CudaPipeline*>(&pipeline);
  FL_CHECK_ARG(p != nullptr, "[ComputeEncoder::dispatch] pipeline '", pipeline.name(),
               "' was made by another driver; look it up on this device");
  cb_.add_kernel(*this, *p, args);
}

void CudaEncoder::execute(const CommandList& list) {
  cb_.add_list(*this, replayable_list<CudaCommandList>(list, cb_.queue_id()));
}

void CudaEncoder::end_encoding() { cb_.end_encoder(*this); }

// ---- Recording (Note [Recording on CUDA]) ---------------------------------------------------

CudaCommandList::~CudaCommandList() {
  DeviceGuard guard(device_->index());
  if (exec_) (void)cudaGraphExecDestroy(exec_);
  if (graph_) (void)cudaGraphDestroy(graph_);
}

CudaRecorder::CudaRecorder(std::shared_ptr<QueueCore> queue) : queue_(std::move(queue)) {
  DeviceCore& dev = queue_->device();
  DeviceGuard guard(dev.index());
  FL_CUDA_CHECK_DEV(dev, cudaStreamBeginCapture(queue_->stream(), cudaStreamCaptureModeRelaxed));
}

cudaGraph_t CudaRecorder::end_capture(cudaError_t* err) {
  cudaGraph_t graph = nullptr;
  *err = cudaSuccess;
  if (!capturing_) return nullptr;
  capturing_ = false;
  DeviceGuard guard(queue_->device().index());
  *err = cudaStreamEndCapture(queue_->stream(), &graph);
  if (*err != cudaSuccess) {
    if (graph) (void)cudaGraphDestroy(graph);
    (void)cudaGetLastError();  // not sticky: do not let the next launch report it
    return nullptr;
  }
  return graph;
}

CudaRecorder::~CudaRecorder() {
  if (finished_) return;
  cudaError_t err;
  if (cudaGraph_t g = end_capture(&err)) {
    DeviceGuard guard(queue_->device().index());
    (void)cudaGraphDestroy(g);
  }
  queue_->end_recording();
}

void CudaRecorder::dispatch(const Pipeline& pipeline, const KernelArgs& args) {
  FL_CHECK_STATE(!finished_,
                 "[CommandRecorder::dispatch] the recording has finished; start a "
                 "new one with Queue::new_recorder()");
  const auto* p = dynamic_cast<const CudaPipeline*>(&pipeline);
  FL_CHECK_ARG(p != nullptr, "[CommandRecorder::dispatch] pipeline '", pipeline.name(),
               "' was made by another driver; look it up on this device");
  DeviceCore& dev = queue_->device();
  dev.check_usable("CommandRecorder::dispatch");
  ++kernels_;
  if (error_) return;  // the recording has failed: finish() throws
  DeviceGuard guard(dev.index());
  try {
    p->fn()(args, queue_->launch_context());
  } catch (const InvalidArgument&) {
    error_ = std::current_exception();
  }
}

std::unique_ptr<CommandList> CudaRecorder::finish() {
  FL_CHECK_STATE(!finished_, "[CommandRecorder::finish] called twice; a recorder finishes once");
  finished_ = true;
  DeviceCore& dev = queue_->device();
  cudaError_t err;
  cudaGraph_t graph = end_capture(&err);
  queue_->end_recording();
  if (error_) {
    if (graph) {
      DeviceGuard guard(dev.index());
      (void)cudaGraphDestroy(graph);
    }
    std::rethrow_exception(error_);
  }
  if (!graph) dev.fail(err, "cudaStreamEndCapture(stream, &graph)", __FILE__, __LINE__);
  DeviceGuard guard(dev.index());
  cudaGraphExec_t exec = nullptr;
  const cudaError_t ie = cudaGraphInstantiate(&exec, graph, 0);
  if (ie != cudaSuccess) {
    (void)cudaGraphDestroy(graph);
    dev.fail(ie, "cudaGraphInstantiate(&exec, graph, 0)", __FILE__, __LINE__);
  }
  return std::make_unique<CudaCommandList>(queue_->device_shared(), graph, exec, queue_->id(),
                                           kernels_);
}

std::unique_ptr<CommandRecorder> CudaQueue::new_recorder() {
  core_->device().check_usable("Queue::new_recorder");
  FL_CHECK_STATE(core_->try_start_recording(), "[Queue::new_recorder] queue ", core_->id(),
                 " is already recording; finish that recording first (one at a time per queue)");
  try {
    return std::make_unique<CudaRecorder>(core_);
  } catch (...) {
    core_->end_recording();
    throw;
  }
}

void CudaQueue::set_device_share(int queues) {
  FL_CHECK_ARG(queues >= 1, "[Queue::set_device_share] queue ", core_->id(), ": ", queues,
               " queues; the hint counts the queues running at once, this one included (>= 1; 1 "
               "plans for the whole device)");
  core_->launch_context().set_device_share(queues);
}

// ---- CudaCommandBuffer ------------------------------------------------------------------

CudaCommandBuffer::CudaCommandBuffer(std::shared_ptr<QueueCore> queue, uint64_t id)
    : queue_(std::move(queue)), device_(queue_->device()), id_(id) {}

CudaCommandBuffer::~CudaCommandBuffer() {
  // finish() gives the event back; this covers a buffer whose commit failed
  // after its event was recorded.
  if (owns_completion_event_ && completion_event_) device_.sync_events().give(completion_event_);
}

void CudaCommandBuffer::violation(const char* rule, const char* call, const std::string& what) {
  device_.violation(rule, detail::str_cat("[CommandBuffer::", call, "] command buffer #", id_,
                                          " (queue ", queue_->id(), "): ", what));
}

CudaSharedEvent& CudaCommandBuffer::cuda_event(SharedEvent& event, const char* call) {
  auto* e = dynamic_cast<CudaSharedEvent*>(&event);
  FL_CHECK_ARG(e != nullptr, "[CommandBuffer::", call,
               "] the event was made by another driver; use one made by this device");
  FL_CHECK_ARG(&e->core()->device() == &device_, "[CommandBuffer::", call,
               "] the event belongs to ", e->core()->device().label(), ", not ", device_.label(),
               "; order work across devices on the host");
  return *e;
}

ComputeEncoder& CudaCommandBuffer::compute_encoder() {
  MutexLock lock(mu_);
  if (auto broken = check_new_encoder(status(), open_encoder_ != nullptr))
    violation(broken->rule, "compute_encoder", broken->message);
  encoders_.push_back(std::make_unique<CudaEncoder>(*this));
  open_encoder_ = encoders_.back().get();
  return *open_encoder_;
}

void CudaCommandBuffer::add_kernel(CudaEncoder& enc, const CudaPipeline& p,
                                   const KernelArgs& args) {
  MutexLock lock(mu_);
  if (auto broken = check_encode(status(), open_encoder_ == &enc, queue_->recording(),
                                 [&] { return detail::str_cat("kernel '", p.name(), "'"); }))
    violation(broken->rule, "dispatch", broken->message);
  device_.check_usable("ComputeEncoder::dispatch");
  ++kernels_;
  tail_signal_ = nullptr;
  // After a failed kernel the rest of the buffer is skipped, as on the CPU.
  if (error_) return;
  DeviceGuard guard(device_.index());
  try {
    p.fn()(args, queue_->launch_context());
  } catch (const InvalidArgument&) {
    // A bad argument fails the buffer (reported at completion), as on the CPU.
    error_ = std::current_exception();
  }
}

void CudaCommandBuffer::add_list(CudaEncoder& enc, const CudaCommandList& list) {
  MutexLock lock(mu_);
  if (auto broken = check_encode(status(), open_encoder_ == &enc, queue_->recording(),
                                 [] { return std::string("the replay"); }))
    violation(broken->rule, "execute", broken->message);
  device_.check_usable("ComputeEncoder::execute");
  kernels_ += list.kernel_count();
  tail_signal_ = nullptr;
  if (error_) return;
  DeviceGuard guard(device_.index());
  FL_CUDA_CHECK_DEV(device_, cudaGraphLaunch(list.exec(), queue_->stream()));
}

void CudaCommandBuffer::end_encoder(CudaEncoder& enc) {
  MutexLock lock(mu_);
  if (auto broken = check_end_encoding(open_encoder_ == &enc))
    violation(broken->rule, "end_encoding", broken->message);
  open_encoder_ = nullptr;
  enc.mark_ended();
}

void CudaCommandBuffer::encode_signal(SharedEvent& event, uint64_t value) {
  auto& ev = cuda_event(event, "encode_signal");
  MutexLock lock(mu_);
  if (auto broken = check_encode_event(status(), open_encoder_ != nullptr, queue_->recording()))
    violation(broken->rule, "encode_signal", broken->message);
  device_.check_usable("CommandBuffer::encode_signal");
  DeviceGuard guard(device_.index());
  cudaEvent_t e = device_.timing_events().take(device_);
  const cudaError_t r = cudaEventRecord(e, queue_->stream());
  if (r != cudaSuccess) {
    device_.timing_events().give(e);
    device_.fail(r, "cudaEventRecord(e, stream)", __FILE__, __LINE__);
  }
  ev.core()->add_pending(value, e);
  signals_.push_back(Signal{ev.core(), value, e});
  tail_signal_ = e;
}

void CudaCommandBuffer::encode_wait(SharedEvent& event, uint64_t value) {
  auto& ev = cuda_event(event, "encode_wait");
  MutexLock lock(mu_);
  if (auto broken = check_encode_event(status(), open_encoder_ != nullptr, queue_->recording()))
    violation(broken->rule, "encode_wait", broken->message);
  device_.check_usable("CommandBuffer::encode_wait");
  DeviceGuard guard(device_.index());
  ev.core()->encode_wait(queue_->stream(), value, id_);
  tail_signal_ = nullptr;
}

void CudaCommandBuffer::add_completed_handler(Handler handler) {
  MutexLock lock(mu_);
  if (auto broken = check_add_handler(status()))
    violation(broken->rule, "add_completed_handler", broken->message);
  handlers_.push_back(std::move(handler));
}

void CudaCommandBuffer::commit() {
  auto self = shared_from_this();
  MutexLock lock(mu_);
  // The CUDA queue captures into a graph while recording, so say what a
  // commit then would do.
  if (auto broken = check_commit(status(), open_encoder_ != nullptr, queue_->recording(),
                                 " (its completion would be recorded instead of run)"))
    violation(broken->rule, "commit", broken->message);
  device_.check_usable("CommandBuffer::commit");
  device_.begin_commit("CommandBuffer::commit");
  // Committed before it is published: the completion thread may finish it
  // (under mu_, after we release it) as soon as submit() returns.
  set_status(CommandBufferStatus::kCommitted);
  try {
    DeviceGuard guard(device_.index());
    queue_->submit(self, tail_signal_);
  } catch (...) {
    // Never reached the queue: fail it here, so a waiter does not hang.
    device_.abort_commit();
    error_ = std::current_exception();
    set_status(CommandBufferStatus::kError);
    finished_.store(true, std::memory_order_release);
    throw;
  }
  device_.committed.fetch_add(1, std::memory_order_relaxed);
}

void CudaCommandBuffer::wait_until_completed() {
  if (auto broken = check_wait(status()))
    violation(broken->rule, "wait_until_completed", broken->message);
  if (finished_.load(std::memory_order_acquire)) return;
  // A waiter spins Config::cuda_wait_spin on the finished flag before
  // sleeping: a small op's round trip is a few microseconds, a futex sleep
  // and wake-up more.
  if (spin_until([&] { return finished_.load(std::memory_order_acquire); }, device_.wait_spin()))
    return;
  MutexLock lock(mu_);
  done_cv_.wait(mu_, [&] { return finished_.load(std::memory_order_acquire); });
}

std::exception_ptr CudaCommandBuffer::error() const {
  MutexLock lock(mu_);
  return error_;
}

size_t CudaCommandBuffer::kernel_count() const {
  MutexLock lock(mu_);
  return kernels_;
}

void CudaCommandBuffer::finish(std::exception_ptr failure) {
  std::vector<Handler> handlers;
  std::vector<Signal> signals;
  std::exception_ptr error;
  size_t kernels = 0;
  {
    MutexLock lock(mu_);
    if (failure && !error_) error_ = failure;
    error = error_;
    handlers.swap(handlers_);
    signals.swap(signals_);
    kernels = kernels_;
  }
  // The signals ran (a failed kernel does not stop them, as on the CPU), so
  // work waiting for them elsewhere does not hang; a lost device ran nothing.
  if (!failure)
    for (auto& s : signals) s.event->reach(s.value, s.recorded);
  if (owns_completion_event_) device_.sync_events().give(completion_event_);
  completion_event_ = nullptr;
  set_status(error ? CommandBufferStatus::kError : CommandBufferStatus::kCompleted);
  for (auto& h : handlers) {
    try {
      h(*this);
    } catch (...) {
      device_.handler_errors.fetch_add(1, std::memory_order_relaxed);  // never kills the thread
    }
  }
  // Counted before waiters wake, so a waiter reading stats() sees it; the
  // shutdown drain that this lets through only joins this thread later.
  device_.end_commit(!error, kernels);
  finished_.store(true, std::memory_order_release);
  { MutexLock lock(mu_); }  // a waiter is either before its check or asleep
  done_cv_.notify_all();
}

}  // namespace flotilla::backend::cuda
