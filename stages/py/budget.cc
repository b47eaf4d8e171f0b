#include "stages/py/budget.h"

#include <malloc.h>
#include <pthread.h>
#include <sched.h>
#include <unistd.h>

#include <cstdio>
#include <cstring>

#include "runtime/log.h"
#include "runtime/clock.h"
#include "runtime/process_events.h"
#include "runtime/units.h"

namespace metronome::py {
namespace {

// --- allocator wrappers ---------------------------------------------------------------------

// Every wrapped block starts with this header; 16 bytes keep the caller's 16-byte alignment.
struct alignas(16) BlockHeader {
  size_t size;
  size_t pad;
};
static_assert(sizeof(BlockHeader) == 16);

thread_local MemoryAccount* t_account = nullptr;
std::atomic<int64_t> g_live{0};
bool g_installed = false;

struct Wrapped {
  PyMemAllocatorEx inner;
};
Wrapped g_domains[3];

inline bool Charge(size_t size) {
  MemoryAccount* a = t_account;
  if (a == nullptr) return true;
  if (a->cap > 0 && a->live + static_cast<int64_t>(size) > a->cap) {
    a->exceeded = true;
    return false;
  }
  a->live += static_cast<int64_t>(size);
  if (a->live > a->peak) a->peak = a->live;
  return true;
}

inline void Credit(size_t size) {
  if (MemoryAccount* a = t_account) a->live -= static_cast<int64_t>(size);
}

void* Malloc(void* ctx, size_t size) {
  auto* w = static_cast<Wrapped*>(ctx);
  if (!Charge(size)) return nullptr;
  auto* h = static_cast<BlockHeader*>(w->inner.malloc(w->inner.ctx, size + sizeof(BlockHeader)));
  if (h == nullptr) {
    Credit(size);
    return nullptr;
  }
  h->size = size;
  g_live.fetch_add(static_cast<int64_t>(size), std::memory_order_relaxed);
  return h + 1;
}

void* Calloc(void* ctx, size_t nelem, size_t elsize) {
  if (elsize != 0 && nelem > (SIZE_MAX - sizeof(BlockHeader)) / elsize) return nullptr;
  size_t size = nelem * elsize;
  void* p = Malloc(ctx, size);
  if (p != nullptr) std::memset(p, 0, size);
  return p;
}

void Free(void* ctx, void* ptr) {
  if (ptr == nullptr) return;
  auto* w = static_cast<Wrapped*>(ctx);
  BlockHeader* h = static_cast<BlockHeader*>(ptr) - 1;
  Credit(h->size);
  g_live.fetch_sub(static_cast<int64_t>(h->size), std::memory_order_relaxed);
  w->inner.free(w->inner.ctx, h);
}

void* Realloc(void* ctx, void* ptr, size_t size) {
  if (ptr == nullptr) return Malloc(ctx, size);
  auto* w = static_cast<Wrapped*>(ctx);
  BlockHeader* h = static_cast<BlockHeader*>(ptr) - 1;
  size_t old = h->size;
  if (size > old && !Charge(size - old)) return nullptr;
  auto* n = static_cast<BlockHeader*>(w->inner.realloc(w->inner.ctx, h, size + sizeof(BlockHeader)));
  if (n == nullptr) {
    if (size > old) Credit(size - old);
    return nullptr;
  }
  if (size < old) Credit(old - size);
  n->size = size;
  g_live.fetch_add(static_cast<int64_t>(size) - static_cast<int64_t>(old), std::memory_order_relaxed);
  return n + 1;
}

}  // namespace

void SetMemoryAccount(MemoryAccount* account) { t_account = account; }

void InstallAllocatorWrappers() {
  if (g_installed) return;
  const PyMemAllocatorDomain domains[3] = {PYMEM_DOMAIN_RAW, PYMEM_DOMAIN_MEM, PYMEM_DOMAIN_OBJ};
  for (int i = 0; i < 3; ++i) {
    PyMem_GetAllocator(domains[i], &g_domains[i].inner);
    PyMemAllocatorEx a{&g_domains[i], Malloc, Calloc, Realloc, Free};
    PyMem_SetAllocator(domains[i], &a);
  }
  g_installed = true;
}

int64_t WrappedLiveBytes() { return g_live.load(std::memory_order_relaxed); }

int64_t ReadRssBytes() {
  FILE* f = fopen("/proc/self/statm", "r");
  if (f == nullptr) return 0;
  long size = 0, resident = 0;
  int n = fscanf(f, "%ld %ld", &size, &resident);
  fclose(f);
  return n == 2 ? resident * sysconf(_SC_PAGESIZE) : 0;
}

// --- watchdog -----------------------------------------------------------------------------

Watchdog& GlobalWatchdog() {
  static Watchdog* w = new Watchdog();  // lives as long as the process: the thread reads it
  return *w;
}

void Watchdog::Start(const Options& options, PyObject* budget_exceeded) {
  options_ = options;
  // The signal only trips the eval breaker if Python handles it: give it a Python handler that
  // does nothing (the pending call does the work, tagged with its request).
  PyObject* r = PyRun_String("__import__('signal').signal(__import__('signal').SIGUSR2, lambda s, f: None)",
                             Py_eval_input, PyEval_GetBuiltins(), nullptr);
  if (r == nullptr) {
    PyErr_Clear();
    LOG_WARN("budget: cannot install a Python handler for SIGUSR2: CPU budgets on the main lane fire late");
  }
  Py_XDECREF(r);
  Py_XINCREF(budget_exceeded);
  exc_ = budget_exceeded;
  thread_ = std::thread([this] { Loop(); });
  interrupter_ = std::thread([this] { Interrupter(); });
}

void Watchdog::Stop() {
  if (!thread_.joinable()) return;
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  async_cv_.notify_all();
  // The interrupter may be waiting for the GIL: let it have it.
  Py_BEGIN_ALLOW_THREADS
  thread_.join();
  interrupter_.join();
  Py_END_ALLOW_THREADS
}

// Raises BudgetExceeded in non-main lanes, one request at a time, under the GIL.
void Watchdog::Interrupter() {
  pthread_setname_np(pthread_self(), "interrupter");
  std::unique_lock<std::mutex> lock(mu_);
  for (;;) {
    async_cv_.wait(lock, [&] { return stop_ || !async_.empty(); });
    if (stop_) return;
    AsyncInterrupt job = async_.front();
    async_.pop_front();
    lock.unlock();
    Lane& l = lanes_[job.lane];
    PyGILState_STATE g = PyGILState_Ensure();
    // Under the GIL the lane is not running Python: its seq cannot change while we look.
    if (l.seq.load(std::memory_order_acquire) == job.seq) {
      PyThreadState_SetAsyncExc(l.thread_id, exc_);
    } else {
      late_interrupts.Add();
    }
    PyGILState_Release(g);
    lock.lock();
  }
}

int Watchdog::Register(bool main_thread) {
  int i = num_lanes_.load();
  if (i >= kLanesMax) Fatal("more than %d python lanes", kLanesMax);
  lanes_[i].main_thread = main_thread;
  lanes_[i].thread_id = PyThread_get_thread_ident();
  lanes_[i].pthread = pthread_self();
  num_lanes_.store(i + 1, std::memory_order_release);
  return i;
}

void Watchdog::Begin(int lane, uint64_t seq, int64_t now_ns, int64_t budget_ns, const char* label) {
  Lane& l = lanes_[lane];
  l.label = label;
  l.stuck_reported.store(false, std::memory_order_relaxed);
  l.start_ns.store(now_ns, std::memory_order_relaxed);
  l.deadline_ns.store(budget_ns > 0 ? now_ns + budget_ns : kNeverNs, std::memory_order_relaxed);
  l.seq.store(seq, std::memory_order_release);
}

bool Watchdog::End(int lane, int64_t now_ns) {
  Lane& l = lanes_[lane];
  const uint64_t seq = l.seq.load(std::memory_order_relaxed);
  l.seq.store(0, std::memory_order_release);
  const bool fired = l.fired_seq.load(std::memory_order_acquire) == seq;
  // Past its budget, yet not interrupted: the watchdog was late (seen on this VM about once in
  // 20k interrupts, issued ~2 ms after the deadline; the cause is not known). The request
  // exceeded its budget all the same; the answer must not depend on the watchdog's timing.
  const bool ended_past = !fired && now_ns > l.deadline_ns.load(std::memory_order_relaxed);
  if (ended_past) ended_past_budget.Add();
  if (fired && !l.main_thread) {
    // An async exception that did not get raised in time would hit this thread's next Python
    // code: clear it (REQUIRES the GIL, which the lane holds).
    PyThreadState_SetAsyncExc(l.thread_id, nullptr);
  }
  if (l.stuck_reported.load(std::memory_order_relaxed)) {
    LOG_ERROR("budget: %s returned after %.3fs, past the %s hard limit", l.label,
              static_cast<double>(now_ns - l.start_ns.load()) / 1e9, FormatDuration(options_.hard_ns).c_str());
  }
  return fired || ended_past;
}

// Runs on the main thread at the interpreter's next check (Py_AddPendingCall).
int Watchdog::InterruptMain(void* arg) {
  Watchdog& w = GlobalWatchdog();
  uintptr_t packed = reinterpret_cast<uintptr_t>(arg);
  int lane = static_cast<int>(packed & 0xff);
  uint64_t seq = packed >> 8;
  if (w.lanes_[lane].seq.load(std::memory_order_acquire) != seq) {
    w.late_interrupts.Add();
    return 0;  // its request is over: nothing to interrupt
  }
  PyErr_SetString(w.exc_, "the request ran past its CPU budget");
  return -1;
}

void Watchdog::Fire(int lane, uint64_t seq, int64_t now) {
  Lane& l = lanes_[lane];
  int64_t deadline = l.deadline_ns.load(std::memory_order_relaxed);
  // `fired_seq` goes first: the interrupt can end the request before this thread runs another
  // line, and End() must then see that the budget, not the handler, failed it. (`fired_ns` is
  // this thread's own: only Loop reads it.)
  l.fired_ns.store(now, std::memory_order_relaxed);
  l.fired_seq.store(seq, std::memory_order_release);
  if (l.main_thread) {
    // The sequence number travels in the pointer (24 bits of lane slack are plenty).
    void* arg = reinterpret_cast<void*>(static_cast<uintptr_t>((seq << 8) | static_cast<uint64_t>(lane)));
    if (Py_AddPendingCall(&Watchdog::InterruptMain, arg) != 0) {
      l.fired_seq.store(0, std::memory_order_release);  // queue full: next round
      return;
    }
    // CPython 3.11 decides whether to wake the main thread for a pending call on the *calling*
    // thread, where the answer is no: alone, the call would wait for the handler's end. A real
    // signal delivered to the main thread runs Python's C handler there, which trips the eval
    // breaker; the main thread then runs the pending call (~100 us, measured; a simulated signal
    // with PyErr_SetInterruptEx has the same flaw as the pending call and does not work).
    pthread_kill(l.pthread, kBudgetSignal);
  } else {
    // Raising in another thread needs the GIL, which can take a while to get from a busy lane:
    // the interrupter thread waits for it, so this loop never does and keeps every other
    // deadline (a watchdog stuck on the GIL once missed the next request's budget entirely).
    {
      std::lock_guard<std::mutex> lock(mu_);
      async_.push_back({lane, seq});
    }
    async_cv_.notify_one();
  }
  cpu_interrupts.Add();
  interrupt_delay_ns.Record(static_cast<uint64_t>(std::max<int64_t>(0, now - deadline)));
}

void Watchdog::Loop() {
  pthread_setname_np(pthread_self(), "watchdog");
  // Prompt wake-ups matter more than anything this thread costs (it sleeps almost always):
  // SCHED_FIFO where permitted, else the default policy (said once).
  sched_param sp{};
  sp.sched_priority = 1;
  if (pthread_setschedparam(pthread_self(), SCHED_FIFO | SCHED_RESET_ON_FORK, &sp) != 0) {
    LOG_WARN("budget watchdog runs under SCHED_OTHER (SCHED_FIFO refused): CPU budgets may fire late under load");
  }
  int64_t next_rss = 0;
  std::unique_lock<std::mutex> lock(mu_);
  while (!stop_) {
    lock.unlock();
    int64_t now = MonotonicNowNs();
    int64_t wake = now + options_.idle_look_ns;
    const int n = num_lanes_.load(std::memory_order_acquire);
    for (int i = 0; i < n; ++i) {
      Lane& l = lanes_[i];
      uint64_t seq = l.seq.load(std::memory_order_acquire);
      if (seq == 0) continue;
      int64_t deadline = l.deadline_ns.load(std::memory_order_relaxed);
      if (l.fired_seq.load(std::memory_order_relaxed) != seq) {
        if (now >= deadline) {
          Fire(i, seq, now);
        } else {
          wake = std::min(wake, deadline);
        }
      }
      // Stuck: still running `hard` after its interrupt was issued, so it did not get back to
      // the eval loop, which would have raised it (budget.h). Counting from the handler's start
      // instead called a route whose own budget is longer than `hard` stuck while it ran.
      const bool fired = l.fired_seq.load(std::memory_order_relaxed) == seq;
      const bool unbudgeted = deadline == kNeverNs;
      const int64_t start = l.start_ns.load(std::memory_order_relaxed);
      const int64_t hard_at = fired ? l.fired_ns.load(std::memory_order_relaxed) + options_.hard_ns
                              : unbudgeted ? start + options_.hard_ns
                                           : kNeverNs;  // not yet interrupted: its deadline wakes us
      if (!l.stuck_reported.load(std::memory_order_relaxed) && now >= hard_at && l.seq.load() == seq) {
        l.stuck_reported.store(true, std::memory_order_relaxed);
        stuck_handlers.Add();
        ReportProcessEvent("stuck\n");  // a supervisor may replace this worker (hard_action)
        if (fired) {
          LOG_ERROR("budget: %s did not stop within the %s hard limit after its CPU budget interrupt (%.3fs in "
                    "the handler): it cannot be interrupted (C code that does not check for signals, or a "
                    "blocking call off the main lane); Python work on its thread waits, native routes keep "
                    "answering", l.label, FormatDuration(options_.hard_ns).c_str(),
                    static_cast<double>(now - start) / 1e9);
        } else {
          LOG_ERROR("budget: %s has run for %.3fs with no CPU budget, past the %s hard limit; nothing can "
                    "interrupt it. Python work on its thread waits, native routes keep answering", l.label,
                    static_cast<double>(now - start) / 1e9, FormatDuration(options_.hard_ns).c_str());
        }
      } else if (!l.stuck_reported.load(std::memory_order_relaxed)) {
        wake = std::min(wake, hard_at);
      }
    }
    if (options_.rss_limit_bytes > 0 && now >= next_rss) {
      next_rss = now + options_.rss_check_ns;
      int64_t rss = ReadRssBytes();
      bool over = rss > options_.rss_limit_bytes;
      if (over != rss_over_.load(std::memory_order_relaxed)) {
        rss_over_.store(over, std::memory_order_relaxed);
        if (over) {
          rss_sheds.Add();
          malloc_trim(0);
        }
        LOG_WARN("budget: process RSS %s MiB is %s python.budget.rss_limit (%s MiB): %s",
                 std::to_string(rss >> 20).c_str(), over ? "above" : "back below",
                 std::to_string(options_.rss_limit_bytes >> 20).c_str(),
                 over ? "new Python work is answered 503" : "serving Python again");
      }
      wake = std::min(wake, next_rss);
    }
    lock.lock();
    if (stop_) break;
    int64_t wait_ns = std::max<int64_t>(0, wake - MonotonicNowNs());
    cv_.wait_for(lock, std::chrono::nanoseconds(wait_ns));
  }
}

}  // namespace metronome::py
