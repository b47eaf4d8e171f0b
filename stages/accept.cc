// accept: owns the listening socket and the connections' read side, on the lane's io_uring.
//
// Multishot accept takes connections; each gets a slot in the connection table and a multishot
// recv that draws from a registered buffer ring. Every completed recv becomes the RecvChunk of
// its buffer, handed to parse; parse gives the buffer back to the ring. When the ring runs dry
// the kernel ends the recv with -ENOBUFS (backpressure: parse is behind); the connection waits
// in `rearm_` until parse returned enough buffers.
//
// A read side that ends (EOF, reset, or our own shutdown from send) emits the slot's kClosed
// event; send closes the fd once every response was accounted for (conn.h).
//
// Past server.max_connections a new connection gets a canned 503 with Retry-After and is closed.
//
// The drain (BeginStop) closes the listening socket, so that new connections are refused at
// once (a load balancer moves on; the client knows nothing was sent, so any request is safe to
// retry) instead of completing handshakes nobody answers. Connections the kernel had already
// completed are taken first and served like the others. Open connections keep their read side:
// a request that arrives on one during the drain is answered (with Connection: close, see
// serialize and parse), never swallowed.
#include "stages/accept.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <fcntl.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "runtime/log.h"
#include "runtime/outbox.h"
#include "runtime/registry.h"
#include "runtime/uring.h"

