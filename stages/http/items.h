// The items that travel the HTTP pipeline, and the pools they come from.
//
//   RecvChunk   accept -> parse        one per ring buffer (indexed by buffer id): the bytes of
//                                      one completed recv. Parse gives the buffer back to the
//                                      ring as soon as it copied what it needs.
//   Request     parse -> route -> [python] -> serialize -> send
//                                      from RequestPool; carries the request, then its response,
//                                      then its wire bytes. Send returns it to the pool.
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
#include "runtime/queue.h"
#include "stages/http/conn.h"
#include "stages/http/parser.h"

namespace metronome::http {

enum class Kind : uint8_t { kRecv, kRequest, kOpened, kClosed, kShutdown, kContinue };

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
  bool chunked = false;              // body_parts are sent with chunked framing
  std::vector<std::string> body_parts;

  void Reset();
  // 503 for overload (a full queue ahead): the client may retry after `retry_after_s`.
  void SetBusy(int retry_after_s_value) {
    Reset();
    status = 503;
    content_type = "text/plain; charset=utf-8";
    body = "server busy; retry later\n";
    retry_after_s = retry_after_s_value;
  }
  void SetBodyCopy(std::string_view text) {
    body_storage.assign(text.data(), text.size());
    body = body_storage;
  }
};

struct Request : HttpItem {
  explicit Request(const Limits& limits) : HttpItem(Kind::kRequest), chunked(limits) {}
  void Reset();

  uint32_t seq = 0;             // this connection's request number: responses leave in this order
  int64_t head_done_ns = 0;     // when the head was complete
  RequestHead head;             // views into head_buf
  std::string head_buf;
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

  Request* next_out = nullptr;  // send's per-connection list of responses waiting their turn
  std::string wire;             // status line + fields (+ body when small): serialize's output
  iovec iov[2] = {};            // what send writes: wire, then a large body in place
  int iov_count = 0;
  size_t wire_total = 0;
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

// Answers r now: its response (already filled) is final and it skips ahead to serialize, past
// any stage in between. Every early answer (errors, sheds, plugins) goes through here.
inline void AnswerEarly(Request* r, int serialize, Outbox& out) {
  r->responded = true;
  out.EmitTo(serialize, r);
}

const char* ReasonPhrase(int status);

}  // namespace metronome::http
