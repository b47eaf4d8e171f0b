// python: runs the application's handlers in the embedded interpreter (see python.cc).
// Thread-safety: each instance runs on its own lane; the first on the process's main thread.
// An instance holds the GIL only inside a batch.
#pragma once

#include <Python.h>

#include <atomic>
#include <deque>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "runtime/stage.h"
#include "stages/http/dispatch.h"
#include "stages/http/router.h"
#include "stages/http/shared.h"
#include "stages/py/asgi.h"
#include "stages/py/budget.h"
#include "stages/py/loop.h"
#include "stages/py/wsgi.h"

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
// How the app is called (python.interface).
enum class Interface : uint8_t { kMetronome, kWsgi, kAsgi };
const char* InterfaceName(Interface i);

struct PythonShared {
  Interface interface = Interface::kMetronome;
  PyObject* app = nullptr;        // the app object (WSGI callable, ASGI app, metronome.App)
  PyObject* lifespan_state = nullptr;  // ASGI: the dict lifespan startup filled (borrowed)
  std::map<int, PyObject*> error_handlers;  // @app.error(status)
  wsgi::ServerInfo wsgi_info;
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

class PythonStage : public Stage, public asgi::Host {
 public:
  absl::Status Configure(ConfigNode entry, ConfigNode root, StageEnv& env) override;
  absl::Status Start(StageEnv& env) override;
  absl::StatusOr<std::string> CheckDeep(StageEnv& env) override;
  void Process(std::span<Item* const> batch, Outbox& out) override;
  bool Poll(Outbox& out) override;
  int64_t Tick(int64_t now_ns, Outbox& out) override;
  void BeginStop(Outbox& out) override;
  bool Idle() const override { return streams_.empty() && calls_.empty() && pending_out_.empty(); }
  int WaitFd() const override { return loop_.open() ? loop_.fd() : -1; }
  std::string BusyWith() const override;
  void Shutdown() override;
  bool NeedsMainThread() const override { return main_; }
  void ExtraStats(StatsSink& sink) const override;

