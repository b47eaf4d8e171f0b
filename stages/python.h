// python: runs the application's handlers in the embedded interpreter (see python.cc).
// Thread-safety: each instance runs on its own lane; the first on the process's main thread.
// An instance holds the GIL only inside a batch.
#pragma once

#include <Python.h>

#include <atomic>
#include <memory>
#include <string>
#include <vector>

#include "runtime/stage.h"
#include "stages/http/dispatch.h"
#include "stages/http/router.h"
#include "stages/http/shared.h"
#include "stages/py/budget.h"

namespace metronome::py {

// Per-route figures, shared by every python lane (each field has one writer at a time: the
// lane running the route's handler; concurrent lanes may race on a count, which costs a count,
// never a crash).
struct RouteStats {
  std::string label;  // "GET /users/{id:int}"
  Counter calls, errors, handler_ns, cpu_kills, memory_kills;
  LatencyHistogram handler_hist_ns;
};

// What the Python stages share (StageEnv::Shared<PythonShared>("python")). Filled during
// Configure and Start (single-threaded), read during the run.
struct PythonShared {
  // Stage plugins in pipeline order; the python stages call on_response after the handler.
  std::vector<PyObject*> plugins;
  std::vector<std::string> plugin_names;
  bool interpreter_ready = false;

  // The handlers, filled by the main python stage from the app.
  struct Handler {
    PyObject* callable = nullptr;
    PyObject* kwnames = nullptr;  // tuple of the route's parameter names, or nullptr
    std::unique_ptr<RouteStats> stats;
  };
  std::vector<Handler> handlers;

  // Defaults (python.budget); a route's own budgets override them.
  int64_t cpu_budget_ns = 0;
  int64_t memory_budget_bytes = 0;
  Counter rss_sheds;
  // How far past its CPU budget a stopped handler ran (time in handler - budget), every lane.
  LatencyHistogram cpu_overshoot_ns;
  std::atomic<int64_t> cpu_overshoot_max_ns{0};
};

class PythonStage : public Stage {
 public:
  absl::Status Configure(ConfigNode entry, ConfigNode root, StageEnv& env) override;
  absl::Status Start(StageEnv& env) override;
  absl::StatusOr<std::string> CheckDeep(StageEnv& env) override;
  void Process(std::span<Item* const> batch, Outbox& out) override;
  void Shutdown() override;
  bool NeedsMainThread() const override { return main_; }
  void ExtraStats(StatsSink& sink) const override;

 private:
  absl::Status StartMain(StageEnv& env);
  absl::Status InitializeInterpreter();
  absl::Status LoadApp(StageEnv& env);
  absl::Status LoadRoutes();
  void Handle(http::Request* r);
  void CallOnResponse(http::Request* r, PyObject* req_obj);
  void Fail(http::Request* r, RouteStats& stats, int status);
  void BudgetFail(http::Request* r, RouteStats& stats, const char* kind, int64_t used, int64_t budget);

  struct RouteOverride {
    std::string path, method;
    int64_t cpu_ns = 0, memory_bytes = 0;
    int heavy = -1;  // -1: unchanged
    std::string where;  // "file:line: python.routes[i].path"
  };

  bool main_ = false;
  int lane_ = -1;          // this stage's lane in the Dispatch
  http::Dispatch* dispatch_ = nullptr;
  int watch_ = -1;         // index in the watchdog
  int serialize_ = -1;
  std::string app_spec_;
  std::string app_where_;  // "file:line: python.app", for every error about the app
  std::vector<std::string> path_;
  int64_t switch_interval_ns_ = 0;
  Watchdog::Options watchdog_options_;
  std::vector<RouteOverride> overrides_;
  http::HttpConfig http_config_;
  http::HttpShared* shared_ = nullptr;
  http::RouteTable* routes_ = nullptr;
  PythonShared* python_ = nullptr;
  PyObject* app_ = nullptr;
  PyThreadState* saved_ = nullptr;  // this thread's state while the GIL is released
  uint64_t seq_ = 0;                // requests started on this lane (budget interrupts carry it)
  MemoryAccount account_;
  Counter exceptions_, http_errors_, bad_results_, cpu_kills_, memory_kills_, rss_sheds_;
};

}  // namespace metronome::py
