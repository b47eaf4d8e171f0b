#include "runtime/drain_guard.h"

#include <poll.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include "runtime/clock.h"
#include "runtime/log.h"
#include "runtime/signals.h"
#include "runtime/units.h"

namespace metronome {

DrainGuard::DrainGuard() : arm_fd_(eventfd(0, EFD_CLOEXEC)), done_fd_(eventfd(0, EFD_CLOEXEC)) {}

DrainGuard::~DrainGuard() {
  Finish();
  if (arm_fd_ >= 0) close(arm_fd_);
  if (done_fd_ >= 0) close(done_fd_);
}

void DrainGuard::Start(int64_t drain_timeout_ns, const std::atomic<int64_t>* stop_time_ns,
                       std::function<std::string()> describe) {
  timeout_ns_ = drain_timeout_ns;
  stop_time_ns_ = stop_time_ns;
  describe_ = std::move(describe);
  if (arm_fd_ < 0 || done_fd_ < 0) {
    LOG_WARN("drain guard: eventfd failed; a drain stuck past runtime.drain_timeout will need a second signal");
    return;
  }
  thread_ = std::thread([this] { Loop(); });
}

void DrainGuard::Arm() {
  uint64_t one = 1;
  ssize_t n = write(arm_fd_, &one, sizeof one);
  (void)n;
}

void DrainGuard::Finish() {
  if (!thread_.joinable()) return;
  uint64_t one = 1;
  ssize_t n = write(done_fd_, &one, sizeof one);
  (void)n;
  thread_.join();
}

void DrainGuard::Loop() {
  pthread_setname_np(pthread_self(), "drain-guard");
  pollfd fds[2] = {{arm_fd_, POLLIN, 0}, {done_fd_, POLLIN, 0}};
  for (;;) {
    if (poll(fds, 2, -1) < 0) continue;  // EINTR
    if (fds[1].revents != 0) return;
    if (fds[0].revents != 0) break;
  }
  const int64_t stop = stop_time_ns_->load(std::memory_order_acquire);
  const int64_t deadline = (stop != 0 ? stop : MonotonicNowNs()) + timeout_ns_ + kDrainExitGraceNs;
  for (;;) {
    const int64_t left = deadline - MonotonicNowNs();
    if (left <= 0) break;
    pollfd done{done_fd_, POLLIN, 0};
    const int ms = static_cast<int>((left + kNanosPerMilli - 1) / kNanosPerMilli);
    if (poll(&done, 1, ms) > 0) return;
  }
  std::string busy = describe_ ? describe_() : std::string();
  LOG_ERROR("drain: not finished %s after the stop began (runtime.drain_timeout %s + %s): exiting with "
            "status 1 without waiting for a second signal. Still busy: %s",
            FormatDuration(timeout_ns_ + kDrainExitGraceNs).c_str(), FormatDuration(timeout_ns_).c_str(),
            FormatDuration(kDrainExitGraceNs).c_str(), busy.empty() ? "(nothing reported)" : busy.c_str());
  ResetDeadlineThreadsToOther();
  _exit(1);
}

}  // namespace metronome
