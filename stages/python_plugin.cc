// python-plugin: `{stage: python-plugin, name: auth, plugin: "examples.plugins:ApiKeyAuth",
// config: {...}}` between route and python. The class is constructed with its `config:` mapping
// (as a dict). on_request(req) runs here, on the plugin's own thread: returning a
// metronome.Response (or anything a handler may return) answers the request early and it skips
// the handler; returning None passes it on. on_response(req, resp) runs after the handler, on
// the python stage's thread (python.cc), and may change or replace the response.
//
// Cost: this thread must take the GIL from the python stage for every batch; gil_wait_ns counts
// the time it waits (see README "Plugins").
#include "stages/python_plugin.h"

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "runtime/log.h"
#include "runtime/outbox.h"
#include "runtime/clock.h"
#include "runtime/registry.h"
#include "stages/py/convert.h"
#include "stages/py/interpreter.h"
#include "stages/py/module.h"

namespace metronome::py {
namespace {

// YAML -> Python: mappings to dicts, sequences to lists, scalars to int, float, bool, None or
// str (the first that parses; quoted scalars stay strings).
PyObject* YamlToPython(const YAML::Node& n) {
  if (!n.IsDefined() || n.IsNull()) Py_RETURN_NONE;
  if (n.IsMap()) {
    PyObject* d = PyDict_New();
    for (const auto& kv : n) {
      PyObject* v = YamlToPython(kv.second);
      if (v == nullptr || PyDict_SetItemString(d, kv.first.Scalar().c_str(), v) < 0) {
        Py_XDECREF(v);
        Py_DECREF(d);
        return nullptr;
      }
      Py_DECREF(v);
    }
    return d;
  }
  if (n.IsSequence()) {
    PyObject* l = PyList_New(0);
    for (const auto& item : n) {
      PyObject* v = YamlToPython(item);
      if (v == nullptr || PyList_Append(l, v) < 0) {
        Py_XDECREF(v);
        Py_DECREF(l);
        return nullptr;
      }
      Py_DECREF(v);
    }
    return l;
  }
  const std::string& s = n.Scalar();
  if (n.Tag() != "!") {  // "!" marks a quoted scalar: keep it a string
    int64_t i;
    double d;
    if (absl::SimpleAtoi(s, &i)) return PyLong_FromLongLong(i);
    if (absl::SimpleAtod(s, &d) && s.find_first_of("0123456789") != std::string::npos) return PyFloat_FromDouble(d);
    if (s == "true") Py_RETURN_TRUE;
    if (s == "false") Py_RETURN_FALSE;
    if (s == "null" || s == "~") Py_RETURN_NONE;
  }
  return PyUnicode_FromStringAndSize(s.data(), static_cast<Py_ssize_t>(s.size()));
}

}  // namespace

absl::Status PythonPluginStage::Configure(ConfigNode entry, ConfigNode root, StageEnv& env) {
  name_ = env.stage_name();
  spec_ = entry.String("plugin", std::nullopt);
  config_ = entry.Opaque("config");
  shared_ = &http::GetHttpShared(env, root, &http_config_);
  python_ = &env.Shared<PythonShared>("python");
  serialize_ = env.FindStageOfType("serialize");
  routes_ = &env.Shared<http::RouteTable>("routes");
  dispatch_ = &env.Shared<http::Dispatch>("dispatch");
  last_ = env.FindStageOfType("python-plugin") < 0;
  int python_stage = env.FindStageOfType("python");
  if (python_stage < 0) return absl::InvalidArgumentError("a python-plugin needs a python stage after it");
  if (serialize_ < 0) return absl::InvalidArgumentError("a python-plugin needs a serialize stage after it");
  index_ = static_cast<int>(python_->plugin_names.size());
  python_->plugin_names.push_back(name_);
  if (index_ >= kPluginsMax) return absl::InvalidArgumentError(absl::StrCat("at most ", kPluginsMax, " plugins"));
  python_->plugins.push_back(nullptr);
  return absl::OkStatus();
}

absl::Status PythonPluginStage::Start(StageEnv& env) {
  (void)env;
  if (!python_->interpreter_ready) {
    return absl::FailedPreconditionError("the python stage did not start the interpreter");
  }
  // This thread's first GIL: PyGILState_Ensure makes its thread state, which it keeps.
  PyGILState_Ensure();
  absl::Status result = [&]() -> absl::Status {
    PyObject* cls = nullptr;
    if (absl::Status s = ImportObject(spec_, &cls); !s.ok()) {
      return absl::FailedPreconditionError(absl::StrCat("plugin: ", s.message()));
    }
    PyObject* cfg = YamlToPython(config_);
    if (cfg == Py_None) {
      Py_DECREF(cfg);
      cfg = PyDict_New();
    }
    plugin_ = cfg ? PyObject_CallOneArg(cls, cfg) : nullptr;
    Py_XDECREF(cfg);
    Py_DECREF(cls);
    if (plugin_ == nullptr) {
      return absl::FailedPreconditionError(absl::StrCat("plugin ", spec_, "(config) raised:\n", FetchTraceback()));
    }
    // `async def` on_request/on_response become plain methods that run on this lane's loop.
    PyObject* app_module = PyImport_ImportModule("metronome._app");
    PyObject* synced = app_module ? PyObject_CallMethod(app_module, "sync_plugin", "O", plugin_) : nullptr;
    Py_XDECREF(app_module);
    if (synced == nullptr) {
      return absl::FailedPreconditionError(absl::StrCat("plugin ", spec_, ": metronome._app.sync_plugin failed:\n",
                                                        FetchTraceback()));
    }
    Py_DECREF(synced);
    on_request_ = PyObject_GetAttrString(plugin_, "on_request");
    if (on_request_ == nullptr) PyErr_Clear();
    if (!PyObject_HasAttrString(plugin_, "on_response")) {
      // The python stage calls on_response unconditionally: give it a no-op.
      PyObject* none = PyRun_String("lambda req, resp: None", Py_eval_input, PyEval_GetBuiltins(), nullptr);
      if (none == nullptr || PyObject_SetAttrString(plugin_, "on_response", none) < 0) PyErr_Clear();
      Py_XDECREF(none);
    }
    Py_INCREF(plugin_);
    python_->plugins[static_cast<size_t>(index_)] = plugin_;
    return absl::OkStatus();
  }();
  saved_ = PyEval_SaveThread();
  if (result.ok()) LOG_INFO("plugin '%s': %s", name_.c_str(), spec_.c_str());
  return result;
}

void PythonPluginStage::Process(std::span<Item* const> batch, Outbox& out) {
  int64_t t0 = MonotonicNowNs();
  PyEval_RestoreThread(saved_);
  gil_wait_ns_.Add(static_cast<uint64_t>(MonotonicNowNs() - t0));
  for (Item* it : batch) {
    auto* r = static_cast<http::Request*>(it);
    if (r->responded || on_request_ == nullptr) {
      out.Emit(r);
      continue;
    }
    PyObject* req = static_cast<PyObject*>(r->py_request);
    if (req == nullptr) {
      req = NewRequest(r, shared_);
      r->py_request = req;
    }
    PyObject* result = req ? PyObject_CallOneArg(on_request_, req) : nullptr;
    if (result == Py_None) {
      Py_DECREF(result);
      r->plugins_seen |= 1u << index_;
      passed_.Add();
      if (!last_) {
        out.Emit(r);
        continue;
      }
      // The last plugin picks the python lane, and sheds as route does when that lane is full.
      const http::RouteTarget& t = routes_->targets[static_cast<size_t>(r->route)];
      if (!dispatch_->Forward(r, t, /*to_python=*/true, -1, serialize_, http_config_.retry_after_s, out,
                              &ReleaseRequestObject)) {
        shed_.Add();
      }
      continue;
    }
    r->resp.Reset();
    if (result == nullptr) {
      if (!HttpErrorToResponse(&r->resp)) {
        errors_.Add();
        LOG_RATE_LIMITED(LogLevel::kError, "plugin '%s' on_request raised:\n%s", name_.c_str(), FetchTraceback().c_str());
        SetInternalError(&r->resp);
      }
    } else {
      if (!ResultToResponse(result, &r->resp)) {
        errors_.Add();
        LOG_RATE_LIMITED(LogLevel::kError, "plugin '%s' on_request returned an invalid response: %s", name_.c_str(),
                         FetchExceptionLine().c_str());
        SetInternalError(&r->resp);
      }
      Py_DECREF(result);
    }
    answered_.Add();
    ReleaseRequestObject(r);
    http::AnswerEarly(r, serialize_, out);
  }
  saved_ = PyEval_SaveThread();
}

void PythonPluginStage::ExtraStats(StatsSink& sink) const {
  sink.Value("answered_total", static_cast<double>(answered_.Get()));
  sink.Value("passed_total", static_cast<double>(passed_.Get()));
  sink.Value("errors_total", static_cast<double>(errors_.Get()));
  sink.Value("shed_total", static_cast<double>(shed_.Get()));
  sink.Value("gil_wait_seconds_total", static_cast<double>(gil_wait_ns_.Get()) / 1e9);
}

METRONOME_REGISTER_STAGE("python-plugin", PythonPluginStage);

}  // namespace metronome::py
