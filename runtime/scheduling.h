// Scheduling of lane threads: SCHED_DEADLINE or SCHED_OTHER, and the kernel's admission limit.
//
// Why these flags with SCHED_DEADLINE (FACTS.md):
//   - SCHED_FLAG_RESET_ON_FORK: without it a deadline thread cannot create threads, and io_uring
//     requests punted to io-wq workers complete with -ECANCELED.
//   - SCHED_FLAG_DL_OVERRUN: the kernel sends SIGXCPU when the thread overruns its runtime; the
//     runtime counts it per lane (unhandled, SIGXCPU kills the process).
// Why no pinning: a pinned thread cannot become deadline (EPERM) and a deadline thread cannot be
// pinned (EBUSY); the config offers no affinity key for deadline lanes.
//
// Thread-safety: ApplyToCurrentThread affects the calling thread only.
#pragma once

#include <cstdint>
#include <string>

#include "absl/status/status.h"

namespace metronome {

enum class Policy { kDeadline, kOther };
enum class WaitMode { kYield, kBlock, kSpin };

const char* PolicyName(Policy p);
const char* WaitModeName(WaitMode w);

struct SchedParams {
  Policy policy = Policy::kOther;
  int nice = 0;              // SCHED_OTHER only
  int64_t runtime_ns = 0;    // SCHED_DEADLINE only
  int64_t deadline_ns = 0;   // defaults to period
  int64_t period_ns = 0;

  double Bandwidth() const {
    return policy == Policy::kDeadline && period_ns > 0
               ? static_cast<double>(runtime_ns) / static_cast<double>(period_ns)
               : 0.0;
  }
};

// Sets the calling thread's policy. On failure returns the errno-derived status, with a message
// naming the likely cause and the fix.
absl::Status ApplyToCurrentThread(const SchedParams& params);

// Moves thread `tid` back to SCHED_OTHER (nice 0). Async-signal-safe: one system call, no
// allocation. Returns 0, or -1 with errno set.
int ResetThreadToOther(int tid);

// What the kernel's admission control accepts in total for SCHED_DEADLINE, in CPUs:
// online CPUs x (sched_rt_runtime_us / sched_rt_period_us), minus the fair server's reservation
// (kernel >= 6.12 reserves 50 ms per second per CPU for SCHED_OTHER; read from debugfs when
// mounted). On this 2-core machine: 2 x (0.95 - 0.05) = 1.80, which matches what was measured.
struct AdmissionLimit {
  double cpus = 0;          // total admissible bandwidth, in CPUs
  int online_cpus = 0;
  double rt_share = 0;      // sched_rt_runtime_us / sched_rt_period_us (1.0 when unlimited)
  double fair_server_share = 0;
  std::string explanation;  // how it was computed, for `metronome check`
};
AdmissionLimit ReadAdmissionLimit();

// The periods the kernel accepts for SCHED_DEADLINE (sched_deadline_period_{min,max}_us).
struct DeadlinePeriodLimits {
  int64_t min_ns = 100'000;
  int64_t max_ns = 4'194'304'000;
};
DeadlinePeriodLimits ReadDeadlinePeriodLimits();

// The SCHED_* policy the calling thread runs under now, as a name ("deadline", "other", ...).
std::string CurrentPolicyName();

}  // namespace metronome
