#include "backend/cpu/cpu_driver.h"

#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <deque>
#include <map>
#include <new>
#include <thread>
#include <variant>

#include "backend/cpu/kernels.h"
#include "backend/cpu/validation.h"
#include "backend/encode_rules.h"
#include "flotilla/common/error.h"
#include "flotilla/common/sync.h"

namespace flotilla::backend::cpu {

namespace {

using Clock = std::chrono::steady_clock;

int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now().time_since_epoch())
      .count();
}

class CpuDriver;
class QueueCore;

// ---- Shared events ---------------------------------------------------------

// The state of a shared event; commands and listeners hold it by shared_ptr,
// so an event dropped while work still refers to it stays valid.
class EventCore {
 public:
  uint64_t value() const { return fast_value_.load(std::memory_order_acquire); }

  void signal(uint64_t v) FL_EXCLUDES(mu_) {
    std::vector<std::function<void()>> ready;
    {
      MutexLock lock(mu_);
      if (v > value_) {
        value_ = v;
        // release: a reader that sees the value sees the work before it.
        fast_value_.store(v, std::memory_order_release);
      }
      times_[next_time_ % times_.size()] = {v, now_ns()};
      ++next_time_;
      auto end = listeners_.upper_bound(value_);
      for (auto it = listeners_.begin(); it != end; ++it) ready.push_back(std::move(it->second));
      listeners_.erase(listeners_.begin(), end);
    }
    cv_.notify_all();
    for (auto& fn : ready) fn();
  }

  bool wait_until(uint64_t v, Clock::time_point deadline) FL_EXCLUDES(mu_) {
    MutexLock lock(mu_);
    return cv_.wait_until(mu_, deadline, [&]() FL_REQUIRES(mu_) { return value_ >= v; });
  }

  void notify(uint64_t v, std::function<void()> fn) FL_EXCLUDES(mu_) {
    {
      MutexLock lock(mu_);
      if (value_ < v) {
        listeners_.emplace(v, std::move(fn));
        return;
      }
    }
    fn();
  }

  int64_t time_of(uint64_t v) const FL_EXCLUDES(mu_) {
    MutexLock lock(mu_);
    for (const auto& [value, t] : times_)
      if (value == v && t != 0) return t;
    throw InvalidState(detail::str_cat("[SharedEvent::signal_time_ns] value ", v,
                                       " has not been signaled (or was signaled too long ago); "
                                       "synchronize the event before asking for its time"));
  }

 private:
  mutable Mutex mu_;
  CondVar cv_;
  uint64_t value_ FL_GUARDED_BY(mu_) = 0;
  std::multimap<uint64_t, std::function<void()>> listeners_ FL_GUARDED_BY(mu_);
  std::array<std::pair<uint64_t, int64_t>, 8> times_ FL_GUARDED_BY(mu_){};
  size_t next_time_ FL_GUARDED_BY(mu_) = 0;
  std::atomic<uint64_t> fast_value_{0};
};

class CpuSharedEvent final : public SharedEvent {
 public:
  CpuSharedEvent() : core_(std::make_shared<EventCore>()) {}
  uint64_t signaled_value() const override { return core_->value(); }
  bool wait_until(uint64_t value, Clock::time_point deadline) override {
    return core_->wait_until(value, deadline);
  }
  void notify(uint64_t value, std::function<void()> listener) override {
    core_->notify(value, std::move(listener));
  }
  int64_t signal_time_ns(uint64_t value) const override { return core_->time_of(value); }
  const std::shared_ptr<EventCore>& core() const { return core_; }

 private:
  std::shared_ptr<EventCore> core_;
};

// ---- Buffers and pipelines -------------------------------------------------

class CpuBuffer final : public Buffer {
 public:
  CpuBuffer(void* p, size_t n, std::atomic<size_t>& used) : p_(p), n_(n), used_(used) {}
  ~CpuBuffer() override {
    std::free(p_);
    used_.fetch_sub(n_, std::memory_order_relaxed);
  }
  size_t size() const override { return n_; }
  void* device_ptr() const override { return p_; }
  void* host_ptr() const override { return p_; }

 private:
  void* p_;
  size_t n_;
  std::atomic<size_t>& used_;
};

class CpuPipeline final : public Pipeline {
 public:
  CpuPipeline(std::string name, KernelFn fn) : name_(std::move(name)), fn_(fn) {}
  const std::string& name() const override { return name_; }
  KernelFn fn() const { return fn_; }

 private:
  std::string name_;
  KernelFn fn_;
};

// ---- Commands --------------------------------------------------------------

struct KernelCmd {
  const CpuPipeline* pipeline;
  KernelArgs args;
};
struct SignalCmd {
  std::shared_ptr<EventCore> event;
  uint64_t value;
};
struct WaitCmd {
  std::shared_ptr<EventCore> event;
  uint64_t value;
};
using Command = std::variant<KernelCmd, SignalCmd, WaitCmd>;

