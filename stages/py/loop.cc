#include "stages/py/loop.h"

#include "absl/strings/str_cat.h"
#include "runtime/log.h"
#include "stages/py/interpreter.h"

namespace metronome::py {

absl::Status LaneLoop::Create() {
  PyObject* asyncio = PyImport_ImportModule("asyncio");
  loop_ = asyncio ? PyObject_CallMethod(asyncio, "new_event_loop", nullptr) : nullptr;
  Py_XDECREF(asyncio);
  if (loop_ == nullptr) return absl::InternalError(absl::StrCat("asyncio.new_event_loop: ", FetchExceptionLine()));
  run_once_ = PyObject_GetAttrString(loop_, "_run_once");
  ready_deque_ = PyObject_GetAttrString(loop_, "_ready");
  scheduled_ = PyObject_GetAttrString(loop_, "_scheduled");
  PyObject* selector = PyObject_GetAttrString(loop_, "_selector");
  PyObject* fileno = selector ? PyObject_CallMethod(selector, "fileno", nullptr) : nullptr;
  Py_XDECREF(selector);
  if (run_once_ == nullptr || ready_deque_ == nullptr || scheduled_ == nullptr || fileno == nullptr) {
    Py_XDECREF(fileno);
    return absl::InternalError(absl::StrCat(
        "this asyncio loop has no _run_once/_ready/_scheduled/_selector (CPython 3.11's BaseEventLoop is "
        "required): ", FetchExceptionLine()));
  }
  fd_ = static_cast<int>(PyLong_AsLong(fileno));
  Py_DECREF(fileno);
  return absl::OkStatus();
}

absl::Status LaneLoop::Enter() {
  // What run_forever() does before its first iteration: the running loop of this thread, and
  // the loop's async generator hooks.
  PyObject* events = PyImport_ImportModule("asyncio.events");
  PyObject* r = events ? PyObject_CallMethod(events, "_set_running_loop", "O", loop_) : nullptr;
  Py_XDECREF(events);
  if (r == nullptr) return absl::InternalError(absl::StrCat("asyncio: cannot enter the loop: ", FetchExceptionLine()));
  Py_DECREF(r);
  PyObject* sys = PyImport_ImportModule("sys");
  PyObject* first = PyObject_GetAttrString(loop_, "_asyncgen_firstiter_hook");
  PyObject* final = PyObject_GetAttrString(loop_, "_asyncgen_finalizer_hook");
  PyObject* set = sys && first && final ? PyObject_GetAttrString(sys, "set_asyncgen_hooks") : nullptr;
  PyObject* kwargs = set ? Py_BuildValue("{s:O,s:O}", "firstiter", first, "finalizer", final) : nullptr;
  PyObject* args = kwargs ? PyTuple_New(0) : nullptr;
  r = args ? PyObject_Call(set, args, kwargs) : nullptr;
  Py_XDECREF(args);
  Py_XDECREF(kwargs);
  Py_XDECREF(set);
  Py_XDECREF(first);
  Py_XDECREF(final);
  Py_XDECREF(sys);
  if (r == nullptr) return absl::InternalError(absl::StrCat("asyncio: async generator hooks: ", FetchExceptionLine()));
  Py_DECREF(r);
  entered_ = true;
  Refresh();
  return absl::OkStatus();
}

void LaneLoop::Refresh() {
  ready_ = PyObject_Length(ready_deque_) > 0;
  next_timer_ns_ = kNeverNs;
  if (PyList_GET_SIZE(scheduled_) > 0) {
    PyObject* when = PyObject_GetAttrString(PyList_GET_ITEM(scheduled_, 0), "_when");
    double s = when ? PyFloat_AsDouble(when) : -1;
    Py_XDECREF(when);
    if (s >= 0 && !PyErr_Occurred()) {
      next_timer_ns_ = static_cast<int64_t>(s * 1e9);  // loop.time() is time.monotonic(): CLOCK_MONOTONIC
    } else {
      PyErr_Clear();
      next_timer_ns_ = MonotonicNowNs();
    }
  }
}

void LaneLoop::Step() {
  PyObject* r = PyObject_CallNoArgs(run_once_);
  if (r == nullptr) {
    // The loop itself failed (not a task: those keep their exceptions): say so, keep serving.
    LOG_RATE_LIMITED(LogLevel::kError, "asyncio loop iteration raised:\n%s", FetchTraceback().c_str());
  }
  Py_XDECREF(r);
  Refresh();
}

PyObject* LaneLoop::RunUntilComplete(PyObject* awaitable, double timeout_s) {
  PyObject* asyncio = PyImport_ImportModule("asyncio");
  PyObject* bounded = asyncio ? PyObject_CallMethod(asyncio, "wait_for", "Od", awaitable, timeout_s) : nullptr;
  Py_XDECREF(asyncio);
  if (bounded == nullptr) return nullptr;
  PyObject* events = nullptr;
  if (entered_) {
    // run_until_complete refuses to run while the thread has a running loop: step aside.
    events = PyImport_ImportModule("asyncio.events");
    PyObject* r = events ? PyObject_CallMethod(events, "_set_running_loop", "O", Py_None) : nullptr;
    Py_XDECREF(r);
  }
  PyObject* result = PyObject_CallMethod(loop_, "run_until_complete", "O", bounded);
  Py_DECREF(bounded);
  if (entered_ && events != nullptr) {
    PyObject *t, *v, *tb;
    PyErr_Fetch(&t, &v, &tb);
    PyObject* r = PyObject_CallMethod(events, "_set_running_loop", "O", loop_);
    Py_XDECREF(r);
    PyErr_Restore(t, v, tb);
  }
  Py_XDECREF(events);
  return result;
}

void LaneLoop::Close() {
  if (loop_ == nullptr) return;
  if (entered_) {
    // run_until_complete (in close_loop) refuses to run while the thread has a running loop.
    PyObject* events = PyImport_ImportModule("asyncio.events");
    PyObject* r2 = events ? PyObject_CallMethod(events, "_set_running_loop", "O", Py_None) : nullptr;
    Py_XDECREF(r2);
    Py_XDECREF(events);
    PyErr_Clear();
    entered_ = false;
  }
  PyObject* helpers = PyImport_ImportModule("metronome._asgi");
  PyObject* r = helpers ? PyObject_CallMethod(helpers, "close_loop", "O", loop_) : nullptr;
  if (r == nullptr) LOG_WARN("asyncio loop close: %s", FetchExceptionLine().c_str());
  Py_XDECREF(r);
  Py_XDECREF(helpers);
  Py_CLEAR(run_once_);
  Py_CLEAR(ready_deque_);
  Py_CLEAR(scheduled_);
  Py_CLEAR(loop_);
  fd_ = -1;
}

}  // namespace metronome::py
