// The unit of work that moves between stages. Stages define their own item types by deriving
// from Item; the runtime only reads and writes the two routing fields below.
//
// Ownership: exactly one stage owns an item at a time. Emitting it hands it on; the emitting stage
// must not touch it afterwards.
#pragma once

#include <cstdint>

namespace metronome {

struct Item {
  // Pipeline index of the stage that takes the item next. Set by Outbox::Emit.
  uint16_t next_stage = 0;
  // When the item entered its current queue (CLOCK_MONOTONIC ns); for hand-off latency.
  int64_t enqueued_ns = 0;
};

}  // namespace metronome
