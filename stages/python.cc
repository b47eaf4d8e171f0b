// python: the application's handlers, in the embedded interpreter.
//
// The first python stage in the pipeline runs on the process's main thread. Its Start
// initialises the interpreter (with the allocator wrappers of the memory budget installed
// first), imports `python.app` ("module:attribute"), takes the app's routes into the shared
// route table (the route stage builds its router from it), starts the budget watchdog and runs
// the app's startup hooks. A module that fails to import, a missing attribute, a handler that
// cannot take its route's path parameters or a failing hook stops the server before it serves
// anything, with the traceback or the handler's file:line, and the config's line.
// `metronome check` loads the app with the same code (CheckDeep -> LoadApp), in a child process,
// without running the hooks or starting the watchdog.
//
// More python stages may follow, each on its own thread (a lane), sharing the GIL: with
// `serves: heavy` one takes the routes marked heavy, so that a long handler there leaves the
// main lane free for the others; any lane takes the GIL from a running one within
// python.switch_interval. With more than one lane, route (or the last plugin) picks the lane
// per request (PythonShared::Dispatch).
//
// Per batch a lane takes the GIL once; per request it makes (or reuses, when a plugin made it)
// the request object, calls handler(request, **path_params) by vectorcall under the request's
// CPU and memory budgets (stages/py/budget.h), turns the result into a native Response
// (convert.h) and hands the request to serialize. An exception is a 500 with the traceback in
// the log, never in the response; metronome.HTTPError is its status; a budget overrun is a 503
// naming the budget, whatever the handler did with the exception.
#include "stages/python.h"

#include <malloc.h>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "runtime/log.h"
#include "runtime/outbox.h"
#include "runtime/clock.h"
#include "runtime/registry.h"
#include "runtime/units.h"
#include "stages/py/convert.h"
#include "stages/py/interpreter.h"
#include "stages/py/module.h"

