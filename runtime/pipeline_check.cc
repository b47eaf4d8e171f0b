// Pipeline::CheckDeep: `metronome check` runs what start-up would run short of resources, in a
// child process, so that check refuses what serve would refuse, with the same messages.
//
// Why a child: what CheckDeep loads (an embedded interpreter and the application) cannot be
// unloaded, may hang (an import that waits forever) or crash, and must not leave anything in the
// process that prints the report. The child reports through a pipe, one record at a time, so
// that the parent knows which stage it was in, and doing what, when it hangs or dies.
//
// Record: one kind byte, a uint32 length (this machine's byte order: both ends are one binary),
// then the text. Kinds: 'S' the child enters a stage (text: "<index> <phase>"), 'W' what the
// stage is doing (StageEnv::CheckStep), 'N' a note, 'E' an error, 'D' done.
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "runtime/lane.h"
#include "runtime/log.h"
#include "runtime/units.h"

namespace metronome {
namespace {

bool WriteAll(int fd, const char* p, size_t n) {
  while (n > 0) {
    ssize_t w = write(fd, p, n);
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) return false;
    p += w;
    n -= static_cast<size_t>(w);
  }
  return true;
}

}  // namespace

void Pipeline::CheckSend(char kind, absl::string_view text) {
  if (check_fd_ < 0) return;
  char head[1 + sizeof(uint32_t)];
  head[0] = kind;
  const uint32_t len = static_cast<uint32_t>(text.size());
  std::memcpy(head + 1, &len, sizeof len);
  // A parent that went away leaves nothing to report to: the child just carries on to _exit.
  if (!WriteAll(check_fd_, head, sizeof head) || !WriteAll(check_fd_, text.data(), text.size())) check_fd_ = -1;
}

// In the child: CheckDeep in start order (as Run calls Start), then Connect in pipeline order.
// Unlike Run it goes on after an error, so that one check lists every problem it can see; a
// Connect after a failed CheckDeep sees less published, never something inconsistent.
void Pipeline::CheckChild() {
  for (int l : LaneStartOrder()) {
    for (int i = lane_specs_[l].first_stage; i <= lane_specs_[l].last_stage; ++i) {
      CheckSend('S', absl::StrCat(i, " check"));
      absl::StatusOr<std::string> r = stages_[i]->CheckDeep(*envs_[i]);
      if (!r.ok()) {
        CheckSend('E', StageError(i, " would fail to start", r.status()).message());
      } else if (!r->empty()) {
        CheckSend('N', absl::StrCat(stage_specs_[i].name, ": ", *r));
      }
    }
  }
  for (int i = 0; i < num_stages(); ++i) {
    CheckSend('S', absl::StrCat(i, " connect"));
    if (absl::Status s = stages_[i]->Connect(*envs_[i]); !s.ok()) CheckSend('E', StageError(i, "", s).message());
  }
  CheckSend('D', "");
}

Pipeline::CheckReport Pipeline::CheckDeep(int64_t timeout_ns) {
  CheckReport report;
  int fds[2];
  if (pipe2(fds, O_CLOEXEC) != 0) {
    report.errors.push_back(absl::StrCat("cannot check the stages: pipe: ", std::strerror(errno)));
    return report;
  }
  // Whatever stdio holds now would otherwise be written twice, once by each process.
  fflush(stdout);
  fflush(stderr);
  const pid_t pid = fork();
  if (pid < 0) {
    report.errors.push_back(absl::StrCat("cannot check the stages: fork: ", std::strerror(errno)));
    close(fds[0]);
    close(fds[1]);
    return report;
  }
  if (pid == 0) {
    close(fds[0]);
    check_fd_ = fds[1];
    // What the application prints while it loads goes to stderr: stdout is check's report.
    dup2(STDERR_FILENO, STDOUT_FILENO);
    // Start-up's info lines (route table sizes, ...) would only clutter the report.
    SetLogLevel(LogLevel::kWarn);
    CheckChild();
    _exit(0);  // no destructors, no atexit: nothing the stages loaded is torn down
  }
  close(fds[1]);

  int stage = -1;
  std::string phase, what, buf;
  bool done = false, timed_out = false;
  const int64_t deadline = MonotonicNowNs() + timeout_ns;
  char chunk[4096];
  while (!done) {
    const int64_t left_ns = deadline - MonotonicNowNs();
    if (left_ns <= 0) {
      timed_out = true;
      break;
    }
    pollfd pfd{fds[0], POLLIN, 0};
    int pr = poll(&pfd, 1, static_cast<int>(std::min<int64_t>(left_ns / kNanosPerMilli + 1, 60'000)));
    if (pr < 0 && errno == EINTR) continue;
    if (pr <= 0) continue;
    ssize_t n = read(fds[0], chunk, sizeof chunk);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;  // the child ended (or died) without saying it was done
    buf.append(chunk, static_cast<size_t>(n));
    constexpr size_t kHead = 1 + sizeof(uint32_t);
    while (buf.size() >= kHead) {
      uint32_t len;
      std::memcpy(&len, buf.data() + 1, sizeof len);
      if (buf.size() < kHead + len) break;
      const char kind = buf[0];
      std::string text = buf.substr(kHead, len);
      buf.erase(0, kHead + len);
      switch (kind) {
        case 'S': {
          std::pair<std::string, std::string> parts = absl::StrSplit(text, absl::MaxSplits(' ', 1));
          if (!absl::SimpleAtoi(parts.first, &stage)) stage = -1;
          phase = parts.second;
          what.clear();
          break;
        }
        case 'W': what = std::move(text); break;
        case 'N': report.notes.push_back(std::move(text)); break;
        case 'E': report.errors.push_back(std::move(text)); break;
        case 'D': done = true; break;
        default: break;
      }
    }
  }
  close(fds[0]);
  // The child holds no deadline bandwidth (check never applies a scheduling policy) and nothing
  // that needs a drain: SIGKILL is the one signal an application cannot catch or ignore.
  if (timed_out) kill(pid, SIGKILL);
  int status = 0;
  while (waitpid(pid, &status, 0) < 0 && errno == EINTR) {
  }
  if (done) return report;

  std::string where = stage >= 0 && stage < num_stages()
                          ? absl::StrCat("stage '", stage_specs_[stage].name, "'",
                                         phase == "connect" ? " (connecting)" : "")
                          : std::string("the check");
  std::string doing = what.empty() ? "" : absl::StrCat(" while ", what);
  if (timed_out) {
    report.timed_out = true;
    report.errors.push_back(absl::StrCat(where, ": did not finish within ", FormatDuration(timeout_ns), doing,
                                         "; the check process was killed"));
  } else if (WIFSIGNALED(status)) {
    report.errors.push_back(absl::StrCat(where, ": the check process died of signal ", WTERMSIG(status), " (",
                                         strsignal(WTERMSIG(status)), ")", doing));
  } else {
    report.errors.push_back(absl::StrCat(where, ": the check process exited with status ",
                                         WIFEXITED(status) ? WEXITSTATUS(status) : -1, doing,
                                         " before it finished"));
  }
  return report;
}

}  // namespace metronome