class CpuCommandBuffer;

// ---- Executor: the driver's execution threads --------------------------------

class Executor {
 public:
  explicit Executor(int threads);
  ~Executor() { stop(); }
  void schedule(std::shared_ptr<QueueCore> q) FL_EXCLUDES(mu_);
  void stop() FL_EXCLUDES(mu_);
  // True while no queue is ready or running.
  bool idle() FL_EXCLUDES(mu_) {
    MutexLock lock(mu_);
    return ready_.empty() && running_ == 0;
  }
  bool is_exec_thread() const;

 private:
  void run() FL_EXCLUDES(mu_);

  Mutex mu_;
  CondVar cv_;
  std::deque<std::shared_ptr<QueueCore>> ready_ FL_GUARDED_BY(mu_);
  int running_ FL_GUARDED_BY(mu_) = 0;
  bool stopping_ FL_GUARDED_BY(mu_) = false;
  std::vector<std::thread> threads_;  // written by the constructor and stop() only
};

// ---- The driver ---------------------------------------------------------------

class CpuDriver final : public Driver {
 public:
  CpuDriver(int index, const Config& config);
  ~CpuDriver() override { shutdown(); }

  const DeviceInfo& info() const override { return info_; }
  bool encoding_thread_safe() const override { return info_.encoding_thread_safe; }
  std::unique_ptr<Queue> new_queue() override;
  std::unique_ptr<SharedEvent> new_shared_event() override {
    check_alive("Driver::new_shared_event");
    return std::make_unique<CpuSharedEvent>();
  }
  std::unique_ptr<Buffer> allocate(size_t bytes) override;
  std::unique_ptr<Buffer> allocate_host(size_t bytes) override { return allocate(bytes); }
  const Pipeline& pipeline(std::string_view name) override;
  std::vector<std::string> pipeline_names() const override;
  DriverStats stats() const override;
  std::exception_ptr device_error() const override { return nullptr; }
  void shutdown() override FL_EXCLUDES(mu_);

  void check_alive(const char* api) const {
    if (shut_down_.load(std::memory_order_acquire)) [[unlikely]]
      throw ShutDown(detail::str_cat("[", api,
                                     "] the cpu driver has been shut down; "
                                     "create a new device to run more work"));
  }
  ViolationSink& violations() { return violations_; }
  EncodingChecker& encoding_checker() { return encoding_checker_; }
  std::chrono::nanoseconds encode_cost() const { return encode_cost_; }
  Executor& executor() { return executor_; }
  uint64_t next_buffer_id() { return next_cb_id_.fetch_add(1, std::memory_order_relaxed); }

  // Committed-but-unfinished command buffers, for draining at shutdown.
  // on_committed() throws ShutDown once the drain is done.
  void on_committed() FL_EXCLUDES(mu_);
  void on_finished(bool ok) FL_EXCLUDES(mu_);
  void count_kernel() { kernels_.fetch_add(1, std::memory_order_relaxed); }
  void count_handler_error() { handler_errors_.fetch_add(1, std::memory_order_relaxed); }
  void register_queue(const std::shared_ptr<QueueCore>& q) FL_EXCLUDES(mu_);

 private:
  DeviceInfo info_;
  std::chrono::nanoseconds encode_cost_;
  size_t memory_limit_;
  ViolationSink violations_;
  EncodingChecker encoding_checker_;
  std::map<std::string, std::unique_ptr<CpuPipeline>, std::less<>> pipelines_;  // const after ctor

  Mutex mu_;
  CondVar drained_;
  uint64_t in_flight_ FL_GUARDED_BY(mu_) = 0;
  std::vector<std::weak_ptr<QueueCore>> queues_ FL_GUARDED_BY(mu_);
  bool shutting_down_ FL_GUARDED_BY(mu_) = false;
  bool accepting_commits_ FL_GUARDED_BY(mu_) = true;  // false once the drain is done

  // acquire/release: set once by shutdown(); readers then see the drain done.
  std::atomic<bool> shut_down_{false};
  // Relaxed: statistics and id generators only.
  std::atomic<uint64_t> next_cb_id_{1};
  std::atomic<uint64_t> next_queue_id_{1};
  std::atomic<uint64_t> committed_{0}, completed_{0}, kernels_{0}, handler_errors_{0};
  std::atomic<size_t> memory_used_{0};

  Executor executor_;  // last: its threads stop first
};

// ---- Queues --------------------------------------------------------------------

// A queue's state, shared by its handle, its command buffers, the executor and
// event listeners (by weak_ptr), so nothing outlives what it points to.
class QueueCore : public std::enable_shared_from_this<QueueCore> {
 public:
  QueueCore(CpuDriver& driver, int id) : driver_(driver), id_(id) {}
  int id() const { return id_; }
  CpuDriver& driver() { return driver_; }