namespace metronome::py {
namespace {

constexpr std::string_view kText = "text/plain; charset=utf-8";
static_assert(Watchdog::kLanesMax >= http::kPythonLanesMax, "the watchdog watches every python lane");

// Calls app.<name>() if the app has it; returns an error with the traceback if it raised.
absl::Status CallHook(PyObject* app, const char* name) {
  if (!PyObject_HasAttrString(app, name)) return absl::OkStatus();
  PyObject* r = PyObject_CallMethod(app, name, nullptr);
  if (r == nullptr) return absl::FailedPreconditionError(absl::StrCat("app.", name, "() raised:\n", FetchTraceback()));
  Py_DECREF(r);
  return absl::OkStatus();
}

// A float number of seconds from a route's options dict, as ns (0 when None or absent).
int64_t OptionNs(PyObject* options, const char* key) {
  PyObject* v = PyDict_Check(options) ? PyDict_GetItemString(options, key) : nullptr;  // borrowed
  if (v == nullptr || v == Py_None) return 0;
  double s = PyFloat_AsDouble(v);
  if (s < 0 || PyErr_Occurred()) {
    PyErr_Clear();
    return 0;
  }
  return static_cast<int64_t>(s * 1e9);
}

int64_t OptionInt(PyObject* options, const char* key) {
  PyObject* v = PyDict_Check(options) ? PyDict_GetItemString(options, key) : nullptr;
  if (v == nullptr || v == Py_None) return 0;
  long long n = PyLong_AsLongLong(v);
  if (PyErr_Occurred()) {
    PyErr_Clear();
    return 0;
  }
  return n;
}

}  // namespace

absl::Status PythonStage::Configure(ConfigNode entry, ConfigNode root, StageEnv& env) {
  shared_ = &http::GetHttpShared(env, root, &http_config_);
  routes_ = &env.Shared<http::RouteTable>("routes");
  python_ = &env.Shared<PythonShared>("python");
  serialize_ = env.FindStageOfType("serialize");
  if (serialize_ < 0) return absl::InvalidArgumentError("python needs a serialize stage after it");
  dispatch_ = &env.Shared<http::Dispatch>("dispatch");
  std::string serves = entry.Enum("serves", "all", {"all", "light", "heavy"});
  lane_ = dispatch_->AddLane(env.stage_index(), serves == "light"   ? http::Dispatch::Serves::kLight
                                                : serves == "heavy" ? http::Dispatch::Serves::kHeavy
                                                                    : http::Dispatch::Serves::kAll);
  if (lane_ < 0) {
    return absl::InvalidArgumentError(absl::StrCat("at most ", http::kPythonLanesMax,
                                                   " python stages (the budget watchdog's lane table)"));
  }
  main_ = lane_ == 0;

  ConfigNode py = root.Map("python");
  app_spec_ = py.String("app", std::nullopt);
  app_where_ = py.Where("app");
  if (!app_spec_.empty() && app_spec_.find(':') == std::string::npos) {
    py.Error("app", "expected \"package.module:attribute\", e.g. \"examples.app:app\"");
  }
  path_ = py.StringList("path");
  switch_interval_ns_ = py.DurationNs("switch_interval", 200 * kNanosPerMicro, kNanosPerMicro, kNanosPerSecond);
  ConfigNode budget = py.Map("budget");
  python_->cpu_budget_ns = budget.DurationNs("cpu", 50 * kNanosPerMilli, 0, 3600 * kNanosPerSecond);
  python_->memory_budget_bytes = static_cast<int64_t>(budget.SizeBytes("memory", 64ull << 20, 0, 1ull << 40));
  watchdog_options_.hard_ns = budget.DurationNs("hard", kNanosPerSecond, kNanosPerMilli, 3600 * kNanosPerSecond);
  if (watchdog_options_.hard_ns <= switch_interval_ns_) {
    // Off the main lane an interrupt waits for the GIL, up to a switch interval: a hard limit
    // that short would call a handler stuck while its interrupt is on the way.
    budget.Error("hard", absl::StrCat("must be longer than python.switch_interval (",
                                      FormatDuration(switch_interval_ns_), ")"));
  }
  watchdog_options_.rss_limit_bytes = static_cast<int64_t>(budget.SizeBytes("rss_limit", 0, 0, 1ull << 44));
  for (ConfigNode o : py.Seq("routes")) {
    RouteOverride ov;
    ov.path = o.String("path", std::nullopt);
    ov.method = o.Enum("method", "", {"", "GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"});
    ov.cpu_ns = o.DurationNs("cpu", 0, 0, 3600 * kNanosPerSecond);
    ov.memory_bytes = static_cast<int64_t>(o.SizeBytes("memory", 0, 0, 1ull << 40));
    ov.heavy = o.Has("heavy") ? (o.Bool("heavy", false) ? 1 : 0) : -1;
    ov.where = o.Where("path");
    overrides_.push_back(ov);
  }
  if (main_ && serves != "all" && serves != "light") {
    entry.Error("serves", "the first python stage runs on the main thread and must serve all or light routes");
  }
  return absl::OkStatus();
}

absl::Status PythonStage::Start(StageEnv& env) {
  shared_->Setup(http_config_);
  if (main_) return StartMain(env);
  if (!python_->interpreter_ready) return absl::FailedPreconditionError("the main python stage did not start");
  PyGILState_Ensure();  // this thread's state, kept for the whole run
  watch_ = GlobalWatchdog().Register(false);
  saved_ = PyEval_SaveThread();
  return absl::OkStatus();
}

absl::Status PythonStage::StartMain(StageEnv& env) {
  if (absl::Status s = InitializeInterpreter(); !s.ok()) return s;
  absl::Status result = [&]() -> absl::Status {
    PyObject* sys = PyImport_ImportModule("sys");
    PyObject* r = sys ? PyObject_CallMethod(sys, "setswitchinterval", "d", static_cast<double>(switch_interval_ns_) / 1e9) : nullptr;
    Py_XDECREF(r);
    Py_XDECREF(sys);
    if (r == nullptr) return absl::InternalError(absl::StrCat("sys.setswitchinterval: ", FetchExceptionLine()));
    if (absl::Status s = LoadApp(env); !s.ok()) return s;
    if (absl::Status s = CallHook(app_, "startup"); !s.ok()) return s;
    int64_t smallest = python_->cpu_budget_ns > 0 ? python_->cpu_budget_ns : Watchdog::kIdleLookMaxNs * 2;
    for (const http::RouteTarget& t : routes_->targets) {
      if (t.kind == http::RouteTarget::Kind::kPython && t.cpu_budget_ns > 0) smallest = std::min(smallest, t.cpu_budget_ns);
    }
    watchdog_options_.idle_look_ns = Watchdog::IdleLookFor(smallest);
    GlobalWatchdog().Start(watchdog_options_, GetHelpers().budget_exceeded);
    watch_ = GlobalWatchdog().Register(true);
    return absl::OkStatus();
  }();
  saved_ = PyEval_SaveThread();
  if (!result.ok()) return result;
  LOG_INFO("python: %s loaded with %zu routes; budgets: cpu %s, memory %s, hard %s%s; %zu python lane(s)",
           app_spec_.c_str(), python_->handlers.size(), FormatDuration(python_->cpu_budget_ns).c_str(),
           FormatSize(static_cast<uint64_t>(python_->memory_budget_bytes)).c_str(),
           FormatDuration(watchdog_options_.hard_ns).c_str(),
           watchdog_options_.rss_limit_bytes > 0
               ? absl::StrCat(", rss_limit ", FormatSize(static_cast<uint64_t>(watchdog_options_.rss_limit_bytes))).c_str()
               : "",
           static_cast<size_t>(dispatch_->lanes()));
  return absl::OkStatus();
}

// Returns holding the GIL when it succeeded.
absl::Status PythonStage::InitializeInterpreter() {
  InterpreterOptions options;
  options.path = path_;
  // The memory budget needs its allocators in place before the interpreter allocates.
  if (python_->memory_budget_bytes > 0) options.before_init = &InstallAllocatorWrappers;
  if (absl::Status s = Initialize(options); !s.ok()) return s;
  python_->interpreter_ready = true;
  return absl::OkStatus();
}

// What serve's start-up and `metronome check` both load: the app and its routes (into the
// shared route table). REQUIRES the GIL. Runs no hook and starts nothing.
absl::Status PythonStage::LoadApp(StageEnv& env) {
  env.CheckStep(absl::StrCat("importing python.app \"", app_spec_, "\" (", app_where_, ")"));
  // Importing the app imports the metronome package, which registers its helpers.
  if (absl::Status s = ImportObject(app_spec_, &app_); !s.ok()) {
    return absl::FailedPreconditionError(absl::StrCat(app_where_, ": ", s.message()));
  }
  if (GetHelpers().response == nullptr) {
    return absl::FailedPreconditionError(
        absl::StrCat(app_where_, ": the app did not import the metronome package (import metronome)"));
  }
  env.CheckStep(absl::StrCat("loading the routes of python.app \"", app_spec_, "\" (", app_where_, ")"));
  return LoadRoutes();
}

absl::StatusOr<std::string> PythonStage::CheckDeep(StageEnv& env) {
  if (!main_) return std::string();  // the other lanes only take a thread state in Start
  if (absl::Status s = InitializeInterpreter(); !s.ok()) return s;
  // The GIL stays held: the check's child process ends with _exit after the last stage.
  if (absl::Status s = LoadApp(env); !s.ok()) return s;
  const size_t n = python_->handlers.size();
  return absl::StrCat(app_spec_, " imported, ", n, n == 1 ? " route" : " routes",
                      ", every handler takes its path parameters; startup hooks were not run");
}

// The app's routes into the shared route table, with their budgets (decorator options, then
// python.routes overrides from the config). Each handler must be callable as the server calls
// it, handler(req, **path_params): one that is not would fail every request, so it stops the
// start instead (every such route is listed). Every route is loaded even then, so that check's
// Connect still finds duplicates among them.
absl::Status PythonStage::LoadRoutes() {
  PyObject* list = PyObject_CallMethod(app_, "routes", nullptr);
  if (list == nullptr) {
    return absl::FailedPreconditionError(absl::StrCat(app_where_, ": '", app_spec_,
                                                      "' is not a metronome.App: routes() failed:\n", FetchTraceback()));
  }
  PyObject* seq = PySequence_Fast(list, "app.routes() must return a list");
  Py_DECREF(list);
  if (seq == nullptr) return absl::FailedPreconditionError(absl::StrCat(app_where_, ": ", FetchExceptionLine()));
  PyObject* app_module = PyImport_ImportModule("metronome._app");
  PyObject* describe = app_module ? PyObject_GetAttrString(app_module, "_describe_route") : nullptr;
  Py_XDECREF(app_module);
  if (describe == nullptr) {
    Py_DECREF(seq);
    return absl::InternalError(absl::StrCat("metronome._app._describe_route: ", FetchExceptionLine()));
  }
  std::vector<std::string> errors;
  std::vector<bool> override_used(overrides_.size(), false);
  for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(seq); ++i) {
    PyObject* t = PySequence_Fast_GET_ITEM(seq, i);
    const char *method, *pattern;
    PyObject *callable, *options;
    if (!PyArg_ParseTuple(t, "ssOO", &method, &pattern, &callable, &options)) {
      errors.push_back(absl::StrCat(app_where_, ": app.routes() entry ", i, ": ", FetchExceptionLine()));
      continue;
    }
    http::RouteTarget target;
    target.kind = http::RouteTarget::Kind::kPython;
    target.pattern = pattern;
    target.method = http::MethodFromName(method);
    target.declared_at = app_where_;
    // Parameter names, in pattern order, for the vectorcall's keyword names.
    std::vector<std::string> names = http::Router::ParamNames(target.pattern);
    PyObject* kwnames = PyTuple_New(static_cast<Py_ssize_t>(names.size()));
    for (size_t k = 0; kwnames != nullptr && k < names.size(); ++k) {
      PyTuple_SET_ITEM(kwnames, static_cast<Py_ssize_t>(k), PyUnicode_InternFromString(names[k].c_str()));
    }
    PyObject* described = kwnames ? PyObject_CallFunctionObjArgs(describe, callable, kwnames, nullptr) : nullptr;
    const char* label = nullptr;
    PyObject* problem = nullptr;
    if (described == nullptr || !PyArg_ParseTuple(described, "sO", &label, &problem)) {
      errors.push_back(absl::StrCat(app_where_, ": route ", method, " ", pattern, ": cannot describe its handler: ",
                                    FetchExceptionLine()));
      Py_XDECREF(described);
      Py_XDECREF(kwnames);
      continue;
    }
    target.function = label;
    const std::string route = absl::StrCat(method, " ", pattern);
    http::Router pattern_check;  // a malformed pattern is reported with its function, here
    if (target.method == http::Method::kOther) {
      errors.push_back(absl::StrCat(app_where_, ": ", target.function, ": route ", route, ": unknown method '", method, "'"));
    } else if (absl::Status ps = pattern_check.Add(target.pattern, target.method, 0); !ps.ok()) {
      errors.push_back(absl::StrCat(app_where_, ": ", target.function, ": ", ps.message()));
    } else if (problem != Py_None) {
      PyObject* text = PyObject_Str(problem);
      errors.push_back(absl::StrCat(app_where_, ": ", target.function, ": route ", route,
                                    ": the handler cannot take the route's path parameters: ",
                                    text && PyUnicode_Check(text) ? PyUnicode_AsUTF8(text) : "?"));
      Py_XDECREF(text);
      PyErr_Clear();
    }
    Py_DECREF(described);
    target.cpu_budget_ns = OptionNs(options, "cpu_budget");
    target.memory_budget_bytes = static_cast<uint64_t>(OptionInt(options, "memory_budget"));
    PyObject* heavy = PyDict_Check(options) ? PyDict_GetItemString(options, "heavy") : nullptr;
    target.heavy = heavy != nullptr && PyObject_IsTrue(heavy) == 1;
    for (size_t k = 0; k < overrides_.size(); ++k) {
      const RouteOverride& ov = overrides_[k];
      if (ov.path != target.pattern || (!ov.method.empty() && ov.method != method)) continue;
      override_used[k] = true;
      if (ov.cpu_ns > 0) target.cpu_budget_ns = ov.cpu_ns;
      if (ov.memory_bytes > 0) target.memory_budget_bytes = static_cast<uint64_t>(ov.memory_bytes);
      if (ov.heavy >= 0) target.heavy = ov.heavy == 1;
    }
    target.handler = static_cast<int>(python_->handlers.size());
    PythonShared::Handler h;
    Py_INCREF(callable);
    h.callable = callable;
    if (names.empty()) {
      Py_DECREF(kwnames);
    } else {
      h.kwnames = kwnames;
    }
    h.stats = std::make_unique<RouteStats>();
    h.stats->label = route;
    python_->handlers.push_back(std::move(h));
    routes_->targets.push_back(std::move(target));
  }
  Py_DECREF(seq);
  Py_DECREF(describe);
  for (size_t k = 0; k < overrides_.size(); ++k) {
    if (!override_used[k]) {
      errors.push_back(absl::StrCat(overrides_[k].where, ": no route of the app has path '", overrides_[k].path, "'",
                                    overrides_[k].method.empty() ? "" : absl::StrCat(" and method ", overrides_[k].method)));
    }
  }
  if (!errors.empty()) return absl::FailedPreconditionError(absl::StrJoin(errors, "\n"));
  return absl::OkStatus();
}

