#include "supervisor/supervisor.h"

#include <arpa/inet.h>
#include <dirent.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <sys/inotify.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <memory>
#include <random>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "runtime/clock.h"
#include "runtime/log.h"
#include "runtime/scheduling.h"
#include "runtime/units.h"

namespace metronome::supervisor {
namespace {

int g_signal_pipe[2] = {-1, -1};

void OnSignal(int signo) {
  unsigned char c = static_cast<unsigned char>(signo);
  ssize_t n = write(g_signal_pipe[1], &c, 1);
  (void)n;
}

int64_t UnixNowNs() {
  timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  return static_cast<int64_t>(ts.tv_sec) * kNanosPerSecond + ts.tv_nsec;
}

// Every thread of `pid` back to SCHED_OTHER (it may be a zombie whose threads linger).
int ResetThreadsOf(pid_t pid) {
  std::string dir = absl::StrCat("/proc/", pid, "/task");
  DIR* d = opendir(dir.c_str());
  if (d == nullptr) return 0;
  int n = 0;
  while (dirent* e = readdir(d)) {
    int tid = atoi(e->d_name);
    if (tid > 0 && ResetThreadToOther(tid) == 0) ++n;
  }
  closedir(d);
  return n;
}

std::string DescribeExit(const siginfo_t& info) {
  if (info.si_code == CLD_EXITED) return absl::StrCat("exited with status ", info.si_status);
  return absl::StrCat("was killed by signal ", info.si_status, " (", strsignal(info.si_status), ")",
                      info.si_code == CLD_DUMPED ? ", core dumped" : "");
}

struct Worker {
  enum class State { kStarting, kReady, kDraining };
  int slot = 0;
  int generation = 0;
  pid_t pid = 0;
  int control_fd = -1;
  std::string buf;
  State state = State::kStarting;
  int64_t started_ns = 0;
  int64_t started_unix_ns = 0;
  int64_t requests = 0;
  int64_t rss_bytes = 0;
  int64_t requests_limit = 0;       // max_requests + this worker's jitter (0: none)
  bool replacement_started = false;  // recycle/stuck: a new worker for its slot is on its way
  bool stuck = false;
  std::string admin;  // its admin socket (abstract unix)
};

const char* StateName(Worker::State s) {
  switch (s) {
    case Worker::State::kStarting: return "starting";
    case Worker::State::kReady: return "ready";
    case Worker::State::kDraining: return "draining";
  }
  return "?";
}

class Supervisor {
 public:
  Supervisor(const Options& o, WorkerTable* table) : o_(o), table_(table), rng_(static_cast<unsigned>(getpid())) {}

  int Run() {
    if (pipe2(g_signal_pipe, O_CLOEXEC | O_NONBLOCK) != 0) {
      LOG_ERROR("supervisor: pipe: %s", std::strerror(errno));
      return 1;
    }
    struct sigaction sa {};
    sa.sa_handler = OnSignal;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = SA_RESTART;
    for (int s : {SIGTERM, SIGINT, SIGHUP, SIGCHLD}) sigaction(s, &sa, nullptr);
    signal(SIGPIPE, SIG_IGN);
    if (!Listen()) return 1;
    slots_.assign(static_cast<size_t>(o_.workers), SlotState{});
    LOG_INFO("supervisor: pid %d, %d worker(s) on http://%s:%u", getpid(), o_.workers, o_.listen_host.c_str(), o_.listen_port);
    for (int i = 0; i < o_.workers; ++i) Spawn(i, generation_);
    if (!o_.watch_dirs.empty()) Watch();
    while (!done_) {
      Publish();
      std::vector<pollfd> fds;
      fds.push_back({g_signal_pipe[0], POLLIN, 0});
      fds.push_back({inotify_fd_, POLLIN, 0});
      for (auto& w : workers_) fds.push_back({w->control_fd, POLLIN, 0});
      poll(fds.data(), fds.size(), 100);
      if (fds[0].revents & POLLIN) Signals();
      if (fds[1].revents & POLLIN) FilesChanged();
      for (size_t i = 2; i < fds.size() && i - 2 < workers_.size(); ++i) {
        if (fds[i].revents & (POLLIN | POLLHUP)) ReadControl(*workers_[i - 2]);
      }
      Timers();
    }
    Publish();
    return exit_code_;
  }