  void enqueue(std::shared_ptr<CpuCommandBuffer> cb) FL_EXCLUDES(mu_);
  // Runs the front command buffer to completion, or until it blocks on an
  // event wait. Called by one executor thread at a time (the strand rule).
  void run() FL_EXCLUDES(mu_);
  // Fails the event waits this queue is blocked on (shutdown with no signaler).
  void abandon_waits() FL_EXCLUDES(mu_);
  // A recorder is open on this queue (one at a time; see driver.h). Read by
  // encoding calls, which report encode-while-recording.
  bool try_start_recording() { return !recording_.exchange(true, std::memory_order_acq_rel); }
  void end_recording() { recording_.store(false, std::memory_order_release); }
  bool recording() const { return recording_.load(std::memory_order_acquire); }
  // Called by an event listener when the value a blocked wait needs arrived.
  void wake() FL_EXCLUDES(mu_);

 private:
  CpuDriver& driver_;
  const int id_;
  Mutex mu_;
  std::deque<std::shared_ptr<CpuCommandBuffer>> pending_ FL_GUARDED_BY(mu_);
  bool active_ FL_GUARDED_BY(mu_) = false;  // scheduled or running
  // Note [Queue wake protocol]: a queue blocked on an event wait is in no
  // ready list. Only the code that flips blocked_ from true to false under
  // mu_ may schedule it again, so a queue is never run by two threads at once;
  // a wake that arrives while the queue is still running is kept in
  // wake_pending_ and turned into a reschedule when the run blocks.
  bool blocked_ FL_GUARDED_BY(mu_) = false;
  bool wake_pending_ FL_GUARDED_BY(mu_) = false;
  bool abandon_ FL_GUARDED_BY(mu_) = false;
  std::atomic<bool> recording_{false};  // acquire/release: see recording()
};

class CpuQueue final : public Queue {
 public:
  explicit CpuQueue(std::shared_ptr<QueueCore> core) : core_(std::move(core)) {}
  std::shared_ptr<CommandBuffer> new_command_buffer() override;
  std::unique_ptr<CommandRecorder> new_recorder() override;
  int id() const override { return core_->id(); }

 private:
  std::shared_ptr<QueueCore> core_;
};

// ---- Recordings --------------------------------------------------------------------

// A recorded list: the kernels, replayed by copying them into the replaying
// command buffer (so the list may be destroyed while replays are in flight).
class CpuCommandList final : public CommandList {
 public:
  CpuCommandList(std::vector<KernelCmd> kernels, int queue_id)
      : kernels_(std::move(kernels)), queue_id_(queue_id) {}
  size_t kernel_count() const override { return kernels_.size(); }
  int queue_id() const override { return queue_id_; }
  const std::vector<KernelCmd>& kernels() const { return kernels_; }

 private:
  const std::vector<KernelCmd> kernels_;
  const int queue_id_;
};

// Kernel arguments are checked when a replay runs them, as for any command
// buffer: a bad one fails the replaying buffer, not the recording.
class CpuRecorder final : public CommandRecorder {
 public:
  explicit CpuRecorder(std::shared_ptr<QueueCore> queue);
  ~CpuRecorder() override {
    if (!finished_) queue_->end_recording();
  }
  void dispatch(const Pipeline& pipeline, const KernelArgs& args) override;
  std::unique_ptr<CommandList> finish() override;

 private:
  std::shared_ptr<QueueCore> queue_;
  const uint64_t id_;
  ObjectUseChecker checker_;
  std::vector<KernelCmd> kernels_;  // single-threaded object: the checker reports misuse
  bool finished_ = false;
};

// ---- Command buffers and encoders ----------------------------------------------

class CpuEncoder final : public ComputeEncoder {
 public:
  CpuEncoder(CpuCommandBuffer& cb, uint64_t id) : cb_(cb), id_(id) {}
  void dispatch(const Pipeline& pipeline, const KernelArgs& args) override;
  void execute(const CommandList& list) override;
  void end_encoding() override;
  bool is_encoding() const override { return encoding_.load(std::memory_order_acquire); }
  void mark_ended() { encoding_.store(false, std::memory_order_release); }

 private:
  CpuCommandBuffer& cb_;
  const uint64_t id_;
  ObjectUseChecker checker_;
  std::atomic<bool> encoding_{true};
};

