#include "runtime/scheduling.h"

#include <sched.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <sys/utsname.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <fstream>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace metronome {
namespace {

// glibc 2.36 has no wrapper for sched_setattr; this is the kernel's struct sched_attr (v1).
struct SchedAttr {
  uint32_t size;
  uint32_t sched_policy;
  uint64_t sched_flags;
  int32_t sched_nice;
  uint32_t sched_priority;
  uint64_t sched_runtime;
  uint64_t sched_deadline;
  uint64_t sched_period;
};

constexpr uint32_t kSchedDeadline = 6;
constexpr uint64_t kSchedFlagResetOnFork = 0x01;
constexpr uint64_t kSchedFlagDlOverrun = 0x04;
// The kernel refuses runtimes below 1 us (and rounds to its own granularity).
constexpr int64_t kDeadlineRuntimeMinNs = 1024;

int64_t ReadInt(const char* path, int64_t fallback) {
  std::ifstream in(path);
  int64_t v;
  if (in >> v) return v;
  return fallback;
}

bool KernelAtLeast(int major, int minor) {
  utsname u;
  if (uname(&u) != 0) return false;
  int ma = 0, mi = 0;
  if (sscanf(u.release, "%d.%d", &ma, &mi) != 2) return false;
  return ma > major || (ma == major && mi >= minor);
}

}  // namespace

const char* PolicyName(Policy p) { return p == Policy::kDeadline ? "deadline" : "other"; }

const char* WaitModeName(WaitMode w) {
  switch (w) {
    case WaitMode::kYield: return "yield";
    case WaitMode::kBlock: return "block";
    case WaitMode::kSpin: return "spin";
  }
  return "?";
}

int ResetThreadToOther(int tid) {
  SchedAttr attr{};
  attr.size = sizeof attr;
  attr.sched_policy = SCHED_OTHER;
  return static_cast<int>(syscall(SYS_sched_setattr, tid, &attr, 0));
}

absl::Status ApplyToCurrentThread(const SchedParams& p) {
  if (p.policy == Policy::kOther) {
    SchedAttr attr{};
    attr.size = sizeof attr;
    attr.sched_policy = SCHED_OTHER;
    attr.sched_nice = p.nice;
    if (syscall(SYS_sched_setattr, 0, &attr, 0) != 0) {
      int err = errno;
      return absl::PermissionDeniedError(absl::StrCat(
          "sched_setattr(SCHED_OTHER, nice ", p.nice, ") failed: ", std::strerror(err),
          err == EPERM ? " (a negative nice needs CAP_SYS_NICE)" : ""));
    }
    return absl::OkStatus();
  }
  if (p.runtime_ns < kDeadlineRuntimeMinNs) {
    return absl::InvalidArgumentError("deadline runtime below the kernel's 1us minimum");
  }
  SchedAttr attr{};
  attr.size = sizeof attr;
  attr.sched_policy = kSchedDeadline;
  attr.sched_flags = kSchedFlagResetOnFork | kSchedFlagDlOverrun;
  attr.sched_runtime = static_cast<uint64_t>(p.runtime_ns);
  attr.sched_deadline = static_cast<uint64_t>(p.deadline_ns > 0 ? p.deadline_ns : p.period_ns);
  attr.sched_period = static_cast<uint64_t>(p.period_ns);
  if (syscall(SYS_sched_setattr, 0, &attr, 0) == 0) return absl::OkStatus();
  int err = errno;
  std::string why;
  switch (err) {
    case EPERM:
      why = "not permitted: SCHED_DEADLINE needs CAP_SYS_NICE (run as root, or "
            "setcap cap_sys_nice+ep build/metronome; containers often drop it), and the thread "
            "must not be pinned to a subset of CPUs";
      break;
    case EBUSY:
      why = "admission control refused the bandwidth: the deadline lanes together ask more than "
            "the kernel admits (see `metronome check`); lower runtime/period or group stages on "
            "fewer lanes";
      break;
    case EINVAL:
      why = "invalid parameters: need runtime <= deadline <= period, period >= 1us";
      break;
    default:
      why = std::strerror(err);
  }
  return absl::Status(err == EPERM ? absl::StatusCode::kPermissionDenied
                                   : absl::StatusCode::kUnavailable,
                      absl::StrCat("sched_setattr(SCHED_DEADLINE) failed with ", std::strerror(err),
                                   ": ", why));
}

AdmissionLimit ReadAdmissionLimit() {
  AdmissionLimit lim;
  lim.online_cpus = static_cast<int>(sysconf(_SC_NPROCESSORS_ONLN));
  int64_t rt_runtime = ReadInt("/proc/sys/kernel/sched_rt_runtime_us", 950000);
  int64_t rt_period = ReadInt("/proc/sys/kernel/sched_rt_period_us", 1000000);
  lim.rt_share = rt_runtime < 0 ? 1.0 : static_cast<double>(rt_runtime) / static_cast<double>(rt_period);
  int64_t fs_runtime = ReadInt("/sys/kernel/debug/sched/fair_server/cpu0/runtime", -1);
  int64_t fs_period = ReadInt("/sys/kernel/debug/sched/fair_server/cpu0/period", -1);
  std::string fs_source;
  if (fs_runtime >= 0 && fs_period > 0) {
    lim.fair_server_share = static_cast<double>(fs_runtime) / static_cast<double>(fs_period);
    fs_source = "debugfs";
  } else if (KernelAtLeast(6, 12)) {
    lim.fair_server_share = 0.05;  // the kernel's default 50ms per 1s
    fs_source = "kernel default for >= 6.12";
  } else {
    fs_source = "none before 6.12";
  }
  double per_cpu = std::max(0.0, lim.rt_share - lim.fair_server_share);
  lim.cpus = per_cpu * lim.online_cpus;
  lim.explanation = absl::StrFormat(
      "%d CPUs x (rt %.2f - fair server %.2f [%s]) = %.2f CPUs", lim.online_cpus, lim.rt_share,
      lim.fair_server_share, fs_source, lim.cpus);
  return lim;
}

DeadlinePeriodLimits ReadDeadlinePeriodLimits() {
  DeadlinePeriodLimits lim;
  lim.min_ns = 1000 * ReadInt("/proc/sys/kernel/sched_deadline_period_min_us", lim.min_ns / 1000);
  lim.max_ns = 1000 * ReadInt("/proc/sys/kernel/sched_deadline_period_max_us", lim.max_ns / 1000);
  return lim;
}

std::string CurrentPolicyName() {
  // RESET_ON_FORK shows up as a flag ORed into the policy.
  switch (sched_getscheduler(0) & ~SCHED_RESET_ON_FORK) {
    case SCHED_OTHER: return "other";
    case SCHED_FIFO: return "fifo";
    case SCHED_RR: return "rr";
    case SCHED_BATCH: return "batch";
    case SCHED_IDLE: return "idle";
    case static_cast<int>(kSchedDeadline): return "deadline";
    default: return "unknown";
  }
}

}  // namespace metronome
