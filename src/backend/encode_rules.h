// The rules every driver's command buffer checks before it takes a kernel or
// a replay (DESIGN.md §3; the CPU driver's rule names), written once: a
// driver calls check_encode() under its buffer's lock and raises what it
// returns through its own violation(). Internal to the backends.
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
