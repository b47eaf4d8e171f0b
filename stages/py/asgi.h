// Requests as asyncio tasks on their lane's loop (loop.h): ASGI 3.0 apps, and metronome.App's
// `async def` handlers.
//
// One task per request: the python stage creates it (the app's coroutine wrapped in a
// `TaskBudget`, below) and the lane's loop runs it among the others; a request that awaits
// holds nothing but its task. What the app sends (ASGI send(), or the handler's return value)
// becomes the response, emitted by the python stage through its Host methods.
//
// Budgets per task: every step of a task's coroutine runs between Host::StepBegin and
// Host::StepEnd, which switch the memory account to the task's and arm the watchdog for what
// is left of its CPU budget, so time and bytes are charged to the request whose task is
// running. A step past its budget gets BudgetExceeded raised inside that task only; a task that
// swallows it is closed. Awaiting costs no budget; python.budget.hard bounds a task's wall time.
//
// Thread-safety: REQUIRES the GIL; a Call belongs to the lane that made it.
#pragma once

#include <Python.h>

#include <cstdint>
#include <string>

#include "absl/status/status.h"

#include "stages/http/items.h"
#include "stages/http/shared.h"
#include "stages/py/budget.h"
#include "stages/py/wsgi.h"

namespace metronome::py {
class LaneLoop;
}

namespace metronome::py::asgi {

class Host;

// One request's task, as the python stage tracks it.
struct Call {
  Host* host = nullptr;
  http::Request* request = nullptr;  // owned by the stage until the head is emitted
  http::ConnId conn = 0;
  uint32_t seq = 0;
  int route = -1;
  bool metronome = false;            // a metronome.App async handler (the return value answers)
  PyObject* object = nullptr;        // the _metronome.AsgiCall (borrowed by the task's closures)
  PyObject* task = nullptr;
  PyObject* req_object = nullptr;    // metronome: the handler's request object
  // Budgets.
  MemoryAccount account;
  int64_t cpu_budget_ns = 0, cpu_used_ns = 0;
  int64_t started_ns = 0;            // wall clock, for python.budget.hard
  int64_t step_start_ns = 0;
  char budget_failed = 0;            // 'c' cpu, 'm' memory, 'h' hard
  // ASGI protocol state.
  bool body_delivered = false;       // http.request was received
  PyObject* body = nullptr;          // the request body as bytes, kept once the head is emitted
  bool response_started = false;     // http.response.start seen
  bool head_emitted = false;         // the Request went to serialize
  bool finished = false;             // the last body (or a whole response) was emitted
  bool client_gone = false;
  PyObject* receive_waiter = nullptr;  // a Future a receive() waits on (http.disconnect)
  PyObject* send_waiter = nullptr;     // a Future a send() waits on (backpressure)
  int64_t send_waiting_since_ns = 0;   // ... since then, and since the client last read
  uint64_t written_seen = 0;           // the connection's written bytes when last looked at
  // The streamed body, once the head is out.
  http::BodyChunk* terminal = nullptr;
  uint32_t next_part = 1;
  http::Framing framing = http::Framing::kChunked;
  int64_t declared = -1, sent = 0;
};

class Host {
 public:
  virtual ~Host() = default;
  // send(message): None, or an awaitable the app must wait on (backpressure); nullptr with an
  // exception set for an invalid message.
  virtual PyObject* OnSend(Call& c, PyObject* message) = 0;
  // receive(): a message dict, or a Future that will carry one.
  virtual PyObject* OnReceive(Call& c) = 0;
  // The task finished (returned, raised, or was cancelled).
  virtual void OnDone(Call& c, PyObject* task) = 0;
  // Around every step of the task's coroutine. StepEnd returns true when the step ran past a
  // budget (the wrapper then makes sure the task ends).
  virtual void StepBegin(Call& c) = 0;
  virtual bool StepEnd(Call& c) = 0;
};

// Once per process (the GIL held): the types and the metronome._asgi helpers.
bool Init();

// The http scope of `r` (new reference). `state` (a dict or nullptr) is the lifespan state,
// copied shallowly into the scope (ASGI spec).
PyObject* NewScope(const http::Request& r, const http::HttpShared& shared, const wsgi::ServerInfo& info,
                   PyObject* state);

// The Python object of a call (new reference): `receive` and `send` for the app come from it.
PyObject* NewCallObject(Call* c);
// (receive, send) coroutine functions bound to the call object (new reference, a tuple).
PyObject* Channel(PyObject* call_object);
// The app's coroutine wrapped so that every step runs under the call's budgets (new reference,
// a collections.abc.Coroutine).
PyObject* WrapCoroutine(PyObject* coro, Call* c);
// Adds the done callback that reports to c->host->OnDone.
bool AddDoneCallback(PyObject* task, PyObject* call_object);
// Detaches the Python object from the call (the call is being freed).
void Detach(PyObject* call_object);

// The lifespan protocol, on the main lane's loop before it runs requests.
struct Lifespan {
  PyObject* driver = nullptr;  // metronome._asgi.Lifespan
  PyObject* state = nullptr;   // the dict the app filled (borrowed from driver)
  bool supported = false;
};
// Startup: OK, or the app's failure message (the server must not start). An app that does not
// speak lifespan (raises on the scope) is fine: `supported` stays false, and the log says so.
absl::Status StartLifespan(PyObject* app, LaneLoop& loop, Lifespan* out);
void StopLifespan(Lifespan& l, LaneLoop& loop);

}  // namespace metronome::py::asgi
