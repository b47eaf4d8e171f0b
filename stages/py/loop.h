// A python lane's persistent asyncio event loop, stepped by the lane instead of running it.
//
// The lane loop (runtime/lane.h) owns the thread, so the event loop cannot `run_forever()`:
// the python stage opens the loop once, marks it as this thread's running loop (so that
// asyncio.get_running_loop(), create_task and anyio work inside handlers), and calls Step()
// when there is something to do: ready callbacks, a timer that is due, or the selector's fd
// readable (the lane waits on that fd too: Stage::WaitFd). Step() runs one iteration of the
// loop (BaseEventLoop._run_once, CPython 3.11), which never blocks then: with ready callbacks
// or a due timer its select timeout is 0, and a readable fd returns at once.
//
// Thread-safety: every call on the lane's thread with the GIL held, except due() and fd(),
// which read values cached after the last Step().
#pragma once

#include <Python.h>

#include <cstdint>

#include "absl/status/status.h"
#include "runtime/clock.h"

namespace metronome::py {

class LaneLoop {
 public:
  // Creates the loop (not yet running on this thread).
  absl::Status Create();
  // Makes it this thread's running loop, from now until Close().
  absl::Status Enter();
  bool open() const { return loop_ != nullptr; }
  PyObject* loop() const { return loop_; }
  int fd() const { return fd_; }
  // Ready callbacks or a timer due at `now_ns` (cached after the last Step or Touch).
  bool due(int64_t now_ns) const { return ready_ || now_ns >= next_timer_ns_; }
  int64_t next_timer_ns() const { return next_timer_ns_; }
  // Something was scheduled from outside a step (a task created): there are ready callbacks.
  void Touch() { ready_ = true; }
  // One iteration of the loop, then the cached state refreshed.
  // REQUIRES: due() or the fd readable, else the iteration would block in its select.
  void Step();
  // Re-reads the ready queue and the first timer (after callbacks were scheduled from outside).
  void Refresh();
  // Runs `awaitable` to completion while the loop is not this thread's running loop (lifespan
  // at start-up and shutdown). New reference to its result, or nullptr with the exception set.
  PyObject* RunUntilComplete(PyObject* awaitable, double timeout_s);
  // Cancels what is left, runs it out, closes the loop.
  void Close();

 private:
  PyObject* loop_ = nullptr;
  PyObject* run_once_ = nullptr;  // bound loop._run_once
  PyObject* ready_deque_ = nullptr;  // loop._ready
  PyObject* scheduled_ = nullptr;    // loop._scheduled (a heap of TimerHandles)
  int fd_ = -1;
  bool entered_ = false;
  bool ready_ = false;
  int64_t next_timer_ns_ = kNeverNs;
};

}  // namespace metronome::py