 private:
  struct SlotState {
    int restarts = 0;
    int64_t respawn_at = 0;      // 0: nothing pending
    int64_t backoff_ns = 0;
  };

  // One socket per worker slot with SO_REUSEPORT (the kernel spreads new connections over
  // them by hash; a replacement or a reload's new worker takes over its slot's socket, so no
  // queued connection is lost), or one socket every worker accepts from (server.balance).
  bool Listen() {
    const int count = o_.reuse_port ? o_.workers : 1;
    for (int i = 0; i < count; ++i) {
      int fd = ListenOne(o_.reuse_port);
      if (fd < 0) return false;
      listen_fds_.push_back(fd);
    }
    // The same line a single server prints: tools and tests find the port in it.
    LOG_INFO("listening on http://%s:%u", o_.listen_host.c_str(), o_.listen_port);
    return true;
  }

  int ListenOne(bool reuse_port) {
    sockaddr_storage addr{};
    socklen_t len;
    int family;
    if (inet_pton(AF_INET6, o_.listen_host.c_str(), &reinterpret_cast<sockaddr_in6*>(&addr)->sin6_addr) == 1) {
      auto* a = reinterpret_cast<sockaddr_in6*>(&addr);
      a->sin6_family = family = AF_INET6;
      a->sin6_port = htons(o_.listen_port);
      len = sizeof *a;
    } else {
      auto* a = reinterpret_cast<sockaddr_in*>(&addr);
      if (inet_pton(AF_INET, o_.listen_host.c_str(), &a->sin_addr) != 1) {
        LOG_ERROR("server.listen: '%s' is not an IPv4 or IPv6 address", o_.listen_host.c_str());
        return -1;
      }
      a->sin_family = family = AF_INET;
      a->sin_port = htons(o_.listen_port);
      len = sizeof *a;
    }
    int fd = socket(family, SOCK_STREAM | SOCK_CLOEXEC, 0);
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (reuse_port) setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof one);
    if (fd < 0 || bind(fd, reinterpret_cast<sockaddr*>(&addr), len) != 0 || listen(fd, o_.backlog) != 0) {
      LOG_ERROR("cannot listen on %s:%u: %s%s", o_.listen_host.c_str(), o_.listen_port, std::strerror(errno),
                errno == EADDRINUSE ? " (another process has the port: stop it or pick another with --listen)" : "");
      if (fd >= 0) close(fd);
      return -1;
    }
    // Port 0: the first socket picks the port, the others join it.
    sockaddr_storage bound{};
    socklen_t blen = sizeof bound;
    getsockname(fd, reinterpret_cast<sockaddr*>(&bound), &blen);
    if (bound.ss_family == AF_INET) o_.listen_port = ntohs(reinterpret_cast<sockaddr_in*>(&bound)->sin_port);
    if (bound.ss_family == AF_INET6) o_.listen_port = ntohs(reinterpret_cast<sockaddr_in6*>(&bound)->sin6_port);
    return fd;
  }

