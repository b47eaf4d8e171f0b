// send: responses leave in request order per connection, whatever order they arrive in (routes
// answered natively overtake Python ones; plugins and lanes reorder). Each connection has at most
// one sendmsg in flight; it carries every response that is ready and next in order (pipelining),
// and a partial write is resumed where it stopped.
//
// Ending a connection (conn.h): after a response marked close, the write side is shut down
// (the client sees the end after the response). kShutdown asks for a full shutdown once the
// responses before it are written. The fd is closed here, exactly once, when the read side has
// ended (kClosed) and every response parse issued was written or dropped; then the slot goes back
// to the table. A peer that vanished turns the rest of its responses into drops.
//
// Streams (stream.h): a streamed response is its Request (the head, part 0) and then its
// BodyChunks (parts 1, 2, ...), all in the connection's list ordered by (seq, part); a write
// takes every piece that is next in order. The Request stays here until its terminal chunk
// retires it, so the response is accounted for (and the connection may end) only then. Each
// chunk written or dropped gives its bytes back to the connection's StreamFlow and wakes a
// producer waiting on it; a connection whose client is gone is marked cancelled there.
#include "stages/send.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <unistd.h>

#include <ctime>

#include <cerrno>
#include <cstring>

#include "runtime/log.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "runtime/outbox.h"
#include "runtime/clock.h"
#include "runtime/registry.h"
#include "runtime/strings.h"
#include "runtime/uring.h"