class CpuCommandBuffer final : public CommandBuffer,
                               public std::enable_shared_from_this<CpuCommandBuffer> {
 public:
  CpuCommandBuffer(std::shared_ptr<QueueCore> queue, uint64_t id)
      : queue_(std::move(queue)), driver_(queue_->driver()), id_(id) {}

  ComputeEncoder& compute_encoder() override FL_EXCLUDES(mu_);
  void encode_signal(SharedEvent& event, uint64_t value) override {
    encode_event("encode_signal", event, value, true);
  }
  void encode_wait(SharedEvent& event, uint64_t value) override {
    encode_event("encode_wait", event, value, false);
  }
  void add_completed_handler(Handler handler) override FL_EXCLUDES(mu_);
  void commit() override FL_EXCLUDES(mu_);
  void wait_until_completed() override FL_EXCLUDES(mu_);
  CommandBufferStatus status() const override {
    return static_cast<CommandBufferStatus>(status_.load(std::memory_order_acquire));
  }
  std::exception_ptr error() const override FL_EXCLUDES(mu_) {
    MutexLock lock(mu_);
    return error_;
  }
  size_t kernel_count() const override FL_EXCLUDES(mu_) {
    MutexLock lock(mu_);
    return kernels_;
  }

  // Encoder side.
  void add_kernel(CpuEncoder& enc, const CpuPipeline& p, const KernelArgs& args) FL_EXCLUDES(mu_);
  void add_list(CpuEncoder& enc, const CpuCommandList& list) FL_EXCLUDES(mu_);
  void end_encoder(CpuEncoder& enc) FL_EXCLUDES(mu_);
  int queue_id() const { return queue_->id(); }

  // Executor side: the strand rule makes these single-threaded.
  // Runs commands from pc_; returns false if blocked on a wait (a listener
  // will reschedule the queue).
  bool execute(const std::shared_ptr<QueueCore>& queue, bool abandon_waits);
  void finish();

  uint64_t id() const { return id_; }
  CpuDriver& driver() { return driver_; }

 private:
  void encode_event(const char* call, SharedEvent& event, uint64_t value, bool signal)
      FL_EXCLUDES(mu_);
  [[noreturn]] void violation(const char* rule, const char* call, const std::string& what);
  void set_status(CommandBufferStatus s) {
    status_.store(static_cast<int>(s), std::memory_order_release);
  }

  std::shared_ptr<QueueCore> queue_;
  CpuDriver& driver_;
  const uint64_t id_;
  ObjectUseChecker checker_;

  mutable Mutex mu_;  // guards the encoding state below against racing misuse
  CondVar done_cv_;
  std::vector<Command> commands_ FL_GUARDED_BY(mu_);
  std::vector<Handler> handlers_ FL_GUARDED_BY(mu_);
  std::vector<std::unique_ptr<CpuEncoder>> encoders_ FL_GUARDED_BY(mu_);
  CpuEncoder* open_encoder_ FL_GUARDED_BY(mu_) = nullptr;
  size_t kernels_ FL_GUARDED_BY(mu_) = 0;
  std::exception_ptr error_ FL_GUARDED_BY(mu_);
  bool finished_ FL_GUARDED_BY(mu_) = false;
  // acquire/release: status is read without the lock by status() and the
  // state machine's fast paths; writes happen under mu_ or on the executor.
  std::atomic<int> status_{static_cast<int>(CommandBufferStatus::kNotEnqueued)};

  // Executor-only state (strand rule): the program counter and run flags.
  size_t pc_ = 0;
  bool started_ = false;
  std::exception_ptr run_error_;
};

// ---- Executor ---------------------------------------------------------------------

thread_local const Executor* tls_executor = nullptr;

Executor::Executor(int threads) {
  threads_.reserve(static_cast<size_t>(threads));
  for (int i = 0; i < threads; ++i) threads_.emplace_back([this] { run(); });
}

bool Executor::is_exec_thread() const { return tls_executor == this; }

void Executor::schedule(std::shared_ptr<QueueCore> q) {
  {
    MutexLock lock(mu_);
    ready_.push_back(std::move(q));
  }
  cv_.notify_one();
}

void Executor::stop() {
  {
    MutexLock lock(mu_);
    if (stopping_) return;
    stopping_ = true;
  }
  cv_.notify_all();
  for (auto& t : threads_)
    if (t.joinable()) t.join();
}

void Executor::run() {
  tls_executor = this;
  for (;;) {
    std::shared_ptr<QueueCore> q;
    {
      MutexLock lock(mu_);
      cv_.wait(mu_, [&]() FL_REQUIRES(mu_) { return stopping_ || !ready_.empty(); });
      if (ready_.empty()) return;  // stopping, and nothing left to run
      q = std::move(ready_.front());
      ready_.pop_front();
      ++running_;
    }
    q->run();
    q.reset();
    MutexLock lock(mu_);
    --running_;
  }
}

// ---- QueueCore ----------------------------------------------------------------------

