// python: the application's handlers, in the embedded interpreter, on the process's main thread.
//
// Start initialises the interpreter, imports `python.app` ("module:attribute"), takes the app's
// routes into the shared route table (the route stage builds its router from it) and runs the
// app's startup hooks. A module that fails to import, a missing attribute or a failing hook
// stops the server before it serves anything, with the traceback.
//
// Per batch the stage takes the GIL once; per request it makes (or reuses, when a plugin made
// it) the request object, calls handler(request, **path_params) by vectorcall, turns the result
// into a native Response (convert.h) and hands the request on to serialize. An exception is a
// 500 with the traceback in the log, never in the response; metronome.HTTPError is its status.
#include "stages/python.h"

#include "absl/strings/str_cat.h"
#include "runtime/log.h"
#include "runtime/outbox.h"
#include "runtime/pipeline.h"
#include "runtime/registry.h"
#include "runtime/units.h"
#include "stages/py/convert.h"
#include "stages/py/interpreter.h"
#include "stages/py/module.h"

namespace metronome::py {
namespace {

constexpr std::string_view kInternalError = "internal server error\n";

// Calls app.<name>() if the app has it; returns an error with the traceback if it raised.
absl::Status CallHook(PyObject* app, const char* name) {
  if (!PyObject_HasAttrString(app, name)) return absl::OkStatus();
  PyObject* r = PyObject_CallMethod(app, name, nullptr);
  if (r == nullptr) return absl::FailedPreconditionError(absl::StrCat("app.", name, "() raised:\n", FetchTraceback()));
  Py_DECREF(r);
  return absl::OkStatus();
}

}  // namespace

absl::Status PythonStage::Configure(ConfigNode entry, ConfigNode root, StageEnv& env) {
  (void)entry;
  shared_ = &http::GetHttpShared(env, root, &http_config_);
  routes_ = &env.Shared<http::RouteTable>("routes");
  python_ = &env.Shared<PythonShared>("python");
  ConfigNode py = root.Map("python");
  app_spec_ = py.String("app", std::nullopt);
  if (!app_spec_.empty() && app_spec_.find(':') == std::string::npos) {
    py.Error("app", "expected \"package.module:attribute\", e.g. \"examples.app:app\"");
  }
  path_ = py.StringList("path");
  py.Consume("budget");  // read by the budgets (request CPU and memory caps)
  return absl::OkStatus();
}

absl::Status PythonStage::Start(StageEnv& env) {
  (void)env;
  shared_->Setup(http_config_);
  InterpreterOptions options;
  options.path = path_;
  if (absl::Status s = Initialize(options); !s.ok()) return s;
  python_->interpreter_ready = true;

  // Importing the app imports the metronome package, which registers its helpers.
  if (absl::Status s = ImportObject(app_spec_, &app_); !s.ok()) {
    PyEval_SaveThread();
    return absl::FailedPreconditionError(absl::StrCat("python.app: ", s.message()));
  }
  absl::Status result = [&]() -> absl::Status {
    if (GetHelpers().response == nullptr) {
      return absl::FailedPreconditionError("the app did not import the metronome package (import metronome)");
    }
    PyObject* list = PyObject_CallMethod(app_, "routes", nullptr);
    if (list == nullptr) {
      return absl::FailedPreconditionError(absl::StrCat("python.app '", app_spec_, "' is not a metronome.App: routes() failed:\n", FetchTraceback()));
    }
    PyObject* seq = PySequence_Fast(list, "app.routes() must return a list");
    Py_DECREF(list);
    if (seq == nullptr) return absl::FailedPreconditionError(FetchExceptionLine());
    for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(seq); ++i) {
      PyObject* t = PySequence_Fast_GET_ITEM(seq, i);
      const char *method, *pattern;
      PyObject *callable, *options_dict;
      if (!PyArg_ParseTuple(t, "ssOO", &method, &pattern, &callable, &options_dict)) {
        Py_DECREF(seq);
        return absl::FailedPreconditionError(absl::StrCat("app.routes() entry ", i, ": ", FetchExceptionLine()));
      }
      http::RouteTarget target;
      target.kind = http::RouteTarget::Kind::kPython;
      target.pattern = pattern;
      target.method = http::MethodFromName(method);
      if (target.method == http::Method::kOther) {
        Py_DECREF(seq);
        return absl::FailedPreconditionError(absl::StrCat("route ", pattern, ": unknown method '", method, "'"));
      }
      target.handler = static_cast<int>(handlers_.size());
      // Parameter names, in pattern order, for the vectorcall's keyword names.
      std::vector<std::string> names;
      for (size_t p = 0; (p = target.pattern.find('{', p)) != std::string::npos; ++p) {
        size_t end = target.pattern.find_first_of(":}", p);
        names.push_back(target.pattern.substr(p + 1, end - p - 1));
      }
      Handler h;
      Py_INCREF(callable);
      h.callable = callable;
      if (!names.empty()) {
        h.kwnames = PyTuple_New(static_cast<Py_ssize_t>(names.size()));
        for (size_t k = 0; k < names.size(); ++k) {
          PyTuple_SET_ITEM(h.kwnames, static_cast<Py_ssize_t>(k), PyUnicode_InternFromString(names[k].c_str()));
        }
      }
      auto stats = std::make_unique<RouteStats>();
      stats->label = absl::StrCat(method, " ", pattern);
      h.route_stats = static_cast<int>(route_stats_.size());
      route_stats_.push_back(std::move(stats));
      handlers_.push_back(h);
      routes_->targets.push_back(std::move(target));
      (void)options_dict;  // per-route budgets are read by the budget code
    }
    Py_DECREF(seq);
    return CallHook(app_, "startup");
  }();
  saved_ = PyEval_SaveThread();
  if (!result.ok()) return result;
  LOG_INFO("python: %s loaded with %zu routes", app_spec_.c_str(), handlers_.size());
  return absl::OkStatus();
}

