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
#include <poll.h>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_format.h"
#include "runtime/log.h"
#include "runtime/outbox.h"
#include "runtime/clock.h"
#include "runtime/registry.h"
#include "runtime/units.h"
#include "stages/py/convert.h"
#include "stages/py/interpreter.h"
#include "stages/py/module.h"
#include "stages/py/asgi.h"
#include "stages/py/loop.h"
#include "stages/py/wsgi.h"

namespace metronome::py {
namespace {

constexpr std::string_view kText = "text/plain; charset=utf-8";
static_assert(Watchdog::kLanesMax >= http::kPythonLanesMax, "the watchdog watches every python lane");
// A stream that found the chunk pool empty tries again after this.
constexpr int64_t kStreamPoolRetryNs = 5 * kNanosPerMilli;
// How often tasks in flight are looked at for python.budget.hard and the drain's cut; a task
// waiting in receive() or send() is looked at more often (its client may be gone or reading).
constexpr int64_t kCallCheckNs = 10 * kNanosPerMilli;
constexpr int64_t kCallWaiterCheckNs = 1 * kNanosPerMilli;

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
  interface_config_ = py.Enum("interface", "auto", {"auto", "metronome", "wsgi", "asgi"});
  max_tasks_ = py.Int("max_tasks", max_tasks_, 1, 1 << 16);
  log_level_ = py.Enum("log_level", "info", {"debug", "info", "warning", "error"});
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
  waker_ = env.lane_waker();
  chunk_giver_ = shared_->body_chunks.MakeGiverToken();
  drain_timeout_ns_ = env.drain_timeout_ns();
  streams_.reserve(http_config_.max_inflight);
  if (main_) return StartMain(env);
  if (!python_->interpreter_ready) return absl::FailedPreconditionError("the main python stage did not start");
  PyGILState_Ensure();  // this thread's state, kept for the whole run
  watch_ = GlobalWatchdog().Register(false);
  absl::Status loop = python_->interface == Interface::kWsgi ? absl::OkStatus() : OpenLoop();
  saved_ = PyEval_SaveThread();
  return loop;
}

// This lane's asyncio loop, entered as the thread's running loop (ASGI apps, async handlers).
absl::Status PythonStage::OpenLoop() {
  if (!asgi::Init()) return absl::InternalError(absl::StrCat("ASGI set-up: ", FetchExceptionLine()));
  if (absl::Status s = loop_.Create(); !s.ok()) return s;
  if (main_ && python_->interface == Interface::kAsgi) {
    // Lifespan startup runs before the loop is this thread's running loop (run_until_complete).
    if (absl::Status s = asgi::StartLifespan(python_->app, loop_, &lifespan_); !s.ok()) return s;
    python_->lifespan_state = lifespan_.supported ? lifespan_.state : nullptr;
  }
  return loop_.Enter();
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
    // Python's logging into the server's log, unless the app configured its own.
    PyObject* logging_module = PyImport_ImportModule("metronome._logging");
    PyObject* what = logging_module ? PyObject_CallMethod(logging_module, "install", "s", log_level_.c_str()) : nullptr;
    Py_XDECREF(logging_module);
    if (what == nullptr) return absl::InternalError(absl::StrCat("python logging set-up: ", FetchTraceback()));
    LOG_INFO("python: %s", PyUnicode_Check(what) ? PyUnicode_AsUTF8(what) : "logging set up");
    Py_DECREF(what);
    if (python_->interface == Interface::kMetronome) {
      if (absl::Status s = CallHook(app_, "startup"); !s.ok()) return s;
    }
    if (python_->interface == Interface::kWsgi && !wsgi::Init()) {
      return absl::InternalError(absl::StrCat("WSGI set-up: ", FetchExceptionLine()));
    }
    if (python_->interface != Interface::kWsgi) {
      if (absl::Status s = OpenLoop(); !s.ok()) return s;
    }
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

// What serve's start-up and `metronome check` both load: the app, its interface and its routes
// (into the shared route table). REQUIRES the GIL. Runs no hook (startup, lifespan) and starts
// nothing.
absl::Status PythonStage::LoadApp(StageEnv& env) {
  // The metronome package registers its helpers with the native module; a WSGI or ASGI app
  // does not import it, so the server does, first.
  PyObject* package = PyImport_ImportModule("metronome");
  if (package == nullptr) return absl::InternalError(absl::StrCat("import metronome:\n", FetchTraceback()));
  Py_DECREF(package);
  env.CheckStep(absl::StrCat("importing python.app \"", app_spec_, "\" (", app_where_, ")"));
  if (absl::Status s = ImportObject(app_spec_, &app_); !s.ok()) {
    return absl::FailedPreconditionError(absl::StrCat(app_where_, ": ", s.message()));
  }
  Py_INCREF(app_);
  python_->app = app_;
  if (absl::Status s = ChooseInterface(); !s.ok()) {
    return absl::Status(s.code(), absl::StrCat(app_where_, ": ", s.message()));
  }
  env.CheckStep(absl::StrCat("loading the routes of python.app \"", app_spec_, "\" (", app_where_, ")"));
  if (python_->interface != Interface::kMetronome) return LoadAppRoutes();
  if (absl::Status s = LoadRoutes(); !s.ok()) return s;
  return LoadErrorHandlers();
}

// App(errors="json") and @app.error(status): the server's own answers in the app's form, and
// the app's handlers for them. With handlers or plugins, route hands its 404/405/OPTIONS
// answers to Python (Dispatch::error_target) so that they and the plugins see them.
absl::Status PythonStage::LoadErrorHandlers() {
  PyObject* errors = PyObject_GetAttrString(app_, "errors");
  if (errors != nullptr && PyUnicode_Check(errors) && PyUnicode_CompareWithASCIIString(errors, "json") == 0) {
    http::SetErrorsAsJson(true);
  }
  Py_XDECREF(errors);
  PyErr_Clear();
  PyObject* handlers = PyObject_CallMethod(app_, "error_handlers", nullptr);
  if (handlers == nullptr || !PyDict_Check(handlers)) {
    Py_XDECREF(handlers);
    return absl::FailedPreconditionError(absl::StrCat("app.error_handlers(): ", FetchExceptionLine()));
  }
  PyObject *key, *value;
  Py_ssize_t pos = 0;
  while (PyDict_Next(handlers, &pos, &key, &value)) {
    long status = PyLong_AsLong(key);
    if (status < 100 || status > 599) {
      PyErr_Clear();
      continue;
    }
    Py_INCREF(value);
    python_->error_handlers[static_cast<int>(status)] = value;
  }
  Py_DECREF(handlers);
  if (!python_->error_handlers.empty() || !python_->plugin_names.empty()) {
    http::RouteTarget t;
    t.kind = http::RouteTarget::Kind::kPython;
    t.pattern = "(the server's answer)";
    t.handler = -1;
    dispatch_->error_target = static_cast<int>(routes_->targets.size());
    routes_->targets.push_back(std::move(t));
  }
  return absl::OkStatus();
}

// The app's handler for the server's answer in r->resp (@app.error(status)), if it has one:
// it may replace it. Its result converts like a handler's; a plain body keeps the status.
void PythonStage::ApplyErrorHandler(http::Request* r) {
  auto it = python_->error_handlers.find(r->resp.status);
  if (it == python_->error_handlers.end()) return;
  PyObject* req = static_cast<PyObject*>(r->py_request);
  if (req == nullptr) {
    req = NewRequest(r, shared_);
    if (req == nullptr) {
      PyErr_Clear();
      return;
    }
    r->py_request = req;
  }
  const int status = r->resp.status;
  PyObject* result = PyObject_CallFunction(it->second, "Oi", req, status);
  http::Response replaced;
  if (result == nullptr || !ResultToResponse(result, &replaced) || replaced.streaming()) {
    LOG_RATE_LIMITED(LogLevel::kError, "the app's error handler for %d raised or returned something invalid; "
                     "the server's answer stands:\n%s", status, PyErr_Occurred() ? FetchTraceback().c_str() : "(a stream)");
    DropStreamSource(&replaced);
  } else {
    if (replaced.status == 200) replaced.status = status;
    const std::string_view allow = r->resp.allow;
    const int retry = r->resp.retry_after_s;
    const std::string_view budget = r->resp.budget;
    // The views may point into the storage that moves with them (small strings are copied).
    const bool body_stored = replaced.body.data() == replaced.body_storage.data();
    const bool type_stored = replaced.content_type.data() == replaced.content_type_storage.data();
    r->resp = std::move(replaced);
    if (body_stored) r->resp.body = r->resp.body_storage;
    if (type_stored) r->resp.content_type = r->resp.content_type_storage;
    r->resp.allow = allow;
    r->resp.retry_after_s = retry;
    r->resp.budget = budget;
  }
  Py_XDECREF(result);
}

absl::StatusOr<std::string> PythonStage::CheckDeep(StageEnv& env) {
  if (!main_) return std::string();  // the other lanes only take a thread state in Start
  if (absl::Status s = InitializeInterpreter(); !s.ok()) return s;
  // The GIL stays held: the check's child process ends with _exit after the last stage.
  if (absl::Status s = LoadApp(env); !s.ok()) return s;
  const size_t n = python_->handlers.size();
  switch (python_->interface) {
    case Interface::kMetronome:
      return absl::StrCat(app_spec_, " imported, ", n, n == 1 ? " route" : " routes",
                          ", every handler takes its path parameters; startup hooks were not run");
    case Interface::kWsgi:
      return absl::StrCat(app_spec_, " imported, served as wsgi (every path)");
    case Interface::kAsgi:
      return absl::StrCat(app_spec_, " imported, served as asgi (every path); lifespan startup was not run");
  }
  return std::string();
}

const char* InterfaceName(Interface i) {
  switch (i) {
    case Interface::kMetronome: return "metronome";
    case Interface::kWsgi: return "wsgi";
    case Interface::kAsgi: return "asgi";
  }
  return "?";
}

absl::Status PythonStage::ChooseInterface() {
  PyObject* app_module = PyImport_ImportModule("metronome._app");
  PyObject* r = app_module ? PyObject_CallMethod(app_module, "detect_interface", "O", app_) : nullptr;
  Py_XDECREF(app_module);
  const char *found = nullptr, *why = nullptr;
  if (r == nullptr || !PyArg_ParseTuple(r, "zs", &found, &why)) {
    Py_XDECREF(r);
    return absl::InternalError(absl::StrCat("metronome._app.detect_interface: ", FetchExceptionLine()));
  }
  std::string detected = found != nullptr ? found : "", reason = why;
  Py_DECREF(r);
  std::string chosen = interface_config_ == "auto" ? detected : interface_config_;
  if (chosen.empty()) {
    return absl::FailedPreconditionError(absl::StrCat("python.app '", app_spec_, "' is ", reason,
                                                      ": not a metronome.App, a WSGI callable or an ASGI app"));
  }
  if (chosen == "metronome" && detected != "metronome") {
    return absl::FailedPreconditionError(absl::StrCat("python.interface is metronome, but python.app '", app_spec_,
                                                      "' is ", reason, ", not a metronome.App"));
  }
  if (chosen != "metronome" && detected == "metronome") {
    return absl::FailedPreconditionError(absl::StrCat("python.interface is ", chosen, ", but python.app '", app_spec_,
                                                      "' is a metronome.App (use interface: metronome or auto)"));
  }
  python_->interface = chosen == "metronome" ? Interface::kMetronome : chosen == "wsgi" ? Interface::kWsgi : Interface::kAsgi;
  LOG_INFO("python: %s is served as %s: %s", app_spec_.c_str(), chosen.c_str(),
           interface_config_ == "auto" ? absl::StrCat("python.interface auto, and it is ", reason).c_str()
                                       : "python.interface says so");
  return absl::OkStatus();
}

absl::Status PythonStage::LoadAppRoutes() {
  python_->wsgi_info.server_name = http_config_.listen_host;
  python_->wsgi_info.server_port = std::to_string(http_config_.listen_port);
  python_->wsgi_info.multithread = dispatch_->lanes() > 1;
  auto add = [&](const std::string& pattern, int64_t cpu_ns, int64_t memory_bytes, bool heavy,
                 const std::string& declared_at) {
    PythonShared::Handler h;
    Py_INCREF(app_);
    h.callable = app_;
    h.stats = std::make_unique<RouteStats>();
    h.stats->label = absl::StrCat(InterfaceName(python_->interface), " ", pattern);
    const int handler = static_cast<int>(python_->handlers.size());
    python_->handlers.push_back(std::move(h));
    for (int m = 0; m < http::kRouteMethods; ++m) {
      const auto method = static_cast<http::Method>(m);
      if (method == http::Method::kHead) continue;  // served by the GET target; the app sees HEAD
      http::RouteTarget t;
      t.kind = http::RouteTarget::Kind::kPython;
      t.pattern = pattern;
      t.method = method;
      t.handler = handler;
      t.cpu_budget_ns = cpu_ns;
      t.memory_budget_bytes = static_cast<uint64_t>(memory_bytes);
      t.heavy = heavy;
      t.declared_at = declared_at;
      t.function = absl::StrCat("the ", InterfaceName(python_->interface), " app ", app_spec_);
      routes_->targets.push_back(std::move(t));
    }
  };
  // python.routes: the app's paths that need budgets of their own (their routes are not
  // declared to metronome). The method key narrows nothing here: the app routes by method.
  for (const RouteOverride& ov : overrides_) {
    add(ov.path, ov.cpu_ns, ov.memory_bytes, ov.heavy == 1, ov.where);
  }
  add("/{path:path}", 0, 0, false, app_where_);
  return absl::OkStatus();
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
        r->resp.SetError(503, "server over its memory limit; retry later");
        r->resp.budget = "rss";
        r->resp.retry_after_s = http_config_.retry_after_s;
        r->responded = true;
      } else if (Handle(r, out)) {
        continue;  // a task now: it answers when it is done (OnDone)
      }
    }
    Answered(r);
  }
  // What moved into the outbox leaves the lane only after Poll (see Poll).
  if (FlushPending(out)) unflushed_ = true;
  saved_ = PyEval_SaveThread();
}

