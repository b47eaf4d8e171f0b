// The supervisor: one process that owns the listening socket, starts `server.workers` worker
// processes — each of them today's whole server: its pipeline, interpreter, budgets and
// watchdog — and never touches a request itself.
//
//   start      binds the socket, then for each worker fork()s and exec()s this binary (a fresh
//              process: the worker's deadline threads are made after exec, never forked) with
//              the socket and a control pipe inherited; the worker says "ready" on the pipe
//              once its pipeline runs (app imported, lifespan done, listening).
//   respawn    a worker that dies (a signal, an OOM kill, a crash in a C extension) is replaced
//              at once, then with a growing backoff; more than kCrashLoopMax deaths within
//              kCrashLoopWindowNs stop the server loudly instead of spinning. Before a dead
//              worker is reaped its threads are returned to SCHED_OTHER (a killed, throttled
//              deadline thread can otherwise keep its bandwidth: docs/platform-facts.md).
//   reload     SIGHUP re-reads the config and starts a new generation; only when every new
//              worker is ready do the old ones drain. A config error or a worker that fails
//              to become ready keeps the old generation serving, and the log says why.
//   recycle    server.max_requests (plus a per-worker jitter) and server.max_rss replace a
//              worker the same way: the new one first, then the old one drains.
//   stuck      a worker whose handler is stuck in C code (python.budget.hard) says so; with
//              python.budget.hard_action: replace it is replaced (new first), then drained,
//              and its drain guard ends it.
//   stop       SIGTERM/SIGINT drain every worker and exit 0 once all exited (1 if one failed
//              to drain); a second signal makes every worker exit at once (each returns its
//              threads to SCHED_OTHER first) and the supervisor follows.
//
// Thread-safety: single-threaded (signals arrive through a self-pipe), plus the admin
// listener's thread, which reads the worker table through WorkerTable's lock.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <mutex>
#include <string>
#include <vector>

namespace metronome::supervisor {

// A worker that dies this many times within the window (without staying up) stops the server.
inline constexpr int kCrashLoopMax = 5;
inline constexpr int64_t kCrashLoopWindowNs = 30'000'000'000;
// A replacement waits at most this long (the backoff doubles from kRespawnBackoffMinNs).
inline constexpr int64_t kRespawnBackoffMinNs = 100'000'000;
inline constexpr int64_t kRespawnBackoffMaxNs = 5'000'000'000;
// A new worker that has not said "ready" after this long has failed to start.
inline constexpr int64_t kReadyTimeoutNs = 60'000'000'000;
// Workers report their figures this often on their control pipe.
inline constexpr int64_t kStatusIntervalNs = 500'000'000;

struct Options {
  int workers = 1;
  std::string listen_host;
  uint16_t listen_port = 0;
  int backlog = 4096;
  bool reuse_port = true;           // server.balance: reuseport (a socket per slot) or shared
  int64_t drain_timeout_ns = 5'000'000'000;
  int64_t max_requests = 0;         // 0: never recycle by count
  int64_t max_requests_jitter = 0;  // each worker's limit is max_requests + [0, jitter)
  int64_t max_rss_bytes = 0;        // 0: never recycle by size
  bool replace_stuck = false;       // python.budget.hard_action: replace
  std::vector<std::string> argv;    // the command line, for the workers (exec'd as-is)
  std::string config_path;          // re-read on SIGHUP
  // --reload (development only): a change to a .py file under these directories reloads.
  std::vector<std::string> watch_dirs;
};

// --reload: changes closer together than this make one reload.
inline constexpr int64_t kReloadDebounceNs = 300'000'000;
// At most this many directories are watched (inotify watches are a per-user limit).
inline constexpr int kWatchDirsMax = 512;

// What the admin listener shows of each worker.
struct WorkerView {
  int index = 0;
  int generation = 0;
  pid_t pid = 0;
  std::string state;  // starting, ready, draining
  int64_t requests = 0;
  int64_t rss_bytes = 0;
  int restarts = 0;   // of this slot
  int64_t started_unix_ns = 0;
  std::string admin;  // the worker's own admin socket (for aggregation)
};

class WorkerTable {
 public:
  std::vector<WorkerView> Snapshot() const;
  void Set(std::vector<WorkerView> workers);
  bool draining() const;
  void set_draining(bool d);

 private:
  mutable std::mutex mu_;
  std::vector<WorkerView> workers_;
  bool draining_ = false;
};

// Runs the supervisor until the workers are stopped. Returns the process's exit status.
int Run(const Options& options, WorkerTable* table);

// In a worker (the supervisor's environment is set): the inherited fds and identity.
struct WorkerEnv {
  bool is_worker = false;
  int index = 0, generation = 0, workers = 1;
  int listen_fd = -1, control_fd = -1;
  std::string admin_socket;  // where this worker's admin listens for the supervisor
};
WorkerEnv ReadWorkerEnv();
// A worker's line to its supervisor ("ready", "stuck ...", "status ..."). Thread-safe,
// async-signal-safe (one write(2)).
void TellSupervisor(const char* line);

}  // namespace metronome::supervisor
