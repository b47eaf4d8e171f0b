// parse: bytes to requests, per connection, in order (RFC 9112 framing; rules in parser.h).
//
// Per connection it keeps the chunks not consumed yet (each holds a ring buffer), the partial
// head of a request split across reads (`carry`), and the request whose body is arriving.
// A head is parsed in place in the receive buffer when it arrived whole (the common case) and
// copied once into its request; the buffer goes back to the ring as soon as it is consumed.
//
// A request is emitted to route when its body is complete. Malformed input gets its error
// response (emitted straight to serialize) and the connection is closed after it. When the
// request pool is empty or the outbox is full the connection waits in `blocked_` with its
// chunks (and their ring buffers): the ring runs dry and accept stops reading (backpressure).
//
// Timeouts (one list per phase, each ordered by deadline since every entry has the same
// timeout): a new or idle connection gets server.keepalive_timeout (limits.header_timeout
// before its first byte), a partial head limits.header_timeout (then 408), a body without
// progress limits.body_timeout (then 408), a closing connection server.linger_timeout to see the
// client's EOF before send shuts it down hard.
//
// The drain (BeginStop): every request still read is answered with Connection: close and ends
// its connection; a connection with nothing in progress is closed once server.drain_grace has
// passed (a request already on its way there is answered, not swallowed); new ones get the same
// grace.
#include "stages/parse.h"

#include <cassert>
#include <cstring>
#include <cstdio>
#include <unistd.h>
#include <strings.h>

#include "runtime/clock.h"
#include "runtime/log.h"
#include "runtime/outbox.h"
#include "runtime/registry.h"
#include "runtime/units.h"
#include "stages/http/path.h"