void PythonStage::Process(std::span<Item* const> batch, Outbox& out) {
  PyEval_RestoreThread(saved_);
  for (Item* it : batch) {
    auto* r = static_cast<http::Request*>(it);
    if (!r->responded) Handle(r);
    if (r->py_request != nullptr) {
      PyObject* obj = static_cast<PyObject*>(r->py_request);
      DetachRequest(obj);
      Py_DECREF(obj);
      r->py_request = nullptr;
    }
    out.Emit(r);
  }
  saved_ = PyEval_SaveThread();
}

void PythonStage::Handle(http::Request* r) {
  const http::RouteTarget& target = routes_->targets[static_cast<size_t>(r->route)];
  const Handler& h = handlers_[static_cast<size_t>(target.handler)];
  RouteStats& stats = *route_stats_[static_cast<size_t>(h.route_stats)];
  int64_t t0 = MonotonicNowNs();
  PyObject* req = static_cast<PyObject*>(r->py_request);
  if (req == nullptr) {
    req = NewRequest(r, shared_);
    if (req == nullptr) {
      Fail(r, h, 500);
      return;
    }
    r->py_request = req;
  }
  // args[0] is scratch for vectorcall's PY_VECTORCALL_ARGUMENTS_OFFSET; then the request, then
  // one value per path parameter.
  PyObject* args[2 + http::kPathParamsMax];
  args[1] = req;
  int n = 0;
  bool ok = true;
  for (int i = 0; i < r->num_params && ok; ++i) {
    const http::PathParam& p = r->params[i];
    PyObject* v = p.type == http::ParamType::kInt ? PyLong_FromLongLong(p.int_value)
                                                   : DecodePercent(p.value.data(), p.value.size());
    if (v == nullptr) ok = false; else args[2 + n++] = v;
  }
  PyObject* result = ok ? PyObject_Vectorcall(h.callable, args + 1, 1 | PY_VECTORCALL_ARGUMENTS_OFFSET,
                                              n > 0 ? h.kwnames : nullptr)
                        : nullptr;
  for (int i = 0; i < n; ++i) Py_DECREF(args[2 + i]);
  r->resp.Reset();
  if (result == nullptr) {
    if (HttpErrorToResponse(&r->resp)) {
      http_errors_.Add();
    } else {
      Fail(r, h, 500);
      stats.calls.Add();
      return;
    }
  } else {
    bool converted = ResultToResponse(result, &r->resp);
    Py_DECREF(result);
    if (!converted) {
      bad_results_.Add();
      Fail(r, h, 500);
      stats.calls.Add();
      return;
    }
  }
  if (r->plugins_seen != 0) CallOnResponse(r, req);
  r->responded = true;
  int64_t dt = MonotonicNowNs() - t0;
  stats.calls.Add();
  stats.handler_ns.Add(static_cast<uint64_t>(dt));
  stats.handler_hist_ns.Record(static_cast<uint64_t>(dt));
  if (r->resp.status >= 500) stats.errors.Add();
}