namespace metronome::http {
namespace {

enum Op : uint64_t { kOpAccept = 1, kOpRecv = 2, kOpReject = 3, kOpRejectClose = 4, kOpCancel = 5 };

// user data payload: op (4 bits) | slot (20 bits) | generation (32 bits)
uint64_t Payload(uint64_t op, ConnId id) {
  return (op << 52) | (static_cast<uint64_t>(SlotOf(id)) << 32) | GenOf(id);
}
uint64_t OpOf(uint64_t payload) { return payload >> 52; }
ConnId IdOf(uint64_t payload) {
  return MakeConnId(static_cast<uint32_t>((payload >> 32) & 0xfffff), static_cast<uint32_t>(payload));
}

// Re-arm receives only once this share of the ring is free again, so that a ring that is just
// dry does not thrash between one buffer and -ENOBUFS.
constexpr int kRearmFreeFraction = 8;

}  // namespace

absl::Status AcceptStage::Configure(ConfigNode entry, ConfigNode root, StageEnv& env) {
  (void)entry;
  shared_ = &GetHttpShared(env, root, &config_);
  return absl::OkStatus();
}

absl::Status AcceptStage::Start(StageEnv& env) {
  shared_->Setup(config_);
  ring_ = env.ring();
  tag_ = env.ring_tag();
  shared_->accept_waker = env.lane_waker();
  live_ = std::vector<uint8_t>(config_.max_connections, 0);
  rearm_.reserve(config_.max_connections);
  overflow_.reserve(config_.recv_buffers + config_.max_connections);
  constexpr absl::string_view kRejectBody = "server at max_connections; retry later\n";
  reject_response_ = absl::StrCat(
      "HTTP/1.1 503 Service Unavailable\r\nServer: ", config_.server_name,
      "\r\nRetry-After: ", config_.retry_after_s,
      "\r\nContent-Type: text/plain\r\nContent-Length: ", kRejectBody.size(),
      "\r\nConnection: close\r\n\r\n", kRejectBody);

  // The listening socket.
  sockaddr_storage addr{};
  socklen_t addr_len;
  int family;
  if (inet_pton(AF_INET6, config_.listen_host.c_str(), &reinterpret_cast<sockaddr_in6*>(&addr)->sin6_addr) == 1) {
    auto* a = reinterpret_cast<sockaddr_in6*>(&addr);
    a->sin6_family = family = AF_INET6;
    a->sin6_port = htons(config_.listen_port);
    addr_len = sizeof *a;
  } else {
    auto* a = reinterpret_cast<sockaddr_in*>(&addr);
    if (inet_pton(AF_INET, config_.listen_host.c_str(), &a->sin_addr) != 1) {
      return absl::InvalidArgumentError(absl::StrCat("server.listen: '", config_.listen_host,
                                                     "' is not an IPv4 or IPv6 address"));
    }
    a->sin_family = family = AF_INET;
    a->sin_port = htons(config_.listen_port);
    addr_len = sizeof *a;
  }
  listen_fd_ = socket(family, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (listen_fd_ < 0) return absl::InternalError(absl::StrCat("socket: ", std::strerror(errno)));
  int one = 1;
  setsockopt(listen_fd_, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  if (config_.reuse_port) setsockopt(listen_fd_, SOL_SOCKET, SO_REUSEPORT, &one, sizeof one);
  if (bind(listen_fd_, reinterpret_cast<sockaddr*>(&addr), addr_len) != 0) {
    int err = errno;
    return absl::UnavailableError(absl::StrCat(
        "cannot listen on ", config_.listen_host, ":", config_.listen_port, ": ", std::strerror(err),
        err == EADDRINUSE ? " (another process has the port: stop it, pick another with --listen, "
                            "or set server.reuse_port to share it)"
        : err == EACCES ? " (ports below 1024 need root or CAP_NET_BIND_SERVICE)" : ""));
  }
  if (listen(listen_fd_, config_.backlog) != 0) {
    return absl::UnavailableError(absl::StrCat("listen: ", std::strerror(errno)));
  }
  sockaddr_storage bound{};
  socklen_t bound_len = sizeof bound;
  getsockname(listen_fd_, reinterpret_cast<sockaddr*>(&bound), &bound_len);
  bound_address_ = FormatPeer(bound);

  // The receive-buffer ring: page-aligned memory registered as buffer group 0 (liburing 2.3
  // has no io_uring_setup_buf_ring; this is what it would do).
  const uint32_t n = config_.recv_buffers;
  size_t ring_bytes = n * sizeof(io_uring_buf);
  void* ring_mem = nullptr;
  if (posix_memalign(&ring_mem, 4096, ring_bytes) != 0) return absl::ResourceExhaustedError("buffer ring");
  std::memset(ring_mem, 0, ring_bytes);
  ring_mem_ = ring_mem;
  auto* br = static_cast<io_uring_buf_ring*>(ring_mem);
  io_uring_buf_ring_init(br);
  io_uring_buf_reg reg{};
  reg.ring_addr = reinterpret_cast<uint64_t>(br);
  reg.ring_entries = n;
  reg.bgid = kBufferGroup;
  int rc = io_uring_register_buf_ring(ring_->raw(), &reg, 0);
  if (rc < 0) {
    return absl::UnavailableError(absl::StrCat("io_uring_register_buf_ring: ", std::strerror(-rc),
                                               " (needs Linux >= 5.19)"));
  }
  buffers_.resize(static_cast<size_t>(n) * config_.recv_buffer_bytes);
  shared_->buf_ring = br;
  shared_->buf_base = buffers_.data();
  for (uint32_t bid = 0; bid < n; ++bid) {
    io_uring_buf_ring_add(br, buffers_.data() + static_cast<size_t>(bid) * config_.recv_buffer_bytes,
                          config_.recv_buffer_bytes, static_cast<uint16_t>(bid),
                          io_uring_buf_ring_mask(n), static_cast<int>(bid));
  }
  io_uring_buf_ring_advance(br, static_cast<int>(n));

  ArmAccept();
  LOG_INFO("listening on http://%s", bound_address_.c_str());
  return absl::OkStatus();
}

std::vector<RingOp> AcceptStage::RingOps() const {
  return {{IORING_OP_ACCEPT, "ACCEPT (multishot)", "5.19"},
          {IORING_OP_RECV, "RECV (multishot, provided buffers)", "6.0"},
          {IORING_OP_SEND, "SEND (the max_connections 503)", "5.6"},
          {IORING_OP_CLOSE, "CLOSE", "5.6"},
          {IORING_OP_ASYNC_CANCEL, "ASYNC_CANCEL", "5.5"}};
}

void AcceptStage::ArmAccept() {
  io_uring_sqe* sqe = ring_->GetSqe();
  io_uring_prep_multishot_accept(sqe, listen_fd_, nullptr, nullptr, SOCK_CLOEXEC);
  sqe->user_data = Ring::Pack(tag_, Payload(kOpAccept, 0));
  accept_armed_ = true;
}

void AcceptStage::ArmRecv(ConnId id) {
  io_uring_sqe* sqe = ring_->GetSqe();
  io_uring_prep_recv_multishot(sqe, shared_->conns.fd(id), nullptr, 0, 0);
  sqe->flags |= IOSQE_BUFFER_SELECT;
  sqe->buf_group = kBufferGroup;
  sqe->user_data = Ring::Pack(tag_, Payload(kOpRecv, id));
}

void AcceptStage::OnCompletion(const io_uring_cqe& cqe, Outbox& out) {
  uint64_t payload = Ring::PayloadOf(cqe.user_data);
  switch (OpOf(payload)) {
    case kOpAccept:
      out_ = &out;
      OnAccept(cqe);
      break;
    case kOpRecv: OnRecv(cqe, IdOf(payload), out); break;
    case kOpReject: break;
    case kOpRejectClose: break;
    case kOpCancel: break;
    default: Fatal("accept: completion with unknown op %llu", static_cast<unsigned long long>(OpOf(payload)));
  }
}

void AcceptStage::OnAccept(const io_uring_cqe& cqe) {
  if (!(cqe.flags & IORING_CQE_F_MORE)) accept_armed_ = false;
  if (cqe.res < 0) {
    if (cqe.res != -ECANCELED) {
      accept_errors_.Add();
      LOG_RATE_LIMITED(LogLevel::kWarn, "accept failed: %s%s", std::strerror(-cqe.res),
                       cqe.res == -EMFILE || cqe.res == -ENFILE ? " (out of file descriptors: raise ulimit -n)" : "");
    }
  } else {
    int fd = cqe.res;
    sockaddr_storage peer{};
    socklen_t len = sizeof peer;
    getpeername(fd, reinterpret_cast<sockaddr*>(&peer), &len);
    AddConnection(fd, peer, *out_);
  }
  if (!accept_armed_ && !stopping_) ArmAccept();
  if (!accept_armed_ && stopping_) CloseListener();
}

// The multishot accept has ended (cancelled): take what the kernel already accepted, then
// close the socket. Until the close a handshake may still complete; it is taken too.
void AcceptStage::CloseListener() {
  if (listen_fd_ < 0) return;
  int flags = fcntl(listen_fd_, F_GETFL);
  fcntl(listen_fd_, F_SETFL, flags | O_NONBLOCK);
  int taken = 0;
  for (;;) {
    sockaddr_storage peer{};
    socklen_t len = sizeof peer;
    int fd = accept4(listen_fd_, reinterpret_cast<sockaddr*>(&peer), &len, SOCK_CLOEXEC);
    if (fd < 0) break;  // EAGAIN: the queue is empty
    ++taken;
    AddConnection(fd, peer, *out_);
  }
  close(listen_fd_);
  listen_fd_ = -1;
  LOG_INFO("drain: the listening socket is closed (new connections are refused)%s",
           taken > 0 ? absl::StrCat("; ", taken, " connection(s) already queued were taken").c_str() : "");
}

void AcceptStage::AddConnection(int fd, const sockaddr_storage& peer, Outbox& out) {
  ConnId id;
  if (!shared_->conns.Acquire(fd, peer, &id)) {
    Reject(fd);
    return;
  }
  int one = 1;
  // Responses are written whole; Nagle would only delay the last segment.
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  live_[SlotOf(id)] = 1;
  ++live_count_;
  // Parse starts the connection's first-request timer from this event.
  ConnEvent& opened = shared_->opened_events[SlotOf(id)];
  opened.conn = id;
  Hand(&opened, out);
  if (BuffersLow()) {
    QueueRearm(id);
  } else {
    ArmRecv(id);
  }
}

void AcceptStage::Reject(int fd) {
  rejected_.Add();
  LOG_RATE_LIMITED(LogLevel::kWarn, "shed a new connection with 503: server.max_connections reached");
  io_uring_sqe* sqe = ring_->GetSqe();
  io_uring_prep_send(sqe, fd, reject_response_.data(), reject_response_.size(), MSG_NOSIGNAL);
  sqe->flags |= IOSQE_IO_LINK;
  sqe->user_data = Ring::Pack(tag_, Payload(kOpReject, 0));
  sqe = ring_->GetSqe();
  io_uring_prep_close(sqe, fd);
  sqe->user_data = Ring::Pack(tag_, Payload(kOpRejectClose, 0));
}

void AcceptStage::OnRecv(const io_uring_cqe& cqe, ConnId id, Outbox& out) {
  const uint32_t slot = SlotOf(id);
  bool more = cqe.flags & IORING_CQE_F_MORE;
  if (cqe.res > 0) {
    assert(cqe.flags & IORING_CQE_F_BUFFER);
    uint16_t bid = static_cast<uint16_t>(cqe.flags >> IORING_CQE_BUFFER_SHIFT);
    shared_->buffers_out.fetch_add(1, std::memory_order_acq_rel);
    RecvChunk& chunk = shared_->chunks[bid];
    chunk.conn = id;
    chunk.bid = bid;
    chunk.data = buffers_.data() + static_cast<size_t>(bid) * config_.recv_buffer_bytes;
    chunk.len = static_cast<uint32_t>(cqe.res);
    chunk.offset = 0;
    chunk.next = nullptr;
    bytes_in_.Add(static_cast<uint64_t>(cqe.res));
    Hand(&chunk, out);
    if (!more) {
      // The multishot recv ended without an error (e.g. the ring ran dry right after): re-arm.
      if (BuffersLow()) QueueRearm(id); else ArmRecv(id);
    }
    return;
  }
  if (cqe.res == -ENOBUFS) {
    enobufs_.Add();
    QueueRearm(id);
    return;
  }
  // EOF (0) or an error: the read side is over. `more` is false here.
  (void)more;
  if (cqe.res < 0 && cqe.res != -ECONNRESET && cqe.res != -ECANCELED && cqe.res != -EPIPE) {
    LOG_RATE_LIMITED(LogLevel::kWarn, "recv on connection %u failed: %s", slot, std::strerror(-cqe.res));
  }
  live_[slot] = 0;
  --live_count_;
  EmitClosed(id, out);
}

void AcceptStage::EmitClosed(ConnId id, Outbox& out) {
  ConnEvent& ev = shared_->closed_events[SlotOf(id)];
  ev.conn = id;
  ev.requests_issued = 0;
  Hand(&ev, out);
}

void AcceptStage::Hand(HttpItem* item, Outbox& out) {
  // Completions keep coming while parse's queue is full; what does not fit waits here, in
  // order. Bounded: every chunk and event is a preallocated item that exists once.
  if (overflow_.empty() && out.Room() > 0) {
    out.Emit(item);
  } else {
    overflow_.push_back(item);
  }
}

bool AcceptStage::BuffersLow() const {
  int64_t free_buffers = static_cast<int64_t>(config_.recv_buffers) - shared_->buffers_out.load(std::memory_order_acquire);
  return free_buffers < static_cast<int64_t>(config_.recv_buffers) / kRearmFreeFraction;
}

void AcceptStage::QueueRearm(ConnId id) {
  rearm_.push_back(id);
  shared_->accept_wants_buffers.store(true, std::memory_order_release);
}

bool AcceptStage::Poll(Outbox& out) {
  bool worked = false;
  size_t sent = 0;
  while (sent < overflow_.size() && out.Room() > 0) out.Emit(overflow_[sent++]);
  if (sent > 0) {
    overflow_.erase(overflow_.begin(), overflow_.begin() + static_cast<long>(sent));
    worked = true;
  }
  if (rearm_.empty()) return worked;
  if (BuffersLow()) return worked;
  shared_->accept_wants_buffers.store(false, std::memory_order_release);
  for (ConnId id : rearm_) ArmRecv(id);
  rearms_.Add(rearm_.size());
  rearm_.clear();
  return true;
}

void AcceptStage::BeginStop(Outbox& out) {
  out_ = &out;
  stopping_ = true;
  // Stop taking connections; the accept's last completion closes the socket (CloseListener).
  // The connections stay: parse ends them as their last requests are answered.
  if (accept_armed_) {
    io_uring_sqe* sqe = ring_->GetSqe();
    io_uring_prep_cancel64(sqe, Ring::Pack(tag_, Payload(kOpAccept, 0)), 0);
    sqe->user_data = Ring::Pack(tag_, Payload(kOpCancel, 0));
  } else {
    CloseListener();
  }
}

bool AcceptStage::Idle() const { return live_count_ == 0 && !accept_armed_ && listen_fd_ < 0 && overflow_.empty(); }

void AcceptStage::Shutdown() {
  if (listen_fd_ >= 0) close(listen_fd_);
  listen_fd_ = -1;
  free(ring_mem_);
  ring_mem_ = nullptr;
}

void AcceptStage::ExtraStats(StatsSink& sink) const {
  sink.Value("connections_open", static_cast<double>(shared_ != nullptr && shared_->ready() ? shared_->conns.open() : 0));
  sink.Value("connections_accepted_total", static_cast<double>(shared_ != nullptr && shared_->ready() ? shared_->conns.accepted_total() : 0));
  sink.Value("connections_rejected_total", static_cast<double>(rejected_.Get()));
  sink.Value("accept_errors_total", static_cast<double>(accept_errors_.Get()));
  sink.Value("recv_bytes_total", static_cast<double>(bytes_in_.Get()));
  sink.Value("recv_enobufs_total", static_cast<double>(enobufs_.Get()));
  sink.Value("recv_rearms_total", static_cast<double>(rearms_.Get()));
  sink.Value("recv_buffers_in_use", static_cast<double>(shared_ != nullptr ? shared_->buffers_out.load() : 0));
}

METRONOME_REGISTER_STAGE("accept", AcceptStage);

}  // namespace metronome::http