namespace metronome::http {
namespace {

// Emits per head at most: the request, a 100-continue event, an error response, a shutdown.
constexpr size_t kRoomPerStep = 3;
// In the drain, how long a connection that just sent its last response (or became idle after
// the grace) stays open for the client to read it before it is closed.
constexpr int64_t kDrainLingerNs = 100 * kNanosPerMilli;
// How often Tick runs when no deadline is nearer.
constexpr int64_t kTickMaxNs = kNanosPerSecond;

}  // namespace

absl::Status ParseStage::Configure(ConfigNode entry, ConfigNode root, StageEnv& env) {
  (void)entry;
  shared_ = &GetHttpShared(env, root, &config_);
  serialize_ = env.FindStageOfType("serialize");
  send_ = env.FindStageOfType("send");
  if (serialize_ < 0 || send_ < 0) {
    return absl::InvalidArgumentError("parse needs a serialize and a send stage after it");
  }
  timeouts_[kTimerFirst] = config_.header_timeout_ns;
  timeouts_[kTimerIdle] = config_.keepalive_timeout_ns;
  timeouts_[kTimerHead] = config_.header_timeout_ns;
  timeouts_[kTimerBody] = config_.body_timeout_ns;
  timeouts_[kTimerLinger] = config_.linger_timeout_ns;
  timeouts_[kTimerDrain] = config_.drain_grace_ns;
  return absl::OkStatus();
}

absl::Status ParseStage::Start(StageEnv& env) {
  shared_->Setup(config_);
  // Ids made here: unique per process (pid) and per start (time), then a counter.
  snprintf(id_prefix_, sizeof id_prefix_, "%x%04llx", static_cast<unsigned>(getpid()),
           static_cast<unsigned long long>(MonotonicNowNs() / 1000) & 0xffff);
  shared_->parse_waker = env.lane_waker();
  conns_.resize(config_.max_connections);
  blocked_.reserve(config_.max_connections);
  giver_ = shared_->requests.MakeGiverToken();
  return absl::OkStatus();
}

ParseStage::Conn* ParseStage::Lookup(ConnId id) {
  Conn& c = conns_[SlotOf(id)];
  if (c.gen != GenOf(id)) {
    // First sight of this generation: the slot's previous connection is gone.
    assert(c.pending == nullptr && c.current == nullptr && c.timer == kTimerNone);
    c.gen = GenOf(id);
    c.id = id;
    c.next_seq = 0;
    c.phase = Phase::kIdle;
    c.closing = false;
    c.shutdown_sent = false;
    c.blocked = false;
    c.carry.clear();
    c.carry_scanned = 0;
    c.body_left = 0;
  }
  return &c;
}

void ParseStage::Process(std::span<Item* const> batch, Outbox& out) {
  for (Item* it : batch) {
    auto* item = static_cast<HttpItem*>(it);
    switch (item->kind) {
      case Kind::kRecv: {
        auto* chunk = static_cast<RecvChunk*>(item);
        Conn* c = Lookup(chunk->conn);
        if (c->phase == Phase::kDiscard) {
          shared_->ReturnBuffer(chunk->bid);
          break;
        }
        chunk->next = nullptr;
        if (c->pending_tail != nullptr) c->pending_tail->next = chunk; else c->pending = chunk;
        c->pending_tail = chunk;
        if (!c->blocked) Drive(c, out);
        break;
      }
      case Kind::kOpened: {
        Conn* c = Lookup(item->conn);
        Arm(c, draining_ ? kTimerDrain : kTimerFirst, out.now_ns());
        break;
      }
      case Kind::kClosed: {
        Conn* c = Lookup(item->conn);
        Forget(c);
        auto* ev = static_cast<ConnEvent*>(item);
        // Send closes the fd once it has accounted for this many responses.
        ev->requests_issued = c->next_seq;
        out.EmitTo(send_, ev);
        break;
      }
      default:
        Fatal("parse: unexpected item kind %d", static_cast<int>(item->kind));
    }
  }
}

// Drops whatever the connection still holds: its read side ended.
void ParseStage::Forget(Conn* c) {
  for (RecvChunk* ch = c->pending; ch != nullptr;) {
    RecvChunk* next = ch->next;
    shared_->ReturnBuffer(ch->bid);
    ch = next;
  }
  c->pending = c->pending_tail = nullptr;
  if (c->current != nullptr) {
    DropCurrent(c);
    abandoned_.Add();
  }
  c->carry.clear();
  c->carry.shrink_to_fit();  // the connection is gone; give its carry memory back
  c->phase = Phase::kDiscard;
  Disarm(c);
  // c->blocked stays: Poll skips connections whose phase is kDiscard.
}

// The request whose body was arriving is given up. It never left parse: its sequence number is
// taken back, so send does not wait for a response that will never come.
void ParseStage::DropCurrent(Conn* c) {
  shared_->requests.Give(c->current, *giver_);
  c->current = nullptr;
  --c->next_seq;
}

// Consumes the connection's pending chunks as far as capacity allows.
void ParseStage::Drive(Conn* c, Outbox& out) {
  while (c->pending != nullptr) {
    RecvChunk* ch = c->pending;
    if (c->phase != Phase::kDiscard) {
      if (out.Room() < kRoomPerStep || !EnsureSpare()) {
        Block(c);
        return;
      }
      Step(c, ch, out);
    } else {
      ch->offset = ch->len;
    }
    if (ch->offset >= ch->len) {
      c->pending = ch->next;
      if (c->pending == nullptr) c->pending_tail = nullptr;
      shared_->ReturnBuffer(ch->bid);
    }
  }
}

bool ParseStage::EnsureSpare() {
  if (spare_ == nullptr) spare_ = shared_->requests.Take();
  if (spare_ != nullptr) return true;
  shared_->parse_wants_requests.store(true, std::memory_order_release);
  // Re-check: send may have given one back between the failed take and the flag.
  spare_ = shared_->requests.Take();
  return spare_ != nullptr;
}

void ParseStage::Block(Conn* c) {
  if (!c->blocked) {
    c->blocked = true;
    blocked_.push_back(c->id);
    blocked_total_.Add();
  }
}

bool ParseStage::Poll(Outbox& out) {
  if (blocked_.empty()) return false;
  if (!EnsureSpare() || out.Room() < kRoomPerStep) return false;
  shared_->parse_wants_requests.store(false, std::memory_order_relaxed);
  scratch_.swap(blocked_);
  for (ConnId id : scratch_) {
    Conn& c = conns_[SlotOf(id)];
    if (c.gen != GenOf(id) || !c.blocked) continue;
    if (!EnsureSpare() || out.Room() < kRoomPerStep) {
      blocked_.push_back(id);  // still blocked: keep its place for the next round
      continue;
    }
    c.blocked = false;
    if (c.phase != Phase::kDiscard) Drive(&c, out);  // may block it again
  }
  scratch_.clear();
  return true;
}

// One step on the first pending chunk: a head, a piece of body, or discarding.
void ParseStage::Step(Conn* c, RecvChunk* ch, Outbox& out) {
  const char* data = ch->data + ch->offset;
  size_t len = ch->len - ch->offset;
  if (c->current != nullptr) {
    ch->offset += static_cast<uint32_t>(FeedBody(c, data, len, out));
    return;
  }
  // Waiting for a head.
  RequestHead& head = spare_->head;
  size_t consumed = 0;
  ParseError err;
  ParseStatus st;
  const char* base;
  if (c->carry.empty()) {
    base = data;
    st = ParseRequestHead(data, len, 0, config_.limits, &head, &consumed, &err);
    if (st == ParseStatus::kIncomplete) {
      // Keep the partial head; bounded by the parser's limits (it fails past max_header_bytes).
      c->carry.assign(data, len);
      c->carry_scanned = len;
      ch->offset = ch->len;
      if (c->phase != Phase::kHead) {
        c->phase = Phase::kHead;
        Arm(c, kTimerHead, out.now_ns());
      }
      return;
    }
  } else {
    size_t before = c->carry.size();
    // Append no more than can still belong to a head (the limit, plus the empty lines the
    // parser skips before a request line and does not count); the rest stays in the chunk.
    const size_t carry_max = config_.limits.max_header_bytes + 2 * kLeadingEmptyLinesMax + 1;
    size_t take = std::min(len, carry_max > before ? carry_max - before : 0);
    c->carry.append(data, take);
    base = c->carry.data();
    st = ParseRequestHead(base, c->carry.size(), c->carry_scanned, config_.limits, &head, &consumed, &err);
    if (st == ParseStatus::kIncomplete) {
      c->carry_scanned = c->carry.size();
      ch->offset += static_cast<uint32_t>(take);
      return;
    }
    if (st == ParseStatus::kComplete) {
      // The head ended inside this chunk: only its part of the chunk is consumed.
      ch->offset += static_cast<uint32_t>(consumed - before);
    }
  }
  if (st == ParseStatus::kError) {
    Reject(c, err, out);
    ch->offset = ch->len;
    return;
  }

  // The path routing and the app see (path.h); an encoded NUL is refused as a raw one is.
  const PathCheck path = NormalizePath(head.path, &spare_->path_buf);
  if (path == PathCheck::kNul) {
    Reject(c, ParseError{400, "NUL (%00) in the request path"}, out);
    ch->offset = ch->len;
    return;
  }
  // A complete head: it becomes a request, its bytes copied once into the request.
  Request* r = spare_;
  spare_ = nullptr;
  r->head_buf.assign(base, consumed);
  r->head.Rebase(base, r->head_buf.data());
  if (path == PathCheck::kNormalized) {
    r->path = r->path_buf;
    paths_normalized_.Add();
  } else {
    r->path = r->head.path;
  }
  if (!c->carry.empty()) {
    c->carry.clear();
    c->carry_scanned = 0;
  } else {
    ch->offset += static_cast<uint32_t>(consumed);
  }
  r->conn = c->id;
  r->seq = c->next_seq++;
  r->head_done_ns = out.now_ns();
  AssignRequestId(r);
  r->is_head = r->head.method_id == Method::kHead;
  if (draining_) r->head.keep_alive = false;  // answered, then the connection ends
  if (!r->head.keep_alive) c->closing = true;

  if (r->head.body_kind == BodyKind::kNone ||
      (r->head.body_kind == BodyKind::kContentLength && r->head.content_length == 0)) {
    r->body_complete = true;
    Finish(c, r, out);
    return;
  }
  c->current = r;
  c->phase = Phase::kBody;
  c->body_left = r->head.content_length;
  if (r->head.body_kind == BodyKind::kContentLength) r->body.reserve(r->head.content_length);
  Arm(c, kTimerBody, out.now_ns());
  if (r->head.expect_continue && ch->offset >= ch->len && ch->next == nullptr) {
    // The client waits for our go-ahead before it sends the body (RFC 9110 10.1.1).
    ConnEvent& ev = shared_->continue_events[SlotOf(c->id)];
    ev.conn = c->id;
    ev.seq = r->seq;
    out.EmitTo(send_, &ev);
  }
}

size_t ParseStage::FeedBody(Conn* c, const char* data, size_t len, Outbox& out) {
  Request* r = c->current;
  size_t used;
  if (r->head.body_kind == BodyKind::kContentLength) {
    used = static_cast<size_t>(std::min<uint64_t>(len, c->body_left));
    r->body.append(data, used);
    c->body_left -= used;
    if (c->body_left == 0) r->body_complete = true;
  } else {
    ParseError err;
    ParseStatus st = r->chunked.Feed(data, len, &used, &err, [r](const char* d, size_t n) { r->body.append(d, n); });
    if (st == ParseStatus::kError) {
      DropCurrent(c);  // the error response takes its sequence number
      Reject(c, err, out);
      return len;
    }
    if (st == ParseStatus::kComplete) r->body_complete = true;
  }
  if (r->body_complete) {
    c->current = nullptr;
    Finish(c, r, out);
  } else {
    Arm(c, kTimerBody, out.now_ns());  // progress resets the body timeout
  }
  return used;
}

// A request is complete: hand it to route, and set the connection up for the next one.
void ParseStage::Finish(Conn* c, Request* r, Outbox& out) {
  out.Emit(r);
  requests_.Add();
  if (c->closing) {
    // Connection: close (or HTTP/1.0): nothing after this request is read.
    c->phase = Phase::kDiscard;
    Arm(c, kTimerLinger, out.now_ns());
  } else {
    c->phase = Phase::kIdle;
    Arm(c, draining_ ? kTimerDrain : kTimerIdle, out.now_ns());
  }
}

void ParseStage::BeginStop(Outbox& out) {
  draining_ = true;
  drain_deadline_ns_ = out.now_ns() + timeouts_[kTimerDrain];
  // Every connection waiting (for a request, the rest of one, or its client's EOF) gets the
  // drain grace if its own timer would come later; the entries move to the drain's list in
  // deadline order.
  for (int k : {kTimerFirst, kTimerIdle, kTimerHead, kTimerBody, kTimerLinger}) {
    TimerList& l = timers_[k];
    // The list is in deadline order: from its tail, every entry due after the grace moves.
    while (l.tail != kNoSlot && conns_[l.tail].deadline_ns > drain_deadline_ns_) {
      Arm(&conns_[l.tail], kTimerDrain, out.now_ns());
    }
  }
}

// Whether send has accounted for fewer responses than this connection's requests.
bool ParseStage::ResponsesOutstanding(const Conn* c) const {
  const uint64_t a = shared_->flows[SlotOf(c->id)].accounted.load(std::memory_order_acquire);
  const uint32_t gen = static_cast<uint32_t>(a >> 32), done = static_cast<uint32_t>(a);
  return gen != GenOf(c->id) ? c->next_seq > 0 : done < c->next_seq;
}

// The client's request id when it is usable (visible ASCII, at most kRequestIdMax), else one
// made here: this process's prefix and a counter, unique for the process's life.
void ParseStage::AssignRequestId(Request* r) {
  const std::string& want = config_.request_id_header;
  for (size_t i = 0; i < r->head.num_headers; ++i) {
    const Header& f = r->head.headers[i];
    if (f.name.size() != want.size() || strncasecmp(f.name.data(), want.data(), want.size()) != 0) continue;
    bool usable = !f.value.empty() && f.value.size() <= kRequestIdMax;
    for (char c : f.value) usable = usable && c > ' ' && c < 127;
    if (usable) {
      memcpy(r->request_id, f.value.data(), f.value.size());
      r->request_id_len = static_cast<uint8_t>(f.value.size());
      return;
    }
    break;
  }
  int n = snprintf(r->request_id, sizeof r->request_id, "%s-%llx", id_prefix_,
                   static_cast<unsigned long long>(++ids_made_));
  r->request_id_len = static_cast<uint8_t>(std::min<int>(n, static_cast<int>(kRequestIdMax)));
}

// Answers malformed input with its status and ends the connection after that response.
void ParseStage::Reject(Conn* c, const ParseError& err, Outbox& out) {
  rejected_.Add();
  LOG_RATE_LIMITED(LogLevel::kInfo, "rejected a request with %d: %s", err.status, err.reason);
  c->carry.clear();
  c->carry_scanned = 0;
  Respond(c, err.status, err.reason, out);
  c->closing = true;
  c->phase = Phase::kDiscard;
  Arm(c, kTimerLinger, out.now_ns());
}

// Emits an error response with the connection's next sequence number, straight to serialize.
void ParseStage::Respond(Conn* c, int status, absl::string_view reason, Outbox& out) {
  if (!EnsureSpare()) {
    // No request slot for a response: end the connection without one.
    EndConnection(c, out);
    return;
  }
  Request* r = spare_;
  spare_ = nullptr;
  r->conn = c->id;
  r->seq = c->next_seq++;
  r->head.version_minor = 1;
  r->head.keep_alive = false;
  r->resp.SetError(status, std::string_view(reason.data(), reason.size()));
  r->resp.close = true;
  AnswerEarly(r, serialize_, out);
}

void ParseStage::EndConnection(Conn* c, Outbox& out) {
  if (c->shutdown_sent) return;
  c->shutdown_sent = true;
  ConnEvent& ev = shared_->shutdown_events[SlotOf(c->id)];
  ev.conn = c->id;
  ev.seq = c->next_seq;
  out.EmitTo(send_, &ev);
}

// --- timers -------------------------------------------------------------------------------

void ParseStage::Arm(Conn* c, TimerKind kind, int64_t now) {
  Disarm(c);
  int64_t deadline = now + timeouts_[kind];
  if (draining_) {
    // In the drain every wait ends at the grace, or a little after it for what starts later
    // (a connection that just got its last response may read it first). The formula only grows
    // with `now`, so the drain's list stays in deadline order.
    kind = kTimerDrain;
    deadline = std::max(drain_deadline_ns_, now + kDrainLingerNs);
  }
  c->timer = kind;
  c->deadline_ns = deadline;
  TimerList& l = timers_[kind];
  c->timer_prev = l.tail;
  c->timer_next = kNoSlot;
  if (l.tail != kNoSlot) conns_[l.tail].timer_next = SlotOf(c->id); else l.head = SlotOf(c->id);
  l.tail = SlotOf(c->id);
}

void ParseStage::Disarm(Conn* c) {
  if (c->timer == kTimerNone) return;
  TimerList& l = timers_[c->timer];
  if (c->timer_prev != kNoSlot) conns_[c->timer_prev].timer_next = c->timer_next; else l.head = c->timer_next;
  if (c->timer_next != kNoSlot) conns_[c->timer_next].timer_prev = c->timer_prev; else l.tail = c->timer_prev;
  c->timer = kTimerNone;
  c->timer_prev = c->timer_next = kNoSlot;
}

int64_t ParseStage::Tick(int64_t now, Outbox& out) {
  int64_t next = now + kTickMaxNs;
  for (int k = 0; k < kTimerKinds; ++k) {
    TimerList& l = timers_[k];
    while (l.head != kNoSlot) {
      Conn* c = &conns_[l.head];
      if (c->deadline_ns > now) {
        next = std::min(next, c->deadline_ns);
        break;
      }
      if (out.Room() < kRoomPerStep) return now;  // come back at once when there is room
      Disarm(c);
      Expire(c, static_cast<TimerKind>(k), out);
    }
  }
  return next;
}

void ParseStage::Expire(Conn* c, TimerKind kind, Outbox& out) {
  timeouts_fired_[kind].Add();
  switch (kind) {
    case kTimerDrain:
      if (c->phase == Phase::kHead || c->phase == Phase::kBody) {
        // A request still arriving when the drain's grace ran out: answered, not dropped.
        LOG_RATE_LIMITED(LogLevel::kInfo, "connection %u: request incomplete when the drain's grace ended, answering 408",
                         SlotOf(c->id));
        if (c->current != nullptr) DropCurrent(c);
        Reject(c, ParseError{408, "the server is shutting down and the request did not arrive in time"}, out);
        break;
      }
      [[fallthrough]];
    case kTimerFirst:
    case kTimerIdle:
      if (kind == kTimerIdle && ResponsesOutstanding(c)) {
        // A response is still on its way (a slow handler, a long stream): the connection is
        // not idle; its keep-alive time starts over.
        Arm(c, kTimerIdle, MonotonicNowNs());
        break;
      }
      // Nothing was asked: close quietly (RFC 9112 9.5 allows it at any idle moment).
      c->phase = Phase::kDiscard;
      EndConnection(c, out);
      break;
    case kTimerHead:
    case kTimerBody: {
      LOG_RATE_LIMITED(LogLevel::kInfo, "connection %u: %s timed out, answering 408",
                       SlotOf(c->id), kind == kTimerHead ? "request head" : "request body");
      if (c->current != nullptr) DropCurrent(c);
      ParseError err{408, kind == kTimerHead ? "timed out waiting for the request head"
                                             : "timed out waiting for the request body"};
      Reject(c, err, out);
      break;
    }
    case kTimerLinger:
      // Our last response went out long ago and the client has not closed: end it.
      EndConnection(c, out);
      break;
    default:
      break;
  }
}

void ParseStage::ExtraStats(StatsSink& sink) const {
  sink.Value("requests_total", static_cast<double>(requests_.Get()));
  sink.Value("rejected_total", static_cast<double>(rejected_.Get()));
  sink.Value("paths_normalized_total", static_cast<double>(paths_normalized_.Get()));
  sink.Value("abandoned_total", static_cast<double>(abandoned_.Get()));
  sink.Value("blocked_total", static_cast<double>(blocked_total_.Get()));
  sink.Value("timeouts_first_request_total", static_cast<double>(timeouts_fired_[kTimerFirst].Get()));
  sink.Value("timeouts_keepalive_total", static_cast<double>(timeouts_fired_[kTimerIdle].Get()));
  sink.Value("timeouts_header_total", static_cast<double>(timeouts_fired_[kTimerHead].Get()));
  sink.Value("timeouts_body_total", static_cast<double>(timeouts_fired_[kTimerBody].Get()));
  sink.Value("timeouts_linger_total", static_cast<double>(timeouts_fired_[kTimerLinger].Get()));
  sink.Value("drain_idle_closes_total", static_cast<double>(timeouts_fired_[kTimerDrain].Get()));
  sink.Value("requests_in_use", static_cast<double>(shared_ != nullptr && shared_->ready() ? shared_->requests.in_use() : 0));
}

void ParseStage::Shutdown() {
  if (spare_ != nullptr && giver_ != nullptr) shared_->requests.Give(spare_, *giver_);
  spare_ = nullptr;
}

METRONOME_REGISTER_STAGE("parse", ParseStage);

}  // namespace metronome::http
