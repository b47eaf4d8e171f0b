// The items that travel the HTTP pipeline, and the pools they come from.
//
//   RecvChunk   accept -> parse        one per ring buffer (indexed by buffer id): the bytes of
//                                      one completed recv. Parse gives the buffer back to the
//                                      ring as soon as it copied what it needs.
//   Request     parse -> route -> [python] -> serialize -> send
//                                      from RequestPool; carries the request, then its response,
//                                      then its wire bytes. Send returns it to the pool.
//   BodyChunk   python -> serialize -> send
//                                      from ChunkPool (stream.h): one piece of a streamed
//                                      response body, after its Request (the head). The last
//                                      piece of a stream is its terminal chunk (last or abort).
//   ConnEvent   accept/parse -> send   one of each kind per connection slot (preallocated):
//                 kOpened    accept -> parse only: starts the first-request timer.
//                 kClosed    the read side ended (EOF, error, or our shutdown); parse stamps
//                            how many responses send must account for before closing the fd.
//                 kShutdown  parse asks send to end the connection (timeouts, errors): send
//                            shuts the socket down once the responses before it are written.
//                 kContinue  send writes "100 Continue" before the response with `seq`.
//
// Ownership: an item belongs to the stage that holds its pointer (pipeline.h).
#pragma once

#include <sys/uio.h>

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "runtime/item.h"
#include "runtime/outbox.h"
#include "runtime/waker.h"
#include "runtime/queue.h"
#include "stages/http/conn.h"
#include "stages/http/parser.h"

namespace metronome::http {

enum class Kind : uint8_t { kRecv, kRequest, kChunk, kOpened, kClosed, kShutdown, kContinue };

struct HttpItem : Item {
  explicit HttpItem(Kind k) : kind(k) {}
  Kind kind;
  ConnId conn = 0;
};

struct RecvChunk : HttpItem {
  RecvChunk() : HttpItem(Kind::kRecv) {}
  const char* data = nullptr;
  uint32_t len = 0;
  uint32_t offset = 0;      // bytes parse already consumed
  uint16_t bid = 0;         // ring buffer id
  RecvChunk* next = nullptr;  // parse's per-connection list of chunks not yet consumed
};

struct ConnEvent : HttpItem {
  explicit ConnEvent(Kind k) : HttpItem(k) {}
  uint32_t requests_issued = 0;  // kClosed
  uint32_t seq = 0;              // kShutdown: after the response with seq-1; kContinue: before seq
};

inline constexpr int kPathParamsMax = 8;
// A client's X-Request-Id longer than this (or with other than visible ASCII) is replaced.
inline constexpr size_t kRequestIdMax = 64;

enum class ParamType : uint8_t { kString, kInt, kPath };

struct PathParam {
  std::string_view name;   // from the route table (lives as long as the server)
  std::string_view value;  // view into the request's path
  ParamType type = ParamType::kString;
  int64_t int_value = 0;
};

struct ExtraHeader {
  std::string name, value;
};

// How a response body is delimited on the wire (RFC 9112 6.3). The server chooses; a handler
// only declares a length (a Content-Length field) for a streamed body.
enum class Framing : uint8_t {
  kLength,      // Content-Length: the body is known whole (every non-streamed response)
  kChunked,     // Transfer-Encoding: chunked (a stream on HTTP/1.1)
  kDeclared,    // Content-Length the app declared for a stream: exactly that many bytes follow
  kUntilClose,  // neither: the body ends when the connection closes (a stream on HTTP/1.0)
};

// What send writes for one response, in order per connection: a Request (head, plus the body
// when not streamed) and, for a stream, its BodyChunks. Ordered by (seq, part).
struct WirePiece : HttpItem {
  explicit WirePiece(Kind k) : HttpItem(k) {}
  uint32_t seq = 0;             // this connection's request number: responses leave in this order
  uint32_t part = 0;            // 0: the head (a Request); 1.. the body chunks of a stream
  bool ends = true;             // the response is complete after this piece
  WirePiece* next_out = nullptr;  // send's per-connection list, sorted by (seq, part)
  std::string wire;             // serialize's output
  iovec iov[2] = {};            // what send writes: wire, then (a large body) in place
  int iov_count = 0;
  size_t wire_total = 0;
};

// What serialize turns into bytes. Filled by route (native routes, errors) or python.
struct Response {
  int status = 200;
  std::string_view content_type;     // static storage, or into `content_type_storage`
  std::string content_type_storage;
  std::string_view body;             // static storage, or into `body_storage`
  std::string body_storage;
  std::vector<ExtraHeader> headers;  // extra fields (Python's); reserved once per pool item
  std::string_view allow;            // 405: the Allow field
  int retry_after_s = 0;             // 503 from overload: the Retry-After field
  std::string_view budget;           // 503 from a request budget: "cpu" or "memory"
  bool close = false;                // end the connection after this response
  // A streamed body (Framing other than kLength): `body` is empty and BodyChunks follow.
  Framing framing = Framing::kLength;
  int64_t declared_length = -1;      // kDeclared: the Content-Length the app set
  // While the python stage holds the request: the Python iterator the stream comes from (a
  // PyObject*, owned by the python stage; never leaves it).
  void* stream_source = nullptr;
  bool streaming() const { return framing != Framing::kLength; }