  void Spawn(int slot, int generation) {
    int ctl[2];
    if (pipe2(ctl, O_CLOEXEC) != 0) {
      LOG_ERROR("supervisor: pipe: %s", std::strerror(errno));
      return;
    }
    // Everything the child needs is made before fork(): between fork and exec only
    // async-signal-safe calls (the admin thread may hold any lock at the fork).
    std::vector<std::string> env_strings;
    for (char** e = environ; *e != nullptr; ++e) {
      if (strncmp(*e, "METRONOME_WORKER_", 17) != 0) env_strings.emplace_back(*e);
    }
    const pid_t parent = getpid();
    env_strings.push_back(absl::StrCat("METRONOME_WORKER_INDEX=", slot));
    env_strings.push_back(absl::StrCat("METRONOME_WORKER_GENERATION=", generation));
    env_strings.push_back(absl::StrCat("METRONOME_WORKER_COUNT=", o_.workers));
    const int listen_fd = listen_fds_[o_.reuse_port ? static_cast<size_t>(slot) : 0];
    env_strings.push_back(absl::StrCat("METRONOME_WORKER_LISTEN_FD=", listen_fd));
    env_strings.push_back(absl::StrCat("METRONOME_WORKER_CONTROL_FD=", ctl[1]));
    // Unique per process (a replacement runs beside the worker it replaces).
    const std::string admin = absl::StrCat("@metronome-", parent, "-", ++spawned_);
    env_strings.push_back(absl::StrCat("METRONOME_WORKER_ADMIN=", admin));
    std::vector<char*> envp;
    for (auto& e : env_strings) envp.push_back(e.data());
    envp.push_back(nullptr);
    std::vector<std::string> args = o_.argv;
    std::vector<char*> argv;
    for (auto& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);
    const int control_fd = ctl[1];
    // The binary's own path (not /proc/self/exe, which would name every worker thread "exe").
    char exe[4096];
    ssize_t exe_len = readlink("/proc/self/exe", exe, sizeof exe - 1);
    exe[exe_len > 0 ? exe_len : 0] = '\0';
    pid_t pid = fork();
    if (pid == 0) {
      // The worker ends with its supervisor, whatever kills the supervisor.
      prctl(PR_SET_PDEATHSIG, SIGTERM);
      if (getppid() != parent) _exit(1);
      fcntl(listen_fd, F_SETFD, 0);
      fcntl(control_fd, F_SETFD, 0);
      sigset_t none;
      sigemptyset(&none);
      sigprocmask(SIG_SETMASK, &none, nullptr);
      for (int s : {SIGTERM, SIGINT, SIGHUP, SIGCHLD}) signal(s, SIG_DFL);
      execve(exe, argv.data(), envp.data());
      _exit(127);
    }
    close(ctl[1]);
    if (pid < 0) {
      close(ctl[0]);
      LOG_ERROR("supervisor: fork: %s", std::strerror(errno));
      return;
    }
    fcntl(ctl[0], F_SETFL, O_NONBLOCK);
    auto w = std::make_unique<Worker>();
    w->slot = slot;
    w->generation = generation;
    w->pid = pid;
    w->control_fd = ctl[0];
    w->admin = admin;
    w->started_ns = MonotonicNowNs();
    w->started_unix_ns = UnixNowNs();
    if (o_.max_requests > 0) {
      w->requests_limit = o_.max_requests +
                          (o_.max_requests_jitter > 0 ? static_cast<int64_t>(rng_() % static_cast<uint64_t>(o_.max_requests_jitter)) : 0);
    }
    LOG_INFO("supervisor: worker %d (generation %d) started: pid %d", slot, generation, pid);
    workers_.push_back(std::move(w));
  }

  Worker* Find(pid_t pid) {
    for (auto& w : workers_) {
      if (w->pid == pid) return w.get();
    }
    return nullptr;
  }

  void Signals() {
    unsigned char sigs[64];
    ssize_t n;
    while ((n = read(g_signal_pipe[0], sigs, sizeof sigs)) > 0) {
      for (ssize_t i = 0; i < n; ++i) {
        switch (sigs[i]) {
          case SIGCHLD: Reap(); break;
          case SIGHUP: Reload(); break;
          case SIGTERM:
          case SIGINT: Stop(sigs[i]); break;
          default: break;
        }
      }
    }
  }

  void Stop(int signo) {
    if (!stopping_) {
      stopping_ = true;
      table_->set_draining(true);
      LOG_INFO("supervisor: %s: draining %zu worker(s)", strsignal(signo), workers_.size());
      for (auto& w : workers_) Drain(*w);
      if (workers_.empty()) done_ = true;
      return;
    }
    // The second signal: every worker exits at once (it returns its threads to SCHED_OTHER
    // first, as a single server does), and so does the supervisor.
    LOG_WARN("supervisor: second stop signal: workers exit now without draining");
    for (auto& w : workers_) {
      kill(w->pid, SIGTERM);
      kill(w->pid, SIGTERM);
    }
    immediate_ = true;
    immediate_deadline_ns_ = MonotonicNowNs() + 2 * kNanosPerSecond;
    exit_code_ = 128 + signo;
  }

  void Drain(Worker& w) {
    if (w.state == Worker::State::kDraining) return;
    w.state = Worker::State::kDraining;
    kill(w.pid, SIGTERM);
  }

