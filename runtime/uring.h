// The io_uring of one lane. One ring per thread, created on that thread, with
// IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN: completions run only when the owning
// thread enters the kernel, so no task work interrupts another stage's batch.
//
// Stages on one lane share the ring; each tags its requests' user data with its slot on the
// lane (the top 8 bits) so the lane hands every completion to the stage that asked. The lane
// itself uses the last tag to wait on its eventfd: one wait point for the queue and the ring.
//
// Thread-safety: every method must be called from the thread that called Init().
#pragma once

#include <vector>

#include "runtime/stage.h"

#include <cstdint>
#include <string>

#include "absl/status/status.h"

#include <liburing.h>
#ifdef BLOCK_SIZE
#undef BLOCK_SIZE  // from <linux/fs.h>; breaks moodycamel (see queue.h)
#endif

namespace metronome {

class Ring {
 public:
  static constexpr int kTagShift = 56;
  static constexpr uint64_t kPayloadMask = (1ull << kTagShift) - 1;
  static constexpr uint8_t kLaneTag = 0xff;

  Ring() = default;
  ~Ring();
  Ring(const Ring&) = delete;
  Ring& operator=(const Ring&) = delete;

  // Creates the ring; fails with the likely cause when io_uring is unavailable.
  absl::Status Init(unsigned entries);
  bool initialized() const { return initialized_; }
  io_uring* raw() { return &ring_; }

  // A free submission entry, submitting what is queued if the SQ is full.
  // Never returns null: if submission fails the process is in an impossible state and aborts.
  io_uring_sqe* GetSqe();
  static uint64_t Pack(uint8_t tag, uint64_t payload) {
    return (static_cast<uint64_t>(tag) << kTagShift) | (payload & kPayloadMask);
  }
  static uint8_t TagOf(uint64_t user_data) { return static_cast<uint8_t>(user_data >> kTagShift); }
  static uint64_t PayloadOf(uint64_t user_data) { return user_data & kPayloadMask; }

  // SQEs prepared but not yet submitted.
  unsigned Pending() const { return io_uring_sq_ready(&ring_); }

 private:
  io_uring ring_{};
  bool initialized_ = false;
};

// Probes the kernel for the io_uring setup flags and opcodes metronome uses, before any thread
// starts. On failure the message names what is missing and the likely cause (kernel too old,
// io_uring disabled by sysctl, a seccomp filter in a container).
// `ops` are the stages' (Stage::RingOps); the lane's own (READ of its eventfd) are added.
absl::Status ProbeIoUring(const std::vector<RingOp>& ops);

}  // namespace metronome
