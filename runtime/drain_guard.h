// The drain's backstop. A lane checks its drain deadline only between batches, so a lane whose
// stage never returns (a Python handler stuck in C code holds the main thread) keeps the
// process up after runtime.drain_timeout — and systemd or Kubernetes send one SIGTERM, wait,
// then SIGKILL (which leaves deadline threads holding bandwidth, docs/platform-facts.md).
// The guard is a thread that sleeps until the stop begins, then until the drain timeout plus
// kDrainExitGraceNs; if the pipeline has not finished by then it logs what is still busy (which
// stage, which request) and exits with status 1, after returning every deadline thread to
// SCHED_OTHER.
//
// Thread-safety: Start/Finish from the thread that runs the pipeline; Arm from anywhere,
// including a signal handler (it writes an eventfd).
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <string>
#include <thread>

namespace metronome {

// How long past runtime.drain_timeout the guard waits: the lanes' own deadline comes first and
// lets a drain that is merely slow end cleanly (non-zero, with its items counted).
inline constexpr int64_t kDrainExitGraceNs = 1'000'000'000;

class DrainGuard {
 public:
  DrainGuard();
  ~DrainGuard();
  DrainGuard(const DrainGuard&) = delete;
  DrainGuard& operator=(const DrainGuard&) = delete;

  // `stop_time_ns` is read once armed; `describe` runs on the guard's thread when it fires.
  void Start(int64_t drain_timeout_ns, const std::atomic<int64_t>* stop_time_ns,
             std::function<std::string()> describe);
  // The stop began. Async-signal-safe.
  void Arm();
  // The pipeline finished: the guard stands down and its thread is joined.
  void Finish();

 private:
  void Loop();

  int arm_fd_ = -1, done_fd_ = -1;
  int64_t timeout_ns_ = 0;
  const std::atomic<int64_t>* stop_time_ns_ = nullptr;
  std::function<std::string()> describe_;
  std::thread thread_;
};

}  // namespace metronome
