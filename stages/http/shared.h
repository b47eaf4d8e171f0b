// What the HTTP stages share: the config they all read, the connection table, the request pool,
// the accept stage's receive-buffer ring (parse returns buffers to it) and the per-slot
// connection events. Created once per pipeline (StageEnv::Shared("http")) and set up by the
// first HTTP stage to start; stages start one at a time, so set-up needs no lock.
//
// Thread-safety: see each member; everything used after start is either atomic or owned by one
// thread as documented in conn.h / items.h.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "runtime/config.h"
#include "runtime/stage.h"
#include "runtime/waker.h"
#include "stages/http/conn.h"
#include "stages/http/items.h"
#include "stages/http/parser.h"
#include "stages/http/stream.h"

struct io_uring_buf_ring;

namespace metronome::http {

struct HttpConfig {
  // server:
  std::string listen_host = "127.0.0.1";
  uint16_t listen_port = 8080;
  int backlog = 4096;
  bool reuse_port = false;
  int listen_fd = -1;                  // a listening socket inherited from the supervisor (-1: bind)
  uint32_t max_connections = 10000;
  uint32_t max_inflight = 2048;        // request slots: requests parsed but not yet answered
  uint32_t recv_buffers = 2048;        // receive-ring buffers (a power of two)
  uint32_t recv_buffer_bytes = 8192;
  int64_t keepalive_timeout_ns = 5'000'000'000;
  int64_t linger_timeout_ns = 2'000'000'000;
  int64_t drain_grace_ns = 1'000'000'000;     // an idle connection stays this long into a drain
  int retry_after_s = 1;
  std::string server_name = "metronome";
  std::string access_log;              // "" off, "-" stderr, else a file path (appended)
  bool access_log_json = false;        // server.access_log_format: json (else common)
  std::string request_id_header = "X-Request-Id";  // taken from the request, made when absent
  bool echo_request_id = true;         // ... and sent back in the response
  bool errors_json = false;            // server.error_format: json (the app may ask for it too)
  // Streamed responses (stream.h):
  int64_t stream_buffer_bytes = 256 * 1024;       // per connection, waiting for the client
  uint32_t stream_chunks = 4096;                  // the chunk pool, shared by every stream
  int64_t stream_stall_timeout_ns = 30'000'000'000;  // a stream that cannot move this long is cut
  // limits:
  Limits limits;
  int64_t header_timeout_ns = 10'000'000'000;
  int64_t body_timeout_ns = 30'000'000'000;
};

// Reads server: and limits: (every HTTP stage calls it: keys are marked consumed once).
HttpConfig ReadHttpConfig(ConfigNode root);

class HttpShared {
 public:
  // Allocates the table, the pool and the events (idempotent).
  void Setup(const HttpConfig& config);
  bool ready() const { return ready_; }
  const HttpConfig& config() const { return config_; }

  ConnectionTable conns;
  RequestPool requests;
  ChunkPool body_chunks;
  std::unique_ptr<StreamFlow[]> flows;  // per slot
  // Per slot, one of each event kind (items.h).
  std::vector<ConnEvent> opened_events;
  std::vector<ConnEvent> closed_events;
  std::vector<ConnEvent> shutdown_events;
  std::vector<ConnEvent> continue_events;

  // The receive-buffer ring, registered by accept on its io_uring. Parse is its only producer
  // after start (it gives buffers back), accept its only reader of `outstanding`.
  io_uring_buf_ring* buf_ring = nullptr;
  char* buf_base = nullptr;
  std::vector<RecvChunk> chunks;          // one per buffer id
  std::atomic<int64_t> buffers_out{0};    // buffers handed to parse and not yet returned
  std::atomic<bool> accept_wants_buffers{false};  // accept has connections waiting to re-arm recv

  Waker* accept_waker = nullptr;
  Waker* parse_waker = nullptr;
  std::atomic<bool> parse_wants_requests{false};  // parse waits for a free request slot

  // Gives buffer `bid` back to the ring. Parse's thread only.
  void ReturnBuffer(uint16_t bid);

 private:
  HttpConfig config_;
  bool ready_ = false;
};

// The HttpShared of this pipeline, with its config read into `*config`.
HttpShared& GetHttpShared(StageEnv& env, ConfigNode root, HttpConfig* config);

}  // namespace metronome::http
