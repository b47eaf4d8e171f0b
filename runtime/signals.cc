#include "runtime/signals.h"

#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstring>

#include "runtime/scheduling.h"

namespace metronome {
namespace {

std::atomic<int> g_stop_signals{0};
std::atomic<int> g_deadline_tids[kDeadlineThreadsMax];
std::atomic<int> g_deadline_count{0};

void (*g_on_stop)(void*) = nullptr;
void* g_arg = nullptr;

void OnStopSignal(int signo) {
  if (g_stop_signals.fetch_add(1) > 0) {
    static const char kMsg[] = "second stop signal: exiting now without draining\n";
    ssize_t n = write(STDERR_FILENO, kMsg, sizeof kMsg - 1);
    (void)n;
    ResetDeadlineThreadsToOther();
    _exit(128 + signo);
  }
  if (g_on_stop != nullptr) g_on_stop(g_arg);
}

}  // namespace

void ResetDeadlineThreadsToOther() {
  int count = std::min(g_deadline_count.load(), kDeadlineThreadsMax);
  for (int i = 0; i < count; ++i) {
    int tid = g_deadline_tids[i].load();
    if (tid > 0) ResetThreadToOther(tid);
  }
}

void RegisterDeadlineThread(int tid) {
  int i = g_deadline_count.fetch_add(1);
  if (i < kDeadlineThreadsMax) g_deadline_tids[i].store(tid);
}

void InstallStopSignals(void (*on_stop)(void*), void* arg) {
  g_on_stop = on_stop;
  g_arg = arg;
  struct sigaction sa {};
  sa.sa_handler = OnStopSignal;
  sigemptyset(&sa.sa_mask);
  sa.sa_flags = SA_RESTART;
  sigaction(SIGINT, &sa, nullptr);
  sigaction(SIGTERM, &sa, nullptr);
  signal(SIGPIPE, SIG_IGN);
}

}  // namespace metronome