 private:
  absl::Status StartMain(StageEnv& env);
  absl::Status InitializeInterpreter();
  absl::Status LoadApp(StageEnv& env);
  absl::Status LoadRoutes();
  // The interface python.interface names, or (auto) the one the app's type says.
  absl::Status ChooseInterface();
  // WSGI/ASGI apps declare no routes: one catch-all target, plus python.routes' paths with
  // their own budgets.
  absl::Status LoadAppRoutes();
  absl::Status LoadErrorHandlers();
  void ApplyErrorHandler(http::Request* r);
  void AfterServerAnswer(http::Request* r);
  // A streamed response in progress on this lane (stages/http/stream.h).
  struct Stream {
    http::Request* request = nullptr;  // its head: an identity only, once emitted
    http::ConnId conn = 0;
    uint32_t seq = 0;
    uint32_t next_part = 1;
    PyObject* iter = nullptr;
    PyObject* close_target = nullptr;    // WSGI: the iterable (its close(), PEP 3333)
    PyObject* start_response = nullptr;  // WSGI: write() data and the late head
    bool exhausted = false;              // the iterator ended (write() data may still follow)
    bool cut_after_first = false;        // the first item passed a declared length
    int route = -1;
    http::Framing framing = http::Framing::kChunked;
    int64_t declared = -1;             // kDeclared: bytes the app promised
    int64_t sent = 0;                  // body bytes produced
    http::BodyChunk* terminal = nullptr;  // reserved at the start, so the stream can always end
    http::BodyChunk* first = nullptr;     // made while starting, emitted right after the head
    MemoryAccount account;             // the request's, across its steps
    int64_t waiting_since_ns = 0;      // paused on backpressure since (0: not paused)...
    uint64_t written_seen = 0;         // ... or since send's written_bytes was last seen to move
  };
  enum class Outcome : uint8_t { kOk, kRaised, kCpu, kMemory };
  // Calls `call` (the app's code) under the budgets of route `target`, charging memory to
  // `account`. REQUIRES: the GIL.
  template <typename F>
  PyObject* Budgeted(const http::Request* r, const http::RouteTarget& target, RouteStats& stats,
                     MemoryAccount* account, F call, Outcome* outcome, int64_t* elapsed_ns);
  // Runs r's handler. True when r became a task (it is answered later, by OnDone).
  bool Handle(http::Request* r, Outbox& out);
  void Respond(http::Request* r, const http::RouteTarget& target, RouteStats& stats, PyObject* result);
  // Tasks (asgi.h): ASGI requests and async handlers on this lane's loop.
  bool HandleAsgi(http::Request* r, const http::RouteTarget& target, RouteStats& stats);
  bool StartTask(http::Request* r, const http::RouteTarget& target, PyObject* what, bool metronome);
  void FreeCall(asgi::Call* c);
  bool StepLoop(Outbox& out);
  absl::Status OpenLoop();
  void CheckCalls(int64_t now);
  void EmitCallHead(asgi::Call& c);
  void EmitCallChunk(asgi::Call& c, http::BodyChunk* chunk);
  void EndCallStream(asgi::Call& c, bool abort, const char* why);
  // asgi::Host
  PyObject* OnSend(asgi::Call& c, PyObject* message) override;
  PyObject* OnReceive(asgi::Call& c) override;
  void OnDone(asgi::Call& c, PyObject* task) override;
  void StepBegin(asgi::Call& c) override;
  bool StepEnd(asgi::Call& c) override;
  bool StepStreams(Outbox& out);
  // r's response came with an iterator: starts its stream (the first item decides the content
  // type) or answers it whole when it has no body on the wire.
  void StartStream(http::Request* r, const http::RouteTarget& target, RouteStats& stats, Stream st);
  void CloseSource(Stream& s);
  // The WSGI interface: app(environ, start_response).
  void HandleWsgi(http::Request* r, const http::RouteTarget& target, RouteStats& stats);
  enum class Step : uint8_t { kItem, kEnd, kFailed };
  Step StepStream(Stream& s, std::string* data, bool* is_text);
  // Ends a stream with its terminal chunk (`last` unless `abort`), closing the iterator.
  // `stalled`: cut because its client stopped reading (BodyChunk::stalled).
  void EndStream(size_t index, bool abort, const char* why, bool stalled = false);
  void EmitChunk(Stream& s, http::BodyChunk* chunk);
  // Every item this stage hands on goes through pending_out_, in order (responses finished by
  // a task come between batches); FlushPending moves what the outbox takes.
  void Answered(http::Request* r);
  bool FlushPending(Outbox& out);
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
  std::string interface_config_ = "auto";
  std::string log_level_ = "info";  // python.log_level
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
  std::vector<Stream> streams_;
  std::deque<Item*> pending_out_;    // to serialize, in order (FlushPending)
  LaneLoop loop_;                    // this lane's asyncio loop (metronome and ASGI interfaces)
  asgi::Lifespan lifespan_;          // the main lane's, for an ASGI app
  std::vector<asgi::Call*> calls_;   // tasks in flight on it
  int64_t max_tasks_ = 256;          // python.max_tasks
  int64_t next_call_check_ns_ = 0;
  size_t next_stream_ = 0;           // round robin
  Waker* waker_ = nullptr;           // this lane's: send wakes it when a stream may go on
  std::unique_ptr<http::ChunkPool::GiverToken> chunk_giver_;
  bool stopping_ = false;
  bool last_step_budget_ = false;    // StepStream's last kFailed was a CPU budget
  bool unflushed_ = false;           // Process moved items into the outbox the lane has not flushed
  bool yielded_ = false;             // the last Poll returned for the lane to flush them (see Poll)
  int64_t last_step_ns_ = 0;
  int64_t stream_cut_ns_ = kNeverNs;  // streams still running then are cut (drain)
  int64_t drain_timeout_ns_ = 0;
  std::atomic<int64_t> streams_open_{0};
  std::atomic<int64_t> tasks_open_{0};
  Counter tasks_started_, tasks_shed_, tasks_hard_;
  LatencyHistogram task_step_ns_;
  // The request whose app code runs now, and since when (for BusyWith, from another thread).
  std::atomic<const http::Request*> busy_request_{nullptr};
  std::atomic<int64_t> busy_since_ns_{0};  // for stats (streams_ is the lane's own)
  Counter streams_started_, streams_completed_, streams_aborted_, stream_pauses_, stream_stalls_;
  Counter exceptions_, http_errors_, bad_results_, cpu_kills_, memory_kills_, rss_sheds_;
};

}  // namespace metronome::py