void QueueCore::enqueue(std::shared_ptr<CpuCommandBuffer> cb) {
  bool schedule = false;
  {
    MutexLock lock(mu_);
    pending_.push_back(std::move(cb));
    if (!active_) active_ = schedule = true;
  }
  if (schedule) driver_.executor().schedule(shared_from_this());
}

void QueueCore::abandon_waits() {
  bool schedule = false;
  {
    MutexLock lock(mu_);
    abandon_ = true;
    if (blocked_) {
      blocked_ = false;
      schedule = true;
    }
  }
  if (schedule) driver_.executor().schedule(shared_from_this());
}

void QueueCore::wake() {
  bool schedule = false;
  {
    MutexLock lock(mu_);
    if (blocked_) {
      blocked_ = false;
      schedule = true;
    } else {
      wake_pending_ = true;
    }
  }
  if (schedule) driver_.executor().schedule(shared_from_this());
}

void QueueCore::run() {
  std::shared_ptr<CpuCommandBuffer> cb;
  bool abandon = false;
  {
    MutexLock lock(mu_);
    wake_pending_ = false;
    if (pending_.empty()) {
      active_ = false;
      return;
    }
    cb = pending_.front();
    abandon = abandon_;
  }
  if (!cb->execute(shared_from_this(), abandon)) {
    // Blocked on a wait (Note [Queue wake protocol]).
    bool again = false;
    {
      MutexLock lock(mu_);
      if (wake_pending_ || abandon_) {
        wake_pending_ = false;
        again = true;
      } else {
        blocked_ = true;
      }
    }
    if (again) driver_.executor().schedule(shared_from_this());
    return;
  }
  cb->finish();
  bool more = false;
  {
    MutexLock lock(mu_);
    pending_.pop_front();
    more = !pending_.empty();
    if (!more) active_ = false;
  }
  // One command buffer per turn, then to the back of the line: fairness
  // between queues on few threads.
  if (more) driver_.executor().schedule(shared_from_this());
}

std::shared_ptr<CommandBuffer> CpuQueue::new_command_buffer() {
  core_->driver().check_alive("Queue::new_command_buffer");
  return std::make_shared<CpuCommandBuffer>(core_, core_->driver().next_buffer_id());
}

// ---- CpuCommandBuffer -----------------------------------------------------------------

void CpuCommandBuffer::violation(const char* rule, const char* call, const std::string& what) {
  driver_.violations().raise(rule, detail::str_cat("[CommandBuffer::", call, "] command buffer #",
                                                   id_, " (queue ", queue_->id(), "): ", what));
}

ComputeEncoder& CpuCommandBuffer::compute_encoder() {
  ObjectUseChecker::Scope use(checker_, driver_.violations(), "CommandBuffer", id_,
                              "compute_encoder");
  EncodingChecker::Scope enc(driver_.encoding_checker(), driver_.violations(), "compute_encoder");
  simulate_cost(driver_.encode_cost());
  MutexLock lock(mu_);
  if (auto broken = check_new_encoder(status(), open_encoder_ != nullptr))
    violation(broken->rule, "compute_encoder", broken->message);
  encoders_.push_back(std::make_unique<CpuEncoder>(*this, encoders_.size() + 1));
  open_encoder_ = encoders_.back().get();
  return *open_encoder_;
}

void CpuCommandBuffer::add_kernel(CpuEncoder& enc, const CpuPipeline& p, const KernelArgs& args) {
  MutexLock lock(mu_);
  if (auto broken = check_encode(status(), open_encoder_ == &enc, queue_->recording(),
                                 [&] { return detail::str_cat("kernel '", p.name(), "'"); }))
    violation(broken->rule, "dispatch", broken->message);
  commands_.emplace_back(KernelCmd{&p, args});
  ++kernels_;
}

void CpuCommandBuffer::add_list(CpuEncoder& enc, const CpuCommandList& list) {
  MutexLock lock(mu_);
  if (auto broken = check_encode(status(), open_encoder_ == &enc, queue_->recording(),
                                 [] { return std::string("the replay"); }))
    violation(broken->rule, "execute", broken->message);
  for (const KernelCmd& k : list.kernels()) commands_.emplace_back(k);
  kernels_ += list.kernel_count();
}

void CpuCommandBuffer::end_encoder(CpuEncoder& enc) {
  MutexLock lock(mu_);
  if (auto broken = check_end_encoding(open_encoder_ == &enc))
    violation(broken->rule, "end_encoding", broken->message);
  open_encoder_ = nullptr;
  enc.mark_ended();
}

