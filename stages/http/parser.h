// A strict HTTP/1.1 request parser (RFC 9112), zero-copy and incremental.
//
// Shape (after picohttpparser, h2o's parser): ParseRequestHead is stateless. The caller hands it
// the bytes received so far for the current request; it answers kIncomplete, kError (with the
// status to send), or kComplete with the number of bytes the head used, and fills `out` with
// views into the caller's buffer. When more bytes arrive the caller calls it again on the
// longer buffer (passing the previous length lets it skip re-scanning for the end of the head).
// Bodies are framed by the caller from out->body_kind: Content-Length bytes, or ChunkedDecoder.
//
// Strictness (each rejection is a test in tests/stages/http/parser_test.cc):
//   - CR LF line endings only: a bare CR or a bare LF is 400; NUL anywhere in the head is 400.
//   - method must be a token (400); request-target must be origin-form ("/..."), absolute-form
//     ("http://host/..."), "*" for OPTIONS, or authority-form for CONNECT; no CTL or SP (400).
//   - version "HTTP/1.0" or "HTTP/1.1" (other 1.x minors are treated as 1.1); "HTTP/2.0" etc.
//     is 505; anything not of the form HTTP/d.d is 400.
//   - field names are tokens; whitespace between name and colon is 400; obs-fold is 400; field
//     values may hold VCHAR, SP, HTAB and obs-text only (400).
//   - Content-Length: 1*DIGIT only ("+5", "0x5", " 5 5", "", overflow: 400); a second
//     Content-Length header, or a list value, is 400 even when equal.
//   - Transfer-Encoding: "chunked" must be the last coding (else 400); any coding other than
//     chunked is 501; Transfer-Encoding with Content-Length is 400; Transfer-Encoding in
//     HTTP/1.0 is 400.
//   - Host: exactly one in HTTP/1.1 (missing or repeated: 400).
//   - Expect: "100-continue" sets expect_continue; any other expectation is 417.
//   - Limits (Limits below): request line > max_request_line_bytes is 414; the head (request
//     line + fields) > max_header_bytes or more than max_header_count fields is 431;
//     Content-Length > max_body_bytes is 413.
//   - Up to kLeadingEmptyLinesMax empty lines before the request line are skipped (RFC 9112
//     2.2); more is 400.
// Every kError sets close=true: after a framing error the connection cannot be trusted.
//
// Thread-safety: ParseRequestHead is a pure function; a ChunkedDecoder belongs to one caller.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string_view>

namespace metronome::http {

inline constexpr size_t kHeaderCountMax = 256;      // hard cap for Limits::max_header_count
inline constexpr int kLeadingEmptyLinesMax = 4;
inline constexpr size_t kChunkLineBytesMax = 4096;  // chunk-size line incl. extensions (400 past it)

struct Limits {
  size_t max_request_line_bytes = 8 * 1024;
  size_t max_header_bytes = 16 * 1024;   // request line + header fields + final CRLF
  size_t max_header_count = 100;         // <= kHeaderCountMax
  uint64_t max_body_bytes = 1 << 20;
};

enum class Method : uint8_t { kGet, kHead, kPost, kPut, kDelete, kPatch, kOptions, kTrace, kConnect, kOther };

enum class BodyKind : uint8_t { kNone, kContentLength, kChunked };

struct Header {
  std::string_view name;   // as received (compare case-insensitively)
  std::string_view value;  // leading/trailing OWS trimmed
};

struct RequestHead {
  std::string_view method;
  Method method_id = Method::kOther;
  std::string_view target;   // the raw request-target
  std::string_view path;     // for absolute-form, the path part; "" for "*" and authority-form
  std::string_view query;    // after '?', without it; empty if none
  int version_minor = 1;     // 0 or 1
  Header headers[kHeaderCountMax];
  size_t num_headers = 0;
  std::string_view host;     // the Host field's value ("" in HTTP/1.0 without one)
  BodyKind body_kind = BodyKind::kNone;
  uint64_t content_length = 0;  // for kContentLength
  bool keep_alive = true;    // from the version and the Connection field
  bool expect_continue = false;

