// python: runs the application's handlers in the embedded interpreter (see python.cc).
// Thread-safety: runs on the process's main thread only; holds the GIL only inside a batch.
#pragma once

#include <Python.h>

#include <memory>
#include <string>
#include <vector>

#include "runtime/stage.h"
#include "stages/http/router.h"
#include "stages/http/shared.h"

namespace metronome::py {

// What the Python stages share (StageEnv::Shared<PythonShared>("python")): the plugins, in
// pipeline order, whose on_response the python stage calls after the handler.
// Filled during Start (single-threaded), read during the run.
struct PythonShared {
  std::vector<PyObject*> plugins;       // instances (strong references)
  std::vector<std::string> plugin_names;
  bool interpreter_ready = false;
};

class PythonStage : public Stage {
 public:
  absl::Status Configure(ConfigNode entry, ConfigNode root, StageEnv& env) override;
  absl::Status Start(StageEnv& env) override;
  void Process(std::span<Item* const> batch, Outbox& out) override;
  void Shutdown() override;
  bool NeedsMainThread() const override { return true; }
  void ExtraStats(const std::function<void(absl::string_view, double)>& emit) const override;

  struct RouteStats {
    std::string label;  // "GET /users/{id:int}"
    Counter calls, errors, handler_ns;
    LatencyHistogram handler_hist_ns;
  };
  const std::vector<std::unique_ptr<RouteStats>>& route_stats() const { return route_stats_; }

 private:
  struct Handler {
    PyObject* callable = nullptr;
    PyObject* kwnames = nullptr;  // tuple of the route's parameter names, or nullptr
    int route_stats = -1;
  };
  void Handle(http::Request* r);
  void CallOnResponse(http::Request* r, PyObject* req_obj);
  void Fail(http::Request* r, const Handler& h, int status);

  std::string app_spec_;
  std::vector<std::string> path_;
  http::HttpConfig http_config_;
  http::HttpShared* shared_ = nullptr;
  http::RouteTable* routes_ = nullptr;
  PythonShared* python_ = nullptr;
  PyObject* app_ = nullptr;
  std::vector<Handler> handlers_;
  std::vector<std::unique_ptr<RouteStats>> route_stats_;
  PyThreadState* saved_ = nullptr;  // the main thread's state while the GIL is released
  Counter exceptions_, http_errors_, bad_results_;
};

}  // namespace metronome::py
