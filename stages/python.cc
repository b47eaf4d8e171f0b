// python: the application's handlers, in the embedded interpreter.
//
// The first python stage in the pipeline runs on the process's main thread. Its Start
// initialises the interpreter (with the allocator wrappers of the memory budget installed
// first), imports `python.app` ("module:attribute"), takes the app's routes into the shared
// route table (the route stage builds its router from it), starts the budget watchdog and runs
// the app's startup hooks. A module that fails to import, a missing attribute or a failing hook
// stops the server before it serves anything, with the traceback.
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
#include "absl/strings/str_format.h"
#include "runtime/log.h"
#include "runtime/outbox.h"
#include "runtime/clock.h"
#include "runtime/registry.h"
#include "runtime/units.h"
#include "stages/py/convert.h"
#include "stages/py/interpreter.h"
#include "stages/py/module.h"
#include "stages/py/wsgi.h"

namespace metronome::py {
namespace {

constexpr std::string_view kText = "text/plain; charset=utf-8";
static_assert(Watchdog::kLanesMax >= http::kPythonLanesMax, "the watchdog watches every python lane");
// A stream that found the chunk pool empty tries again after this.
constexpr int64_t kStreamPoolRetryNs = 5 * kNanosPerMilli;

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
  if (!app_spec_.empty() && app_spec_.find(':') == std::string::npos) {
    py.Error("app", "expected \"package.module:attribute\", e.g. \"examples.app:app\"");
  }
  path_ = py.StringList("path");
  interface_config_ = py.Enum("interface", "auto", {"auto", "metronome", "wsgi", "asgi"});
  switch_interval_ns_ = py.DurationNs("switch_interval", 200 * kNanosPerMicro, kNanosPerMicro, kNanosPerSecond);
  ConfigNode budget = py.Map("budget");
  python_->cpu_budget_ns = budget.DurationNs("cpu", 50 * kNanosPerMilli, 0, 3600 * kNanosPerSecond);
  python_->memory_budget_bytes = static_cast<int64_t>(budget.SizeBytes("memory", 64ull << 20, 0, 1ull << 40));
  watchdog_options_.hard_ns = budget.DurationNs("hard", kNanosPerSecond, kNanosPerMilli, 3600 * kNanosPerSecond);
  watchdog_options_.rss_limit_bytes = static_cast<int64_t>(budget.SizeBytes("rss_limit", 0, 0, 1ull << 44));
  for (ConfigNode o : py.Seq("routes")) {
    RouteOverride ov;
    ov.path = o.String("path", std::nullopt);
    ov.method = o.Enum("method", "", {"", "GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"});
    ov.cpu_ns = o.DurationNs("cpu", 0, 0, 3600 * kNanosPerSecond);
    ov.memory_bytes = static_cast<int64_t>(o.SizeBytes("memory", 0, 0, 1ull << 40));
    ov.heavy = o.Has("heavy") ? (o.Bool("heavy", false) ? 1 : 0) : -1;
    ov.line = o.line();
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
  if (main_) return StartMain();
  if (!python_->interpreter_ready) return absl::FailedPreconditionError("the main python stage did not start");
  PyGILState_Ensure();  // this thread's state, kept for the whole run
  watch_ = GlobalWatchdog().Register(false);
  saved_ = PyEval_SaveThread();
  return absl::OkStatus();
}

absl::Status PythonStage::StartMain() {
  InterpreterOptions options;
  options.path = path_;
  // The memory budget needs its allocators in place before the interpreter allocates.
  if (python_->memory_budget_bytes > 0) options.before_init = &InstallAllocatorWrappers;
  if (absl::Status s = Initialize(options); !s.ok()) return s;
  python_->interpreter_ready = true;
  absl::Status result = [&]() -> absl::Status {
    PyObject* sys = PyImport_ImportModule("sys");
    PyObject* r = sys ? PyObject_CallMethod(sys, "setswitchinterval", "d", static_cast<double>(switch_interval_ns_) / 1e9) : nullptr;
    Py_XDECREF(r);
    Py_XDECREF(sys);
    if (r == nullptr) return absl::InternalError(absl::StrCat("sys.setswitchinterval: ", FetchExceptionLine()));
    // The metronome package registers its helpers with the native module; a WSGI or ASGI app
    // does not import it, so the server does, first.
    PyObject* package = PyImport_ImportModule("metronome");
    if (package == nullptr) return absl::InternalError(absl::StrCat("import metronome:\n", FetchTraceback()));
    Py_DECREF(package);
    if (absl::Status s = ImportObject(app_spec_, &app_); !s.ok()) {
      return absl::FailedPreconditionError(absl::StrCat("python.app: ", s.message()));
    }
    Py_INCREF(app_);
    python_->app = app_;
    if (absl::Status s = ChooseInterface(); !s.ok()) return s;
    if (python_->interface == Interface::kMetronome) {
      if (absl::Status s = LoadRoutes(); !s.ok()) return s;
      if (absl::Status s = CallHook(app_, "startup"); !s.ok()) return s;
    } else {
      if (absl::Status s = LoadAppRoutes(); !s.ok()) return s;
      if (python_->interface == Interface::kWsgi && !wsgi::Init()) {
        return absl::InternalError(absl::StrCat("WSGI set-up: ", FetchExceptionLine()));
      }
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
  auto add = [&](const std::string& pattern, int64_t cpu_ns, int64_t memory_bytes, bool heavy) {
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
      routes_->targets.push_back(std::move(t));
    }
  };
  // python.routes: the app's paths that need budgets of their own (their routes are not
  // declared to metronome). The method key narrows nothing here: the app routes by method.
  for (const RouteOverride& ov : overrides_) {
    add(ov.path, ov.cpu_ns, ov.memory_bytes, ov.heavy == 1);
  }
  add("/{path:path}", 0, 0, false);
  return absl::OkStatus();
}

// The app's routes into the shared route table, with their budgets (decorator options, then
// python.routes overrides from the config).
absl::Status PythonStage::LoadRoutes() {
  PyObject* list = PyObject_CallMethod(app_, "routes", nullptr);
  if (list == nullptr) {
    return absl::FailedPreconditionError(
        absl::StrCat("python.app '", app_spec_, "' is not a metronome.App: routes() failed:\n", FetchTraceback()));
  }
  PyObject* seq = PySequence_Fast(list, "app.routes() must return a list");
  Py_DECREF(list);
  if (seq == nullptr) return absl::FailedPreconditionError(FetchExceptionLine());
  std::vector<bool> override_used(overrides_.size(), false);
  for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(seq); ++i) {
    PyObject* t = PySequence_Fast_GET_ITEM(seq, i);
    const char *method, *pattern;
    PyObject *callable, *options;
    if (!PyArg_ParseTuple(t, "ssOO", &method, &pattern, &callable, &options)) {
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
    // Parameter names, in pattern order, for the vectorcall's keyword names.
    std::vector<std::string> names = http::Router::ParamNames(target.pattern);
    if (!names.empty()) {
      h.kwnames = PyTuple_New(static_cast<Py_ssize_t>(names.size()));
      for (size_t k = 0; k < names.size(); ++k) {
        PyTuple_SET_ITEM(h.kwnames, static_cast<Py_ssize_t>(k), PyUnicode_InternFromString(names[k].c_str()));
      }
    }
    h.stats = std::make_unique<RouteStats>();
    h.stats->label = absl::StrCat(method, " ", pattern);
    python_->handlers.push_back(std::move(h));
    routes_->targets.push_back(std::move(target));
  }
  Py_DECREF(seq);
  for (size_t k = 0; k < overrides_.size(); ++k) {
    if (!override_used[k]) {
      return absl::FailedPreconditionError(absl::StrCat(
          "python.routes entry at line ", overrides_[k].line, ": no route of the app has path '",
          overrides_[k].path, "'", overrides_[k].method.empty() ? "" : absl::StrCat(" and method ", overrides_[k].method)));
    }
  }
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
        Handle(r, out);
      }
    }
    ReleaseRequestObject(r);
    dispatch_->Done(lane_);
    assert(r->resp.stream_source == nullptr && "a stream source must not leave the python stage");
    out.EmitTo(serialize_, r);
    // A stream started by this request: its first chunk follows its head.
    if (!streams_.empty() && streams_.back().request == r && streams_.back().first != nullptr) {
      Stream& st = streams_.back();
      http::BodyChunk* first = st.first;
      st.first = nullptr;
      EmitChunk(st, first, out);
      if (st.cut_after_first) EndStream(streams_.size() - 1, true, "the body was longer than its declared Content-Length", out);
    }
  }
  saved_ = PyEval_SaveThread();
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

void PythonStage::Handle(http::Request* r, Outbox& out) {
  (void)out;
  const http::RouteTarget& target = routes_->targets[static_cast<size_t>(r->route)];
  PythonShared::Handler& h = python_->handlers[static_cast<size_t>(target.handler)];
  RouteStats& stats = *h.stats;
  if (python_->interface == Interface::kWsgi) {
    HandleWsgi(r, target, stats);
    return;
  }
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
void PythonStage::CloseSource(Stream& s) {
  PyObject* target = s.close_target != nullptr ? s.close_target : s.iter;
  if (target != nullptr && PyObject_HasAttrString(target, "close")) {
    SetMemoryAccount(&s.account);
    PyObject* r = PyObject_CallMethod(target, "close", nullptr);
    SetMemoryAccount(nullptr);
    if (r == nullptr) {
      LOG_RATE_LIMITED(LogLevel::kError, "a streamed body's close() raised:\n%s", FetchTraceback().c_str());
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
    // Nothing was sent yet: the request fails as a handler does (the cause was logged).
    give_back();
    CloseSource(st);
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
  if (!ok) {
    bad_results_.Add();
    stats.errors.Add();
    LOG_RATE_LIMITED(LogLevel::kError, "%s: its streamed body yielded a bad item: %s", stats.label.c_str(),
                     FetchExceptionLine().c_str());
    return Step::kFailed;
  }
  return Step::kItem;
}

void PythonStage::EmitChunk(Stream& s, http::BodyChunk* chunk, Outbox& out) {
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
  out.EmitTo(serialize_, chunk);
}

void PythonStage::EndStream(size_t index, bool abort, const char* why, Outbox& out) {
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
  t->request = s.request;
  if (s.first != nullptr) shared_->body_chunks.Give(s.first, *chunk_giver_);
  EmitChunk(s, t, out);
  streams_[index] = std::move(streams_.back());
  streams_.pop_back();
  streams_open_.store(static_cast<int64_t>(streams_.size()), std::memory_order_relaxed);
  if (next_stream_ >= streams_.size()) next_stream_ = 0;
}

// One step of one stream, round robin, so that every chunk leaves (the lane flushes after
// Poll) before the app is asked for the next.
bool PythonStage::Poll(Outbox& out) {
  if (streams_.empty() || out.Room() < 2) return false;
  const int64_t now = out.now_ns();
  bool gil = false;
  bool worked = false;
  for (size_t tries = 0; tries < streams_.size() && !worked; ++tries) {
    if (next_stream_ >= streams_.size()) next_stream_ = 0;
    const size_t i = next_stream_++;
    Stream& s = streams_[i];
    http::StreamFlow& flow = shared_->flows[http::SlotOf(s.conn)];
    const char* end_why = nullptr;
    if (flow.cancelled_gen.load(std::memory_order_acquire) == http::GenOf(s.conn)) {
      end_why = "the client went away";
    } else if (now >= stream_cut_ns_) {
      end_why = "the server is stopping";
    } else if (s.waiting_since_ns != 0 && now - s.waiting_since_ns >= http_config_.stream_stall_timeout_ns) {
      stream_stalls_.Add();
      end_why = "the client did not read for server.stream_stall_timeout";
    }
    if (end_why == nullptr && !http::StreamMayProduce(flow, http_config_.stream_buffer_bytes)) {
      if (s.waiting_since_ns == 0) {
        s.waiting_since_ns = now;
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
      EndStream(i, /*abort=*/true, end_why, out);
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
          EmitChunk(s, chunk, out);
          EndStream(i, true, "the body was longer than its declared Content-Length", out);
          break;
        }
        EmitChunk(s, chunk, out);
        break;
      }
      case Step::kEnd:
        shared_->body_chunks.Give(chunk, *chunk_giver_);
        EndStream(i, false, "", out);
        break;
      case Step::kFailed:
        shared_->body_chunks.Give(chunk, *chunk_giver_);
        EndStream(i, true, "the app failed while producing it (see above)", out);
        break;
    }
  }
  if (gil) saved_ = PyEval_SaveThread();
  return worked;
}

int64_t PythonStage::Tick(int64_t now_ns, Outbox& out) {
  (void)out;
  // Poll does the work (ending stalled and cut streams); Tick only makes the lane look again.
  if (streams_.empty()) return kNeverNs;
  int64_t next = stream_cut_ns_;
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
  DropStreamSource(&r->resp);
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