  void Reap() {
    for (;;) {
      siginfo_t info{};
      // WNOWAIT first: the zombie's threads are returned to SCHED_OTHER before it is reaped.
      if (waitid(P_ALL, 0, &info, WEXITED | WNOHANG | WNOWAIT) != 0 || info.si_pid == 0) return;
      const pid_t pid = info.si_pid;
      int reset = ResetThreadsOf(pid);
      int status;
      waitpid(pid, &status, 0);
      Worker* w = Find(pid);
      if (w == nullptr) continue;
      const std::string how = DescribeExit(info);
      const bool clean = info.si_code == CLD_EXITED && info.si_status == 0;
      if (w->state == Worker::State::kDraining) {
        LOG_INFO("supervisor: worker %d (generation %d, pid %d) %s after its drain", w->slot, w->generation, pid, how.c_str());
        if (!clean && stopping_ && !immediate_) exit_code_ = 1;
      } else {
        LOG_ERROR("supervisor: worker %d (generation %d, pid %d) %s%s", w->slot, w->generation, pid, how.c_str(),
                  reset > 0 ? absl::StrCat(" (", reset, " thread(s) returned to SCHED_OTHER first)").c_str() : "");
        Died(*w);
      }
      Remove(pid);
    }
  }

  // An unexpected death: a replacement (unless the slot has another worker), or the end of a
  // reload, or a crash loop.
  void Died(Worker& w) {
    const int64_t now = MonotonicNowNs();
    if (reload_generation_ >= 0 && w.generation == reload_generation_) {
      LOG_ERROR("supervisor: reload failed: a worker of the new generation died before it was ready; "
                "the old generation keeps serving");
      AbortReload();
      return;
    }
    if (stopping_) return;
    deaths_.push_back(now);
    while (!deaths_.empty() && now - deaths_.front() > kCrashLoopWindowNs) deaths_.pop_front();
    if (static_cast<int>(deaths_.size()) > kCrashLoopMax) {
      LOG_ERROR("supervisor: crash loop: %zu worker deaths within %s; stopping the server (see the lines above for why "
                "they died)", deaths_.size(), FormatDuration(kCrashLoopWindowNs).c_str());
      exit_code_ = 1;
      Stop(SIGTERM);
      exit_code_ = 1;
      return;
    }
    if (SlotHasLive(w.slot, w.pid)) return;  // its replacement is already there (recycle)
    SlotState& s = slots_[static_cast<size_t>(w.slot)];
    // The first replacement at once; then a backoff that doubles while deaths keep coming.
    s.backoff_ns = deaths_.size() <= 1 ? 0 : std::clamp<int64_t>(s.backoff_ns * 2, kRespawnBackoffMinNs, kRespawnBackoffMaxNs);
    s.respawn_at = now + s.backoff_ns;
    if (s.respawn_at == now) s.respawn_at = now + 1;
  }

  bool SlotHasLive(int slot, pid_t except) const {
    for (const auto& w : workers_) {
      if (w->slot == slot && w->pid != except && w->state != Worker::State::kDraining) return true;
    }
    return false;
  }

  void Remove(pid_t pid) {
    for (size_t i = 0; i < workers_.size(); ++i) {
      if (workers_[i]->pid == pid) {
        if (workers_[i]->control_fd >= 0) close(workers_[i]->control_fd);
        workers_.erase(workers_.begin() + static_cast<long>(i));
        break;
      }
    }
    if (stopping_ && workers_.empty()) done_ = true;
  }

  void ReadControl(Worker& w) {
    char buf[1024];
    ssize_t n;
    while ((n = read(w.control_fd, buf, sizeof buf)) > 0) w.buf.append(buf, static_cast<size_t>(n));
    if (n == 0) {
      // The worker closed its end (it is exiting): SIGCHLD tells the rest.
      close(w.control_fd);
      w.control_fd = -1;
    }
    size_t nl;
    while ((nl = w.buf.find('\n')) != std::string::npos) {
      std::string line = w.buf.substr(0, nl);
      w.buf.erase(0, nl + 1);
      Line(w, line);
    }
  }