namespace metronome::http {
namespace {

constexpr char kContinue[] = "HTTP/1.1 100 Continue\r\n\r\n";

}  // namespace

absl::Status SendStage::Configure(ConfigNode entry, ConfigNode root, StageEnv& env) {
  (void)entry;
  shared_ = &GetHttpShared(env, root, &config_);
  return absl::OkStatus();
}

absl::Status SendStage::Start(StageEnv& env) {
  shared_->Setup(config_);
  ring_ = env.ring();
  tag_ = env.ring_tag();
  conns_ = std::vector<Conn>(config_.max_connections);
  giver_ = shared_->requests.MakeGiverToken();
  chunk_giver_ = shared_->body_chunks.MakeGiverToken();
  if (config_.access_log == "-") {
    access_fd_ = STDERR_FILENO;
  } else if (!config_.access_log.empty()) {
    access_fd_ = open(config_.access_log.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
    if (access_fd_ < 0) {
      return absl::UnavailableError(absl::StrCat("server.access_log: cannot open '", config_.access_log, "': ", std::strerror(errno)));
    }
  }
  if (access_fd_ >= 0) access_buf_.reserve(64 * 1024);
  return absl::OkStatus();
}

void SendStage::Shutdown() {
  FlushAccessLog();
  if (access_fd_ > STDERR_FILENO) close(access_fd_);
  access_fd_ = -1;
}

// Common Log Format: host - - [time] "request line" status bytes
void SendStage::AccessLog(const Conn* c, const Request* r, uint64_t body_bytes) {
  time_t now = time(nullptr);
  if (now != access_second_) {
    access_second_ = now;
    tm t;
    gmtime_r(&now, &t);
    strftime(access_time_, sizeof access_time_, "%d/%b/%Y:%H:%M:%S +0000", &t);
  }
  const sockaddr_storage& peer = shared_->conns.peer(c->id);
  char host[64] = "-";
  if (peer.ss_family == AF_INET) {
    inet_ntop(AF_INET, &reinterpret_cast<const sockaddr_in*>(&peer)->sin_addr, host, sizeof host);
  } else if (peer.ss_family == AF_INET6) {
    inet_ntop(AF_INET6, &reinterpret_cast<const sockaddr_in6*>(&peer)->sin6_addr, host, sizeof host);
  }
  const RequestHead& h = r->head;
  const double seconds = r->head_done_ns != 0 ? static_cast<double>(MonotonicNowNs() - r->head_done_ns) / 1e9 : 0.0;
  const std::string_view budget = r->resp.budget.empty() ? std::string_view("-") : r->resp.budget;
  if (config_.access_log_json) {
    // One JSON object a line; strings escaped (the target is the client's bytes).
    auto str = [this](std::string_view v) {
      access_buf_ += '"';
      for (char ch : v) {
        const auto u = static_cast<unsigned char>(ch);
        if (ch == '"' || ch == '\\') {
          access_buf_ += '\\';
          access_buf_ += ch;
        } else if (u < 0x20 || u >= 0x7f) {
          char esc[8];
          snprintf(esc, sizeof esc, "\\u%04x", u);
          access_buf_ += esc;
        } else {
          access_buf_ += ch;
        }
      }
      access_buf_ += '"';
    };
    access_buf_ += "{\"time\":";
    str(access_time_);
    access_buf_ += ",\"client\":";
    str(host);
    access_buf_ += ",\"method\":";
    str(h.method.empty() ? std::string_view("-") : h.method);
    access_buf_ += ",\"target\":";
    str(h.target);
    absl::StrAppend(&access_buf_, ",\"version\":\"1.", h.version_minor, "\",\"status\":", r->resp.status,
                    ",\"bytes\":", body_bytes, ",\"duration_s\":", absl::StrFormat("%.6f", seconds), ",\"budget\":");
    str(budget);
    access_buf_ += ",\"request_id\":";
    str(r->id());
    access_buf_ += "}\n";
  } else {
    // Common Log Format, then the duration in seconds, the budget outcome and the request id.
    absl::StrAppend(&access_buf_, host, " - - [", access_time_, "] \"");
    if (h.method.empty()) {
      access_buf_ += "-";  // an error answered before the request line was complete
    } else {
      absl::StrAppend(&access_buf_, Sv(h.method), " ", Sv(h.target), " HTTP/1.", h.version_minor);
    }
    absl::StrAppend(&access_buf_, "\" ", r->resp.status, " ", body_bytes, " ", absl::StrFormat("%.6f", seconds), " ",
                    Sv(budget), " ", Sv(r->request_id_len > 0 ? r->id() : std::string_view("-")), "\n");
  }
  if (access_buf_.size() > 60 * 1024) FlushAccessLog();
}

void SendStage::FlushAccessLog() {
  if (access_fd_ < 0 || access_buf_.empty()) return;
  ssize_t n = write(access_fd_, access_buf_.data(), access_buf_.size());
  (void)n;  // a full disk loses log lines, never requests
  access_buf_.clear();
}

std::vector<RingOp> SendStage::RingOps() const { return {{IORING_OP_SENDMSG, "SENDMSG", "5.3"}}; }

SendStage::Conn* SendStage::Lookup(ConnId id) {
  Conn& c = conns_[SlotOf(id)];
  if (c.gen != GenOf(id)) {
    assert(c.waiting == nullptr && !c.writing && "slot reused while send still held its responses");
    c = Conn();
    c.gen = GenOf(id);
    c.id = id;
  }
  return &c;
}

void SendStage::Process(std::span<Item* const> batch, Outbox& out) {
  (void)out;
  for (Item* it : batch) {
    auto* item = static_cast<HttpItem*>(it);
    Conn* c = Lookup(item->conn);
    switch (item->kind) {
      case Kind::kRequest:
        Enqueue(c, static_cast<WirePiece*>(item));
        break;
      case Kind::kChunk: {
        const bool stalled = static_cast<BodyChunk*>(item)->stalled;  // read before Enqueue may retire it
        Enqueue(c, static_cast<WirePiece*>(item));
        if (stalled && c->writing && !c->shut_read) {
          // The write in flight waits for a client that stopped reading: shutting the socket
          // down fails it (then PeerGone drops the rest, this stream's terminal chunk with it)
          // and ends the read side, so the connection and its fd end now, not never.
          ::shutdown(shared_->conns.fd(c->id), SHUT_RDWR);
          c->shut = c->shut_read = true;
        }
        break;
      }
      case Kind::kClosed:
        c->read_closed = true;
        shared_->flows[SlotOf(c->id)].read_closed_gen.store(c->gen, std::memory_order_release);
        c->issued = static_cast<ConnEvent*>(item)->requests_issued;
        break;
      case Kind::kShutdown:
        c->shutdown_wanted = true;
        c->shutdown_seq = static_cast<ConnEvent*>(item)->seq;
        break;
      case Kind::kContinue:
        c->continue_wanted = true;
        c->continue_seq = static_cast<ConnEvent*>(item)->seq;
        break;
      default:
        Fatal("send: unexpected item kind %d", static_cast<int>(item->kind));
    }
    TryWrite(c);
    MaybeEnd(c);
  }
  FlushAccessLog();
}

// Inserts p into the connection's list, which stays sorted by (seq, part).
void SendStage::Enqueue(Conn* c, WirePiece* p) {
  if (c->peer_gone || c->shut) {
    RetirePiece(c, p, false);  // accounted for, never written
    return;
  }
  assert((p->seq > c->next_seq || (p->seq == c->next_seq && p->part >= c->next_part)) &&
         "a piece of a response already written");
  WirePiece** q = &c->waiting;
  while (*q != nullptr && ((*q)->seq < p->seq || ((*q)->seq == p->seq && (*q)->part < p->part))) q = &(*q)->next_out;
  p->next_out = *q;
  *q = p;
}

void SendStage::TryWrite(Conn* c) {
  if (c->writing || c->peer_gone) return;
  const int fd = shared_->conns.fd(c->id);
  if (c->continue_wanted && c->continue_seq == c->next_seq) {
    c->continue_wanted = false;
    // Skip the go-ahead when the final response is already here (e.g. an early 413).
    if (c->waiting == nullptr || c->waiting->seq != c->next_seq) {
      c->iov[0].iov_base = const_cast<char*>(kContinue);
      c->iov[0].iov_len = sizeof kContinue - 1;
      c->iov_n = 1;
      c->batch = 0;
      c->writing_continue = true;
      continues_.Add();
    }
  }
  if (!c->writing_continue) {
    // Every piece ready and next in order, up to the iovec limit or a piece that closes.
    c->iov_n = 0;
    c->batch = 0;
    uint32_t seq = c->next_seq, part = c->next_part;
    for (WirePiece* p = c->waiting; p != nullptr && p->seq == seq && p->part == part && c->iov_n + p->iov_count <= kIovMax;
         p = p->next_out) {
      for (int i = 0; i < p->iov_count; ++i) c->iov[c->iov_n++] = p->iov[i];
      ++c->batch;
      if (p->ends) {
        ++seq;
        part = 0;
      } else {
        ++part;
      }
      if (EndsConnection(p)) break;
    }
    if (c->batch == 0) return;
    if (c->iov_n == 0) {
      // Only empty pieces (an aborted stream's terminal chunk): nothing to write.
      if (RetireBatch(c)) EndWrites(c);
      TryWrite(c);
      return;
    }
  }
  c->msg = msghdr{};
  c->msg.msg_iov = c->iov;
  c->msg.msg_iovlen = static_cast<size_t>(c->iov_n);
  io_uring_sqe* sqe = ring_->GetSqe();
  io_uring_prep_sendmsg(sqe, fd, &c->msg, MSG_NOSIGNAL);
  sqe->user_data = Ring::Pack(tag_, (static_cast<uint64_t>(SlotOf(c->id)) << 32) | c->gen);
  c->writing = true;
  sendmsgs_.Add();
}

void SendStage::OnCompletion(const io_uring_cqe& cqe, Outbox& out) {
  (void)out;
  uint64_t payload = Ring::PayloadOf(cqe.user_data);
  Conn& c = conns_[payload >> 32];
  assert(c.gen == static_cast<uint32_t>(payload) && c.writing);
  c.writing = false;
  OnWritten(&c, cqe.res);
  TryWrite(&c);
  MaybeEnd(&c);
  FlushAccessLog();
}

void SendStage::OnWritten(Conn* c, int res) {
  if (res < 0) {
    c->writing_continue = false;
    if (res != -EPIPE && res != -ECONNRESET) {
      LOG_RATE_LIMITED(LogLevel::kWarn, "send on connection %u failed: %s", SlotOf(c->id), std::strerror(-res));
    }
    write_errors_.Add();
    PeerGone(c);
    // Make sure the read side ends too (accept's recv completes, kClosed follows), whatever the
    // peer's state: a reset peer does not always wake a pending multishot recv.
    if (!c->shut_read) {
      ::shutdown(shared_->conns.fd(c->id), SHUT_RDWR);
      c->shut = c->shut_read = true;
    }
    return;
  }
  bytes_out_.Add(static_cast<uint64_t>(res));
  shared_->flows[SlotOf(c->id)].written_bytes.fetch_add(static_cast<uint64_t>(res), std::memory_order_relaxed);
  size_t left = static_cast<size_t>(res);
  // Skip the iovecs fully written.
  int i = 0;
  while (i < c->iov_n && left >= c->iov[i].iov_len) left -= c->iov[i++].iov_len;
  if (i < c->iov_n) {
    // A partial write: resume from where it stopped, same pieces.
    partial_writes_.Add();
    c->iov[i].iov_base = static_cast<char*>(c->iov[i].iov_base) + left;
    c->iov[i].iov_len -= left;
    std::memmove(c->iov, c->iov + i, sizeof(iovec) * static_cast<size_t>(c->iov_n - i));
    c->iov_n -= i;
    c->msg.msg_iov = c->iov;
    c->msg.msg_iovlen = static_cast<size_t>(c->iov_n);
    io_uring_sqe* sqe = ring_->GetSqe();
    io_uring_prep_sendmsg(sqe, shared_->conns.fd(c->id), &c->msg, MSG_NOSIGNAL);
    sqe->user_data = Ring::Pack(tag_, (static_cast<uint64_t>(SlotOf(c->id)) << 32) | c->gen);
    c->writing = true;
    return;
  }
  if (c->writing_continue) {
    c->writing_continue = false;
    return;
  }
  if (RetireBatch(c)) EndWrites(c);
}

bool SendStage::EndsConnection(const WirePiece* p) {
  if (p->kind == Kind::kRequest) {
    const auto* r = static_cast<const Request*>(p);
    return p->ends && r->resp.close;
  }
  const auto* chunk = static_cast<const BodyChunk*>(p);
  return chunk->abort || (chunk->last && chunk->request->resp.close);
}

bool SendStage::RetireBatch(Conn* c) {
  bool close = false;
  for (int k = 0; k < c->batch; ++k) {
    WirePiece* p = c->waiting;
    c->waiting = p->next_out;
    close = EndsConnection(p);
    if (p->ends) {
      ++c->next_seq;
      c->next_part = 0;
    } else {
      ++c->next_part;
    }
    RetirePiece(c, p, true);
  }
  return close;
}

// After a response that closes (Connection: close, or a stream cut short): shutting the write
// side lets the client read to the end; its EOF (or the linger timeout in parse) ends the read
// side.
void SendStage::EndWrites(Conn* c) {
  if (c->shut) return;
  ::shutdown(shared_->conns.fd(c->id), SHUT_WR);
  c->shut = true;
  DropAll(c);
}

void SendStage::RetirePiece(Conn* c, WirePiece* p, bool written) {
  if (p->kind == Kind::kRequest) {
    auto* r = static_cast<Request*>(p);
    if (written) c->body_bytes += ResponseHasBody(*r) && !r->resp.streaming() ? r->resp.body.size() : 0;
    // A stream's head stays until its terminal chunk retires it (stream.h).
    if (p->ends) Retire(c, r, written);
    return;
  }
  auto* chunk = static_cast<BodyChunk*>(p);
  if (written) {
    c->body_bytes += chunk->data.size();
    chunks_written_.Add();
  } else {
    chunks_dropped_.Add();
  }
  if (chunk->terminal()) {
    Request* r = chunk->request;
    if (chunk->abort) streams_aborted_.Add();
    ReleaseChunk(c, chunk);
    // A stream cut short is never logged or counted as a complete response.
    Retire(c, r, written && !chunk->abort);
    return;
  }
  ReleaseChunk(c, chunk);
}

void SendStage::ReleaseChunk(Conn* c, BodyChunk* chunk) {
  StreamFlow& flow = shared_->flows[SlotOf(c->id)];
  Waker* producer = chunk->producer;
  flow.buffered_bytes.fetch_sub(static_cast<int64_t>(chunk->data.size()), std::memory_order_acq_rel);
  flow.buffered_chunks.fetch_sub(1, std::memory_order_acq_rel);
  shared_->body_chunks.Give(chunk, *chunk_giver_);
  // Wake a paused producer once the backlog is under half of its bounds.
  if (flow.producer_waiting.load(std::memory_order_acquire) &&
      flow.buffered_bytes.load(std::memory_order_acquire) < config_.stream_buffer_bytes / 2 &&
      flow.buffered_chunks.load(std::memory_order_acquire) < kStreamChunksInFlightMax / 2 &&
      flow.producer_waiting.exchange(false, std::memory_order_acq_rel) && producer != nullptr) {
    producer->Notify();
  }
}

void SendStage::Retire(Conn* c, Request* r, bool written) {
  ++c->accounted;
  shared_->flows[SlotOf(c->id)].accounted.store((static_cast<uint64_t>(c->gen) << 32) | c->accounted,
                                                std::memory_order_release);
  if (written) {
    int cls = r->resp.status / 100;
    responses_[cls >= 1 && cls <= 5 ? cls : 0].Add();
    if (r->head_done_ns != 0) latency_ns_.Record(static_cast<uint64_t>(std::max<int64_t>(0, MonotonicNowNs() - r->head_done_ns)));
    if (access_fd_ >= 0) AccessLog(c, r, c->body_bytes);
  } else {
    dropped_.Add();
  }
  c->body_bytes = 0;
  shared_->requests.Give(r, *giver_);
  if (shared_->parse_wants_requests.load(std::memory_order_relaxed) && shared_->parse_waker != nullptr) {
    shared_->parse_waker->Notify();
  }
}

// The client is gone: what waits is dropped, and producers of its streams stop at their next
// step (each ends its stream with a terminal chunk, which retires the stream's head).
void SendStage::PeerGone(Conn* c) {
  c->peer_gone = true;
  shared_->flows[SlotOf(c->id)].cancelled_gen.store(c->gen, std::memory_order_release);
  DropAll(c);
}

// Drops every piece still waiting (the peer is gone or the connection is ending).
void SendStage::DropAll(Conn* c) {
  if (c->shut || c->peer_gone) shared_->flows[SlotOf(c->id)].cancelled_gen.store(c->gen, std::memory_order_release);
  while (c->waiting != nullptr) {
    WirePiece* p = c->waiting;
    c->waiting = p->next_out;
    RetirePiece(c, p, false);
  }
}

void SendStage::MaybeEnd(Conn* c) {
  if (c->writing) return;
  if (c->shutdown_wanted && !c->shut_read && c->accounted >= c->shutdown_seq && c->waiting == nullptr) {
    // Timeouts, errors, the drain: end both directions (also after a response that already
    // shut the write side, whose client did not close); the pending recv completes and accept
    // emits kClosed.
    ::shutdown(shared_->conns.fd(c->id), SHUT_RDWR);
    c->shut = c->shut_read = true;
  }
  if (c->read_closed && c->accounted >= c->issued && c->waiting == nullptr) {
    // Every stream ended with its terminal chunk, which came last: nothing of this connection
    // is on its way any more (stream.h), so its slot may be reused.
    StreamFlow& flow = shared_->flows[SlotOf(c->id)];
    assert(flow.buffered_chunks.load() == 0 && "a connection ends with chunks of it on their way");
    flow.buffered_bytes.store(0, std::memory_order_relaxed);
    flow.producer_waiting.store(false, std::memory_order_relaxed);
    close(shared_->conns.fd(c->id));
    shared_->conns.Release(c->id);
    closed_.Add();
    c->gen = 0;  // never matches a live generation (they start at 1)
  }
}

bool SendStage::Idle() const { return shared_ == nullptr || !shared_->ready() || shared_->conns.open() == 0; }

void SendStage::ExtraStats(StatsSink& sink) const {
  static const char* kClass[] = {"responses_other_total", "responses_1xx_total", "responses_2xx_total",
                                 "responses_3xx_total", "responses_4xx_total", "responses_5xx_total"};
  for (int i = 0; i < 6; ++i) sink.Value(kClass[i], static_cast<double>(responses_[i].Get()));
  sink.Value("bytes_out_total", static_cast<double>(bytes_out_.Get()));
  sink.Value("sendmsg_total", static_cast<double>(sendmsgs_.Get()));
  sink.Value("partial_writes_total", static_cast<double>(partial_writes_.Get()));
  sink.Value("write_errors_total", static_cast<double>(write_errors_.Get()));
  sink.Value("responses_dropped_total", static_cast<double>(dropped_.Get()));
  sink.Value("connections_closed_total", static_cast<double>(closed_.Get()));
  sink.Value("continues_total", static_cast<double>(continues_.Get()));
  sink.Value("body_chunks_written_total", static_cast<double>(chunks_written_.Get()));
  sink.Value("body_chunks_dropped_total", static_cast<double>(chunks_dropped_.Get()));
  sink.Value("streams_aborted_total", static_cast<double>(streams_aborted_.Get()));
  // The body chunk pool (server.stream_chunks), shared by every stream of the server.
  const bool ready = shared_ != nullptr && shared_->ready();
  sink.Value("stream_chunks_in_use", static_cast<double>(ready ? shared_->body_chunks.in_use() : 0));
  sink.Value("stream_chunk_pool_empty_total", static_cast<double>(ready ? shared_->body_chunks.empty_events() : 0));
  sink.Histogram("request_seconds", latency_ns_);
}

METRONOME_REGISTER_STAGE("send", SendStage);

}  // namespace metronome::http