  // The value of the first field named `name` (case-insensitive), or nullptr.
  const std::string_view* Find(std::string_view name) const;
  // Moves every view from [old_base, old_base + len) to the same offsets in new_base (after the
  // caller copied the head bytes elsewhere).
  void Rebase(const char* old_base, const char* new_base);
};

enum class ParseStatus : uint8_t { kComplete, kIncomplete, kError };

struct ParseError {
  int status = 400;            // 400, 413, 414, 417, 431, 501 or 505
  const char* reason = "";     // a short static explanation, for logs and the response body
};

// Parses the head of one request from buf[0, len). `prev_len` is the length of the same buffer at
// the previous call that returned kIncomplete (0 on the first call).
// On kComplete, *consumed is the head's length (the body, if any, starts at buf + *consumed).
ParseStatus ParseRequestHead(const char* buf, size_t len, size_t prev_len, const Limits& limits,
                             RequestHead* out, size_t* consumed, ParseError* err);

// Decodes a chunked body incrementally (RFC 9112 7.1): chunk-size in hex with optional
// extensions (ignored), data, CRLF; a last chunk "0"; optional trailer fields (validated like
// header fields, bounded by max_header_bytes and max_header_count, then ignored); final CRLF.
//   chunk-size overflow, non-hex digits, missing CRLF after data, bad trailers: 400.
//   total decoded bytes > max_body_bytes: 413.
class ChunkedDecoder {
 public:
  explicit ChunkedDecoder(const Limits& limits) : limits_(&limits) {}
  void Reset();

  // Consumes input from in[0, len). For each run of body data, calls sink(data, n) (views into
  // `in`, valid during the call only). Returns kComplete once the final CRLF after the trailers
  // was consumed (*consumed then excludes any following bytes: the next pipelined request),
  // kIncomplete when it needs more input (*consumed == len: the decoder keeps partial lines
  // itself, up to kChunkLineBytesMax / max_header_bytes), or kError.
  template <typename Sink>
  ParseStatus Feed(const char* in, size_t len, size_t* consumed, ParseError* err, Sink&& sink);

  uint64_t body_bytes() const { return body_bytes_; }

 private:
  // Non-template core: processes up to one state transition; data runs are reported through
  // *data/*data_len.
  ParseStatus Step(const char* in, size_t len, size_t* used, const char** data, size_t* data_len,
                   ParseError* err);

  enum class State : uint8_t { kSize, kData, kDataCr, kDataLf, kTrailers, kDone };
  const Limits* limits_;
  State state_ = State::kSize;
  uint64_t chunk_left_ = 0;
  uint64_t body_bytes_ = 0;
  // A partial chunk-size line or trailer section, kept across Feed calls.
  char line_[kChunkLineBytesMax];
  size_t line_len_ = 0;
  size_t trailer_bytes_ = 0;
  size_t trailer_count_ = 0;
};

template <typename Sink>
ParseStatus ChunkedDecoder::Feed(const char* in, size_t len, size_t* consumed, ParseError* err,
                                 Sink&& sink) {
  size_t pos = 0;
  while (pos < len || state_ == State::kDone) {
    if (state_ == State::kDone) {
      *consumed = pos;
      return ParseStatus::kComplete;
    }
    size_t used = 0;
    const char* data = nullptr;
    size_t data_len = 0;
    ParseStatus s = Step(in + pos, len - pos, &used, &data, &data_len, err);
    if (s == ParseStatus::kError) {
      *consumed = pos;
      return s;
    }
    if (data_len > 0) sink(data, data_len);
    pos += used;
    if (s == ParseStatus::kComplete) {
      *consumed = pos;
      return s;
    }
    if (used == 0) break;
  }
  *consumed = pos;
  return state_ == State::kDone ? ParseStatus::kComplete : ParseStatus::kIncomplete;
}

// Case-insensitive ASCII comparison of a field name or token.
bool EqualsIgnoreCase(std::string_view a, std::string_view b);

}  // namespace metronome::http