  void Reset();
  // An error the server answers itself (ErrorsAsJson() picks the body's form). `detail` is
  // static text, without a trailing newline.
  void SetError(int status_value, std::string_view detail);
  // 503 for overload (a full queue ahead): the client may retry after `retry_after_s`.
  void SetBusy(int retry_after_s_value) {
    SetError(503, "server busy; retry later");
    retry_after_s = retry_after_s_value;
  }
  void SetBodyCopy(std::string_view text) {
    body_storage.assign(text.data(), text.size());
    body = body_storage;
  }
};

// The server's own error bodies (parse's 400s, route's 404/405, the python stage's 500/503s):
// text/plain by default; {"error": "...", "status": N} as application/json when
// server.error_format is json or the app asks for it (App(errors="json")). Process-wide; set
// before traffic, read by any stage.
void SetErrorsAsJson(bool json);
bool ErrorsAsJson();

struct Request : WirePiece {
  explicit Request(const Limits& limits) : WirePiece(Kind::kRequest), chunked(limits) {}
  void Reset();

  int64_t head_done_ns = 0;     // when the head was complete
  RequestHead head;             // views into head_buf (path: into path_buf when normalised)
  std::string head_buf;
  std::string_view path;        // the path routing and the app see: head.path normalised (path.h)
  std::string path_buf;         // ... when it differs from the raw one
  std::string body;
  ChunkedDecoder chunked;
  bool body_complete = false;

  int32_t route = -1;           // index in the route table; -1: none matched
  PathParam params[kPathParamsMax];
  int num_params = 0;
  bool is_head = false;         // HEAD: answered by the GET route, without a body

  Response resp;
  bool responded = false;       // resp is final (route or python filled it)

  // Python's view of this request (a _metronome.Request), made by the first Python stage that
  // sees it (a plugin or the python stage) and released, under the GIL, by the last.
  void* py_request = nullptr;
  uint32_t plugins_seen = 0;    // bit i: plugin i ran on_request (python calls on_response)

  // The request id (request_id.h): the client's X-Request-Id when it sent a usable one, else
  // made by parse. In log lines about the request, the access log and (by default) the response.
  char request_id[kRequestIdMax + 1] = {};
  uint8_t request_id_len = 0;
  std::string_view id() const { return std::string_view(request_id, request_id_len); }
};

// One piece of a streamed body. The producer (a python lane) fills `data`; serialize frames it
// into `wire`; send writes it and gives it back to the pool.
struct BodyChunk : WirePiece {
  BodyChunk() : WirePiece(Kind::kChunk) {}
  void Reset();
  std::string data;             // the app's bytes (empty in a terminal chunk)
  Framing framing = Framing::kChunked;  // the stream's, copied by the producer
  bool last = false;            // terminal: the body ended as it should
  bool abort = false;           // terminal: the body is cut short; the connection must close
  // abort, because the client stopped reading: send ends the connection at once instead of
  // after the write in flight, which waits for that client and may never complete.
  bool stalled = false;
  // Terminal chunks: the stream's head, which send keeps until this chunk retires it (the
  // producer never touches it after emitting it; it is an identity only).
  Request* request = nullptr;
  Waker* producer = nullptr;    // the producing lane's, woken when backpressure eases
  bool terminal() const { return last || abort; }
};

// Fixed pool of requests, allocated at start. Parse takes; send gives back (parse too, for a
// request it abandons).
// Thread-safety: Take from one thread (parse); Give from any thread with its own GiverToken.
class RequestPool {
 public:
  using GiverToken = moodycamel::ProducerToken;
  void Init(size_t n, const Limits& limits, size_t reserve_bytes);
  Request* Take();
  // Each thread that gives requests back makes its own token once, at start.
  std::unique_ptr<GiverToken> MakeGiverToken() { return std::make_unique<GiverToken>(*free_); }
  void Give(Request* r, GiverToken& token);
  size_t capacity() const { return all_.size(); }
  size_t in_use() const { return in_use_.load(std::memory_order_relaxed); }

 private:
  std::vector<std::unique_ptr<Request>> all_;
  std::unique_ptr<moodycamel::ConcurrentQueue<Request*, QueueTraits>> free_;
  std::unique_ptr<moodycamel::ConsumerToken> take_token_;
  std::atomic<size_t> in_use_{0};
};

// 1xx, 204 and 304 responses have no body and no Content-Length (RFC 9110 6.4.1).
inline bool StatusHasNoBody(int status) { return status < 200 || status == 204 || status == 304; }
// Whether r's response puts body bytes on the wire (not for HEAD or a bodiless status).
inline bool ResponseHasBody(const Request& r) { return !r.is_head && !StatusHasNoBody(r.resp.status); }

// Answers r now: its response (already filled) is final and it skips ahead to serialize, past
// any stage in between. Every early answer (errors, sheds, plugins) goes through here.
inline void AnswerEarly(Request* r, int serialize, Outbox& out) {
  r->responded = true;
  out.EmitTo(serialize, r);
}

const char* ReasonPhrase(int status);

}  // namespace metronome::http
