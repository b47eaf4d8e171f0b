// The clock of the pipeline: CLOCK_MONOTONIC in nanoseconds. Stages read the time here (or
// Outbox::now_ns(), the time at the start of the lane's loop iteration, which costs nothing).
//
// Thread-safety: any thread; async-signal-safe (clock_gettime is).
#pragma once

#include <time.h>

#include <cstdint>
#include <limits>

#include "runtime/units.h"

namespace metronome {

// "No deadline": a Tick that returns it is not called again until woken.
inline constexpr int64_t kNeverNs = std::numeric_limits<int64_t>::max();

inline int64_t MonotonicNowNs() {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<int64_t>(ts.tv_sec) * kNanosPerSecond + ts.tv_nsec;
}

}  // namespace metronome