// r's response is final: it leaves (after its Python object is let go), and, when it started a
// stream, the stream's first chunk right after it.
void PythonStage::Answered(http::Request* r) {
  ReleaseRequestObject(r);
  dispatch_->Done(lane_);
  assert(r->resp.stream_source == nullptr && "a stream source must not leave the python stage");
  pending_out_.push_back(r);
  if (!streams_.empty() && streams_.back().request == r && streams_.back().first != nullptr) {
    Stream& st = streams_.back();
    http::BodyChunk* first = st.first;
    st.first = nullptr;
    EmitChunk(st, first);
    if (st.cut_after_first) EndStream(streams_.size() - 1, true, "the body was longer than its declared Content-Length");
  }
}

bool PythonStage::FlushPending(Outbox& out) {
  bool moved = false;
  while (!pending_out_.empty() && out.Room() > 0) {
    out.EmitTo(serialize_, pending_out_.front());
    pending_out_.pop_front();
    moved = true;
  }
  return moved;
}

template <typename F>
PyObject* PythonStage::Budgeted(const http::Request* r, const http::RouteTarget& target, RouteStats& stats,
                                MemoryAccount* account, F call, Outcome* outcome, int64_t* elapsed_ns) {
  const int64_t cpu_ns = target.cpu_budget_ns > 0 ? target.cpu_budget_ns : python_->cpu_budget_ns;
  const uint64_t seq = ++seq_;
  const int64_t t0 = MonotonicNowNs();
  dispatch_->Busy(lane_, t0);
  busy_since_ns_.store(t0, std::memory_order_relaxed);
  busy_request_.store(r, std::memory_order_release);
  GlobalWatchdog().Begin(watch_, seq, t0, cpu_ns, stats.label.c_str());
  SetMemoryAccount(account);
  PyObject* result = call();
  SetMemoryAccount(nullptr);
  const int64_t t1 = MonotonicNowNs();
  const bool cpu_fired = GlobalWatchdog().End(watch_, t1);
  dispatch_->Idle(lane_);
  busy_request_.store(nullptr, std::memory_order_release);
  *elapsed_ns = t1 - t0;
  stats.handler_ns.Add(static_cast<uint64_t>(t1 - t0));
  if (cpu_fired || account->exceeded) {
    // The server fails the request itself, whatever the handler made of the exception.
    Py_XDECREF(result);
    PyErr_Clear();
    // Both can be true (a big allocation on a loaded machine takes long): the failed
    // allocation is the cause the handler saw, so memory wins.
    *outcome = account->exceeded ? Outcome::kMemory : Outcome::kCpu;
    return nullptr;
  }
  *outcome = result == nullptr ? Outcome::kRaised : Outcome::kOk;
  return result;
}