void CpuCommandBuffer::encode_event(const char* call, SharedEvent& event, uint64_t value,
                                    bool signal) {
  ObjectUseChecker::Scope use(checker_, driver_.violations(), "CommandBuffer", id_, call);
  EncodingChecker::Scope enc(driver_.encoding_checker(), driver_.violations(), call);
  auto* cpu_event = dynamic_cast<CpuSharedEvent*>(&event);
  FL_CHECK_ARG(cpu_event != nullptr, "[CommandBuffer::", call,
               "] the event was made by another driver; use one made by this device");
  MutexLock lock(mu_);
  if (auto broken = check_encode_event(status(), open_encoder_ != nullptr, queue_->recording()))
    violation(broken->rule, call, broken->message);
  if (signal)
    commands_.emplace_back(SignalCmd{cpu_event->core(), value});
  else
    commands_.emplace_back(WaitCmd{cpu_event->core(), value});
}

void CpuCommandBuffer::add_completed_handler(Handler handler) {
  ObjectUseChecker::Scope use(checker_, driver_.violations(), "CommandBuffer", id_,
                              "add_completed_handler");
  MutexLock lock(mu_);
  if (auto broken = check_add_handler(status()))
    violation(broken->rule, "add_completed_handler", broken->message);
  handlers_.push_back(std::move(handler));
}

void CpuCommandBuffer::commit() {
  ObjectUseChecker::Scope use(checker_, driver_.violations(), "CommandBuffer", id_, "commit");
  driver_.check_alive("CommandBuffer::commit");
  {
    MutexLock lock(mu_);
    if (auto broken = check_commit(status(), open_encoder_ != nullptr, queue_->recording()))
      violation(broken->rule, "commit", broken->message);
    // Counted in flight before it is committed: a driver that finished
    // draining refuses it here (ShutDown), leaving the buffer not enqueued.
    driver_.on_committed();
    set_status(CommandBufferStatus::kCommitted);
  }
  queue_->enqueue(shared_from_this());
}

void CpuCommandBuffer::wait_until_completed() {
  if (auto broken = check_wait(status()))
    violation(broken->rule, "wait_until_completed", broken->message);
  MutexLock lock(mu_);
  done_cv_.wait(mu_, [&]() FL_REQUIRES(mu_) { return finished_; });
}

bool CpuCommandBuffer::execute(const std::shared_ptr<QueueCore>& queue, bool abandon_waits) {
  if (!started_) {
    started_ = true;
    set_status(CommandBufferStatus::kScheduled);
  }
  // After commit no one appends (add_kernel checks the status under mu_), so
  // the executor reads commands_ under the lock once per command only to keep
  // the analysis simple; it is uncontended.
  for (;;) {
    Command* cmd = nullptr;
    {
      MutexLock lock(mu_);
      if (pc_ >= commands_.size()) break;
      cmd = &commands_[pc_];
    }
    if (auto* k = std::get_if<KernelCmd>(cmd)) {
      // After a failure the rest of the kernels are skipped, but signals still
      // run, so work on other queues waiting for them does not hang.
      if (!run_error_) {
        try {
          k->pipeline->fn()(k->args);
          driver_.count_kernel();
        } catch (...) {
          run_error_ = std::current_exception();
        }
      }
    } else if (auto* s = std::get_if<SignalCmd>(cmd)) {
      s->event->signal(s->value);
    } else if (auto* w = std::get_if<WaitCmd>(cmd)) {
      if (w->event->value() < w->value) {
        if (abandon_waits) {
          if (!run_error_)
            run_error_ = std::make_exception_ptr(ShutDown(
                detail::str_cat("[CommandBuffer] command buffer #", id_, " waited for event value ",
                                w->value, " that was never signaled before shutdown")));
        } else {
          // Suspend: the listener reschedules the queue. We hold no thread.
          std::weak_ptr<QueueCore> weak = queue;
          w->event->notify(w->value, [weak] {
            if (auto q = weak.lock()) q->wake();
          });
          return false;
        }
      }
    }
    ++pc_;
  }
  return true;
}

void CpuCommandBuffer::finish() {
  std::vector<Handler> handlers;
  {
    MutexLock lock(mu_);
    error_ = run_error_;
    handlers.swap(handlers_);
  }
  set_status(run_error_ ? CommandBufferStatus::kError : CommandBufferStatus::kCompleted);
  for (auto& h : handlers) {
    try {
      h(*this);
    } catch (...) {
      driver_.count_handler_error();  // a throwing handler never kills the thread
    }
  }
  {
    MutexLock lock(mu_);
    finished_ = true;
  }
  done_cv_.notify_all();
  driver_.on_finished(!run_error_);
}

// ---- CpuEncoder ----------------------------------------------------------------------

void CpuEncoder::dispatch(const Pipeline& pipeline, const KernelArgs& args) {
  ObjectUseChecker::Scope use(checker_, cb_.driver().violations(), "ComputeEncoder", id_,
                              "dispatch");
  EncodingChecker::Scope enc(cb_.driver().encoding_checker(), cb_.driver().violations(),
                             "dispatch");
  simulate_cost(cb_.driver().encode_cost());
  const auto* p = dynamic_cast<const CpuPipeline*>(&pipeline);
  FL_CHECK_ARG(p != nullptr, "[ComputeEncoder::dispatch] pipeline '", pipeline.name(),
               "' was made by another driver; look it up on this device");
  cb_.add_kernel(*this, *p, args);
}