  void Line(Worker& w, const std::string& line) {
    if (line == "ready") {
      if (w.state == Worker::State::kStarting) {
        w.state = Worker::State::kReady;
        LOG_INFO("supervisor: worker %d (generation %d, pid %d) is ready", w.slot, w.generation, w.pid);
        Ready(w);
      }
    } else if (line.rfind("status ", 0) == 0) {
      for (absl::string_view kv : absl::StrSplit(line.substr(7), ' ')) {
        std::pair<absl::string_view, absl::string_view> p = absl::StrSplit(kv, absl::MaxSplits('=', 1));
        int64_t v;
        if (!absl::SimpleAtoi(p.second, &v)) continue;
        if (p.first == "requests") w.requests = v;
        if (p.first == "rss") w.rss_bytes = v;
      }
    } else if (line.rfind("stuck", 0) == 0) {
      w.stuck = true;
      if (o_.replace_stuck && !stopping_) {
        LOG_WARN("supervisor: worker %d (pid %d) has a handler stuck in C code: replacing it "
                 "(python.budget.hard_action: replace)", w.slot, w.pid);
        Replace(w);
      }
    }
  }

  // A worker became ready: it may complete a replacement or a reload.
  void Ready(Worker& w) {
    slots_[static_cast<size_t>(w.slot)].backoff_ns = 0;
    if (reload_generation_ >= 0 && w.generation == reload_generation_) {
      for (const auto& x : workers_) {
        if (x->generation == reload_generation_ && x->state != Worker::State::kReady) return;
      }
      LOG_INFO("supervisor: reload: generation %d is ready; the old workers drain", reload_generation_);
      for (auto& x : workers_) {
        if (x->generation != reload_generation_) Drain(*x);
      }
      generation_ = reload_generation_;
      reload_generation_ = -1;
      return;
    }
    // A replacement (recycle, stuck, respawn): the slot's older workers drain now.
    for (auto& x : workers_) {
      if (x.get() != &w && x->slot == w.slot && x->state != Worker::State::kDraining &&
          x->generation <= w.generation && x->started_ns < w.started_ns) {
        Drain(*x);
      }
    }
  }

  void Replace(Worker& w) {
    if (w.replacement_started || reload_generation_ >= 0) return;
    w.replacement_started = true;
    Spawn(w.slot, w.generation);
  }

  void Reload() {
    if (stopping_) return;
    if (reload_generation_ >= 0) {
      LOG_WARN("supervisor: SIGHUP: a reload is already in progress (generation %d)", reload_generation_);
      return;
    }
    // The config is checked before anything starts: a broken one keeps the old workers.
    std::vector<std::string> check = {o_.argv[0], "check"};
    for (size_t i = 2; i < o_.argv.size(); ++i) check.push_back(o_.argv[i]);
    std::string out;
    int rc = RunCapture(check, &out);
    if (rc != 0) {
      LOG_ERROR("supervisor: SIGHUP: the config does not pass `metronome check`; the old generation keeps serving:\n%s",
                out.c_str());
      return;
    }
    reload_generation_ = ++last_generation_;
    reload_started_ns_ = MonotonicNowNs();
    LOG_INFO("supervisor: SIGHUP: starting generation %d (%d worker(s)); the old ones drain once it is ready",
             reload_generation_, o_.workers);
    for (int i = 0; i < o_.workers; ++i) Spawn(i, reload_generation_);
  }

  void AbortReload() {
    for (auto& x : workers_) {
      if (x->generation == reload_generation_) {
        x->state = Worker::State::kDraining;
        kill(x->pid, SIGTERM);
        kill(x->pid, SIGTERM);  // not ready: nothing to drain
      }
    }
    reload_generation_ = -1;
  }

  // Runs `argv` (the check) and captures its output; its exit status.
  static int RunCapture(const std::vector<std::string>& args, std::string* out) {
    int p[2];
    if (pipe2(p, O_CLOEXEC) != 0) return -1;
    std::vector<std::string> a = args;
    std::vector<char*> argv;
    for (auto& s : a) argv.push_back(s.data());
    argv.push_back(nullptr);
    pid_t pid = fork();
    if (pid == 0) {
      dup2(p[1], STDOUT_FILENO);
      dup2(p[1], STDERR_FILENO);
      execv("/proc/self/exe", argv.data());
      _exit(127);
    }
    close(p[1]);
    char buf[4096];
    ssize_t n;
    while ((n = read(p[0], buf, sizeof buf)) > 0) out->append(buf, static_cast<size_t>(n));
    close(p[0]);
    int status = 0;
    // Reap it here (the SIGCHLD it causes finds nothing of ours).
    while (waitpid(pid, &status, 0) < 0 && errno == EINTR) {
    }
    return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  }

