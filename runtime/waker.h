// The single wait point of a lane: an eventfd that producers write when, and only when, the lane
// is about to sleep or asleep. Lanes with an io_uring wait on the same eventfd through a read
// armed on their ring, so one wait covers both the input queue and the ring.
//
// Protocol (Dekker-style, both sides fence seq_cst between their store and their load):
//   consumer: sleeping=1; fence; re-check for work; if none, block on the eventfd; sleeping=0
//   producer: publish work;  fence; if sleeping.exchange(0) then write the eventfd
// so a producer either sees the flag and wakes the lane, or the lane sees the work.
//
// Thread-safety: Notify() from any thread (and from signal handlers); the rest from the owner.
#pragma once

#include <sys/eventfd.h>
#include <unistd.h>

#include <atomic>
#include <cstdint>

#include "runtime/stats.h"

namespace metronome {

class Waker {
 public:
  // Blocking on purpose: a lane without a ring sleeps in read(2), and io_uring returns -EAGAIN
  // for reads on O_NONBLOCK files instead of waiting.
  Waker() : fd_(eventfd(0, EFD_CLOEXEC)) {}
  ~Waker() {
    if (fd_ >= 0) close(fd_);
  }
  Waker(const Waker&) = delete;
  Waker& operator=(const Waker&) = delete;

  bool ok() const { return fd_ >= 0; }
  int fd() const { return fd_; }

  // Producer side: call after publishing work. Async-signal-safe.
  void Notify() {
    std::atomic_thread_fence(std::memory_order_seq_cst);
    if (sleeping_.load(std::memory_order_relaxed) && sleeping_.exchange(0, std::memory_order_acq_rel)) {
      Kick();
    }
  }
  // Unconditional wake (shutdown, timers): the lane re-checks everything.
  void Kick() {
    uint64_t one = 1;
    ssize_t n = write(fd_, &one, sizeof one);
    (void)n;  // EAGAIN means the counter is already non-zero: the lane will wake anyway
    kicks_.fetch_add(1, std::memory_order_relaxed);
  }

  // Consumer side.
  void PrepareSleep() {
    sleeping_.store(1, std::memory_order_relaxed);
    std::atomic_thread_fence(std::memory_order_seq_cst);
  }
  void CancelSleep() { sleeping_.store(0, std::memory_order_relaxed); }
  // Sleeps until the counter is non-zero, then clears it.
  void Drain() {
    uint64_t v;
    ssize_t n = read(fd_, &v, sizeof v);
    (void)n;
  }
  uint64_t kicks() const { return kicks_.load(std::memory_order_relaxed); }

 private:
  int fd_;
  alignas(64) std::atomic<uint32_t> sleeping_{0};
  std::atomic<uint64_t> kicks_{0};
};

}  // namespace metronome