void CpuEncoder::execute(const CommandList& list) {
  ObjectUseChecker::Scope use(checker_, cb_.driver().violations(), "ComputeEncoder", id_,
                              "execute");
  EncodingChecker::Scope enc(cb_.driver().encoding_checker(), cb_.driver().violations(), "execute");
  simulate_cost(cb_.driver().encode_cost());
  cb_.add_list(*this, replayable_list<CpuCommandList>(list, cb_.queue_id()));
}

// ---- CpuRecorder ----------------------------------------------------------------------

CpuRecorder::CpuRecorder(std::shared_ptr<QueueCore> queue)
    : queue_(std::move(queue)), id_(queue_->driver().next_buffer_id()) {}

void CpuRecorder::dispatch(const Pipeline& pipeline, const KernelArgs& args) {
  CpuDriver& driver = queue_->driver();
  ObjectUseChecker::Scope use(checker_, driver.violations(), "CommandRecorder", id_, "dispatch");
  EncodingChecker::Scope enc(driver.encoding_checker(), driver.violations(), "dispatch");
  simulate_cost(driver.encode_cost());
  FL_CHECK_STATE(!finished_,
                 "[CommandRecorder::dispatch] the recording has finished; start a "
                 "new one with Queue::new_recorder()");
  const auto* p = dynamic_cast<const CpuPipeline*>(&pipeline);
  FL_CHECK_ARG(p != nullptr, "[CommandRecorder::dispatch] pipeline '", pipeline.name(),
               "' was made by another driver; look it up on this device");
  kernels_.push_back(KernelCmd{p, args});
}

std::unique_ptr<CommandList> CpuRecorder::finish() {
  ObjectUseChecker::Scope use(checker_, queue_->driver().violations(), "CommandRecorder", id_,
                              "finish");
  FL_CHECK_STATE(!finished_, "[CommandRecorder::finish] called twice; a recorder finishes once");
  finished_ = true;
  queue_->end_recording();
  return std::make_unique<CpuCommandList>(std::move(kernels_), queue_->id());
}

std::unique_ptr<CommandRecorder> CpuQueue::new_recorder() {
  core_->driver().check_alive("Queue::new_recorder");
  FL_CHECK_STATE(core_->try_start_recording(), "[Queue::new_recorder] queue ", core_->id(),
                 " is already recording; finish that recording first (one at a time per queue)");
  try {
    return std::make_unique<CpuRecorder>(core_);
  } catch (...) {
    core_->end_recording();
    throw;
  }
}

void CpuEncoder::end_encoding() {
  ObjectUseChecker::Scope use(checker_, cb_.driver().violations(), "ComputeEncoder", id_,
                              "end_encoding");
  EncodingChecker::Scope enc(cb_.driver().encoding_checker(), cb_.driver().violations(),
                             "end_encoding");
  cb_.end_encoder(*this);
}

// ---- CpuDriver ---------------------------------------------------------------------------

size_t physical_memory() {
  long pages = sysconf(_SC_PHYS_PAGES);
  long page = sysconf(_SC_PAGE_SIZE);
  return pages > 0 && page > 0 ? static_cast<size_t>(pages) * static_cast<size_t>(page) : 0;
}

int exec_threads(const Config& c) {
  if (c.cpu_exec_threads > 0) return c.cpu_exec_threads;
  return std::max(2, static_cast<int>(std::thread::hardware_concurrency()));
}

CpuDriver::CpuDriver(int index, const Config& config)
    : encode_cost_(config.cpu_encode_cost),
      memory_limit_(config.cpu_memory_limit ? config.cpu_memory_limit : physical_memory()),
      encoding_checker_(config.cpu_agx_model),
      executor_(exec_threads(config)) {
  info_.backend = "cpu";
  info_.index = index;
  info_.name = config.cpu_agx_model ? "cpu (strict, AGX encoding model)" : "cpu (strict)";
  info_.memory_bytes = memory_limit_;
  info_.compute_units = exec_threads(config);
  info_.encoding_thread_safe = !config.cpu_agx_model;
  for (const auto& [name, fn] : kernel_table())
    pipelines_.emplace(name, std::make_unique<CpuPipeline>(name, fn));
}

std::unique_ptr<Queue> CpuDriver::new_queue() {
  check_alive("Driver::new_queue");
  auto core = std::make_shared<QueueCore>(
      *this, static_cast<int>(next_queue_id_.fetch_add(1, std::memory_order_relaxed)));
  register_queue(core);
  return std::make_unique<CpuQueue>(std::move(core));
}

