#include "stages/http/shared.h"

#include <liburing.h>

#include <cctype>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "runtime/stage.h"
#include "runtime/units.h"

namespace metronome::http {
namespace {

// Parses "host:port", "[v6]:port" or ":port".
bool ParseListen(const std::string& text, std::string* host, uint16_t* port) {
  size_t colon = text.rfind(':');
  if (colon == std::string::npos) return false;
  std::string h = text.substr(0, colon);
  if (h.size() >= 2 && h.front() == '[' && h.back() == ']') h = h.substr(1, h.size() - 2);
  if (h.empty()) h = "0.0.0.0";
  uint32_t p;
  if (!absl::SimpleAtoi(text.substr(colon + 1), &p) || p > 65535) return false;
  *host = h;
  *port = static_cast<uint16_t>(p);
  return true;
}

}  // namespace

HttpConfig ReadHttpConfig(ConfigNode root) {
  HttpConfig c;
  ConfigNode server = root.Map("server");
  std::string listen = server.String("listen", "127.0.0.1:8080");
  if (!ParseListen(listen, &c.listen_host, &c.listen_port)) {
    server.Error("listen", absl::StrCat("expected HOST:PORT like 127.0.0.1:8080, [::1]:8080 or "
                                        ":8080; got '", listen, "'"));
  }
  c.backlog = static_cast<int>(server.Int("backlog", c.backlog, 1, 65535));
  c.reuse_port = server.Bool("reuse_port", c.reuse_port);
  // Internal: set by the supervisor for its workers (the socket it owns), never by hand.
  c.listen_fd = static_cast<int>(server.Int("listen_fd", -1, -1, 1 << 20));
  c.max_connections = static_cast<uint32_t>(server.Int("max_connections", c.max_connections, 1, kConnectionsMax));
  c.max_inflight = static_cast<uint32_t>(server.Int("max_inflight", c.max_inflight, 1, kQueueCapacityMax));
  c.recv_buffers = static_cast<uint32_t>(server.Int("recv_buffers", c.recv_buffers, 1, 32768));
  if ((c.recv_buffers & (c.recv_buffers - 1)) != 0) {
    server.Error("recv_buffers", "must be a power of two (io_uring buffer rings need it)");
  }
  c.recv_buffer_bytes = static_cast<uint32_t>(server.SizeBytes("recv_buffer_size", c.recv_buffer_bytes, 512, 1 << 20));
  c.keepalive_timeout_ns = server.DurationNs("keepalive_timeout", c.keepalive_timeout_ns, kNanosPerMilli, 3600 * kNanosPerSecond);
  c.linger_timeout_ns = server.DurationNs("linger_timeout", c.linger_timeout_ns, 0, 60 * kNanosPerSecond);
  c.drain_grace_ns = server.DurationNs("drain_grace", c.drain_grace_ns, 0, 600 * kNanosPerSecond);
  c.retry_after_s = static_cast<int>(server.DurationNs("retry_after", c.retry_after_s * kNanosPerSecond, kNanosPerSecond, 3600 * kNanosPerSecond) / kNanosPerSecond);
  c.server_name = server.String("name", c.server_name);
  c.access_log = server.String("access_log", c.access_log);
  c.access_log_json = server.Enum("access_log_format", "common", {"common", "json"}) == "json";
  c.request_id_header = server.String("request_id_header", c.request_id_header);
  for (char ch : c.request_id_header) {
    if (!(std::isalnum(static_cast<unsigned char>(ch)) || ch == '-' || ch == '_')) {
      server.Error("request_id_header", "a header field name: letters, digits, '-' and '_'");
      break;
    }
  }
  c.echo_request_id = server.Bool("echo_request_id", c.echo_request_id);
  c.errors_json = server.Enum("error_format", "text", {"text", "json"}) == "json";
  c.stream_buffer_bytes = static_cast<int64_t>(server.SizeBytes("stream_buffer_size", static_cast<uint64_t>(c.stream_buffer_bytes), 1024, 1ull << 30));
  c.stream_chunks = static_cast<uint32_t>(server.Int("stream_chunks", c.stream_chunks, 16, 1 << 20));
  c.stream_stall_timeout_ns = server.DurationNs("stream_stall_timeout", c.stream_stall_timeout_ns, kNanosPerMilli, 3600 * kNanosPerSecond);

  ConfigNode limits = root.Map("limits");
  c.limits.max_request_line_bytes = limits.SizeBytes("max_request_line", c.limits.max_request_line_bytes, 64, 1 << 20);
  c.limits.max_header_bytes = limits.SizeBytes("max_header_bytes", c.limits.max_header_bytes, 256, 1 << 20);
  c.limits.max_header_count = static_cast<size_t>(limits.Int("max_header_count", static_cast<int64_t>(c.limits.max_header_count), 1, static_cast<int64_t>(kHeaderCountMax)));
  c.limits.max_body_bytes = limits.SizeBytes("max_body_bytes", c.limits.max_body_bytes, 0, 1ull << 32);
  c.header_timeout_ns = limits.DurationNs("header_timeout", c.header_timeout_ns, kNanosPerMilli, 3600 * kNanosPerSecond);
  c.body_timeout_ns = limits.DurationNs("body_timeout", c.body_timeout_ns, kNanosPerMilli, 3600 * kNanosPerSecond);
  if (c.limits.max_request_line_bytes > c.limits.max_header_bytes) {
    limits.Error("max_request_line", "must not exceed max_header_bytes (the request line is part of the head)");
  }
  return c;
}

void HttpShared::Setup(const HttpConfig& config) {
  if (ready_) return;
  config_ = config;
  SetErrorsAsJson(config.errors_json);
  conns.Init(config.max_connections);
  // 2 KiB covers a typical head, a small body and a small response without reallocating.
  requests.Init(config.max_inflight, config_.limits, 2048);
  opened_events.assign(config.max_connections, ConnEvent(Kind::kOpened));
  closed_events.assign(config.max_connections, ConnEvent(Kind::kClosed));
  shutdown_events.assign(config.max_connections, ConnEvent(Kind::kShutdown));
  continue_events.assign(config.max_connections, ConnEvent(Kind::kContinue));
  chunks.resize(config.recv_buffers);
  body_chunks.Init(config.stream_chunks);
  flows = std::make_unique<StreamFlow[]>(config.max_connections);
  ready_ = true;
}

void HttpShared::ReturnBuffer(uint16_t bid) {
  const uint32_t n = config_.recv_buffers;
  io_uring_buf_ring_add(buf_ring, buf_base + static_cast<size_t>(bid) * config_.recv_buffer_bytes,
                        config_.recv_buffer_bytes, bid, io_uring_buf_ring_mask(n), 0);
  io_uring_buf_ring_advance(buf_ring, 1);
  buffers_out.fetch_sub(1, std::memory_order_acq_rel);
  if (accept_wants_buffers.load(std::memory_order_relaxed) && accept_waker != nullptr) {
    accept_waker->Notify();
  }
}

HttpShared& GetHttpShared(StageEnv& env, ConfigNode root, HttpConfig* config) {
  *config = ReadHttpConfig(root);
  return env.Shared<HttpShared>("http");
}

}  // namespace metronome::http