  // --reload: inotify on the app's directories (and their subdirectories).
  void Watch() {
    inotify_fd_ = inotify_init1(IN_NONBLOCK | IN_CLOEXEC);
    if (inotify_fd_ < 0) {
      LOG_ERROR("--reload: inotify: %s; files are not watched", std::strerror(errno));
      return;
    }
    std::vector<std::string> todo = o_.watch_dirs;
    int watched = 0;
    while (!todo.empty() && watched < kWatchDirsMax) {
      std::string dir = todo.back();
      todo.pop_back();
      if (inotify_add_watch(inotify_fd_, dir.c_str(), IN_CLOSE_WRITE | IN_MOVED_TO | IN_CREATE | IN_DELETE) < 0) continue;
      ++watched;
      DIR* d = opendir(dir.c_str());
      if (d == nullptr) continue;
      while (dirent* e = readdir(d)) {
        if (e->d_name[0] == '.' || strcmp(e->d_name, "__pycache__") == 0 || strcmp(e->d_name, "node_modules") == 0) continue;
        std::string sub = absl::StrCat(dir, "/", e->d_name);
        struct stat st;
        if (stat(sub.c_str(), &st) == 0 && S_ISDIR(st.st_mode)) todo.push_back(sub);
      }
      closedir(d);
    }
    LOG_WARN("--reload: watching %d director%s for .py changes; FOR DEVELOPMENT ONLY: a change restarts the "
             "workers (requests in flight drain first)", watched, watched == 1 ? "y" : "ies");
  }

  void FilesChanged() {
    alignas(inotify_event) char buf[8192];
    ssize_t n;
    while ((n = read(inotify_fd_, buf, sizeof buf)) > 0) {
      for (char* p = buf; p < buf + n;) {
        auto* ev = reinterpret_cast<inotify_event*>(p);
        const size_t len = ev->len ? strlen(ev->name) : 0;
        if (len > 3 && strcmp(ev->name + len - 3, ".py") == 0) {
          if (reload_at_ns_ == 0) LOG_INFO("--reload: %s changed", ev->name);
          reload_at_ns_ = MonotonicNowNs() + kReloadDebounceNs;
        }
        p += sizeof(inotify_event) + ev->len;
      }
    }
  }

  void Timers() {
    const int64_t now = MonotonicNowNs();
    if (reload_at_ns_ != 0 && now >= reload_at_ns_ && reload_generation_ < 0) {
      reload_at_ns_ = 0;
      Reload();
    }
    if (immediate_ && now > immediate_deadline_ns_) {
      for (auto& w : workers_) ResetThreadsOf(w->pid);
      done_ = true;
      return;
    }
    for (size_t slot = 0; slot < slots_.size(); ++slot) {
      SlotState& s = slots_[slot];
      if (s.respawn_at != 0 && now >= s.respawn_at && !stopping_) {
        s.respawn_at = 0;
        ++s.restarts;
        Spawn(static_cast<int>(slot), generation_);
      }
    }
    if (reload_generation_ >= 0 && now - reload_started_ns_ > kReadyTimeoutNs) {
      LOG_ERROR("supervisor: reload failed: generation %d was not ready within %s; the old generation keeps serving",
                reload_generation_, FormatDuration(kReadyTimeoutNs).c_str());
      AbortReload();
    }
    for (auto& w : workers_) {
      if (w->state == Worker::State::kStarting && now - w->started_ns > kReadyTimeoutNs &&
          w->generation != reload_generation_) {
        LOG_ERROR("supervisor: worker %d (pid %d) was not ready within %s: stopping it", w->slot, w->pid,
                  FormatDuration(kReadyTimeoutNs).c_str());
        w->state = Worker::State::kReady;  // so that its death counts as a crash
        kill(w->pid, SIGTERM);
        kill(w->pid, SIGTERM);
      }
      if (w->state != Worker::State::kReady || w->replacement_started || stopping_) continue;
      if (w->requests_limit > 0 && w->requests >= w->requests_limit) {
        LOG_INFO("supervisor: worker %d (pid %d) served %lld requests (server.max_requests): recycling it", w->slot,
                 w->pid, static_cast<long long>(w->requests));
        Replace(*w);
      } else if (o_.max_rss_bytes > 0 && w->rss_bytes >= o_.max_rss_bytes) {
        LOG_INFO("supervisor: worker %d (pid %d) RSS %s past server.max_rss: recycling it", w->slot, w->pid,
                 FormatSize(static_cast<uint64_t>(w->rss_bytes)).c_str());
        Replace(*w);
      }
    }
  }