bool PythonStage::Handle(http::Request* r, Outbox& out) {
  (void)out;
  const http::RouteTarget& target = routes_->targets[static_cast<size_t>(r->route)];
  if (target.handler < 0) {
    // route's own answer (404, 405, OPTIONS), handed over for the app's error handlers and
    // plugins (LoadErrorHandlers).
    ApplyErrorHandler(r);
    if (r->plugins_seen != 0) CallOnResponse(r, static_cast<PyObject*>(r->py_request));
    r->responded = true;
    return false;
  }
  PythonShared::Handler& h = python_->handlers[static_cast<size_t>(target.handler)];
  RouteStats& stats = *h.stats;
  if (python_->interface == Interface::kWsgi) {
    HandleWsgi(r, target, stats);
    return false;
  }
  if (python_->interface == Interface::kAsgi) return HandleAsgi(r, target, stats);
  PyObject* req = static_cast<PyObject*>(r->py_request);
  if (req == nullptr) {
    req = NewRequest(r, shared_);
    if (req == nullptr) {
      Fail(r, stats, 500);
      return false;
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
  account_ = MemoryAccount{};
  account_.cap = target.memory_budget_bytes > 0 ? static_cast<int64_t>(target.memory_budget_bytes) : python_->memory_budget_bytes;
  Outcome outcome = Outcome::kRaised;
  int64_t dt = 0;
  PyObject* result = ok ? Budgeted(r, target, stats, &account_, [&] {
    return PyObject_Vectorcall(h.callable, args + 1, 1 | PY_VECTORCALL_ARGUMENTS_OFFSET, n > 0 ? h.kwnames : nullptr);
  }, &outcome, &dt) : nullptr;
  for (int i = 0; i < n; ++i) Py_DECREF(args[2 + i]);
  stats.calls.Add();
  stats.handler_hist_ns.Record(static_cast<uint64_t>(dt));
  r->resp.Reset();
  if (outcome == Outcome::kCpu || outcome == Outcome::kMemory) {
    if (outcome == Outcome::kCpu) {
      BudgetFail(r, stats, "cpu", dt, target.cpu_budget_ns > 0 ? target.cpu_budget_ns : python_->cpu_budget_ns);
    } else {
      BudgetFail(r, stats, "memory", account_.peak, account_.cap);
      malloc_trim(0);  // give what the request touched back to the system
    }
    return false;
  }
  if (result != nullptr && PyCoro_CheckExact(result)) {
    // An `async def` handler: its coroutine runs as a task on this lane's loop.
    const bool deferred = StartTask(r, target, result, /*metronome=*/true);
    Py_DECREF(result);
    return deferred;
  }
  Respond(r, target, stats, result);
  return false;
}

// A metronome.App handler's result (a new reference, or nullptr with its exception pending)
// into r's response.
void PythonStage::Respond(http::Request* r, const http::RouteTarget& target, RouteStats& stats, PyObject* result) {
  r->resp.Reset();
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
  if (r->plugins_seen != 0) CallOnResponse(r, static_cast<PyObject*>(r->py_request));
  r->responded = true;
  if (r->resp.stream_source != nullptr) {
    Stream st;
    st.iter = static_cast<PyObject*>(r->resp.stream_source);
    r->resp.stream_source = nullptr;
    StartStream(r, target, stats, std::move(st));
  }
  if (r->resp.status >= 500) stats.errors.Add();
}

// Closes what a stream came from: the WSGI iterable's close() (PEP 3333), else the iterator's
// (a generator's `finally` runs); a raise is logged. Releases the stream's references.
// close() is the app's code: it runs under the route's budgets like every step.
void PythonStage::CloseSource(Stream& s) {
  PyObject* source = s.close_target != nullptr ? s.close_target : s.iter;
  if (source != nullptr && PyObject_HasAttrString(source, "close")) {
    assert(s.route >= 0 && s.request != nullptr && "a stream source closed before its stream had a route");
    const http::RouteTarget& target = routes_->targets[static_cast<size_t>(s.route)];
    RouteStats& stats = *python_->handlers[static_cast<size_t>(target.handler)].stats;
    Outcome outcome = Outcome::kRaised;
    int64_t dt = 0;
    PyObject* r = Budgeted(s.request, target, stats, &s.account,
                           [&] { return PyObject_CallMethod(source, "close", nullptr); }, &outcome, &dt);
    if (outcome == Outcome::kCpu || outcome == Outcome::kMemory) {
      const bool cpu = outcome == Outcome::kCpu;
      (cpu ? cpu_kills_ : memory_kills_).Add();
      (cpu ? stats.cpu_kills : stats.memory_kills).Add();
      stats.errors.Add();
      LOG_RATE_LIMITED(LogLevel::kWarn, "budget: %s exceeded its %s budget in its streamed body's close()",
                       stats.label.c_str(), cpu ? "cpu" : "memory");
    } else if (r == nullptr) {
      LOG_RATE_LIMITED(LogLevel::kError, "%s: its streamed body's close() raised:\n%s", stats.label.c_str(),
                       FetchTraceback().c_str());
    }
    Py_XDECREF(r);
  }
  Py_CLEAR(s.iter);
  Py_CLEAR(s.close_target);
  Py_CLEAR(s.start_response);
}

void PythonStage::HandleWsgi(http::Request* r, const http::RouteTarget& target, RouteStats& stats) {
  PyObject* environ = wsgi::NewEnviron(*r, *shared_, python_->wsgi_info);
  PyObject* start_response = environ != nullptr ? wsgi::NewStartResponse() : nullptr;
  if (start_response == nullptr) {
    Py_XDECREF(environ);
    Fail(r, stats, 500);
    return;
  }
  account_ = MemoryAccount{};
  account_.cap = target.memory_budget_bytes > 0 ? static_cast<int64_t>(target.memory_budget_bytes) : python_->memory_budget_bytes;
  Outcome outcome = Outcome::kRaised;
  int64_t dt = 0;
  PyObject* result = Budgeted(r, target, stats, &account_, [&] {
    return PyObject_CallFunctionObjArgs(python_->app, environ, start_response, nullptr);
  }, &outcome, &dt);
  Py_DECREF(environ);
  stats.calls.Add();
  stats.handler_hist_ns.Record(static_cast<uint64_t>(dt));
  r->resp.Reset();
  if (outcome == Outcome::kCpu || outcome == Outcome::kMemory) {
    Py_DECREF(start_response);
    if (outcome == Outcome::kCpu) {
      BudgetFail(r, stats, "cpu", dt, target.cpu_budget_ns > 0 ? target.cpu_budget_ns : python_->cpu_budget_ns);
    } else {
      BudgetFail(r, stats, "memory", account_.peak, account_.cap);
      malloc_trim(0);
    }
    return;
  }
  if (result == nullptr) {
    Py_DECREF(start_response);
    Fail(r, stats, 500);
    return;
  }
  r->responded = true;
  // A body known whole: at most one item, start_response called, nothing written.
  const bool sequence = PyList_CheckExact(result) || PyTuple_CheckExact(result);
  if (sequence && PySequence_Fast_GET_SIZE(result) <= 1 && wsgi::Called(start_response) &&
      !wsgi::HasWritten(start_response)) {
    PyObject* item = PySequence_Fast_GET_SIZE(result) == 1 ? PySequence_Fast_GET_ITEM(result, 0) : nullptr;
    bool ok = item == nullptr || PyBytes_Check(item);
    if (!ok) PyErr_Format(PyExc_TypeError, "a WSGI iterable yields bytes, not %s", Py_TYPE(item)->tp_name);
    ok = ok && wsgi::FillHead(start_response, &r->resp);
    if (ok && item != nullptr) {
      r->resp.body_storage.assign(PyBytes_AS_STRING(item), static_cast<size_t>(PyBytes_GET_SIZE(item)));
      r->resp.body = r->resp.body_storage;
    }
    ok = ok && SettleFraming(&r->resp);
    std::string error = ok ? "" : FetchExceptionLine();
    wsgi::CloseIterable(result, stats.label.c_str());
    Py_DECREF(result);
    Py_DECREF(start_response);
    if (!ok) {
      bad_results_.Add();
      stats.errors.Add();
      LOG_RATE_LIMITED(LogLevel::kError, "%s %.*s: %s: 500", stats.label.c_str(), static_cast<int>(r->head.target.size()),
                       r->head.target.data(), error.c_str());
      SetInternalError(&r->resp);
      return;
    }
    if (r->plugins_seen != 0) CallOnResponse(r, static_cast<PyObject*>(r->py_request));
    if (r->resp.status >= 500) stats.errors.Add();
    return;
  }
  // Streamed (or write() was used): stepped like an iterator response.
  Stream st;
  st.request = r;  // (StartStream sets these too; CloseSource needs them already)
  st.route = r->route;
  st.account = account_;
  st.close_target = result;  // its close(), in every case
  st.start_response = start_response;
  st.iter = PyObject_GetIter(result);
  if (st.iter == nullptr) {
    std::string error = FetchExceptionLine();
    CloseSource(st);
    bad_results_.Add();
    stats.errors.Add();
    LOG_RATE_LIMITED(LogLevel::kError, "%s: the WSGI app returned a non-iterable: %s: 500", stats.label.c_str(), error.c_str());
    SetInternalError(&r->resp);
    return;
  }
  StartStream(r, target, stats, std::move(st));
  if (r->resp.status >= 500) stats.errors.Add();
}

void PythonStage::StartStream(http::Request* r, const http::RouteTarget& target, RouteStats& stats, Stream st) {
  http::Response& resp = r->resp;
  st.request = r;
  st.conn = r->conn;
  st.seq = r->seq;
  st.route = r->route;
  st.account = account_;  // the handler's allocations stay charged to its request
  const bool is_wsgi = st.start_response != nullptr;
  http::BodyChunk* terminal = shared_->body_chunks.Take();
  http::BodyChunk* first = terminal != nullptr ? shared_->body_chunks.Take() : nullptr;
  auto give_back = [&] {
    if (first != nullptr) shared_->body_chunks.Give(first, *chunk_giver_);
    if (terminal != nullptr) shared_->body_chunks.Give(terminal, *chunk_giver_);
    first = terminal = nullptr;
  };
  if (first == nullptr) {
    give_back();
    CloseSource(st);
    LOG_RATE_LIMITED(LogLevel::kWarn, "%s: no body chunk free for a new stream (server.stream_chunks): 503",
                     stats.label.c_str());
    resp.SetBusy(http_config_.retry_after_s);
    return;
  }
  // The first step: it decides the content type, and a WSGI app may call start_response in it.
  bool is_text = false;
  const bool run_first = http::ResponseHasBody(*r) || (is_wsgi && !wsgi::Called(st.start_response));
  Step step = run_first ? StepStream(st, &first->data, &is_text) : Step::kEnd;
  if (step == Step::kFailed) {
    // Nothing was sent yet: the request fails as a handler does (the cause was logged). The
    // answer is the server's, whole: none of the app's fields, and not the stream's framing
    // (a 503 with Transfer-Encoding: chunked and no chunks would desynchronise the client).
    give_back();
    CloseSource(st);
    resp.Reset();
    if (st.account.exceeded) {
      BudgetFail(r, stats, "memory", st.account.peak, st.account.cap);
    } else if (last_step_budget_) {
      BudgetFail(r, stats, "cpu", last_step_ns_, target.cpu_budget_ns > 0 ? target.cpu_budget_ns : python_->cpu_budget_ns);
    } else {
      SetInternalError(&resp);
    }
    return;
  }
  if (is_wsgi) {
    resp.framing = http::Framing::kChunked;
    if (!wsgi::FillHead(st.start_response, &resp) || !SettleFraming(&resp)) {
      give_back();
      CloseSource(st);
      bad_results_.Add();
      stats.errors.Add();
      LOG_RATE_LIMITED(LogLevel::kError, "%s: %s", stats.label.c_str(), FetchExceptionLine().c_str());
      SetInternalError(&resp);
      return;
    }
    if (r->plugins_seen != 0) {
      resp.stream_source = st.iter;  // lent for the round trip: plugins see status and fields
      Py_INCREF(st.iter);
      CallOnResponse(r, static_cast<PyObject*>(r->py_request));
      DropStreamSource(&resp);
      resp.framing = resp.declared_length >= 0 ? http::Framing::kDeclared : http::Framing::kChunked;
    }
  }
  st.framing = resp.framing;
  st.declared = resp.declared_length;
  // HTTP/1.0 has no chunked framing: the body ends when the connection closes.
  if (resp.framing == http::Framing::kChunked && r->head.version_minor == 0) {
    resp.framing = st.framing = http::Framing::kUntilClose;
    resp.close = true;
  }
  if (!http::ResponseHasBody(*r) || step == Step::kEnd) {
    // No body on the wire (HEAD, 204, 304: the head says what GET would send), or an empty
    // one: the source is closed and the response goes whole.
    give_back();
    CloseSource(st);
    if (http::ResponseHasBody(*r)) {
      if (st.declared > 0) {
        LOG_RATE_LIMITED(LogLevel::kError, "%s declared Content-Length %lld and produced no body: 500",
                         stats.label.c_str(), static_cast<long long>(st.declared));
        SetInternalError(&resp);
        return;
      }
      resp.framing = http::Framing::kLength;
      resp.declared_length = -1;
      resp.body = {};
    }
    return;
  }
  if (resp.content_type.empty() && !is_wsgi) resp.content_type = is_text ? kText : std::string_view("application/octet-stream");
  if (st.framing == http::Framing::kDeclared && static_cast<int64_t>(first->data.size()) > st.declared) {
    // More than declared in the first item already: what fits goes, then the stream ends cut.
    first->data.resize(static_cast<size_t>(st.declared));
    st.cut_after_first = true;
  }
  if (is_wsgi) wsgi::MarkHeadersSent(st.start_response);
  st.terminal = terminal;
  st.first = first;
  streams_started_.Add();
  streams_.push_back(std::move(st));
  streams_open_.store(static_cast<int64_t>(streams_.size()), std::memory_order_relaxed);
}

// One item of the stream's source under the route's budgets. kFailed: the cause was logged
// and counted (last_step_budget_ says whether a CPU budget stopped it).
PythonStage::Step PythonStage::StepStream(Stream& s, std::string* data, bool* is_text) {
  const http::RouteTarget& target = routes_->targets[static_cast<size_t>(s.route)];
  RouteStats& stats = *python_->handlers[static_cast<size_t>(target.handler)].stats;
  last_step_budget_ = false;
  data->clear();
  const bool is_wsgi = s.start_response != nullptr;
  // write() data from an earlier step goes first (PEP 3333: before the iterable's items).
  if (is_wsgi && wsgi::TakeWritten(s.start_response, data)) return Step::kItem;
  if (s.exhausted) return Step::kEnd;
  Outcome outcome = Outcome::kRaised;
  int64_t dt = 0;
  PyObject* item = Budgeted(s.request, target, stats, &s.account, [&] { return PyIter_Next(s.iter); }, &outcome, &dt);
  last_step_ns_ = dt;
  if (outcome == Outcome::kCpu || outcome == Outcome::kMemory) {
    const bool cpu = outcome == Outcome::kCpu;
    last_step_budget_ = cpu;
    (cpu ? cpu_kills_ : memory_kills_).Add();
    (cpu ? stats.cpu_kills : stats.memory_kills).Add();
    stats.errors.Add();
    LOG_RATE_LIMITED(LogLevel::kWarn, "budget: %s exceeded its %s budget while producing its body",
                     stats.label.c_str(), cpu ? "cpu" : "memory");
    return Step::kFailed;
  }
  if (item == nullptr) {
    if (PyErr_Occurred()) {
      exceptions_.Add();
      stats.errors.Add();
      LOG_RATE_LIMITED(LogLevel::kError, "%s: its streamed body raised:\n%s", stats.label.c_str(), FetchTraceback().c_str());
      return Step::kFailed;
    }
    s.exhausted = true;
    // write() during the last step still counts.
    return is_wsgi && wsgi::TakeWritten(s.start_response, data) ? Step::kItem : Step::kEnd;
  }
  // The item was allocated on the stream's account: it is freed on it too, or every step would
  // add its size for good and a long stream would run into its memory budget.
  SetMemoryAccount(&s.account);
  bool ok = true;
  std::string written;
  if (is_wsgi) wsgi::TakeWritten(s.start_response, &written);
  if (PyBytes_Check(item)) {
    data->assign(written);
    data->append(PyBytes_AS_STRING(item), static_cast<size_t>(PyBytes_GET_SIZE(item)));
  } else if (is_wsgi) {
    // PEP 3333: the iterable yields bytestrings only.
    PyErr_Format(PyExc_TypeError, "a WSGI iterable yields bytes, not %s", Py_TYPE(item)->tp_name);
    ok = false;
  } else if (PyUnicode_Check(item)) {
    Py_ssize_t n;
    const char* p = PyUnicode_AsUTF8AndSize(item, &n);
    if (p == nullptr) ok = false; else data->assign(p, static_cast<size_t>(n));
    *is_text = true;
  } else if (PyObject_CheckBuffer(item)) {
    Py_buffer view;
    if (PyObject_GetBuffer(item, &view, PyBUF_SIMPLE) < 0) {
      ok = false;
    } else {
      data->assign(static_cast<const char*>(view.buf), static_cast<size_t>(view.len));
      PyBuffer_Release(&view);
    }
  } else {
    PyErr_Format(PyExc_TypeError, "a streamed body yields str or bytes, not %s", Py_TYPE(item)->tp_name);
    ok = false;
  }
  Py_DECREF(item);
  SetMemoryAccount(nullptr);
  if (!ok) {
    bad_results_.Add();
    stats.errors.Add();
    LOG_RATE_LIMITED(LogLevel::kError, "%s: its streamed body yielded a bad item: %s", stats.label.c_str(),
                     FetchExceptionLine().c_str());
    return Step::kFailed;
  }
  return Step::kItem;
}

void PythonStage::EmitChunk(Stream& s, http::BodyChunk* chunk) {
  // A stream emits its pieces in order and ends exactly once, with its reserved terminal chunk.
  assert(s.iter != nullptr || chunk->terminal());
  assert(!chunk->terminal() || (chunk->request == s.request && s.terminal == nullptr));
  assert(s.framing != http::Framing::kDeclared || s.sent + static_cast<int64_t>(chunk->data.size()) <= s.declared);
  chunk->conn = s.conn;
  chunk->seq = s.seq;
  chunk->part = s.next_part++;
  chunk->framing = s.framing;
  chunk->producer = waker_;
  s.sent += static_cast<int64_t>(chunk->data.size());
  http::StreamFlow& flow = shared_->flows[http::SlotOf(s.conn)];
  flow.buffered_bytes.fetch_add(static_cast<int64_t>(chunk->data.size()), std::memory_order_acq_rel);
  flow.buffered_chunks.fetch_add(1, std::memory_order_acq_rel);
  pending_out_.push_back(chunk);
}

void PythonStage::EndStream(size_t index, bool abort, const char* why, bool stalled) {
  Stream& s = streams_[index];
  const http::RouteTarget& target = routes_->targets[static_cast<size_t>(s.route)];
  RouteStats& stats = *python_->handlers[static_cast<size_t>(target.handler)].stats;
  if (!abort && s.framing == http::Framing::kDeclared && s.sent != s.declared) {
    abort = true;
    why = "the body was shorter than its declared Content-Length";
  }
  // close() lets a generator's `finally` run (GeneratorExit), whatever ended the stream.
  CloseSource(s);
  if (abort) {
    streams_aborted_.Add();
    LOG_RATE_LIMITED(LogLevel::kWarn, "%s: stream cut after %lld bytes: %s; the connection is closed",
                     stats.label.c_str(), static_cast<long long>(s.sent), why);
  } else {
    streams_completed_.Add();
  }
  http::BodyChunk* t = s.terminal;
  s.terminal = nullptr;
  t->last = !abort;
  t->abort = abort;
  t->stalled = stalled;
  t->request = s.request;
  if (s.first != nullptr) shared_->body_chunks.Give(s.first, *chunk_giver_);
  EmitChunk(s, t);
  streams_[index] = std::move(streams_.back());
  streams_.pop_back();
  streams_open_.store(static_cast<int64_t>(streams_.size()), std::memory_order_relaxed);
  if (next_stream_ >= streams_.size()) next_stream_ = 0;
}

// Pending items out, one generator-stream step, one event-loop step (tasks), pending out again.
bool PythonStage::Poll(Outbox& out) {
  bool worked = FlushPending(out);
  const bool held = worked || unflushed_;
  unflushed_ = false;
  const bool app_code = !streams_.empty() || !calls_.empty() || (loop_.open() && loop_.due(out.now_ns()));
  if (held && app_code && !yielded_) {
    // Responses and stream pieces just went into the outbox, and the lane flushes it only
    // after Poll: the app's code now (a stream's step, a task's) would hold them back for as
    // long as it runs - a stream's head and first chunk until its second item. "Worked" makes
    // the lane flush and come straight back. Once: under batch after batch the app's code
    // still runs every other turn.
    yielded_ = true;
    return true;
  }
  yielded_ = false;
  if (!streams_.empty()) worked |= StepStreams(out);
  if (loop_.open()) worked |= StepLoop(out);
  worked |= FlushPending(out);
  // Items left waiting for room: come back at once.
  return worked || !pending_out_.empty();
}

// One step of one generator stream, round robin, so that every chunk leaves (the lane flushes
// after Poll) before the app is asked for the next.
bool PythonStage::StepStreams(Outbox& out) {
  if (streams_.empty()) return false;
  const int64_t now = out.now_ns();
  bool gil = false;
  bool worked = false;
  for (size_t tries = 0; tries < streams_.size() && !worked; ++tries) {
    if (next_stream_ >= streams_.size()) next_stream_ = 0;
    const size_t i = next_stream_++;
    Stream& s = streams_[i];
    http::StreamFlow& flow = shared_->flows[http::SlotOf(s.conn)];
    const char* end_why = nullptr;
    bool stalled = false;
    if (s.waiting_since_ns != 0) {
      // A client that takes bytes, however slowly (partial writes of a chunk larger than what
      // it reads per stall timeout), has not stalled: the timeout counts from its last progress.
      const uint64_t written = flow.written_bytes.load(std::memory_order_relaxed);
      if (written != s.written_seen) {
        s.written_seen = written;
        s.waiting_since_ns = now;
      }
    }
    if (flow.cancelled_gen.load(std::memory_order_acquire) == http::GenOf(s.conn)) {
      end_why = "the client went away";
    } else if (now >= stream_cut_ns_) {
      end_why = "the server is stopping";
    } else if (s.waiting_since_ns != 0 && now - s.waiting_since_ns >= http_config_.stream_stall_timeout_ns) {
      stream_stalls_.Add();
      end_why = "the client did not read for server.stream_stall_timeout";
      stalled = true;
    }
    if (end_why == nullptr && !http::StreamMayProduce(flow, http_config_.stream_buffer_bytes)) {
      if (s.waiting_since_ns == 0) {
        s.waiting_since_ns = now;
        s.written_seen = flow.written_bytes.load(std::memory_order_relaxed);
        stream_pauses_.Add();
      }
      // Ask send to wake this lane, then look again: send may have drained in between.
      flow.producer_waiting.store(true, std::memory_order_release);
      out.TickBy(s.waiting_since_ns + http_config_.stream_stall_timeout_ns);
      if (!http::StreamMayProduce(flow, http_config_.stream_buffer_bytes)) continue;
    }
    if (!gil) {
      PyEval_RestoreThread(saved_);
      gil = true;
    }
    if (end_why != nullptr) {
      EndStream(i, /*abort=*/true, end_why, stalled);
      worked = true;
      break;
    }
    http::BodyChunk* chunk = shared_->body_chunks.Take();
    if (chunk == nullptr) {
      out.TickBy(now + kStreamPoolRetryNs);  // the pool is empty: try again shortly
      continue;
    }
    s.waiting_since_ns = 0;
    bool is_text = false;
    worked = true;
    switch (StepStream(s, &chunk->data, &is_text)) {
      case Step::kItem: {
        if (chunk->data.empty()) {
          shared_->body_chunks.Give(chunk, *chunk_giver_);  // an empty chunk would end the body
          break;
        }
        if (s.framing == http::Framing::kDeclared && s.sent + static_cast<int64_t>(chunk->data.size()) > s.declared) {
          // More than the app declared: what fits goes out, then the connection closes.
          chunk->data.resize(static_cast<size_t>(s.declared - s.sent));
          EmitChunk(s, chunk);
          EndStream(i, true, "the body was longer than its declared Content-Length");
          break;
        }
        EmitChunk(s, chunk);
        break;
      }
      case Step::kEnd:
        shared_->body_chunks.Give(chunk, *chunk_giver_);
        EndStream(i, false, "");
        break;
      case Step::kFailed:
        shared_->body_chunks.Give(chunk, *chunk_giver_);
        EndStream(i, true, "the app failed while producing it (see above)");
        break;
    }
  }
  if (gil) saved_ = PyEval_SaveThread();
  return worked;
}

int64_t PythonStage::Tick(int64_t now_ns, Outbox& out) {
  (void)out;
  // Poll does the work (ending stalled and cut streams, stepping the loop); Tick only makes the
  // lane look again in time.
  int64_t loop_next = loop_.open() ? loop_.next_timer_ns() : kNeverNs;
  if (!calls_.empty()) loop_next = std::min(loop_next, std::max(next_call_check_ns_, now_ns + kCallWaiterCheckNs));
  if (streams_.empty()) return loop_next;
  int64_t next = std::min(stream_cut_ns_, loop_next);
  for (const Stream& s : streams_) {
    if (s.waiting_since_ns != 0) next = std::min(next, s.waiting_since_ns + http_config_.stream_stall_timeout_ns);
  }
  return std::max(next, now_ns + kStreamPoolRetryNs);
}

void PythonStage::BeginStop(Outbox& out) {
  stopping_ = true;
  // Streams get half the drain (an endless one, e.g. server-sent events, would hold it all);
  // those still running then are cut, their generators closed.
  stream_cut_ns_ = out.now_ns() + drain_timeout_ns_ / 2;
  if (!streams_.empty()) {
    LOG_INFO("python: %zu stream(s) in progress; those not done in %s are cut", streams_.size(),
             FormatDuration(drain_timeout_ns_ / 2).c_str());
  }
  out.TickBy(stream_cut_ns_);
}

// --- tasks: ASGI requests and async handlers on this lane's loop (asgi.h) -------------------

bool PythonStage::HandleAsgi(http::Request* r, const http::RouteTarget& target, RouteStats& stats) {
  stats.calls.Add();
  PyObject* scope = asgi::NewScope(*r, *shared_, python_->wsgi_info, python_->lifespan_state);
  if (scope == nullptr) {
    Fail(r, stats, 500);
    return false;
  }
  const bool deferred = StartTask(r, target, scope, /*metronome=*/false);
  Py_DECREF(scope);
  return deferred;
}

// For the ASGI interface `what` is the scope (the app is called here); for an async handler it
// is the coroutine the handler returned. True when the task runs; false when r was answered at
// once (shed past python.max_tasks, or the app failed before its first step).
bool PythonStage::StartTask(http::Request* r, const http::RouteTarget& target, PyObject* what, bool metronome) {
  RouteStats& stats = *python_->handlers[static_cast<size_t>(target.handler)].stats;
  if (static_cast<int64_t>(calls_.size()) >= max_tasks_) {
    tasks_shed_.Add();
    LOG_RATE_LIMITED(LogLevel::kWarn, "%s: shed with 503: %zu tasks in flight on this lane (python.max_tasks)",
                     stats.label.c_str(), calls_.size());
    if (metronome) {
      PyObject* closed = PyObject_CallMethod(what, "close", nullptr);
      Py_XDECREF(closed);
      PyErr_Clear();
    }
    r->resp.SetBusy(http_config_.retry_after_s);
    r->responded = true;
    return false;
  }
  auto* c = new asgi::Call();
  c->host = this;
  c->request = r;
  c->conn = r->conn;
  c->seq = r->seq;
  c->route = r->route;
  c->metronome = metronome;
  c->account = MemoryAccount{};
  c->account.cap = target.memory_budget_bytes > 0 ? static_cast<int64_t>(target.memory_budget_bytes) : python_->memory_budget_bytes;
  c->cpu_budget_ns = target.cpu_budget_ns > 0 ? target.cpu_budget_ns : python_->cpu_budget_ns;
  c->started_ns = MonotonicNowNs();
  c->object = asgi::NewCallObject(c);
  PyObject* coro = nullptr;
  if (c->object != nullptr) {
    if (metronome) {
      coro = Py_NewRef(what);
    } else {
      PyObject* channel = asgi::Channel(c->object);
      if (channel != nullptr) {
        // Calling the app only makes its coroutine; its code runs in the task's steps.
        SetMemoryAccount(&c->account);
        coro = PyObject_CallFunctionObjArgs(python_->app, what, PyTuple_GET_ITEM(channel, 0), PyTuple_GET_ITEM(channel, 1), nullptr);
        SetMemoryAccount(nullptr);
        Py_DECREF(channel);
      }
    }
  }
  PyObject* wrapped = coro != nullptr ? asgi::WrapCoroutine(coro, c) : nullptr;
  Py_XDECREF(coro);
  c->task = wrapped != nullptr ? PyObject_CallMethod(loop_.loop(), "create_task", "O", wrapped) : nullptr;
  Py_XDECREF(wrapped);
  if (c->task == nullptr || !asgi::AddDoneCallback(c->task, c->object)) {
    std::string error = FetchTraceback();
    exceptions_.Add();
    stats.errors.Add();
    LOG_RATE_LIMITED(LogLevel::kError, "%s %.*s: the app could not be started as a task:\n%s", stats.label.c_str(),
                     static_cast<int>(r->head.target.size()), r->head.target.data(), error.c_str());
    if (c->task != nullptr) {
      PyObject* x = PyObject_CallMethod(c->task, "cancel", nullptr);
      Py_XDECREF(x);
      PyErr_Clear();
    }
    FreeCall(c);
    SetInternalError(&r->resp);
    r->responded = true;
    return false;
  }
  if (metronome) c->req_object = Py_NewRef(static_cast<PyObject*>(r->py_request));
  calls_.push_back(c);
  tasks_started_.Add();
  tasks_open_.store(static_cast<int64_t>(calls_.size()), std::memory_order_relaxed);
  loop_.Touch();
  return true;
}

void PythonStage::FreeCall(asgi::Call* c) {
  if (c->object != nullptr) {
    asgi::Detach(c->object);
    Py_CLEAR(c->object);
  }
  Py_CLEAR(c->task);
  Py_CLEAR(c->req_object);
  Py_CLEAR(c->body);
  Py_CLEAR(c->receive_waiter);
  Py_CLEAR(c->send_waiter);
  if (c->terminal != nullptr) shared_->body_chunks.Give(c->terminal, *chunk_giver_);
  delete c;
}

// One iteration of the loop when something is due: a ready callback, a timer, the selector.
// Before it, waiters whose condition came true are woken and tasks past python.budget.hard
// cancelled.
bool PythonStage::StepLoop(Outbox& out) {
  const int64_t now = out.now_ns();
  bool readable = false;
  if (!loop_.due(now)) {
    pollfd p{loop_.fd(), POLLIN, 0};
    readable = poll(&p, 1, 0) > 0;
  }
  const bool watch = !calls_.empty() && (now >= next_call_check_ns_);
  if (!loop_.due(now) && !readable && !watch) {
    if (!calls_.empty()) out.TickBy(next_call_check_ns_);
    return false;
  }
  PyEval_RestoreThread(saved_);
  if (watch) {
    CheckCalls(now);
    loop_.Refresh();  // a waiter woken above is a ready callback now
  }
  // Only when something is due: _run_once would block in its select otherwise.
  if (loop_.due(now) || readable) loop_.Step();
  saved_ = PyEval_SaveThread();
  out.TickBy(loop_.next_timer_ns());
  if (!calls_.empty()) out.TickBy(next_call_check_ns_);
  return true;
}

// Waiters and wall-clock limits; at most every kCallCheckNs unless something wakes the lane.
void PythonStage::CheckCalls(int64_t now) {
  next_call_check_ns_ = now + kCallCheckNs;
  for (asgi::Call* c : calls_) {
    http::StreamFlow& flow = shared_->flows[http::SlotOf(c->conn)];
    const uint32_t gen = http::GenOf(c->conn);
    if (!c->client_gone && (flow.cancelled_gen.load(std::memory_order_acquire) == gen ||
                            flow.read_closed_gen.load(std::memory_order_acquire) == gen)) {
      c->client_gone = true;
    }
    if (c->receive_waiter != nullptr && (c->client_gone || c->finished)) {
      PyObject* m = Py_BuildValue("{s:s}", "type", "http.disconnect");
      PyObject* x = m ? PyObject_CallMethod(c->receive_waiter, "set_result", "O", m) : nullptr;
      Py_XDECREF(x);
      Py_XDECREF(m);
      PyErr_Clear();
      Py_CLEAR(c->receive_waiter);
    }
    if (c->send_waiter != nullptr && (c->client_gone || http::StreamMayProduce(flow, http_config_.stream_buffer_bytes))) {
      PyObject* x = PyObject_CallMethod(c->send_waiter, "set_result", "O", Py_None);
      Py_XDECREF(x);
      PyErr_Clear();
      Py_CLEAR(c->send_waiter);
    }
    // python.budget.hard bounds a task's wait for its response to start; a streaming response
    // (the head is out: server-sent events) may last, and is cut only when its client stops
    // reading for server.stream_stall_timeout.
    const bool over_hard = !c->head_emitted && now - c->started_ns > watchdog_options_.hard_ns;
    if (c->send_waiter != nullptr) {
      const uint64_t written = flow.written_bytes.load(std::memory_order_acquire);
      if (c->send_waiting_since_ns == 0 || written != c->written_seen) {
        c->send_waiting_since_ns = now;
        c->written_seen = written;
      } else if (now - c->send_waiting_since_ns > http_config_.stream_stall_timeout_ns && c->budget_failed == 0) {
        stream_stalls_.Add();
        c->budget_failed = 's';
        c->client_gone = true;
        PyObject* x = PyObject_CallMethod(c->task, "cancel", nullptr);
        Py_XDECREF(x);
        PyErr_Clear();
      }
    } else {
      c->send_waiting_since_ns = 0;
    }
    const bool cut = now >= stream_cut_ns_;
    if ((over_hard || cut) && c->budget_failed == 0 && c->task != nullptr) {
      c->budget_failed = over_hard ? 'h' : 's';
      PyObject* x = PyObject_CallMethod(c->task, "cancel", nullptr);
      Py_XDECREF(x);
      PyErr_Clear();
    }
    if (c->receive_waiter != nullptr || c->send_waiter != nullptr) next_call_check_ns_ = std::min(next_call_check_ns_, now + kCallWaiterCheckNs);
  }
}

void PythonStage::StepBegin(asgi::Call& c) {
  const http::RouteTarget& target = routes_->targets[static_cast<size_t>(c.route)];
  RouteStats& stats = *python_->handlers[static_cast<size_t>(target.handler)].stats;
  const int64_t t0 = MonotonicNowNs();
  c.step_start_ns = t0;
  const int64_t left = c.cpu_budget_ns > 0 ? std::max<int64_t>(kNanosPerMicro, c.cpu_budget_ns - c.cpu_used_ns) : 0;
  dispatch_->Busy(lane_, t0);
  busy_since_ns_.store(t0, std::memory_order_relaxed);
  busy_request_.store(c.head_emitted ? nullptr : c.request, std::memory_order_release);
  GlobalWatchdog().Begin(watch_, ++seq_, t0, left, stats.label.c_str());
  SetMemoryAccount(&c.account);
}

bool PythonStage::StepEnd(asgi::Call& c) {
  SetMemoryAccount(nullptr);
  const int64_t t1 = MonotonicNowNs();
  const bool fired = GlobalWatchdog().End(watch_, t1);
  dispatch_->Idle(lane_);
  busy_request_.store(nullptr, std::memory_order_release);
  const int64_t dt = t1 - c.step_start_ns;
  c.cpu_used_ns += dt;
  const http::RouteTarget& target = routes_->targets[static_cast<size_t>(c.route)];
  RouteStats& stats = *python_->handlers[static_cast<size_t>(target.handler)].stats;
  stats.handler_ns.Add(static_cast<uint64_t>(dt));
  task_step_ns_.Record(static_cast<uint64_t>(dt));
  if (c.budget_failed != 0) return c.budget_failed == 'c' || c.budget_failed == 'm';
  if (c.account.exceeded) c.budget_failed = 'm';
  else if (fired) c.budget_failed = 'c';
  return c.budget_failed != 0;
}

PyObject* PythonStage::OnReceive(asgi::Call& c) {
  if (!c.body_delivered) {
    c.body_delivered = true;
    PyObject* body = c.body != nullptr ? Py_NewRef(c.body)
                                       : PyBytes_FromStringAndSize(c.request->body.data(), static_cast<Py_ssize_t>(c.request->body.size()));
    if (body == nullptr) return nullptr;
    return Py_BuildValue("{s:s,s:N,s:O}", "type", "http.request", "body", body, "more_body", Py_False);
  }
  if (c.finished || c.client_gone) return Py_BuildValue("{s:s}", "type", "http.disconnect");
  if (c.receive_waiter == nullptr) {
    c.receive_waiter = PyObject_CallMethod(loop_.loop(), "create_future", nullptr);
    if (c.receive_waiter == nullptr) return nullptr;
    next_call_check_ns_ = 0;  // look at it on the next turn
  }
  return Py_NewRef(c.receive_waiter);
}

namespace {

// message[key] as bytes (b"" when absent); nullptr with TypeError when it is something else.
PyObject* BytesField(PyObject* message, const char* key) {
  PyObject* v = PyDict_GetItemString(message, key);  // borrowed
  if (v == nullptr || v == Py_None) return PyBytes_FromStringAndSize("", 0);
  if (PyBytes_Check(v)) return Py_NewRef(v);
  if (PyByteArray_Check(v) || PyMemoryView_Check(v)) return PyBytes_FromObject(v);
  PyErr_Format(PyExc_TypeError, "ASGI message '%s' must be bytes, not %s", key, Py_TYPE(v)->tp_name);
  return nullptr;
}

}  // namespace

PyObject* PythonStage::OnSend(asgi::Call& c, PyObject* message) {
  PyObject* type = PyDict_GetItemString(message, "type");  // borrowed
  const char* kind = type != nullptr && PyUnicode_Check(type) ? PyUnicode_AsUTF8(type) : nullptr;
  if (kind == nullptr) {
    PyErr_SetString(PyExc_ValueError, "an ASGI message needs a 'type'");
    return nullptr;
  }
  if (c.client_gone) Py_RETURN_NONE;  // nothing reaches the client any more
  http::Request* r = c.request;
  if (strcmp(kind, "http.response.start") == 0) {
    if (c.response_started) {
      PyErr_SetString(PyExc_RuntimeError, "http.response.start sent twice");
      return nullptr;
    }
    PyObject* status = PyDict_GetItemString(message, "status");
    long code = status != nullptr ? PyLong_AsLong(status) : -1;
    if (code < 100 || code > 599) {
      PyErr_Clear();
      PyErr_Format(PyExc_ValueError, "http.response.start status must be an int in 100..599, got %R", status ? status : Py_None);
      return nullptr;
    }
    r->resp.Reset();
    r->resp.status = static_cast<int>(code);
    PyObject* headers = PyDict_GetItemString(message, "headers");
    if (headers != nullptr && headers != Py_None) {
      PyObject* it = PyObject_GetIter(headers);
      if (it == nullptr) return nullptr;
      PyObject* pair;
      while ((pair = PyIter_Next(it)) != nullptr) {
        PyObject* seq = PySequence_Fast(pair, "an ASGI header is a [name, value] pair");
        Py_DECREF(pair);
        if (seq == nullptr || PySequence_Fast_GET_SIZE(seq) != 2 || !PyBytes_Check(PySequence_Fast_GET_ITEM(seq, 0)) ||
            !PyBytes_Check(PySequence_Fast_GET_ITEM(seq, 1))) {
          Py_XDECREF(seq);
          Py_DECREF(it);
          if (!PyErr_Occurred()) PyErr_SetString(PyExc_TypeError, "an ASGI header is a pair of bytes");
          return nullptr;
        }
        http::ExtraHeader f;
        PyObject* k = PySequence_Fast_GET_ITEM(seq, 0);
        PyObject* v = PySequence_Fast_GET_ITEM(seq, 1);
        f.name.assign(PyBytes_AS_STRING(k), static_cast<size_t>(PyBytes_GET_SIZE(k)));
        f.value.assign(PyBytes_AS_STRING(v), static_cast<size_t>(PyBytes_GET_SIZE(v)));
        Py_DECREF(seq);
        if (!AddField(std::move(f), &r->resp)) {
          Py_DECREF(it);
          return nullptr;
        }
      }
      Py_DECREF(it);
      if (PyErr_Occurred()) return nullptr;
    }
    c.response_started = true;
    Py_RETURN_NONE;
  }
  if (strcmp(kind, "http.response.body") != 0) {
    PyErr_Format(PyExc_ValueError, "unknown ASGI message type '%s' for an http scope", kind);
    return nullptr;
  }
  if (!c.response_started) {
    PyErr_SetString(PyExc_RuntimeError, "http.response.body before http.response.start");
    return nullptr;
  }
  if (c.finished) Py_RETURN_NONE;  // the response is complete: later bodies are ignored
  PyObject* body = BytesField(message, "body");
  if (body == nullptr) return nullptr;
  PyObject* more_obj = PyDict_GetItemString(message, "more_body");
  const bool more = more_obj != nullptr && PyObject_IsTrue(more_obj) == 1;
  const std::string_view data(PyBytes_AS_STRING(body), static_cast<size_t>(PyBytes_GET_SIZE(body)));
  if (!c.head_emitted) {
    http::Response& resp = r->resp;
    if (!more) {
      resp.body_storage.assign(data.data(), data.size());
      resp.body = resp.body_storage;
      Py_DECREF(body);
      if (!SettleFraming(&resp)) {
        LOG_RATE_LIMITED(LogLevel::kError, "ASGI %.*s: %s: 500", static_cast<int>(r->head.target.size()),
                         r->head.target.data(), FetchExceptionLine().c_str());
        bad_results_.Add();
        SetInternalError(&resp);
      }
      c.finished = true;
      EmitCallHead(c);
      Py_RETURN_NONE;
    }
    resp.framing = http::Framing::kChunked;
    if (!SettleFraming(&resp)) {
      Py_DECREF(body);
      return nullptr;
    }
    if (resp.framing == http::Framing::kChunked && r->head.version_minor == 0) {
      resp.framing = http::Framing::kUntilClose;
      resp.close = true;
    }
    c.framing = resp.framing;
    c.declared = resp.declared_length;
    if (!http::ResponseHasBody(*r)) {
      Py_DECREF(body);
      c.finished = true;  // HEAD, 204, 304: the head is the whole response
      EmitCallHead(c);
      Py_RETURN_NONE;
    }
    c.terminal = shared_->body_chunks.Take();
    if (c.terminal == nullptr) {
      Py_DECREF(body);
      LOG_RATE_LIMITED(LogLevel::kWarn, "ASGI: no body chunk free for a new stream (server.stream_chunks): 503");
      resp.SetBusy(http_config_.retry_after_s);
      c.finished = true;
      EmitCallHead(c);
      Py_RETURN_NONE;
    }
    EmitCallHead(c);
  }
  bool cut = false;
  std::string_view part = data;
  if (c.framing == http::Framing::kDeclared && c.sent + static_cast<int64_t>(part.size()) > c.declared) {
    part = part.substr(0, static_cast<size_t>(c.declared - c.sent));
    cut = true;
  }
  if (!part.empty()) {
    http::BodyChunk* chunk = shared_->body_chunks.Take();
    if (chunk == nullptr) {
      cut = true;  // the pool is empty: the stream cannot go on
    } else {
      chunk->data.assign(part.data(), part.size());
      EmitCallChunk(c, chunk);
    }
  }
  Py_DECREF(body);
  if (cut) {
    EndCallStream(c, /*abort=*/true, "the body was longer than its declared Content-Length, or no chunk was free");
    Py_RETURN_NONE;
  }
  if (!more) {
    EndCallStream(c, /*abort=*/c.framing == http::Framing::kDeclared && c.sent != c.declared,
                  "the body was shorter than its declared Content-Length");
    Py_RETURN_NONE;
  }
  // Backpressure: past the connection's bound, send() waits until the client reads.
  http::StreamFlow& flow = shared_->flows[http::SlotOf(c.conn)];
  if (!http::StreamMayProduce(flow, http_config_.stream_buffer_bytes)) {
    flow.producer_waiting.store(true, std::memory_order_release);
    stream_pauses_.Add();
    if (c.send_waiter == nullptr) c.send_waiter = PyObject_CallMethod(loop_.loop(), "create_future", nullptr);
    if (c.send_waiter == nullptr) return nullptr;
    next_call_check_ns_ = 0;
    return Py_NewRef(c.send_waiter);
  }
  Py_RETURN_NONE;
}

// The head leaves: the request (with its whole body, or the head of a stream) goes to serialize.
void PythonStage::EmitCallHead(asgi::Call& c) {
  http::Request* r = c.request;
  assert(!c.head_emitted);
  if (!c.body_delivered && c.body == nullptr) {
    // receive() may still be called: keep the body, the request is about to leave.
    c.body = PyBytes_FromStringAndSize(r->body.data(), static_cast<Py_ssize_t>(r->body.size()));
    if (c.body == nullptr) PyErr_Clear();
  }
  c.head_emitted = true;
  r->responded = true;
  if (c.req_object != nullptr) {
    ReleaseRequestObject(r);
    Py_CLEAR(c.req_object);
  }
  dispatch_->Done(lane_);
  pending_out_.push_back(r);
  if (c.terminal != nullptr) streams_started_.Add();
}

void PythonStage::EmitCallChunk(asgi::Call& c, http::BodyChunk* chunk) {
  chunk->conn = c.conn;
  chunk->seq = c.seq;
  chunk->part = c.next_part++;
  chunk->framing = c.framing;
  chunk->producer = waker_;
  c.sent += static_cast<int64_t>(chunk->data.size());
  http::StreamFlow& flow = shared_->flows[http::SlotOf(c.conn)];
  flow.buffered_bytes.fetch_add(static_cast<int64_t>(chunk->data.size()), std::memory_order_acq_rel);
  flow.buffered_chunks.fetch_add(1, std::memory_order_acq_rel);
  pending_out_.push_back(chunk);
}

void PythonStage::EndCallStream(asgi::Call& c, bool abort, const char* why) {
  assert(c.head_emitted && c.terminal != nullptr);
  http::BodyChunk* t = c.terminal;
  c.terminal = nullptr;
  t->last = !abort;
  t->abort = abort;
  t->request = c.request;
  EmitCallChunk(c, t);
  c.finished = true;
  if (abort) {
    streams_aborted_.Add();
    LOG_RATE_LIMITED(LogLevel::kWarn, "ASGI stream cut after %lld bytes: %s; the connection is closed",
                     static_cast<long long>(c.sent), why);
  } else {
    streams_completed_.Add();
  }
}

void PythonStage::OnDone(asgi::Call& c, PyObject* task) {
  const http::RouteTarget& target = routes_->targets[static_cast<size_t>(c.route)];
  RouteStats& stats = *python_->handlers[static_cast<size_t>(target.handler)].stats;
  http::Request* r = c.request;
  // The outcome: a result, an exception, or cancelled.
  PyObject* result = nullptr;
  std::string traceback;
  bool cancelled = false;
  PyObject* is_cancelled = PyObject_CallMethod(task, "cancelled", nullptr);
  cancelled = is_cancelled == Py_True;
  Py_XDECREF(is_cancelled);
  if (!cancelled) {
    result = PyObject_CallMethod(task, "result", nullptr);  // raises the task's exception
    if (result == nullptr) {
      if (c.budget_failed != 0) PyErr_Clear(); else traceback = FetchTraceback();
    }
  }
  PyErr_Clear();
  const char* budget = c.budget_failed == 'c' ? "cpu" : c.budget_failed == 'm' ? "memory" : c.budget_failed == 'h' ? "hard" : nullptr;
  if (c.budget_failed == 'h') tasks_hard_.Add();
  if (!c.head_emitted) {
    if (budget != nullptr) {
      BudgetFail(r, stats, budget, c.budget_failed == 'm' ? c.account.peak : c.cpu_used_ns,
                 c.budget_failed == 'm' ? c.account.cap : c.budget_failed == 'h' ? watchdog_options_.hard_ns : c.cpu_budget_ns);
    } else if (c.budget_failed == 's') {
      r->resp.SetBusy(http_config_.retry_after_s);  // cut by the drain
    } else if (c.metronome) {
      if (result == nullptr && !traceback.empty()) {
        // Restore for Respond: an HTTPError answers its status, anything else is a 500.
        PyObject* exc = PyObject_CallMethod(task, "exception", nullptr);
        if (exc != nullptr && exc != Py_None) PyErr_SetObject(reinterpret_cast<PyObject*>(Py_TYPE(exc)), exc);
        Py_XDECREF(exc);
        if (PyErr_Occurred() && !PyErr_ExceptionMatches(GetHelpers().http_error)) {
          PyErr_Clear();
          exceptions_.Add();
          stats.errors.Add();
          LOG_RATE_LIMITED(LogLevel::kError, "%s %.*s failed with 500:\n%s", stats.label.c_str(),
                           static_cast<int>(r->head.target.size()), r->head.target.data(), traceback.c_str());
          SetInternalError(&r->resp);
          r->responded = true;
        } else {
          Respond(r, target, stats, nullptr);
        }
      } else {
        Respond(r, target, stats, result);
        result = nullptr;  // Respond took it
      }
    } else if (!traceback.empty() || cancelled) {
      exceptions_.Add();
      stats.errors.Add();
      LOG_RATE_LIMITED(LogLevel::kError, "%s %.*s failed with 500:\n%s", stats.label.c_str(),
                       static_cast<int>(r->head.target.size()), r->head.target.data(),
                       cancelled ? "(the task was cancelled)" : traceback.c_str());
      SetInternalError(&r->resp);
    } else if (!c.response_started) {
      bad_results_.Add();
      stats.errors.Add();
      LOG_RATE_LIMITED(LogLevel::kError, "%s %.*s: the ASGI app returned without sending a response: 500",
                       stats.label.c_str(), static_cast<int>(r->head.target.size()), r->head.target.data());
      SetInternalError(&r->resp);
    }
    // (response started, no body sent: the head with an empty body)
    r->responded = true;
    Py_CLEAR(c.req_object);
    c.head_emitted = true;
    Answered(r);
  } else if (!c.finished) {
    // The head (and maybe part of the body) went out: too late for a status. The response is
    // cut, so that the client never takes it for a complete one.
    if (budget != nullptr) {
      (budget[0] == 'c' ? cpu_kills_ : memory_kills_).Add();
      LOG_RATE_LIMITED(LogLevel::kWarn, "budget: %s exceeded its %s budget after its response started", stats.label.c_str(), budget);
    } else if (!traceback.empty()) {
      exceptions_.Add();
      LOG_RATE_LIMITED(LogLevel::kError, "%s: the ASGI app raised after its response started:\n%s", stats.label.c_str(),
                       traceback.c_str());
    }
    EndCallStream(c, true, budget != nullptr ? "a budget stopped it" : !traceback.empty() ? "the app raised"
                                                  : "the app returned without completing its response");
  }
  Py_XDECREF(result);
  if (r->resp.status >= 500 && !c.finished) stats.errors.Add();
  for (size_t i = 0; i < calls_.size(); ++i) {
    if (calls_[i] == &c) {
      calls_[i] = calls_.back();
      calls_.pop_back();
      break;
    }
  }
  tasks_open_.store(static_cast<int64_t>(calls_.size()), std::memory_order_relaxed);
  FreeCall(&c);
}

void PythonStage::BudgetFail(http::Request* r, RouteStats& stats, const char* kind, int64_t used, int64_t budget) {
  const bool cpu = kind[0] == 'c', hard = kind[0] == 'h';
  if (!hard) {
    (cpu ? cpu_kills_ : memory_kills_).Add();
    (cpu ? stats.cpu_kills : stats.memory_kills).Add();
  }
  stats.errors.Add();
  if (cpu) {
    const int64_t over = std::max<int64_t>(0, used - budget);
    python_->cpu_overshoot_ns.Record(static_cast<uint64_t>(over));  // lanes may race on a count
    int64_t seen = python_->cpu_overshoot_max_ns.load(std::memory_order_relaxed);
    while (over > seen && !python_->cpu_overshoot_max_ns.compare_exchange_weak(seen, over)) {
    }
    LOG_RATE_LIMITED(LogLevel::kWarn, "budget: %s exceeded its cpu budget (%s) after %.1fms: 503 [request %.*s]",
                     stats.label.c_str(), FormatDuration(budget).c_str(), static_cast<double>(used) / 1e6,
                     static_cast<int>(r->request_id_len), r->request_id);
  } else if (hard) {
    LOG_RATE_LIMITED(LogLevel::kWarn, "budget: %s was still waiting after python.budget.hard (%s): cancelled, 503",
                     stats.label.c_str(), FormatDuration(budget).c_str());
  } else {
    LOG_RATE_LIMITED(LogLevel::kWarn, "budget: %s exceeded its memory budget (%s, reached %.1f MiB): 503 [request %.*s]",
                     stats.label.c_str(), FormatSize(static_cast<uint64_t>(budget)).c_str(),
                     static_cast<double>(used) / (1 << 20), static_cast<int>(r->request_id_len), r->request_id);
  }
  r->resp.SetError(503, cpu ? "request exceeded its cpu budget" : hard ? "request exceeded its time limit"
                                                                    : "request exceeded its memory budget");
  r->resp.budget = cpu ? "cpu" : hard ? "hard" : "memory";
  AfterServerAnswer(r);
}

// A 500 (the pending exception's traceback goes to the log, never to the client).
void PythonStage::Fail(http::Request* r, RouteStats& stats, int status) {
  exceptions_.Add();
  stats.errors.Add();
  std::string tb = PyErr_Occurred() ? FetchTraceback() : "(no exception)";
  DropStreamSource(&r->resp);
  LOG_RATE_LIMITED(LogLevel::kError, "%s %.*s failed with %d [request %.*s]:\n%s", stats.label.c_str(),
                   static_cast<int>(r->head.target.size()), r->head.target.data(), status,
                   static_cast<int>(r->request_id_len), r->request_id, tb.c_str());
  SetInternalError(&r->resp);
  r->resp.status = status;
  AfterServerAnswer(r);
}

// The server answered for the app (a 500, a budget's 503): the app's error handler and its
// plugins' on_response see it too.
void PythonStage::AfterServerAnswer(http::Request* r) {
  if (!python_->error_handlers.empty()) ApplyErrorHandler(r);
  if (r->plugins_seen != 0 && r->py_request != nullptr) CallOnResponse(r, static_cast<PyObject*>(r->py_request));
  r->responded = true;
}

// Plugins see the response after the handler, last plugin first (like middleware unwinding).
void PythonStage::CallOnResponse(http::Request* r, PyObject* req_obj) {
  PyObject* resp = ResponseToPython(r->resp);
  if (resp == nullptr) {
    DropStreamSource(&r->resp);
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
  DropStreamSource(&r->resp);  // the Python Response holds its own reference to it
  r->resp.Reset();
  if (!ResultToResponse(resp, &r->resp)) {
    LOG_RATE_LIMITED(LogLevel::kError, "on_response left an invalid response: %s", FetchExceptionLine().c_str());
    SetInternalError(&r->resp);
  }
  Py_DECREF(resp);
}

void PythonStage::Shutdown() {
  if (!Initialized()) return;
  if (!streams_.empty()) {
    // Left by a drain that timed out: their connections are gone with the process.
    PyEval_RestoreThread(saved_);
    for (Stream& st : streams_) {
      Py_CLEAR(st.iter);
      Py_CLEAR(st.close_target);
      Py_CLEAR(st.start_response);
      if (st.terminal != nullptr) shared_->body_chunks.Give(st.terminal, *chunk_giver_);
      if (st.first != nullptr) shared_->body_chunks.Give(st.first, *chunk_giver_);
    }
    streams_.clear();
    saved_ = PyEval_SaveThread();
  }
  if (loop_.open() || !calls_.empty()) {
    PyEval_RestoreThread(saved_);
    // Tasks a drain that timed out left: their requests go with the process.
    for (asgi::Call* c : calls_) FreeCall(c);
    calls_.clear();
    if (main_) asgi::StopLifespan(lifespan_, loop_);
    loop_.Close();
    saved_ = PyEval_SaveThread();
  }
  if (!main_) return;
  PyEval_RestoreThread(saved_);
  GlobalWatchdog().Stop();
  if (app_ != nullptr && python_->interface == Interface::kMetronome) {
    if (absl::Status s = CallHook(app_, "shutdown"); !s.ok()) LOG_ERROR("%s", std::string(s.message()).c_str());
  }
  for (PythonShared::Handler& h : python_->handlers) {
    Py_CLEAR(h.callable);
    Py_CLEAR(h.kwnames);
  }
  for (PyObject*& p : python_->plugins) Py_CLEAR(p);
  Py_CLEAR(app_);
  Py_CLEAR(python_->app);
  Finalize();
}

std::string PythonStage::BusyWith() const {
  const http::Request* r = busy_request_.load(std::memory_order_acquire);
  if (r == nullptr) return streams_open_.load() > 0 ? absl::StrCat(streams_open_.load(), " stream(s) open") : "";
  // The request stays put while its handler runs (this lane owns it, or send holds a stream's
  // head until the stream ends).
  const double s = static_cast<double>(MonotonicNowNs() - busy_since_ns_.load()) / 1e9;
  return absl::StrFormat("%s %s (route %s) has run for %.1fs; a handler stuck in C code cannot be interrupted",
                         std::string(r->head.method), std::string(r->head.target),
                         python_->handlers[static_cast<size_t>(routes_->targets[static_cast<size_t>(r->route)].handler)].stats->label,
                         s);
}

void PythonStage::ExtraStats(StatsSink& sink) const {
  sink.Value("handler_exceptions_total", static_cast<double>(exceptions_.Get()));
  sink.Value("http_errors_total", static_cast<double>(http_errors_.Get()));
  sink.Value("bad_results_total", static_cast<double>(bad_results_.Get()));
  sink.Value("budget_cpu_kills_total", static_cast<double>(cpu_kills_.Get()));
  sink.Value("budget_memory_kills_total", static_cast<double>(memory_kills_.Get()));
  sink.Value("budget_rss_sheds_total", static_cast<double>(rss_sheds_.Get()));
  sink.Value("streams_started_total", static_cast<double>(streams_started_.Get()));
  sink.Value("streams_completed_total", static_cast<double>(streams_completed_.Get()));
  sink.Value("streams_aborted_total", static_cast<double>(streams_aborted_.Get()));
  sink.Value("stream_pauses_total", static_cast<double>(stream_pauses_.Get()));
  sink.Value("stream_stalls_total", static_cast<double>(stream_stalls_.Get()));
  sink.Value("streams_open", static_cast<double>(streams_open_.load(std::memory_order_relaxed)));
  sink.Value("tasks_open", static_cast<double>(tasks_open_.load(std::memory_order_relaxed)));
  sink.Value("tasks_started_total", static_cast<double>(tasks_started_.Get()));
  sink.Value("tasks_shed_total", static_cast<double>(tasks_shed_.Get()));
  sink.Value("tasks_hard_limit_total", static_cast<double>(tasks_hard_.Get()));
  sink.Histogram("task_step_seconds", task_step_ns_);
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
    sink.Value("response_fields_server_owned_dropped_total", static_cast<double>(ServerOwnedFieldsDropped()));
  }
}

METRONOME_REGISTER_STAGE("python", PythonStage);

}  // namespace metronome::py
