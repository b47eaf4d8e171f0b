// libFuzzer target for stages/http/parser: ParseRequestHead and ChunkedDecoder.
//
// Invariants checked (a violation aborts, which libFuzzer reports as a crash):
//   - consumed <= len; on kComplete every non-null view lies inside the buffer;
//   - on kError the status is one of 400/413/414/417/431/501/505 and keep_alive is false;
//   - the result is the same when the bytes arrive whole or in two parts (every split point of
//     the first kSplitsMax bytes, passing prev_len), and a prefix is never rejected unless the
//     whole input is, with the same status and reason;
//   - for a complete chunked head, the decoder gives the same status, body and consumed count
//     when the rest of the input is fed whole, in two parts (split at a data-derived point), and
//     one byte at a time (for short inputs).
// Every parse runs on an exact-size heap copy so AddressSanitizer sees any read past the end.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <string_view>

#include "stages/http/parser.h"

namespace {

using metronome::http::BodyKind;
using metronome::http::ChunkedDecoder;
using metronome::http::Limits;
using metronome::http::ParseError;
using metronome::http::ParseRequestHead;
using metronome::http::ParseStatus;
using metronome::http::RequestHead;

constexpr size_t kSplitsMax = 300;
constexpr size_t kByteAtATimeMax = 2048;

#define FUZZ_CHECK(cond)                                                          \
  do {                                                                            \
    if (!(cond)) {                                                                \
      std::fprintf(stderr, "%s:%d: check failed: %s\n", __FILE__, __LINE__, #cond); \
      std::abort();                                                               \
    }                                                                             \
  } while (0)

Limits SmallLimits() {
  Limits l;
  l.max_request_line_bytes = 200;
  l.max_header_bytes = 600;
  l.max_header_count = 12;
  l.max_body_bytes = 1000;
  return l;
}

struct Result {
  ParseStatus status;
  size_t consumed;
  int err_status;
  std::string err_reason;
};

// An exact-size heap copy of data[0, n).
std::unique_ptr<char[]> Copy(const uint8_t* data, size_t n) {
  std::unique_ptr<char[]> p(new char[n == 0 ? 1 : n]);
  if (n > 0) std::memcpy(p.get(), data, n);
  return p;
}

void CheckView(std::string_view v, const char* buf, size_t len) {
  if (v.data() == nullptr) {
    FUZZ_CHECK(v.empty());
    return;
  }
  auto b = reinterpret_cast<uintptr_t>(buf);
  auto p = reinterpret_cast<uintptr_t>(v.data());
  FUZZ_CHECK(p >= b && p + v.size() <= b + len);
}

// Views are compared by offset into their buffers.
void CheckSameView(std::string_view a, const char* abuf, std::string_view b, const char* bbuf) {
  FUZZ_CHECK((a.data() == nullptr) == (b.data() == nullptr));
  FUZZ_CHECK(a.size() == b.size());
  if (a.data() != nullptr) FUZZ_CHECK(a.data() - abuf == b.data() - bbuf);
}

void CheckSameHead(const RequestHead& a, const char* abuf, const RequestHead& b, const char* bbuf) {
  CheckSameView(a.method, abuf, b.method, bbuf);
  FUZZ_CHECK(a.method_id == b.method_id);
  CheckSameView(a.target, abuf, b.target, bbuf);
  CheckSameView(a.path, abuf, b.path, bbuf);
  CheckSameView(a.query, abuf, b.query, bbuf);
  FUZZ_CHECK(a.version_minor == b.version_minor);
  FUZZ_CHECK(a.num_headers == b.num_headers);
  for (size_t i = 0; i < a.num_headers; ++i) {
    CheckSameView(a.headers[i].name, abuf, b.headers[i].name, bbuf);
    CheckSameView(a.headers[i].value, abuf, b.headers[i].value, bbuf);
  }
  CheckSameView(a.host, abuf, b.host, bbuf);
  FUZZ_CHECK(a.body_kind == b.body_kind);
  FUZZ_CHECK(a.content_length == b.content_length);
  FUZZ_CHECK(a.keep_alive == b.keep_alive);
  FUZZ_CHECK(a.expect_continue == b.expect_continue);
}

Result Parse(const char* buf, size_t len, size_t prev_len, const Limits& limits, RequestHead* out) {
  size_t consumed = 12345;
  ParseError err;
  ParseStatus s = ParseRequestHead(buf, len, prev_len, limits, out, &consumed, &err);
  FUZZ_CHECK(consumed <= len);
  Result r{s, consumed, 0, ""};
  if (s == ParseStatus::kError) {
    FUZZ_CHECK(err.status == 400 || err.status == 413 || err.status == 414 || err.status == 417 ||
               err.status == 431 || err.status == 501 || err.status == 505);
    FUZZ_CHECK(err.reason != nullptr && err.reason[0] != '\0');
    FUZZ_CHECK(!out->keep_alive);
    r.err_status = err.status;
    r.err_reason = err.reason;
  } else if (s == ParseStatus::kComplete) {
    FUZZ_CHECK(consumed > 0);
    FUZZ_CHECK(out->num_headers <= limits.max_header_count);
    CheckView(out->method, buf, consumed);
    CheckView(out->target, buf, consumed);
    CheckView(out->path, buf, consumed);
    CheckView(out->query, buf, consumed);
    CheckView(out->host, buf, consumed);
    for (size_t i = 0; i < out->num_headers; ++i) {
      CheckView(out->headers[i].name, buf, consumed);
      CheckView(out->headers[i].value, buf, consumed);
      FUZZ_CHECK(!out->headers[i].name.empty());
    }
    FUZZ_CHECK(!out->method.empty() && !out->target.empty());
    FUZZ_CHECK(out->version_minor == 0 || out->version_minor == 1);
    if (out->body_kind == BodyKind::kContentLength) {
      FUZZ_CHECK(out->content_length <= limits.max_body_bytes);
    }
    FUZZ_CHECK(consumed - 0 <= limits.max_header_bytes + 2 * metronome::http::kLeadingEmptyLinesMax);
  } else {
    FUZZ_CHECK(consumed == 0);
  }
  return r;
}

void CheckSameResult(const Result& a, const Result& b) {
  FUZZ_CHECK(a.status == b.status);
  FUZZ_CHECK(a.consumed == b.consumed);
  FUZZ_CHECK(a.err_status == b.err_status);
  FUZZ_CHECK(a.err_reason == b.err_reason);
}

struct Decoded {
  ParseStatus status = ParseStatus::kIncomplete;
  int err_status = 0;
  size_t consumed = 0;  // total over all Feed calls, on kComplete
  std::string body;
};

// Feeds rest[0, n) to a fresh decoder in pieces of the given sizes (0 = the remainder), each piece
// in its own exact-size copy.
Decoded Decode(const uint8_t* rest, size_t n, const Limits& limits, size_t first_piece,
               size_t piece) {
  auto dec = std::make_unique<ChunkedDecoder>(limits);
  Decoded d;
  size_t pos = 0;
  bool first = true;
  while (pos < n || first) {
    size_t take = first ? first_piece : piece;
    if (take == 0 || take > n - pos) take = n - pos;
    first = false;
    auto buf = Copy(rest + pos, take);
    size_t consumed = 9999999;
    ParseError err;
    ParseStatus s = dec->Feed(buf.get(), take, &consumed, &err, [&](const char* p, size_t k) {
      auto b = reinterpret_cast<uintptr_t>(buf.get());
      auto q = reinterpret_cast<uintptr_t>(p);
      FUZZ_CHECK(k > 0 && q >= b && q + k <= b + take);
      d.body.append(p, k);
    });
    FUZZ_CHECK(consumed <= take);
    d.status = s;
    if (s == ParseStatus::kError) {
      FUZZ_CHECK(err.status == 400 || err.status == 413 || err.status == 431);
      d.err_status = err.status;
      break;
    }
    FUZZ_CHECK(d.body.size() == dec->body_bytes());
    FUZZ_CHECK(dec->body_bytes() <= limits.max_body_bytes);
    if (s == ParseStatus::kComplete) {
      d.consumed = pos + consumed;
      break;
    }
    FUZZ_CHECK(consumed == take);
    pos += take;
    if (take == 0) break;
  }
  return d;
}

void CheckSameDecoded(const Decoded& a, const Decoded& b) {
  FUZZ_CHECK(a.status == b.status);
  FUZZ_CHECK(a.err_status == b.err_status);
  if (a.status == ParseStatus::kComplete) FUZZ_CHECK(a.consumed == b.consumed);
  if (a.status != ParseStatus::kError) FUZZ_CHECK(a.body == b.body);
}

RequestHead g_whole;
RequestHead g_part;

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const Limits limits = SmallLimits();
  auto whole = Copy(data, size);
  const Result r = Parse(whole.get(), size, 0, limits, &g_whole);

  // Two parts: prefix [0, k) first, then the whole buffer with prev_len = k.
  const size_t splits = size < kSplitsMax ? size : kSplitsMax;
  for (size_t k = 0; k <= splits; ++k) {
    auto prefix = Copy(data, k);
    Result r1 = Parse(prefix.get(), k, 0, limits, &g_part);
    if (r1.status == ParseStatus::kIncomplete) {
      Result r2 = Parse(whole.get(), size, k, limits, &g_part);
      CheckSameResult(r, r2);
      if (r.status == ParseStatus::kComplete) CheckSameHead(g_whole, whole.get(), g_part, whole.get());
    } else if (r1.status == ParseStatus::kError) {
      // An early rejection must agree with the verdict on the whole input.
      CheckSameResult(r, r1);
    } else {
      CheckSameResult(r, r1);
      CheckSameHead(g_whole, whole.get(), g_part, prefix.get());
    }
  }

  if (r.status != ParseStatus::kComplete) return 0;

  // Rebase onto a copy of the head.
  {
    auto copy = Copy(data, r.consumed);
    static RequestHead rebased;
    rebased = g_whole;
    rebased.Rebase(whole.get(), copy.get());
    CheckSameHead(g_whole, whole.get(), rebased, copy.get());
    for (size_t i = 0; i < rebased.num_headers; ++i) {
      FUZZ_CHECK(rebased.headers[i].value == g_whole.headers[i].value);
    }
  }

  if (g_whole.body_kind != BodyKind::kChunked) return 0;
  const uint8_t* rest = data + r.consumed;
  const size_t n = size - r.consumed;
  Decoded all = Decode(rest, n, limits, 0, 0);
  size_t cut = n == 0 ? 0 : (static_cast<size_t>(rest[0]) * 131 + n / 2) % (n + 1);
  if (cut == 0) cut = 1;
  CheckSameDecoded(all, Decode(rest, n, limits, cut, 0));
  if (n <= kByteAtATimeMax) CheckSameDecoded(all, Decode(rest, n, limits, 1, 1));
  return 0;
}
