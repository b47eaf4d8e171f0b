// The admin listener: a separate, small HTTP server (admin.listen, loopback by default, off
// when the section is absent) serving
//   /          the live page (admin/page/: static files, read at start)
//   /metrics   Prometheus text
//   /stats     JSON, with the resolved config
//   /healthz   "ok" while the process lives (a liveness probe)
//   /readyz    200 "ready" while it serves, 503 while it starts or drains (a readiness probe)
// It runs on its own thread, under SCHED_OTHER, and reads the pipeline's counters without
// locks; nothing on the data path waits for it.
//
// Thread-safety: Configure/Bind on the main thread before the pipeline runs; Start spawns the
// thread; Stop joins it.
#pragma once

#include <atomic>
#include <map>
#include <memory>
#include <string>
#include <thread>

#include "absl/status/status.h"
#include "runtime/config.h"
#include "runtime/pipeline.h"

namespace metronome::admin {

// Connections served at once; one more waits in the listen backlog.
inline constexpr int kAdminConnectionsMax = 32;
// A request head larger than this is answered 431 and the connection closed.
inline constexpr size_t kAdminRequestBytesMax = 16 * 1024;

// What an admin listener serves when it is not one pipeline's (the supervisor's view of its
// workers). Called on the listener's thread.
class Source {
 public:
  virtual ~Source() = default;
  virtual std::string Metrics() = 0;  // Prometheus text
  virtual std::string Stats() = 0;    // JSON
  virtual bool Ready() = 0;           // for /readyz
};

class AdminListener {
 public:
  ~AdminListener();
  // Reads `admin:`; *enabled is false when the section is absent.
  absl::Status Configure(ConfigNode root, bool* enabled);
  // Binds the socket and loads the page; fails with the address on error.
  absl::Status Bind();
  void Start(const Pipeline* pipeline, const ConfigDoc* doc);
  // The supervisor's: /metrics, /stats and /readyz come from `source`.
  void Start(Source* source);
  void Stop();
  const std::string& address() const { return address_; }

 private:
  void Loop();
  std::string Respond(absl::string_view method, absl::string_view path, bool keep_alive, bool* close);

  std::string host_ = "127.0.0.1";
  uint16_t port_ = 9090;
  std::string address_;
  std::string unix_path_;  // "unix:PATH" (a worker's, for its supervisor); "@" = abstract
  int listen_fd_ = -1;
  int wake_fd_ = -1;
  std::map<std::string, std::pair<std::string, std::string>> files_;  // path -> (type, body)
  const Pipeline* pipeline_ = nullptr;
  Source* source_ = nullptr;
  const ConfigDoc* doc_ = nullptr;
  int64_t started_unix_ns_ = 0;
  std::thread thread_;
  std::atomic<bool> stop_{false};
};

}  // namespace metronome::admin
