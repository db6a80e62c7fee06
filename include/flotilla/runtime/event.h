// Event: a marker in a stream's work (the seed's events, with the
// use-after-free fixed).
//
// Events come from a per-device pool of driver shared events. record(s)
// places the marker at the end of s's work (and commits s, so the marker
// will be reached); wait(s) makes s wait on the device, without blocking the
// host, until the marker is reached; synchronize() blocks the host; query()
// does not; elapsed_ms() measures between two recorded events.
//
// Callbacks (then()) run on a driver thread once the marker is reached. A
// callback owns what it touches: it keeps the event's state alive, so
// dropping the Event with callbacks pending is safe. A callback that throws
// never kills its thread: the first error is kept and rethrown by the next
// synchronize() on this event.
//
// Thread safety: an Event is a shared handle (copies refer to one marker);
// all members may be called from any thread. Lifetime: not past its Device.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>

namespace flotilla {

class Device;
class Stream;
namespace detail {
class EventState;
}

class Event {
 public:
  explicit Event(Device& device);
  ~Event();
  Event(const Event&) = default;
  Event& operator=(const Event&) = default;
  Event(Event&&) noexcept = default;
  Event& operator=(Event&&) noexcept = default;

  // Marks the end of the work encoded on `stream` so far; commits `stream`.
  void record(const Stream& stream);
  // Makes `stream` wait (on the device) until the last record() is reached.
  // Waiting on a never-recorded event does nothing, as in CUDA.
  void wait(const Stream& stream) const;
  // True once the last record() is reached (or if never recorded).
  bool query() const;
  // Blocks until reached and every callback registered so far has run;
  // rethrows the first callback error, once.
  void synchronize() const;
  // As synchronize(), with a limit; false if it ran out.
  bool synchronize_for(std::chrono::milliseconds timeout) const;
  // Milliseconds of device time from this event to `end`; both must have
  // been recorded and reached.
  double elapsed_ms(const Event& end) const;
  // Runs `fn` on a driver thread once the last record() is reached (at once,
  // on this thread, if it already is). Needs a record() first.
  void then(std::function<void()> fn);

  uint64_t recorded_value() const;

 private:
  std::shared_ptr<detail::EventState> state_;
};

}  // namespace flotilla