  void Publish() {
    std::vector<WorkerView> v;
    for (const auto& w : workers_) {
      WorkerView x;
      x.index = w->slot;
      x.generation = w->generation;
      x.pid = w->pid;
      x.state = StateName(w->state);
      x.requests = w->requests;
      x.rss_bytes = w->rss_bytes;
      x.restarts = slots_[static_cast<size_t>(w->slot)].restarts;
      x.started_unix_ns = w->started_unix_ns;
      x.admin = w->admin;
      v.push_back(std::move(x));
    }
    table_->Set(std::move(v));
  }

  Options o_;
  WorkerTable* table_;
  std::mt19937 rng_;
  std::vector<int> listen_fds_;
  int spawned_ = 0;
  int inotify_fd_ = -1;
  int64_t reload_at_ns_ = 0;
  std::vector<std::unique_ptr<Worker>> workers_;
  std::vector<SlotState> slots_;
  std::deque<int64_t> deaths_;
  int generation_ = 0, last_generation_ = 0, reload_generation_ = -1;
  int64_t reload_started_ns_ = 0;
  bool stopping_ = false, done_ = false, immediate_ = false;
  int64_t immediate_deadline_ns_ = 0;
  int exit_code_ = 0;
};

int g_control_fd = -1;

}  // namespace

std::vector<WorkerView> WorkerTable::Snapshot() const {
  std::lock_guard<std::mutex> l(mu_);
  return workers_;
}
void WorkerTable::Set(std::vector<WorkerView> workers) {
  std::lock_guard<std::mutex> l(mu_);
  workers_ = std::move(workers);
}
bool WorkerTable::draining() const {
  std::lock_guard<std::mutex> l(mu_);
  return draining_;
}
void WorkerTable::set_draining(bool d) {
  std::lock_guard<std::mutex> l(mu_);
  draining_ = d;
}

int Run(const Options& options, WorkerTable* table) { return Supervisor(options, table).Run(); }

WorkerEnv ReadWorkerEnv() {
  WorkerEnv e;
  const char* index = getenv("METRONOME_WORKER_INDEX");
  if (index == nullptr) return e;
  e.is_worker = true;
  e.index = atoi(index);
  e.generation = atoi(getenv("METRONOME_WORKER_GENERATION") ? getenv("METRONOME_WORKER_GENERATION") : "0");
  e.workers = atoi(getenv("METRONOME_WORKER_COUNT") ? getenv("METRONOME_WORKER_COUNT") : "1");
  e.listen_fd = atoi(getenv("METRONOME_WORKER_LISTEN_FD") ? getenv("METRONOME_WORKER_LISTEN_FD") : "-1");
  e.control_fd = atoi(getenv("METRONOME_WORKER_CONTROL_FD") ? getenv("METRONOME_WORKER_CONTROL_FD") : "-1");
  e.admin_socket = getenv("METRONOME_WORKER_ADMIN") ? getenv("METRONOME_WORKER_ADMIN") : "";
  if (e.control_fd >= 0) fcntl(e.control_fd, F_SETFD, FD_CLOEXEC);
  g_control_fd = e.control_fd;
  return e;
}

void TellSupervisor(const char* line) {
  if (g_control_fd < 0) return;
  ssize_t n = write(g_control_fd, line, strlen(line));
  (void)n;
}

}  // namespace metronome::supervisor
