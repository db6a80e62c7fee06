// The rules every driver's command buffer checks (DESIGN.md §3; the CPU
// driver's rule names and messages), written once so the drivers cannot drift
// apart: a driver calls the check for its entry point under its buffer's lock
// (wait_until_completed() reads only the atomic status, as before) and raises
// what it returns through its own violation(), which adds the call and the
// buffer. Each check returns the first broken rule in the order the drivers
// have always checked them, and builds a message only when one is broken, so
// a commit that breaks nothing allocates nothing. Internal to the backends.
#pragma once

#include <optional>
#include <string>

#include "flotilla/backend/driver.h"
#include "flotilla/common/error.h"

namespace flotilla::backend {

struct RuleBreak {
  const char* rule;
  std::string message;
};

// `what()` names what is being encoded ("kernel 'add_f32'", "the replay");
// called only when a rule is broken, so the check costs no allocation.
template <typename What>
std::optional<RuleBreak> check_encode(CommandBufferStatus status, bool encoder_open,
                                      bool queue_recording, What&& what) {
  if (status != CommandBufferStatus::kNotEnqueued)
    return RuleBreak{"encode-after-commit",
                     detail::str_cat("is ", to_string(status), "; ", what(),
                                     " would be lost: encode into a new command buffer")};
  if (!encoder_open)
    return RuleBreak{"encoder-ended",
                     detail::str_cat("the encoder used for ", what(),
                                     " has ended; open a new one with compute_encoder()")};
  if (queue_recording)
    return RuleBreak{
        "encode-while-recording",
        detail::str_cat(what(),
                        " was encoded while a recorder is open on the queue; finish "
                        "the recording first (nothing else may use a recording queue)")};
  return std::nullopt;
}

// compute_encoder(): a new encoder needs an uncommitted buffer with no other
// encoder still encoding.
inline std::optional<RuleBreak> check_new_encoder(CommandBufferStatus status, bool encoder_open) {
  if (status != CommandBufferStatus::kNotEnqueued)
    return RuleBreak{"encode-after-commit",
                     detail::str_cat("is ", to_string(status),
                                     "; encode into a new command buffer from the queue")};
  if (encoder_open)
    return RuleBreak{"encoder-already-open",
                     "a compute encoder is still encoding; call end_encoding() on it first (one "
                     "encoder at a time per command buffer)"};
  return std::nullopt;
}

// encode_signal() / encode_wait(): an event command goes between encoders,
// never into a committed buffer or a recording queue.
inline std::optional<RuleBreak> check_encode_event(CommandBufferStatus status, bool encoder_open,
                                                   bool queue_recording) {
  if (status != CommandBufferStatus::kNotEnqueued)
    return RuleBreak{"encode-after-commit", detail::str_cat("is ", to_string(status))};
  if (encoder_open)
    return RuleBreak{"encoder-already-open",
                     "a compute encoder is still encoding; end it before encoding an event"};
  if (queue_recording)
    return RuleBreak{"encode-while-recording",
                     "an event command was encoded while a recorder is open on the queue; finish "
                     "the recording first"};
  return std::nullopt;
}

// end_encoding(): `encoder_open` says whether this encoder is the open one.
inline std::optional<RuleBreak> check_end_encoding(bool encoder_open) {
  if (!encoder_open) return RuleBreak{"encoder-ended", "the encoder has already ended"};
  return std::nullopt;
}

// add_completed_handler(): a handler added after commit might never run.
inline std::optional<RuleBreak> check_add_handler(CommandBufferStatus status) {
  if (status != CommandBufferStatus::kNotEnqueued)
    return RuleBreak{
        "handler-after-commit",
        detail::str_cat("is ", to_string(status), "; add completion handlers before commit()")};
  return std::nullopt;
}

// commit(). `recording_note` is put after "open on the queue" in the
// encode-while-recording message, for a driver that can say what committing
// then would do (" (its completion would be recorded instead of run)"); the
// drivers keep their own wording that way.
inline std::optional<RuleBreak> check_commit(CommandBufferStatus status, bool encoder_open,
                                             bool queue_recording,
                                             const char* recording_note = "") {
  if (status != CommandBufferStatus::kNotEnqueued)
    return RuleBreak{"commit-twice",
                     detail::str_cat("was already committed (now ", to_string(status),
                                     "); commit a command buffer once, then make a new one")};
  if (encoder_open)
    return RuleBreak{"commit-with-open-encoder",
                     "a compute encoder is still encoding; call end_encoding() before commit()"};
  if (queue_recording)
    return RuleBreak{"encode-while-recording",
                     detail::str_cat("committed while a recorder is open on the queue",
                                     recording_note, "; finish the recording first")};
  return std::nullopt;
}

// wait_until_completed(): a buffer never committed would never complete.
inline std::optional<RuleBreak> check_wait(CommandBufferStatus status) {
  if (status == CommandBufferStatus::kNotEnqueued)
    return RuleBreak{"wait-not-committed",
                     "was never committed, so it would never complete; commit() it first"};
  return std::nullopt;
}

// `list` as this driver's list type L, checked to be recorded on the
// replaying encoder's queue `queue_id`; else InvalidArgument.
template <typename L>
const L& replayable_list(const CommandList& list, int queue_id) {
  const auto* l = dynamic_cast<const L*>(&list);
  FL_CHECK_ARG(l != nullptr,
               "[ComputeEncoder::execute] the command list was made by another driver; record it "
               "on this device");
  FL_CHECK_ARG(l->queue_id() == queue_id,
               "[ComputeEncoder::execute] the command list was "
               "recorded on queue ",
               l->queue_id(), " but this encoder belongs to queue ", queue_id,
               "; replay a list on the queue that recorded it");
  return *l;
}

}  // namespace flotilla::backend
