#include "stages/py/asgi.h"

#include <cctype>

#include "absl/strings/str_cat.h"
#include "runtime/log.h"
#include "stages/py/interpreter.h"
#include "stages/py/loop.h"
#include "stages/py/module.h"

namespace metronome::py::asgi {
namespace {

// Lifespan startup may connect to databases; past this the server gives up and says so.
constexpr double kLifespanTimeoutS = 60.0;

PyObject* g_channel = nullptr;         // metronome._asgi.channel
PyObject* g_lifespan_class = nullptr;  // metronome._asgi.Lifespan
PyObject* g_asgi_info = nullptr;       // {"version": "3.0", "spec_version": "2.3"}

// --- the call object: receive(), send(), and the task's done callback ------------------------

struct CallObject {
  PyObject_HEAD
  Call* call;  // nullptr once detached
};

PyObject* Disconnect() { return Py_BuildValue("{s:s}", "type", "http.disconnect"); }

PyObject* CallReceive(CallObject* self, PyObject*) {
  if (self->call == nullptr) return Disconnect();
  return self->call->host->OnReceive(*self->call);
}

PyObject* CallSend(CallObject* self, PyObject* message) {
  if (self->call == nullptr) Py_RETURN_NONE;  // the request is over: nothing more goes out
  if (!PyDict_Check(message)) {
    PyErr_Format(PyExc_TypeError, "ASGI send() takes a dict, not %s", Py_TYPE(message)->tp_name);
    return nullptr;
  }
  return self->call->host->OnSend(*self->call, message);
}

PyObject* CallDone(CallObject* self, PyObject* task) {
  if (self->call != nullptr) self->call->host->OnDone(*self->call, task);
  Py_RETURN_NONE;
}

PyMethodDef kCallMethods[] = {
    {"receive", reinterpret_cast<PyCFunction>(CallReceive), METH_NOARGS, "ASGI receive(): a message or a Future."},
    {"send", reinterpret_cast<PyCFunction>(CallSend), METH_O, "ASGI send(message): None or a Future to await."},
    {"_done", reinterpret_cast<PyCFunction>(CallDone), METH_O, "The task's done callback."},
    {nullptr, nullptr, 0, nullptr}};

PyTypeObject CallType = [] {
  PyTypeObject t{PyVarObject_HEAD_INIT(nullptr, 0)};
  t.tp_name = "_metronome.AsgiCall";
  t.tp_basicsize = sizeof(CallObject);
  t.tp_dealloc = [](PyObject* o) { Py_TYPE(o)->tp_free(o); };
  t.tp_flags = Py_TPFLAGS_DEFAULT;
  t.tp_doc = "One request's channel between an ASGI app and the server.";
  t.tp_methods = kCallMethods;
  return t;
}();

// --- TaskBudget: the app's coroutine, each step under the call's budgets -----------------------

struct TaskBudget {
  PyObject_HEAD
  PyObject* inner;
  PyObject* call_object;  // a CallObject: reaches the Call while it lives
};

Call* CallOf(TaskBudget* self) { return reinterpret_cast<CallObject*>(self->call_object)->call; }

// After a step that ran past a budget: a coroutine still running (it swallowed BudgetExceeded,
// or the step ended before the interrupt came) is closed, and the task ends with BudgetExceeded.
PySendResult Overran(TaskBudget* self, PySendResult r, PyObject** result) {
  if (r != PYGEN_NEXT) return r;
  Py_CLEAR(*result);
  PyObject* closed = PyObject_CallMethod(self->inner, "close", nullptr);
  if (closed == nullptr) PyErr_Clear();
  Py_XDECREF(closed);
  PyObject* exc = GetHelpers().budget_exceeded != nullptr ? GetHelpers().budget_exceeded : PyExc_RuntimeError;
  PyErr_SetString(exc, "the request exceeded its budget");
  return PYGEN_ERROR;
}

PySendResult BudgetSend(PyObject* o, PyObject* arg, PyObject** result) {
  auto* self = reinterpret_cast<TaskBudget*>(o);
  Call* c = CallOf(self);
  if (c == nullptr) return PyIter_Send(self->inner, arg, result);
  c->host->StepBegin(*c);
  PySendResult r = PyIter_Send(self->inner, arg, result);
  c = CallOf(self);  // the step may have ended the call (a done callback runs later, not here)
  if (c != nullptr && c->host->StepEnd(*c)) return Overran(self, r, result);
  return r;
}

PyObject* ResultOf(PySendResult r, PyObject* result) {
  if (r == PYGEN_NEXT) return result;
  if (r == PYGEN_RETURN) {
    // A coroutine's `return v` is StopIteration(v) to a caller of send().
    if (result == Py_None) {
      Py_DECREF(result);
      PyErr_SetNone(PyExc_StopIteration);
    } else {
      PyObject* e = PyObject_CallOneArg(PyExc_StopIteration, result);
      Py_DECREF(result);
      if (e != nullptr) {
        PyErr_SetObject(PyExc_StopIteration, e);
        Py_DECREF(e);
      }
    }
  }
  return nullptr;
}

PyObject* BudgetSendMethod(PyObject* o, PyObject* arg) {
  PyObject* result = nullptr;
  PySendResult r = BudgetSend(o, arg, &result);
  return ResultOf(r, result);
}

PyObject* BudgetThrow(PyObject* o, PyObject* args) {
  auto* self = reinterpret_cast<TaskBudget*>(o);
  Call* c = CallOf(self);
  if (c != nullptr) c->host->StepBegin(*c);
  PyObject* throw_method = PyObject_GetAttrString(self->inner, "throw");
  PyObject* result = throw_method ? PyObject_Call(throw_method, args, nullptr) : nullptr;
  Py_XDECREF(throw_method);
  c = CallOf(self);
  if (c != nullptr && c->host->StepEnd(*c) && result != nullptr) {
    PySendResult r = Overran(self, PYGEN_NEXT, &result);
    return ResultOf(r, result);
  }
  return result;
}

PyObject* BudgetClose(PyObject* o, PyObject*) {
  return PyObject_CallMethod(reinterpret_cast<TaskBudget*>(o)->inner, "close", nullptr);
}

PyObject* BudgetAwait(PyObject* o) {
  Py_INCREF(o);
  return o;
}

PyObject* BudgetNext(PyObject* o) { return BudgetSendMethod(o, Py_None); }

PyObject* BudgetRepr(PyObject* o) {
  return PyUnicode_FromFormat("<budgeted %R>", reinterpret_cast<TaskBudget*>(o)->inner);
}

void BudgetDealloc(PyObject* o) {
  auto* self = reinterpret_cast<TaskBudget*>(o);
  Py_CLEAR(self->inner);
  Py_CLEAR(self->call_object);
  Py_TYPE(o)->tp_free(o);
}

PyMethodDef kBudgetMethods[] = {
    {"send", BudgetSendMethod, METH_O, nullptr},
    {"throw", BudgetThrow, METH_VARARGS, nullptr},
    {"close", BudgetClose, METH_NOARGS, nullptr},
    {nullptr, nullptr, 0, nullptr}};

PyAsyncMethods kBudgetAsync = {BudgetAwait, nullptr, nullptr, BudgetSend};

PyTypeObject BudgetType = [] {
  PyTypeObject t{PyVarObject_HEAD_INIT(nullptr, 0)};
  t.tp_name = "_metronome.TaskBudget";
  t.tp_basicsize = sizeof(TaskBudget);
  t.tp_dealloc = BudgetDealloc;
  t.tp_repr = BudgetRepr;
  t.tp_as_async = &kBudgetAsync;
  t.tp_iter = BudgetAwait;
  t.tp_iternext = BudgetNext;
  t.tp_flags = Py_TPFLAGS_DEFAULT;
  t.tp_doc = "An app's coroutine whose every step runs under its request's budgets.";
  t.tp_methods = kBudgetMethods;
  return t;
}();

PyObject* Bytes(std::string_view s) { return PyBytes_FromStringAndSize(s.data(), static_cast<Py_ssize_t>(s.size())); }

}  // namespace

bool Init() {
  if (g_channel != nullptr) return true;
  if (PyType_Ready(&CallType) < 0 || PyType_Ready(&BudgetType) < 0) return false;
  PyObject* helpers = PyImport_ImportModule("metronome._asgi");
  if (helpers == nullptr) return false;
  g_channel = PyObject_GetAttrString(helpers, "channel");
  g_lifespan_class = PyObject_GetAttrString(helpers, "Lifespan");
  PyObject* r = PyObject_CallMethod(helpers, "register_coroutine_type", "O", reinterpret_cast<PyObject*>(&BudgetType));
  Py_XDECREF(r);
  Py_DECREF(helpers);
  g_asgi_info = Py_BuildValue("{s:s,s:s}", "version", "3.0", "spec_version", "2.3");
  return g_channel && g_lifespan_class && r && g_asgi_info;
}

PyObject* NewScope(const http::Request& r, const http::HttpShared& shared, const wsgi::ServerInfo& info,
                   PyObject* state) {
  const http::RequestHead& h = r.head;
  const std::string_view path = r.path.data() != nullptr ? r.path : h.path;
  std::string decoded;
  Unescape(path.data(), path.size(), false, &decoded);
  PyObject* headers = PyList_New(static_cast<Py_ssize_t>(h.num_headers));
  if (headers == nullptr) return nullptr;
  std::string lower;
  for (size_t i = 0; i < h.num_headers; ++i) {
    lower.assign(h.headers[i].name.data(), h.headers[i].name.size());
    for (char& ch : lower) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
    PyObject* pair = PyTuple_New(2);
    if (pair == nullptr) {
      Py_DECREF(headers);
      return nullptr;
    }
    PyTuple_SET_ITEM(pair, 0, Bytes(lower));
    PyTuple_SET_ITEM(pair, 1, Bytes(h.headers[i].value));
    PyList_SET_ITEM(headers, static_cast<Py_ssize_t>(i), pair);
  }
  PyObject* client = PeerTuple(shared.conns.peer(r.conn));
  PyObject* server = Py_BuildValue("(si)", info.server_name.c_str(), std::atoi(info.server_port.c_str()));
  PyObject* scope = Py_BuildValue(
      "{s:s,s:O,s:s,s:s#,s:s,s:N,s:N,s:N,s:s,s:N,s:N,s:N}", "type", "http", "asgi", g_asgi_info, "http_version",
      h.version_minor == 0 ? "1.0" : "1.1", "method", h.method.data(), static_cast<Py_ssize_t>(h.method.size()),
      "scheme", "http", "path", PyUnicode_DecodeUTF8(decoded.data(), static_cast<Py_ssize_t>(decoded.size()), "replace"),
      "raw_path", Bytes(h.path), "query_string", Bytes(h.query), "root_path", "", "headers", headers, "client",
      client != nullptr ? client : Py_NewRef(Py_None), "server", server != nullptr ? server : Py_NewRef(Py_None));
  if (scope != nullptr) {
    PyObject* ext = Py_BuildValue("{s:{s:s#}}", "metronome", "request_id", r.request_id,
                                  static_cast<Py_ssize_t>(r.request_id_len));
    if (ext == nullptr || PyDict_SetItemString(scope, "extensions", ext) < 0) PyErr_Clear();
    Py_XDECREF(ext);
  }
  if (scope != nullptr && state != nullptr) {
    PyObject* copy = PyDict_Copy(state);  // a shallow copy per request (ASGI spec)
    if (copy == nullptr || PyDict_SetItemString(scope, "state", copy) < 0) {
      Py_XDECREF(copy);
      Py_DECREF(scope);
      return nullptr;
    }
    Py_DECREF(copy);
  }
  return scope;
}

PyObject* NewCallObject(Call* c) {
  auto* self = PyObject_New(CallObject, &CallType);
  if (self == nullptr) return nullptr;
  self->call = c;
  return reinterpret_cast<PyObject*>(self);
}

PyObject* Channel(PyObject* call_object) { return PyObject_CallOneArg(g_channel, call_object); }

PyObject* WrapCoroutine(PyObject* coro, Call* c) {
  auto* self = PyObject_New(TaskBudget, &BudgetType);
  if (self == nullptr) return nullptr;
  Py_INCREF(coro);
  self->inner = coro;
  Py_INCREF(c->object);
  self->call_object = c->object;
  return reinterpret_cast<PyObject*>(self);
}

bool AddDoneCallback(PyObject* task, PyObject* call_object) {
  PyObject* done = PyObject_GetAttrString(call_object, "_done");
  PyObject* r = done ? PyObject_CallMethod(task, "add_done_callback", "O", done) : nullptr;
  Py_XDECREF(done);
  Py_XDECREF(r);
  return r != nullptr;
}

void Detach(PyObject* call_object) { reinterpret_cast<CallObject*>(call_object)->call = nullptr; }

absl::Status StartLifespan(PyObject* app, LaneLoop& loop, Lifespan* out) {
  out->driver = PyObject_CallFunctionObjArgs(g_lifespan_class, app, loop.loop(), nullptr);
  if (out->driver == nullptr) return absl::InternalError(absl::StrCat("lifespan: ", FetchTraceback()));
  PyObject* startup = PyObject_CallMethod(out->driver, "startup", nullptr);
  PyObject* result = startup ? loop.RunUntilComplete(startup, kLifespanTimeoutS) : nullptr;
  Py_XDECREF(startup);
  if (result == nullptr) {
    return absl::FailedPreconditionError(
        absl::StrCat("ASGI lifespan startup did not complete (", static_cast<int>(kLifespanTimeoutS),
                     " s at most):\n", FetchTraceback()));
  }
  const char *outcome = "", *message = "";
  if (!PyArg_ParseTuple(result, "ss", &outcome, &message)) {
    Py_DECREF(result);
    return absl::InternalError(absl::StrCat("lifespan: ", FetchExceptionLine()));
  }
  std::string o = outcome, m = message;
  Py_DECREF(result);
  if (o == "failed") {
    return absl::FailedPreconditionError(absl::StrCat("the ASGI app's lifespan startup failed: ", m));
  }
  out->supported = o == "ok";
  out->state = PyObject_GetAttrString(out->driver, "state");
  if (out->state != nullptr) Py_DECREF(out->state);  // borrowed from the driver, which keeps it
  if (out->supported) {
    LOG_INFO("python: ASGI lifespan startup complete");
  } else {
    LOG_INFO("python: the app does not use the ASGI lifespan protocol (%s); serving without it", m.c_str());
  }
  return absl::OkStatus();
}

void StopLifespan(Lifespan& l, LaneLoop& loop) {
  if (l.driver == nullptr) return;
  if (l.supported) {
    PyObject* shutdown = PyObject_CallMethod(l.driver, "shutdown", nullptr);
    PyObject* result = shutdown ? loop.RunUntilComplete(shutdown, kLifespanTimeoutS) : nullptr;
    Py_XDECREF(shutdown);
    const char *outcome = "", *message = "";
    if (result == nullptr) {
      LOG_ERROR("ASGI lifespan shutdown did not complete:\n%s", FetchTraceback().c_str());
    } else if (PyArg_ParseTuple(result, "ss", &outcome, &message) && std::string(outcome) == "failed") {
      LOG_ERROR("ASGI lifespan shutdown failed: %s", message);
    } else {
      PyErr_Clear();
      LOG_INFO("python: ASGI lifespan shutdown complete");
    }
    Py_XDECREF(result);
  }
  Py_CLEAR(l.driver);
  l.state = nullptr;
}

}  // namespace metronome::py::asgi