void PythonStage::Process(std::span<Item* const> batch, Outbox& out) {
  PyEval_RestoreThread(saved_);
  for (Item* it : batch) {
    auto* r = static_cast<http::Request*>(it);
    if (!r->responded) {
      if (GlobalWatchdog().rss_over_limit()) {
        // The process is near its memory ceiling: shed instead of adding Python work.
        rss_sheds_.Add();
        python_->rss_sheds.Add();
        LOG_RATE_LIMITED(LogLevel::kWarn, "shed %.*s with 503: process RSS above python.budget.rss_limit",
                         static_cast<int>(r->head.target.size()), r->head.target.data());
        r->resp.Reset();
        r->resp.status = 503;
        r->resp.budget = "rss";
        r->resp.retry_after_s = http_config_.retry_after_s;
        r->resp.content_type = kText;
        r->resp.body = "server over its memory limit; retry later\n";
        r->responded = true;
      } else {
        Handle(r);
      }
    }
    ReleaseRequestObject(r);
    dispatch_->Done(lane_);
    out.EmitTo(serialize_, r);
  }
  saved_ = PyEval_SaveThread();
}

void PythonStage::Handle(http::Request* r) {
  const http::RouteTarget& target = routes_->targets[static_cast<size_t>(r->route)];
  PythonShared::Handler& h = python_->handlers[static_cast<size_t>(target.handler)];
  RouteStats& stats = *h.stats;
  PyObject* req = static_cast<PyObject*>(r->py_request);
  if (req == nullptr) {
    req = NewRequest(r, shared_);
    if (req == nullptr) {
      Fail(r, stats, 500);
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
  const int64_t cpu_ns = target.cpu_budget_ns > 0 ? target.cpu_budget_ns : python_->cpu_budget_ns;
  account_ = MemoryAccount{};
  account_.cap = target.memory_budget_bytes > 0 ? static_cast<int64_t>(target.memory_budget_bytes) : python_->memory_budget_bytes;
  const uint64_t seq = ++seq_;
  const int64_t t0 = MonotonicNowNs();
  dispatch_->Busy(lane_, t0);
  GlobalWatchdog().Begin(watch_, seq, t0, cpu_ns, stats.label.c_str());
  SetMemoryAccount(&account_);
  PyObject* result = ok ? PyObject_Vectorcall(h.callable, args + 1, 1 | PY_VECTORCALL_ARGUMENTS_OFFSET,
                                              n > 0 ? h.kwnames : nullptr)
                        : nullptr;
  SetMemoryAccount(nullptr);
  const int64_t t1 = MonotonicNowNs();
  const bool cpu_fired = GlobalWatchdog().End(watch_, t1);
  const int64_t dt = t1 - t0;
  dispatch_->Idle(lane_);
  for (int i = 0; i < n; ++i) Py_DECREF(args[2 + i]);
  stats.calls.Add();
  stats.handler_ns.Add(static_cast<uint64_t>(dt));
  stats.handler_hist_ns.Record(static_cast<uint64_t>(dt));
  r->resp.Reset();
  if (cpu_fired || account_.exceeded) {
    // The server fails the request itself, whatever the handler made of the exception.
    Py_XDECREF(result);
    PyErr_Clear();
    if (cpu_fired) {
      BudgetFail(r, stats, "cpu", dt, cpu_ns);
    } else {
      BudgetFail(r, stats, "memory", account_.peak, account_.cap);
      malloc_trim(0);  // give what the request touched back to the system
    }
    return;
  }
  if (result == nullptr) {
    if (HttpErrorToResponse(&r->resp)) {
      http_errors_.Add();
    } else {
      Fail(r, stats, 500);
      return;
    }
  } else {
    bool converted = ResultToResponse(result, &r->resp);
    Py_DECREF(result);
    if (!converted) {
      bad_results_.Add();
      Fail(r, stats, 500);
      return;
    }
  }
  if (r->plugins_seen != 0) CallOnResponse(r, req);
  r->responded = true;
  if (r->resp.status >= 500) stats.errors.Add();
}

void PythonStage::BudgetFail(http::Request* r, RouteStats& stats, const char* kind, int64_t used, int64_t budget) {
  const bool cpu = kind[0] == 'c';
  (cpu ? cpu_kills_ : memory_kills_).Add();
  (cpu ? stats.cpu_kills : stats.memory_kills).Add();
  stats.errors.Add();
  if (cpu) {
    const int64_t over = std::max<int64_t>(0, used - budget);
    python_->cpu_overshoot_ns.Record(static_cast<uint64_t>(over));  // lanes may race on a count
    int64_t seen = python_->cpu_overshoot_max_ns.load(std::memory_order_relaxed);
    while (over > seen && !python_->cpu_overshoot_max_ns.compare_exchange_weak(seen, over)) {
    }
    LOG_RATE_LIMITED(LogLevel::kWarn, "budget: %s exceeded its cpu budget (%s) after %.1fms: 503", stats.label.c_str(),
                     FormatDuration(budget).c_str(), static_cast<double>(used) / 1e6);
  } else {
    LOG_RATE_LIMITED(LogLevel::kWarn, "budget: %s exceeded its memory budget (%s, reached %.1f MiB): 503",
                     stats.label.c_str(), FormatSize(static_cast<uint64_t>(budget)).c_str(),
                     static_cast<double>(used) / (1 << 20));
  }
  r->resp.status = 503;
  r->resp.budget = cpu ? "cpu" : "memory";
  r->resp.content_type = kText;
  r->resp.body = cpu ? "request exceeded its cpu budget\n" : "request exceeded its memory budget\n";
  r->responded = true;
}

// A 500 (the pending exception's traceback goes to the log, never to the client).
void PythonStage::Fail(http::Request* r, RouteStats& stats, int status) {
  exceptions_.Add();
  stats.errors.Add();
  std::string tb = PyErr_Occurred() ? FetchTraceback() : "(no exception)";
  LOG_RATE_LIMITED(LogLevel::kError, "%s %.*s failed with %d:\n%s", stats.label.c_str(),
                   static_cast<int>(r->head.target.size()), r->head.target.data(), status, tb.c_str());
  SetInternalError(&r->resp);
  r->resp.status = status;
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
    if (ret != Py_None && PyObject_TypeCheck(ret, reinterpret_cast<PyTypeObject*>(GetHelpers().response))) {
      Py_SETREF(resp, ret);  // the plugin replaced the response
    } else {
      Py_DECREF(ret);
    }
  }
  r->resp.Reset();
  if (!ResultToResponse(resp, &r->resp)) {
    LOG_RATE_LIMITED(LogLevel::kError, "on_response left an invalid response: %s", FetchExceptionLine().c_str());
    SetInternalError(&r->resp);
  }
  Py_DECREF(resp);
}

void PythonStage::Shutdown() {
  if (!main_ || !Initialized()) return;
  PyEval_RestoreThread(saved_);
  GlobalWatchdog().Stop();
  if (app_ != nullptr) {
    if (absl::Status s = CallHook(app_, "shutdown"); !s.ok()) LOG_ERROR("%s", std::string(s.message()).c_str());
  }
  for (PythonShared::Handler& h : python_->handlers) {
    Py_CLEAR(h.callable);
    Py_CLEAR(h.kwnames);
  }
  for (PyObject*& p : python_->plugins) Py_CLEAR(p);
  Py_CLEAR(app_);
  Finalize();
}

void PythonStage::ExtraStats(StatsSink& sink) const {
  sink.Value("handler_exceptions_total", static_cast<double>(exceptions_.Get()));
  sink.Value("http_errors_total", static_cast<double>(http_errors_.Get()));
  sink.Value("bad_results_total", static_cast<double>(bad_results_.Get()));
  sink.Value("budget_cpu_kills_total", static_cast<double>(cpu_kills_.Get()));
  sink.Value("budget_memory_kills_total", static_cast<double>(memory_kills_.Get()));
  sink.Value("budget_rss_sheds_total", static_cast<double>(rss_sheds_.Get()));
  if (main_) {
    // Per route (every lane shares these; the main lane reports them once).
    for (const PythonShared::Handler& h : python_->handlers) {
      const RouteStats& r = *h.stats;
      sink.Labeled("handler_calls_total", "route", r.label, static_cast<double>(r.calls.Get()));
      sink.Labeled("handler_errors_total", "route", r.label, static_cast<double>(r.errors.Get()));
      sink.Labeled("handler_seconds_total", "route", r.label, static_cast<double>(r.handler_ns.Get()) / 1e9);
      sink.Labeled("budget_cpu_kills_by_route_total", "route", r.label, static_cast<double>(r.cpu_kills.Get()));
      sink.Labeled("budget_memory_kills_by_route_total", "route", r.label, static_cast<double>(r.memory_kills.Get()));
      sink.Histogram("handler_seconds", r.handler_hist_ns, "route", r.label);
    }
    const Watchdog& w = GlobalWatchdog();
    sink.Value("budget_stuck_handlers_total", static_cast<double>(w.stuck_handlers.Get()));
    sink.Value("budget_cpu_overshoot_max_seconds", static_cast<double>(python_->cpu_overshoot_max_ns.load()) / 1e9);
    sink.Histogram("budget_cpu_overshoot_seconds", python_->cpu_overshoot_ns);
    sink.Histogram("budget_interrupt_delay_seconds", w.interrupt_delay_ns);
    sink.Value("budget_late_interrupts_total", static_cast<double>(w.late_interrupts.Get()));
    sink.Value("budget_ended_past_budget_total", static_cast<double>(w.ended_past_budget.Get()));
    sink.Value("process_rss_bytes", static_cast<double>(ReadRssBytes()));
    sink.Value("python_heap_bytes", static_cast<double>(WrappedLiveBytes()));
  }
}

METRONOME_REGISTER_STAGE("python", PythonStage);

}  // namespace metronome::py
