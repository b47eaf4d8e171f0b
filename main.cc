// metronome: the command line. Reads the config, builds the pipeline, runs it.
#include <unistd.h>

#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <mutex>
#include <thread>
#include <cstring>
#include <optional>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "yaml-cpp/yaml.h"
#include "admin/listener.h"
#include "runtime/process_events.h"
#include "stages/http/shared.h"
#include "supervisor/admin_source.h"
#include "supervisor/plan.h"
#include "supervisor/supervisor.h"
#include "runtime/config.h"
#include "runtime/log.h"
#include "runtime/pipeline.h"
#include "runtime/registry.h"
#include "runtime/signals.h"
#include "runtime/units.h"
#include "runtime/uring.h"

namespace {

constexpr char kUsage[] =
    "usage:\n"
    "  metronome serve -c FILE [--listen HOST:PORT] [--admin HOST:PORT]\n"
    "                                                 run the server on a config\n"
    "  metronome serve --app MODULE:ATTR [--interface auto|metronome|wsgi|asgi] [--path DIR]\n"
    "                  [--listen HOST:PORT] [-c FILE] [--reload]\n"
    "                                                 run an app (Flask, Django, FastAPI, ...) on\n"
    "                                                 the default config's pipeline\n"
    "  metronome check -c FILE [--timeout DURATION]\n"
    "                                                 validate a config, load its app, print the pipeline\n"
    "  metronome --version\n"
    "  metronome --help\n"
    "\n"
    "FILE is YAML; see configs/default.yaml for every key. --listen overrides server.listen,\n"
    "--admin overrides admin.listen (and turns the admin listener on). Port 0 picks a free port.\n"
    "--app overrides python.app and --interface python.interface; --path DIR puts DIR first on\n"
    "python.path (default with --app and no -c: the working directory). Without -c, --app uses\n"
    "the default config (" METRONOME_DEFAULT_CONFIG "), without its example routes.\n"
    "--reload (development only) restarts the workers when a .py file under python.path changes.\n"
    "check also loads the app as serve would (in a child process, without running its startup\n"
    "hooks) and reports what serve would refuse; --timeout (default 30s) bounds that load.\n"
    "SIGINT/SIGTERM drain in-flight work and exit 0; a second signal exits at once.\n";

// How long `check` waits for the stages to load (the app's import, above all) before it stops
// the child process and reports where it hung. Imports of large apps take seconds, not tens.
constexpr int64_t kCheckTimeoutDefaultNs = 30 * metronome::kNanosPerSecond;
constexpr int64_t kCheckTimeoutMaxNs = 3600 * metronome::kNanosPerSecond;

struct Args {
  std::string command;
  std::string config;
  std::string listen;
  std::string admin;
  std::string app;        // --app: python.app
  std::string interface;  // --interface: python.interface
  std::string path;       // --path: first on python.path
  bool config_given = false;
  int64_t timeout_ns = kCheckTimeoutDefaultNs;
  bool timeout_given = false;
  bool reload = false;    // --reload: watch the app's files (development)
};

int UsageError(const std::string& message) {
  fprintf(stderr, "metronome: %s\n\n%s", message.c_str(), kUsage);
  return 2;
}

void StopPipeline(void* p) { static_cast<metronome::Pipeline*>(p)->RequestStop(); }

int LoadAndBuild(const Args& args, bool check_only,
                 std::unique_ptr<metronome::ConfigDoc>* doc_out,
                 std::unique_ptr<metronome::Pipeline>* pipeline_out,
                 metronome::admin::AdminListener* admin, bool* admin_enabled,
                 metronome::supervisor::ProcessPlan* plan_out = nullptr) {
  const metronome::supervisor::WorkerEnv worker = metronome::supervisor::ReadWorkerEnv();
  auto doc = metronome::ConfigDoc::FromFile(args.config);
  if (!doc.ok()) {
    fprintf(stderr, "metronome: %s\n", std::string(doc.status().message()).c_str());
    return 1;
  }
  if (!args.listen.empty()) (*doc)->raw_root()["server"]["listen"] = args.listen;
  if (!args.app.empty()) {
    YAML::Node root = (*doc)->raw_root();
    root["python"]["app"] = args.app;
    if (!args.interface.empty()) root["python"]["interface"] = args.interface;
    if (!args.config_given) {
      // The default config's routes and python.path belong to its example app.
      root.remove("routes");
      YAML::Node path(YAML::NodeType::Sequence);
      path.push_back(args.path.empty() ? std::string(".") : args.path);
      root["python"]["path"] = path;
    } else if (!args.path.empty()) {
      YAML::Node path(YAML::NodeType::Sequence);
      path.push_back(args.path);
      for (const auto& p : root["python"]["path"]) path.push_back(p.as<std::string>());
      root["python"]["path"] = path;
    }
  }
  if (!args.admin.empty()) (*doc)->raw_root()["admin"]["listen"] = args.admin;
  if (worker.is_worker) {
    // A worker accepts from its supervisor's socket; its admin answers the supervisor only.
    (*doc)->raw_root()["server"]["listen_fd"] = worker.listen_fd;
    (*doc)->raw_root()["admin"]["listen"] = "unix:" + worker.admin_socket;
  }
  // The supervisor's keys, then the admin section (the process's, not a stage's): read first
  // so that the pipeline's unknown-key check sees them consumed.
  metronome::supervisor::ProcessPlan plan = metronome::supervisor::ReadProcessPlan(**doc);
  if (plan_out != nullptr) *plan_out = plan;
  (void)admin->Configure((*doc)->Root(), admin_enabled);
  auto pipeline = metronome::Pipeline::Build(**doc, metronome::StageRegistry::Global(), check_only,
                                             plan.supervised ? plan.workers : 1);
  if (!pipeline.ok()) {
    fprintf(stderr, "metronome: invalid config:\n%s\n", std::string(pipeline.status().message()).c_str());
    return 1;
  }
  *doc_out = std::move(*doc);
  *pipeline_out = std::move(*pipeline);
  return 0;
}

bool AnyRing(metronome::Pipeline& p) {
  for (int i = 0; i < p.num_stages(); ++i) {
    if (p.stage(i).NeedsRing()) return true;
  }
  return false;
}

// The io_uring opcodes the configured stages submit.
std::vector<metronome::RingOp> RingOps(metronome::Pipeline& p) {
  std::vector<metronome::RingOp> ops;
  for (int i = 0; i < p.num_stages(); ++i) {
    for (const metronome::RingOp& op : p.stage(i).RingOps()) ops.push_back(op);
  }
  return ops;
}

int Check(const Args& args) {
  std::unique_ptr<metronome::ConfigDoc> doc;
  std::unique_ptr<metronome::Pipeline> pipeline;
  metronome::admin::AdminListener admin;
  bool admin_enabled = false;
  if (int rc = LoadAndBuild(args, /*check_only=*/true, &doc, &pipeline, &admin, &admin_enabled); rc != 0) return rc;
  // What serve would refuse at start-up, past the config: the app, its routes, the router.
  metronome::Pipeline::CheckReport deep = pipeline->CheckDeep(args.timeout_ns);
  if (!deep.errors.empty()) {
    fprintf(stderr, "metronome: %s: the server would not start:\n", args.config.c_str());
    for (const std::string& e : deep.errors) fprintf(stderr, "%s\n", e.c_str());
    if (deep.timed_out) fprintf(stderr, "(give check more time with --timeout DURATION)\n");
    return 1;
  }
  printf("%s: valid\n%s", args.config.c_str(), pipeline->Describe().c_str());
  for (const std::string& note : deep.notes) printf("%s\n", note.c_str());
  printf("admin: %s\n", admin_enabled ? "enabled" : "off (no admin: section)");
  if (AnyRing(*pipeline)) {
    absl::Status probe = metronome::ProbeIoUring(RingOps(*pipeline));
    printf("io_uring: %s\n", probe.ok() ? "ok" : std::string(probe.message()).c_str());
    if (!probe.ok()) return 1;
  }
  return 0;
}

// The supervisor: validates the config as a worker would, then runs the workers.
int Supervise(const Args& args, std::vector<std::string> argv) {
  std::unique_ptr<metronome::ConfigDoc> doc;
  std::unique_ptr<metronome::Pipeline> pipeline;
  metronome::admin::AdminListener admin;
  bool admin_enabled = false;
  metronome::supervisor::ProcessPlan plan;
  if (int rc = LoadAndBuild(args, /*check_only=*/true, &doc, &pipeline, &admin, &admin_enabled, &plan); rc != 0) return rc;
  metronome::http::HttpConfig http = metronome::http::ReadHttpConfig(doc->Root());
  metronome::supervisor::Options o;
  o.workers = plan.workers;
  o.listen_host = http.listen_host;
  o.listen_port = http.listen_port;
  o.backlog = http.backlog;
  o.reuse_port = plan.reuse_port;
  o.drain_timeout_ns = pipeline->options().drain_timeout_ns;
  o.max_requests = plan.max_requests;
  o.max_requests_jitter = plan.max_requests_jitter;
  o.max_rss_bytes = plan.max_rss_bytes;
  o.replace_stuck = plan.replace_stuck;
  o.argv = std::move(argv);
  o.config_path = args.config;
  if (args.reload) {
    // The app's directories: python.path, relative to the working directory.
    char cwd[4096];
    const std::string here = getcwd(cwd, sizeof cwd) != nullptr ? cwd : ".";
    for (const auto& p : doc->raw_root()["python"]["path"]) {
      std::string dir = p.as<std::string>();
      o.watch_dirs.push_back(dir.empty() || dir[0] != '/' ? here + "/" + dir : dir);
    }
    if (o.watch_dirs.empty()) o.watch_dirs.push_back(here);
  }
  LOG_INFO("metronome %s starting on %s: a supervisor and %s worker(s)\n%s", METRONOME_VERSION, args.config.c_str(),
           plan.workers_reason.c_str(), pipeline->Describe().c_str());
  metronome::supervisor::WorkerTable table;
  // The supervisor's admin: every worker's figures, /healthz and /readyz.
  metronome::supervisor::WorkersSource source(&table);
  if (admin_enabled) {
    if (absl::Status s = admin.Bind(); !s.ok()) {
      fprintf(stderr, "metronome: %s\n", std::string(s.message()).c_str());
      return 1;
    }
    admin.Start(&source);
  }
  int rc = metronome::supervisor::Run(o, &table);
  admin.Stop();
  return rc;
}

// A worker reports its figures to the supervisor (requests for max_requests, RSS for max_rss).
class WorkerStatus {
 public:
  explicit WorkerStatus(const metronome::Pipeline* p) : p_(p), thread_([this] { Loop(); }) {}
  ~WorkerStatus() {
    {
      std::lock_guard<std::mutex> l(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    thread_.join();
  }

 private:
  // Captures parse's requests_total from the stages' figures.
  class Capture : public metronome::StatsSink {
   public:
    void Value(absl::string_view name, double value) override {
      if (name == "requests_total") requests += value;
    }
    void Labeled(absl::string_view, absl::string_view, absl::string_view, double) override {}
    void Histogram(absl::string_view, const metronome::LatencyHistogram&, absl::string_view,
                   absl::string_view) override {}
    double requests = 0;
  };
  void Loop() {
    pthread_setname_np(pthread_self(), "worker-status");
    std::unique_lock<std::mutex> l(mu_);
    while (!stop_) {
      cv_.wait_for(l, std::chrono::nanoseconds(metronome::supervisor::kStatusIntervalNs));
      Capture c;
      for (int i = 0; i < p_->num_stages(); ++i) {
        if (p_->stage_spec(i).type == "parse") p_->stage(i).ExtraStats(c);
      }
      long pages = 0, resident = 0;
      FILE* f = fopen("/proc/self/statm", "r");
      if (f != nullptr) {
        if (fscanf(f, "%ld %ld", &pages, &resident) != 2) resident = 0;
        fclose(f);
      }
      std::string line = absl::StrCat("status requests=", static_cast<int64_t>(c.requests),
                                      " rss=", static_cast<int64_t>(resident) * sysconf(_SC_PAGESIZE), "\n");
      metronome::supervisor::TellSupervisor(line.c_str());
    }
  }
  const metronome::Pipeline* p_;
  std::mutex mu_;
  std::condition_variable cv_;
  bool stop_ = false;
  std::thread thread_;
};

int Serve(const Args& args, std::vector<std::string> argv) {
  const metronome::supervisor::WorkerEnv worker = metronome::supervisor::ReadWorkerEnv();
  if (!worker.is_worker) {
    // server.workers set: this process becomes the supervisor (it never builds a pipeline).
    auto doc = metronome::ConfigDoc::FromFile(args.config);
    if (doc.ok() && ((*doc)->raw_root()["server"]["workers"].IsDefined() || args.reload)) {
      return Supervise(args, std::move(argv));
    }
  }
  std::unique_ptr<metronome::ConfigDoc> doc;
  std::unique_ptr<metronome::Pipeline> pipeline;
  metronome::admin::AdminListener admin;
  bool admin_enabled = false;
  if (int rc = LoadAndBuild(args, /*check_only=*/false, &doc, &pipeline, &admin, &admin_enabled); rc != 0) return rc;
  if (worker.is_worker) metronome::SetProcessEventSink(&metronome::supervisor::TellSupervisor);
  if (admin_enabled) {
    if (absl::Status s = admin.Bind(); !s.ok()) {
      fprintf(stderr, "metronome: %s\n", std::string(s.message()).c_str());
      return 1;
    }
  }
  if (AnyRing(*pipeline)) {
    if (absl::Status probe = metronome::ProbeIoUring(RingOps(*pipeline)); !probe.ok()) {
      fprintf(stderr, "metronome: %s\n", std::string(probe.message()).c_str());
      return 1;
    }
  }
  std::string banner = pipeline->Describe();
  LOG_INFO("metronome %s starting on %s\n%s", METRONOME_VERSION, args.config.c_str(), banner.c_str());
  metronome::InstallStopSignals(StopPipeline, pipeline.get());
  if (admin_enabled) admin.Start(pipeline.get(), doc.get());
  std::unique_ptr<WorkerStatus> status;
  absl::Status s = pipeline->Run([&] {
    LOG_INFO("running:\n%s", pipeline->RunningSummary().c_str());
    if (worker.is_worker) {
      metronome::supervisor::TellSupervisor("ready\n");
      status = std::make_unique<WorkerStatus>(pipeline.get());
    }
  });
  status.reset();
  admin.Stop();
  if (!s.ok()) {
    LOG_ERROR("%s", std::string(s.message()).c_str());
    return 1;
  }
  if (pipeline->drain_timed_out()) {
    LOG_ERROR("stopped by the drain timeout with %llu items abandoned (see the lines above for busy stages)",
              static_cast<unsigned long long>(pipeline->items_abandoned()));
    return 1;
  }
  LOG_INFO("stopped cleanly; totals:\n%s", pipeline->StatsSummary().c_str());
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<std::string> av(argv + 1, argv + argc);
  if (av.empty()) return UsageError("missing command");
  Args args;
  for (size_t i = 0; i < av.size(); ++i) {
    const std::string& a = av[i];
    if (a == "--help" || a == "-h") {
      fputs(kUsage, stdout);
      return 0;
    }
    if (a == "--version") {
      printf("metronome %s\n", METRONOME_VERSION);
      return 0;
    }
    if ((a == "-c" || a == "--config") && i + 1 < av.size()) {
      args.config = av[++i];
    } else if (a == "--listen" && i + 1 < av.size()) {
      args.listen = av[++i];
    } else if (a == "--reload") {
      args.reload = true;
    } else if (a == "--app" && i + 1 < av.size()) {
      args.app = av[++i];
    } else if (a.rfind("--app=", 0) == 0) {
      args.app = a.substr(6);
    } else if (a == "--interface" && i + 1 < av.size()) {
      args.interface = av[++i];
    } else if (a.rfind("--interface=", 0) == 0) {
      args.interface = a.substr(12);
    } else if (a == "--path" && i + 1 < av.size()) {
      args.path = av[++i];
    } else if (a.rfind("--path=", 0) == 0) {
      args.path = a.substr(7);
    } else if ((a == "--timeout" && i + 1 < av.size()) || a.rfind("--timeout=", 0) == 0) {
      std::string value = a == "--timeout" ? av[++i] : a.substr(10);
      std::optional<int64_t> ns = metronome::ParseDurationNs(value);
      if (!ns || *ns <= 0 || *ns > kCheckTimeoutMaxNs) {
        return UsageError(absl::StrCat("--timeout: expected a duration like 30s (at most 1h), got '", value, "'"));
      }
      args.timeout_ns = *ns;
      args.timeout_given = true;
    } else if (a == "--admin" && i + 1 < av.size()) {
      args.admin = av[++i];
    } else if (a.rfind("--admin=", 0) == 0) {
      args.admin = a.substr(8);
    } else if (a.rfind("--config=", 0) == 0) {
      args.config = a.substr(9);
    } else if (a.rfind("--listen=", 0) == 0) {
      args.listen = a.substr(9);
    } else if (args.command.empty() && a[0] != '-') {
      args.command = a;
    } else {
      return UsageError(absl::StrCat("unexpected argument '", a, "'"));
    }
  }
  if (args.command != "serve" && args.command != "check") {
    return UsageError(args.command.empty() ? "missing command"
                                           : absl::StrCat("unknown command '", args.command, "'"));
  }
  args.config_given = !args.config.empty();
  if (!args.interface.empty() && args.app.empty()) return UsageError("--interface needs --app");
  if (!args.path.empty() && args.app.empty()) return UsageError("--path needs --app");
  if (args.config.empty() && !args.app.empty()) args.config = METRONOME_DEFAULT_CONFIG;
  if (args.config.empty()) return UsageError("missing -c FILE (or --app MODULE:ATTR)");
  if (args.timeout_given && args.command != "check") return UsageError("--timeout applies to check only");
  return args.command == "check" ? Check(args) : Serve(args, std::vector<std::string>(argv, argv + argc));
}
