// The batch sizes a BatchQueue with record_batches records and replays
// (Note [Recorded sizes]). Internal to the serve layer.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <utility>

namespace flotilla::serve::detail {

// Note [Recorded sizes]
// A recorded batch of B rows runs as the smallest recorded size R >= B,
// padded (Note [Recorded batches] in batch_queue.cpp), and the device does
// all R rows' work: the gather, three GEMMs, the copy back. Up to 64 rows
// the sizes are the powers of two: a small batch's time is its launches and
// the weights' reads, whatever its rows. Above 64 each octave (P, 2P] is cut
// in BatchQueueOptions::record_steps steps of P/steps (the default, four:
// 80, 96, 112, 128, 160, ..., 256, 320, ...), so R is at most
// (1 + 1/steps) B (four: 1.25 B, about 1.1 B on average) instead of up to
// 2 B: with 64 clients on the H100 the device, not the host, was the limit
// (kernels running all the time, the workers waiting on their fences, 10.5
// of 16 cores busy; docs/PERF.md), and batches of about 190 and 300 rows
// ran as 256 and 512. The last size is max_batch. Each size is recorded once per
// slot and input kind, when first used: a recording keeps the model's
// intermediates of R rows, so a queue of many workers that sees every size
// holds up to 2 x (sizes) x (workers x pipeline_depth) of them. More steps
// pad less and record more sizes (with max_batch 1024: 11 sizes with one
// step, 23 with four, 39 with eight).
//
// Padding rather than cutting: a worker with more requests ready than a
// recorded size could instead run the largest size they fill and leave the
// rest queued. Tried twice on the H100 and removed: cutting FIFO picks too
// kept the FIFO from emptying under load (every worker then took the locked
// way; 64 x 112 ran at 0.59x), and cutting only lists taken from the inbox
// ran at 0.96-0.97x with higher p99s: the rows left behind wait a batch
// longer (docs/PERF.md, "Batches cut to a recorded size").
constexpr int64_t kPowersUpTo = 64;
constexpr int64_t kDefaultStepsPerOctave = 4;
constexpr int64_t kMaxStepsPerOctave = 64;  // a step of 64 / steps rows stays whole

// Returns the index of the smallest recorded size >= n (1 <= n <=
// max_batch) and that size, with `steps` sizes an octave above kPowersUpTo
// (a power of two, 1..kMaxStepsPerOctave). Indices run from 0 without gaps,
// in the order of the sizes; the largest is size_bucket(max_batch,
// max_batch, steps).first.
inline std::pair<size_t, int64_t> size_bucket(int64_t n, int64_t max_batch,
                                              int64_t steps = kDefaultStepsPerOctave) {
  size_t i = 0;
  int64_t rows = 1;
  while (rows < n && rows < kPowersUpTo) {
    rows *= 2;
    ++i;
  }
  if (rows >= n) return {i, std::min(rows, max_batch)};
  // n > kPowersUpTo: the octave (p, 2p] that holds n, in `steps` steps.
  int64_t p = kPowersUpTo;
  while (2 * p < n) {
    p *= 2;
    i += static_cast<size_t>(steps);
  }
  const int64_t step = p / steps;
  const int64_t q = (n - p + step - 1) / step;  // 1 .. steps
  return {i + static_cast<size_t>(q), std::min(p + q * step, max_batch)};
}

}  // namespace flotilla::serve::detail