// A 500 (the pending exception's traceback goes to the log, never to the client).
void PythonStage::Fail(http::Request* r, const Handler& h, int status) {
  exceptions_.Add();
  RouteStats& stats = *route_stats_[static_cast<size_t>(h.route_stats)];
  stats.errors.Add();
  std::string tb = PyErr_Occurred() ? FetchTraceback() : "(no exception)";
  LOG_RATE_LIMITED(LogLevel::kError, "%s %.*s failed with %d:\n%s", stats.label.c_str(),
                   static_cast<int>(r->head.target.size()), r->head.target.data(), status, tb.c_str());
  r->resp.Reset();
  r->resp.status = status;
  r->resp.content_type = "text/plain; charset=utf-8";
  r->resp.body = kInternalError;
  r->responded = true;
}

// Plugins see the response after the handler, last plugin first (like middleware unwinding).
void PythonStage::CallOnResponse(http::Request* r, PyObject* req_obj) {
  PyObject* resp = ResponseToPython(r->resp);
  if (resp == nullptr) {
    LOG_RATE_LIMITED(LogLevel::kError, "cannot make a Response for on_response: %s", FetchExceptionLine().c_str());
    return;
  }
  for (int i = static_cast<int>(python_->plugins.size()) - 1; i >= 0; --i) {
    if (!(r->plugins_seen & (1u << i))) continue;
    PyObject* ret = PyObject_CallMethod(python_->plugins[static_cast<size_t>(i)], "on_response", "OO", req_obj, resp);
    if (ret == nullptr) {
      LOG_RATE_LIMITED(LogLevel::kError, "plugin '%s' on_response raised:\n%s",
                       python_->plugin_names[static_cast<size_t>(i)].c_str(), FetchTraceback().c_str());
      continue;
    }
    if (ret != Py_None && GetHelpers().response != nullptr &&
        PyObject_TypeCheck(ret, reinterpret_cast<PyTypeObject*>(GetHelpers().response))) {
      Py_SETREF(resp, ret);  // the plugin replaced the response
    } else {
      Py_DECREF(ret);
    }
  }
  http::Response converted;
  if (ResultToResponse(resp, &converted)) {
    r->resp = std::move(converted);
    // body pointed into converted.body_storage, which moved: point it at the new storage.
    if (!r->resp.chunked && !r->resp.body_storage.empty()) r->resp.body = r->resp.body_storage;
    if (!r->resp.content_type_storage.empty()) r->resp.content_type = r->resp.content_type_storage;
  } else {
    LOG_RATE_LIMITED(LogLevel::kError, "on_response left an invalid response: %s", FetchExceptionLine().c_str());
  }
  Py_DECREF(resp);
}

void PythonStage::Shutdown() {
  if (!Initialized()) return;
  PyEval_RestoreThread(saved_);
  if (app_ != nullptr) {
    if (absl::Status s = CallHook(app_, "shutdown"); !s.ok()) LOG_ERROR("%s", std::string(s.message()).c_str());
  }
  for (Handler& h : handlers_) {
    Py_CLEAR(h.callable);
    Py_CLEAR(h.kwnames);
  }
  for (PyObject*& p : python_->plugins) Py_CLEAR(p);
  Py_CLEAR(app_);
  Finalize();
}

void PythonStage::ExtraStats(const std::function<void(absl::string_view, double)>& emit) const {
  emit("handler_exceptions_total", static_cast<double>(exceptions_.Get()));
  emit("http_errors_total", static_cast<double>(http_errors_.Get()));
  emit("bad_results_total", static_cast<double>(bad_results_.Get()));
}

METRONOME_REGISTER_STAGE("python", PythonStage);

}  // namespace metronome::py
