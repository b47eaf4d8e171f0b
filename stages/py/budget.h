// Per-request budgets for Python handlers: CPU (wall-clock time in the handler) and memory.
//
// CPU. A watchdog thread watches every python lane's running request. Past its budget it makes
// the handler raise metronome.BudgetExceeded:
//   - on the main thread, with Py_AddPendingCall: no GIL needed, the interpreter runs the call
//     at its next check (measured ~10-14 us, FACTS.md);
//   - on another python lane, with PyThreadState_SetAsyncExc, which needs the GIL: the delay is
//     the switch interval (python.switch_interval). An interrupter thread takes the GIL for it,
//     so the watchdog itself never waits on the GIL.
// Every interrupt carries the request's sequence number; one that arrives after its request
// ended does nothing (pending calls check it; the lane clears any async exception before its
// next request). Whatever the handler does with the exception, the server answers 503 with
// "Metronome-Budget: cpu". A handler stuck in C code cannot be interrupted: still running
// `hard` (python.budget.hard) after its interrupt was issued, it did not get back to the eval
// loop, and the watchdog logs it loudly and counts it, once per request. The hard limit counts
// from the interrupt, not from the handler's start: the interrupt reaches a handler that runs
// Python within ~100 us on the main lane and within a switch interval or two elsewhere, so only
// a handler in C code (or, off the main lane, in a blocking call) is still there `hard` later,
// whatever its own budget; a route whose budget is longer than `hard` is not stuck while it runs
// within it. A handler with no CPU budget (cpu: 0) is never interrupted: the hard limit counts
// from its start, and the log says it had no budget.
//
// Memory. The three CPython allocator domains are wrapped (pymalloc stays underneath); each
// block carries a 16-byte header with its size, so the bytes a request allocates minus the
// bytes it frees are known at every allocation. Past the cap the allocation fails: Python raises
// MemoryError, and the server answers 503 with "Metronome-Budget: memory" even if the handler
// swallowed it.
//
// Process-wide guard: when the process RSS passes python.budget.rss_limit, new Python work is
// answered 503 at once until it falls back below.
//
// Thread-safety: SetMemoryAccount/the allocators are per thread. Watchdog::Begin/End from the
// lane's thread; the watchdog thread reads the lanes' atomics.
#pragma once

#include <Python.h>
#include <pthread.h>
#include <signal.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <deque>
#include <cstdint>
#include <mutex>
#include <string>
#include <thread>

#include "runtime/stats.h"

namespace metronome::py {

// --- memory -------------------------------------------------------------------------------

struct MemoryAccount {
  int64_t live = 0;   // bytes allocated minus bytes freed while the account was current
  int64_t peak = 0;
  int64_t cap = 0;    // 0: unlimited
  bool exceeded = false;
};

// Charges this thread's allocations to `account` (nullptr: to nobody).
void SetMemoryAccount(MemoryAccount* account);
// Wraps the RAW, MEM and OBJ domains. REQUIRES: after Py_PreInitialize, before Py_Initialize
// (the wrapper must see every block it later frees).
void InstallAllocatorWrappers();
// Bytes currently allocated through the wrappers, all threads (for stats).
int64_t WrappedLiveBytes();
// The process's resident set, from /proc/self/statm.
int64_t ReadRssBytes();

// --- CPU ----------------------------------------------------------------------------------

class Watchdog {
 public:
  static constexpr int kLanesMax = 8;
  // Sent to the main thread with a budget interrupt, to wake the interpreter's eval loop; Python
  // gets a no-op handler for it. A stray SIGUSR2 sent to the process is harmless.
  static constexpr int kBudgetSignal = SIGUSR2;

  struct Options {
    // A handler still running this long after its budget interrupt (or, with no CPU budget,
    // after its start) is reported as stuck.
    int64_t hard_ns = 1'000'000'000;
    int64_t rss_limit_bytes = 0;      // 0: no process-wide guard
    int64_t rss_check_ns = 100'000'000;
    // With no request running, the watchdog looks again this often. It must be shorter than any
    // budget: a request that starts right after a look is then seen before its deadline (else
    // a 1 ms budget could be noticed only after a 3 ms handler ended). See IdleLookFor().
    int64_t idle_look_ns = kIdleLookMaxNs;
  };
  static constexpr int64_t kIdleLookMaxNs = 2'000'000;
  static constexpr int64_t kIdleLookMinNs = 100'000;
  // Half the smallest CPU budget in force, within [kIdleLookMinNs, kIdleLookMaxNs].
  static int64_t IdleLookFor(int64_t smallest_budget_ns) {
    return std::clamp<int64_t>(smallest_budget_ns / 2, kIdleLookMinNs, kIdleLookMaxNs);
  }

  // The per-lane state the watchdog reads. Written by the lane (Begin/End), read by the watchdog.
  struct alignas(64) Lane {
    std::atomic<uint64_t> seq{0};         // the running request's number; 0 when idle
    std::atomic<int64_t> start_ns{0};
    std::atomic<int64_t> deadline_ns{0};
    // The seq the CPU budget was enforced for (0: none). A seq, not a flag: a Fire that races
    // with the end of its request can only ever mark that request, never the next one.
    std::atomic<uint64_t> fired_seq{0};
    std::atomic<int64_t> fired_ns{0};     // when that interrupt was issued (the watchdog's own)
    std::atomic<bool> stuck_reported{false};
    const char* label = "";               // route of the running request (static storage)
    bool main_thread = false;
    unsigned long thread_id = 0;          // for PyThreadState_SetAsyncExc
    pthread_t pthread{};                  // for pthread_kill
  };

  // REQUIRES: the GIL is held by the caller during Start (the watchdog keeps the exception
  // class); the interpreter stays up until Stop.
  void Start(const Options& options, PyObject* budget_exceeded);
  void Stop();
  // A lane registers itself from its own thread. Returns its index.
  int Register(bool main_thread);

  // Around each handler call, on the lane's thread (with the GIL held).
  void Begin(int lane, uint64_t seq, int64_t now_ns, int64_t budget_ns, const char* label);
  // Returns true if the request ran past its CPU budget: interrupted, or ended (at `now_ns`,
  // when the handler returned) past its deadline before the interrupt came. Clears a late async
  // exception aimed at it.
  bool End(int lane, int64_t now_ns);

  bool rss_over_limit() const { return rss_over_.load(std::memory_order_relaxed); }

  Counter cpu_interrupts;     // BudgetExceeded raised
  Counter late_interrupts;    // an interrupt that found its request already gone (a no-op)
  Counter ended_past_budget;  // handlers that returned past their budget before any interrupt
  Counter stuck_handlers;     // handlers past the hard limit (after their interrupt, see above)
  Counter rss_sheds;          // transitions into the RSS guard
  LatencyHistogram interrupt_delay_ns;  // deadline -> the interrupt was issued

 private:
  void Loop();
  void Interrupter();
  void Fire(int lane, uint64_t seq, int64_t now);
  static int InterruptMain(void* arg);

  Options options_;
  PyObject* exc_ = nullptr;
  Lane lanes_[kLanesMax];
  std::atomic<int> num_lanes_{0};
  std::thread thread_;
  std::thread interrupter_;
  std::mutex mu_;
  std::condition_variable cv_;
  // Interrupts for non-main lanes, handed from the watchdog to the interrupter (under mu_).
  struct AsyncInterrupt {
    int lane;
    uint64_t seq;
  };
  std::deque<AsyncInterrupt> async_;
  std::condition_variable async_cv_;
  bool stop_ = false;
  std::atomic<bool> rss_over_{false};
};

Watchdog& GlobalWatchdog();

}  // namespace metronome::py
