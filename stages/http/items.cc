#include "stages/http/items.h"

#include <atomic>
#include <cassert>
#include <string>

namespace metronome::http {

namespace {
std::atomic<bool> g_errors_json{false};
}  // namespace

void SetErrorsAsJson(bool json) { g_errors_json.store(json, std::memory_order_relaxed); }
bool ErrorsAsJson() { return g_errors_json.load(std::memory_order_relaxed); }

void Response::SetError(int status_value, std::string_view detail) {
  Reset();
  status = status_value;
  if (ErrorsAsJson()) {
    content_type = "application/json";
    body_storage = "{\"error\":\"";
    for (char c : detail) {
      if (c == '"' || c == '\\') body_storage += '\\';
      if (static_cast<unsigned char>(c) >= 0x20) body_storage += c;
    }
    body_storage += "\",\"status\":";
    body_storage += std::to_string(status_value);
    body_storage += "}";
  } else {
    content_type = "text/plain; charset=utf-8";
    body_storage.assign(detail.data(), detail.size());
    body_storage += '\n';
  }
  body = body_storage;
}

void Response::Reset() {
  status = 200;
  content_type = {};
  content_type_storage.clear();
  body = {};
  body_storage.clear();
  headers.clear();
  allow = {};
  retry_after_s = 0;
  budget = {};
  close = false;
  framing = Framing::kLength;
  declared_length = -1;
  stream_source = nullptr;
}

void Request::Reset() {
  seq = 0;
  head_done_ns = 0;
  head.num_headers = 0;
  head.method = head.target = head.path = head.query = head.host = {};
  head.method_id = Method::kOther;
  head.version_minor = 1;
  head.keep_alive = true;
  head.body_kind = BodyKind::kNone;
  head_buf.clear();
  path = {};
  path_buf.clear();
  body.clear();
  chunked.Reset();
  body_complete = false;
  route = -1;
  num_params = 0;
  is_head = false;
  resp.Reset();
  responded = false;
  py_request = nullptr;
  plugins_seen = 0;
  request_id_len = 0;
  part = 0;
  ends = true;
  next_out = nullptr;
  wire.clear();
  iov_count = 0;
  wire_total = 0;
}

void BodyChunk::Reset() {
  seq = 0;
  part = 0;
  ends = false;
  next_out = nullptr;
  wire.clear();
  iov_count = 0;
  wire_total = 0;
  data.clear();
  framing = Framing::kChunked;
  last = abort = stalled = false;
  request = nullptr;
  producer = nullptr;
}

void RequestPool::Init(size_t n, const Limits& limits, size_t reserve_bytes) {
  all_.reserve(n);
  // Producers: the initial fill, send, parse.
  free_ = std::make_unique<moodycamel::ConcurrentQueue<Request*, QueueTraits>>(n * 2, 3, 0);
  auto fill = MakeGiverToken();
  take_token_ = std::make_unique<moodycamel::ConsumerToken>(*free_);
  for (size_t i = 0; i < n; ++i) {
    auto r = std::make_unique<Request>(limits);
    // Reserved once so that a typical request never allocates on the data path.
    r->head_buf.reserve(reserve_bytes);
    r->body.reserve(reserve_bytes);
    r->wire.reserve(reserve_bytes);
    r->resp.body_storage.reserve(reserve_bytes);
    r->resp.headers.reserve(8);
    free_->enqueue(*fill, r.get());
    all_.push_back(std::move(r));
  }
}

Request* RequestPool::Take() {
  Request* r = nullptr;
  if (!free_->try_dequeue(*take_token_, r)) return nullptr;
  in_use_.fetch_add(1, std::memory_order_relaxed);
  return r;
}

void RequestPool::Give(Request* r, GiverToken& token) {
  r->Reset();
  in_use_.fetch_sub(1, std::memory_order_relaxed);
  bool ok = free_->try_enqueue(token, r);
  assert(ok && "request pool free list sized for every request");
  (void)ok;
}

const char* ReasonPhrase(int status) {
  switch (status) {
    case 100: return "Continue";
    case 200: return "OK";
    case 201: return "Created";
    case 202: return "Accepted";
    case 204: return "No Content";
    case 206: return "Partial Content";
    case 301: return "Moved Permanently";
    case 302: return "Found";
    case 303: return "See Other";
    case 304: return "Not Modified";
    case 307: return "Temporary Redirect";
    case 308: return "Permanent Redirect";
    case 400: return "Bad Request";
    case 401: return "Unauthorized";
    case 403: return "Forbidden";
    case 404: return "Not Found";
    case 405: return "Method Not Allowed";
    case 406: return "Not Acceptable";
    case 408: return "Request Timeout";
    case 409: return "Conflict";
    case 410: return "Gone";
    case 411: return "Length Required";
    case 413: return "Content Too Large";
    case 414: return "URI Too Long";
    case 415: return "Unsupported Media Type";
    case 417: return "Expectation Failed";
    case 418: return "I'm a teapot";
    case 422: return "Unprocessable Content";
    case 429: return "Too Many Requests";
    case 431: return "Request Header Fields Too Large";
    case 500: return "Internal Server Error";
    case 501: return "Not Implemented";
    case 502: return "Bad Gateway";
    case 503: return "Service Unavailable";
    case 504: return "Gateway Timeout";
    case 505: return "HTTP Version Not Supported";
    default: return status < 200 ? "Informational" : status < 300 ? "OK" : status < 400 ? "Redirect"
                   : status < 500 ? "Client Error" : "Server Error";
  }
}

}  // namespace metronome::http