void CpuDriver::register_queue(const std::shared_ptr<QueueCore>& q) {
  MutexLock lock(mu_);
  queues_.push_back(q);
}

std::unique_ptr<Buffer> CpuDriver::allocate(size_t bytes) {
  check_alive("Driver::allocate");
  FL_CHECK_ARG(bytes > 0, "[Driver::allocate] asked for 0 bytes; ask for at least 1");
  const size_t rounded = (bytes + 63) / 64 * 64;
  size_t used = memory_used_.fetch_add(rounded, std::memory_order_relaxed);
  if (used + rounded > memory_limit_) {
    memory_used_.fetch_sub(rounded, std::memory_order_relaxed);
    throw OutOfMemory(detail::str_cat("[Driver::allocate] cpu device ", info_.index, ": asked for ",
                                      bytes, " bytes with ", memory_limit_ - used, " of ",
                                      memory_limit_,
                                      " free; free tensors or raise cpu_memory_limit"));
  }
  void* p = std::aligned_alloc(64, rounded);
  if (!p) {
    memory_used_.fetch_sub(rounded, std::memory_order_relaxed);
    throw OutOfMemory(detail::str_cat("[Driver::allocate] the host refused ", bytes, " bytes"));
  }
  return std::make_unique<CpuBuffer>(p, rounded, memory_used_);
}

const Pipeline& CpuDriver::pipeline(std::string_view name) {
  auto it = pipelines_.find(name);
  if (it == pipelines_.end()) {
    std::string known;
    for (const auto& [n, p] : pipelines_) known += (known.empty() ? "" : ", ") + n;
    throw InvalidArgument(detail::str_cat("[Driver::pipeline] the cpu driver has no kernel '", name,
                                          "'; it has: ", known));
  }
  return *it->second;
}

std::vector<std::string> CpuDriver::pipeline_names() const {
  std::vector<std::string> out;
  for (const auto& [n, p] : pipelines_) out.push_back(n);
  return out;
}

DriverStats CpuDriver::stats() const {
  DriverStats s;
  s.command_buffers_committed = committed_.load(std::memory_order_relaxed);
  s.command_buffers_completed = completed_.load(std::memory_order_relaxed);
  s.kernels_executed = kernels_.load(std::memory_order_relaxed);
  s.violations = violations_.count();
  s.handler_errors = handler_errors_.load(std::memory_order_relaxed);
  return s;
}

void CpuDriver::on_committed() {
  MutexLock lock(mu_);
  if (!accepting_commits_)
    throw ShutDown(
        "[CommandBuffer::commit] the cpu driver has been shut down; "
        "create a new device to run more work");
  ++in_flight_;
  committed_.fetch_add(1, std::memory_order_relaxed);
}

void CpuDriver::on_finished(bool) {
  completed_.fetch_add(1, std::memory_order_relaxed);
  {
    MutexLock lock(mu_);
    --in_flight_;
  }
  drained_.notify_all();
}

void CpuDriver::shutdown() {
  {
    MutexLock lock(mu_);
    if (shutting_down_) return;
    shutting_down_ = true;
  }
  if (executor_.is_exec_thread()) {
    // Called from a completion handler: we cannot wait for ourselves. Refuse
    // new work; the threads are joined when the driver is destroyed.
    shut_down_.store(true, std::memory_order_release);
    return;
  }
  // Drain: wait for committed work. If the executor stays idle with work still
  // in flight, that work waits for events nobody will signal: fail those waits.
  int idle_rounds = 0;
  for (;;) {
    std::vector<std::shared_ptr<QueueCore>> queues;
    {
      MutexLock lock(mu_);
      if (drained_.wait_for(mu_, std::chrono::milliseconds(20),
                            [&]() FL_REQUIRES(mu_) { return in_flight_ == 0; })) {
        // Still under mu_: a commit that passed check_alive() cannot slip in
        // between this drain and stopping the execution threads.
        accepting_commits_ = false;
        break;
      }
      idle_rounds = executor_.idle() ? idle_rounds + 1 : 0;
      if (idle_rounds < 3) continue;
      for (auto& w : queues_)
        if (auto q = w.lock()) queues.push_back(std::move(q));
    }
    for (auto& q : queues) q->abandon_waits();
  }
  shut_down_.store(true, std::memory_order_release);
  executor_.stop();
}

}  // namespace

std::unique_ptr<Driver> make_cpu_driver(int index, const Config& config) {
  FL_CHECK_ARG(index == 0, "[Device] the cpu backend has one device (index 0), not index ", index);
  return std::make_unique<CpuDriver>(index, config);
}

int cpu_device_count() { return 1; }

}  // namespace flotilla::backend::cpu
