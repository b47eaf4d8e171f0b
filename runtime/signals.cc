#include "runtime/signals.h"

#include <signal.h>
#include <unistd.h>

#include <atomic>
#include <cstring>

namespace metronome {
namespace {

std::atomic<int> g_stop_signals{0};
void (*g_on_stop)(void*) = nullptr;
void* g_arg = nullptr;

void OnStopSignal(int signo) {
  if (g_stop_signals.fetch_add(1) > 0) {
    static const char kMsg[] = "second stop signal: exiting now without draining\n";
    ssize_t n = write(STDERR_FILENO, kMsg, sizeof kMsg - 1);
    (void)n;
    _exit(128 + signo);
  }
  if (g_on_stop != nullptr) g_on_stop(g_arg);
}

}  // namespace

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
