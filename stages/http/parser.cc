// Strict HTTP/1.1 request head parser and chunked body decoder; see parser.h for the rules.
//
// How ParseRequestHead is organised:
//   1. Up to kLeadingEmptyLinesMax CRLFs before the request line are skipped.
//   2. The end of the head (the first empty line) is searched with memchr on '\n', restarting at
//      prev_len, and only within the first max_header_bytes bytes of the head. Every LF met on the
//      way must follow a CR. (Fast path: on a first call with a buffer that ends in LF, step 4 is
//      tried directly, with that LF as the sentinel; if it fails, steps 2-4 run as usual.)
//   3. Incomplete: the bytes seen so far are checked for "lexical" errors (NUL, bare CR, bare LF,
//      request line or head already over its limit), so a slow client cannot park junk.
//   4. Complete: one pass over the head parses and validates the request line and every field,
//      with no bounds checks in the inner loops: CR is in no character class, and the head ends
//      in CRLF CRLF, so every scan stops in time.
//
// Errors are deterministic whatever way the bytes arrive: a lexical error is reported at the
// byte where it first becomes visible, and when the complete head fails the semantic pass the
// lexical check (FindLexicalError) runs over the whole head and, if it finds anything, its answer
// wins. So the earliest lexical error in a head is reported both when the head arrives whole and
// when it arrives in pieces, and a prefix is never rejected unless the whole head would be (with
// the same status and reason).
//
// Length conventions (exactly-at-limit is accepted, one byte more is not):
//   request line: method SP target SP version CRLF, CRLF included, <= max_request_line_bytes;
//   head: request line through the final CRLF, leading empty lines excluded, <= max_header_bytes;
//   chunk-size line incl. extensions and CRLF <= kChunkLineBytesMax;
//   trailer section (fields and the final CRLF) <= max_header_bytes, 431 past it (as for heads).
#include "stages/http/parser.h"

#include <cassert>

#include <algorithm>
#include <array>
#include <cstring>
#include <limits>

namespace metronome::http {
namespace {

// Character classes (bit flags in one 256-entry table).
constexpr uint8_t kTchar = 1;    // token character (RFC 9110 5.6.2)
constexpr uint8_t kVchar = 2;    // VCHAR: allowed in request-target
constexpr uint8_t kFvalue = 4;   // field-value byte: VCHAR, SP, HTAB, obs-text
constexpr uint8_t kHostc = 8;    // Host / authority: unreserved, pct, sub-delims, ':', '[', ']'
constexpr uint8_t kHexc = 16;    // HEXDIG
constexpr uint8_t kQdtext = 32;  // qdtext (RFC 9110 5.6.4)

constexpr std::array<uint8_t, 256> MakeClasses() {
  std::array<uint8_t, 256> t{};
  for (int c = 0; c < 256; ++c) {
    uint8_t f = 0;
    bool alpha = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z');
    bool digit = c >= '0' && c <= '9';
    bool vchar = c >= 0x21 && c <= 0x7e;
    if (alpha || digit) f |= kTchar;
    for (char s : std::string_view("!#$%&'*+-.^_`|~")) {
      if (c == static_cast<unsigned char>(s)) f |= kTchar;
    }
    if (vchar) f |= kVchar;
    if (vchar || c == ' ' || c == '\t' || c >= 0x80) f |= kFvalue;
    if (alpha || digit) f |= kHostc;
    for (char s : std::string_view("-._~%!$&'()*+,;=:[]")) {
      if (c == static_cast<unsigned char>(s)) f |= kHostc;
    }
    if (digit || (c >= 'a' && c <= 'f') || (c >= 'A' && c <= 'F')) f |= kHexc;
    if (c == '\t' || c == ' ' || c == 0x21 || (c >= 0x23 && c <= 0x5b) || (c >= 0x5d && c <= 0x7e) ||
        c >= 0x80) {
      f |= kQdtext;
    }
    t[static_cast<size_t>(c)] = f;
  }
  return t;
}

constexpr std::array<uint8_t, 256> kClass = MakeClasses();

constexpr std::array<char, 256> MakeLower() {
  std::array<char, 256> t{};
  for (int c = 0; c < 256; ++c) {
    int l = (c >= 'A' && c <= 'Z') ? c + ('a' - 'A') : c;
    t[static_cast<size_t>(c)] = static_cast<char>(static_cast<unsigned char>(l));
  }
  return t;
}

constexpr std::array<char, 256> kLower = MakeLower();

// Word-at-a-time helpers (8 bytes): a fast path that only ever skips bytes that are certainly
// valid; anything unusual (HTAB, a CTL, the CR at the end) falls back to the byte loop.
constexpr uint64_t kOnes = 0x0101010101010101ULL;
constexpr uint64_t kHighs = 0x8080808080808080ULL;
inline uint64_t Load8(const char* p) {
  uint64_t x;
  std::memcpy(&x, p, sizeof x);
  return x;
}
inline uint32_t Load4(const char* p) {
  uint32_t x;
  std::memcpy(&x, p, sizeof x);
  return x;
}
// Whether some byte of x is < n (n <= 128).
inline bool HasLess(uint64_t x, uint8_t n) { return ((x - kOnes * n) & ~x & kHighs) != 0; }
inline bool HasZero(uint64_t x) { return ((x - kOnes) & ~x & kHighs) != 0; }
// 8 bytes of VCHAR / obs-text / SP: no CTL (< 0x20 or DEL).
inline bool AllFieldBytes(uint64_t x) { return !HasLess(x, 0x20) && !HasZero(x ^ (kOnes * 0x7f)); }
// 8 bytes of VCHAR (0x21..0x7e).
inline bool AllVchar(uint64_t x) {
  return (x & kHighs) == 0 && !HasLess(x, 0x21) && !HasZero(x ^ (kOnes * 0x7f));
}

inline bool Is(char c, uint8_t cls) { return (kClass[static_cast<unsigned char>(c)] & cls) != 0; }

// Skips the bytes of class `cls` from p (4 at a time while at least 4 remain before e, then one by
// one: the caller guarantees a byte outside the class before e).
inline const char* Skip(const char* p, const char* e, uint8_t cls) {
  while (e - p >= 4) {
    const uint8_t m = kClass[static_cast<unsigned char>(p[0])] & kClass[static_cast<unsigned char>(p[1])] &
                      kClass[static_cast<unsigned char>(p[2])] & kClass[static_cast<unsigned char>(p[3])];
    if ((m & cls) == 0) break;
    p += 4;
  }
  while (Is(*p, cls)) ++p;
  return p;
}
inline bool IsWs(char c) { return c == ' ' || c == '\t'; }

// Compares s with a literal made of lower-case letters, digits, '-', ':' and '/' only. `c | 0x20`
// folds case; it would also map some CTLs (0x00-0x1F) onto digits or those punctuation marks, but
// s is always validated text (tokens, field values, targets) that holds no CTL.
// Word-wise: those literal characters already have bit 5 set, so OR-ing whole words is exact.
inline bool EqualsLower(std::string_view s, std::string_view lower) {
  const size_t n = s.size();
  if (n != lower.size()) return false;
  const char* a = s.data();
  const char* b = lower.data();
  if (n >= 8) {
    for (size_t i = 0; i + 8 <= n; i += 8) {
      if ((Load8(a + i) | (kOnes * 0x20)) != Load8(b + i)) return false;
    }
    return (Load8(a + n - 8) | (kOnes * 0x20)) == Load8(b + n - 8);
  }
  if (n >= 4) {
    return ((Load4(a) | 0x20202020u) == Load4(b)) && ((Load4(a + n - 4) | 0x20202020u) == Load4(b + n - 4));
  }
  for (size_t i = 0; i < n; ++i) {
    if ((a[i] | 0x20) != b[i]) return false;
  }
  return true;
}

inline std::string_view TrimOws(std::string_view s) {
  while (!s.empty() && IsWs(s.front())) s.remove_prefix(1);
  while (!s.empty() && IsWs(s.back())) s.remove_suffix(1);
  return s;
}

inline bool IsToken(std::string_view s) {
  if (s.empty()) return false;
  for (char c : s) {
    if (!Is(c, kTchar)) return false;
  }
  return true;
}

Method MethodIdOf(std::string_view m) {
  switch (m.size()) {
    case 3:
      if (m == "GET") return Method::kGet;
      if (m == "PUT") return Method::kPut;
      break;
    case 4:
      if (m == "HEAD") return Method::kHead;
      if (m == "POST") return Method::kPost;
      break;
    case 5:
      if (m == "PATCH") return Method::kPatch;
      if (m == "TRACE") return Method::kTrace;
      break;
    case 6:
      if (m == "DELETE") return Method::kDelete;
      break;
    case 7:
      if (m == "OPTIONS") return Method::kOptions;
      if (m == "CONNECT") return Method::kConnect;
      break;
    default:
      break;
  }
  return Method::kOther;
}

inline bool Fail(ParseError* err, int status, const char* reason) {
  err->status = status;
  err->reason = reason;
  return false;
}

// The lexical errors visible in buf[start, end), checked from `from` on (the bytes in
// [start, from) are known to be clean, except that the limits are always rechecked). A CR as the
// very last visible byte is pending, not an error. Among several, the one detectable earliest
// (at the smallest prefix length) wins; ties go to the limits, then to the leftmost byte.
// Returns true and fills *err when there is one.
bool FindLexicalError(const char* buf, size_t end, size_t start, size_t from, const Limits& limits,
                      ParseError* err) {
  size_t best = std::numeric_limits<size_t>::max();
  int status = 0;
  const char* reason = "";
  const size_t rl = limits.max_request_line_bytes;
  const size_t hb = limits.max_header_bytes;
  // Request line over its limit: max_request_line_bytes bytes seen and none of them is an LF.
  if (rl < end - start && std::memchr(buf + start, '\n', rl) == nullptr) {
    best = start + rl;
    status = 414;
    reason = "request line too long";
  }
  // Head over its limit: one byte more than max_header_bytes seen without the end of the head
  // (the caller only gets here for a complete head if it is within the limit).
  if (hb < end - start && start + hb < best) {
    best = start + hb;
    status = 431;
    reason = "request header section too large";
  }
  size_t stop = std::min(end, best);
  for (size_t i = std::max(from, start); i < stop; ++i) {
    // Skip words without NUL, LF or CR (all < 0x0e).
    while (stop - i >= 8 && !HasLess(Load8(buf + i), 0x0e)) i += 8;
    if (i == stop) break;
    char c = buf[i];
    if (c == '\0') {
      Fail(err, 400, "NUL byte in request head");
      return true;
    }
    if (c == '\n' && (i == 0 || buf[i - 1] != '\r')) {
      Fail(err, 400, "bare LF in request head");
      return true;
    }
    if (c == '\r' && i + 1 < end && buf[i + 1] != '\n') {
      // Detectable one byte later: a limit exactly there wins the tie.
      if (i + 1 >= best) break;
      Fail(err, 400, "bare CR in request head");
      return true;
    }
  }
  if (status == 0) return false;
  Fail(err, status, reason);
  return true;
}

// Parses an absolute-form target "http://authority[/path][?query]" (scheme case-insensitive,
// http or https, no userinfo). Sets path ("/" when the URI has none: a view of the '/' in "//")
// and query.
bool ParseAbsoluteForm(std::string_view t, RequestHead* out, ParseError* err) {
  size_t scheme = 0;
  if (t.size() > 7 && EqualsLower(t.substr(0, 7), "http://")) {
    scheme = 7;
  } else if (t.size() > 8 && EqualsLower(t.substr(0, 8), "https://")) {
    scheme = 8;
  } else {
    return Fail(err, 400, "invalid request-target");
  }
  size_t i = scheme;
  while (i < t.size() && t[i] != '/' && t[i] != '?') {
    if (!Is(t[i], kHostc)) return Fail(err, 400, "invalid authority in request-target");
    ++i;
  }
  if (i == scheme) return Fail(err, 400, "empty authority in request-target");
  size_t q = t.find('?', i);
  if (q == std::string_view::npos) {
    out->query = {};
    q = t.size();
  } else {
    out->query = t.substr(q + 1);
  }
  if (i < t.size() && t[i] == '/') {
    out->path = t.substr(i, q - i);
  } else {
    out->path = t.substr(scheme - 1, 1);  // the second '/' of "://"
  }
  return true;
}

// authority-form for CONNECT: host ":" port, port 1*DIGIT.
bool ParseAuthorityForm(std::string_view t, ParseError* err) {
  size_t colon = t.rfind(':');
  if (colon == std::string_view::npos || colon == 0 || colon + 1 == t.size()) {
    return Fail(err, 400, "CONNECT target must be host:port");
  }
  for (size_t i = 0; i < colon; ++i) {
    if (!Is(t[i], kHostc) || t[i] == '@') return Fail(err, 400, "invalid CONNECT target");
  }
  for (size_t i = colon + 1; i < t.size(); ++i) {
    if (t[i] < '0' || t[i] > '9') return Fail(err, 400, "invalid port in CONNECT target");
  }
  return true;
}

bool ParseTarget(std::string_view t, RequestHead* out, ParseError* err) {
  out->path = {};
  out->query = {};
  if (out->method_id == Method::kConnect) return ParseAuthorityForm(t, err);
  if (t[0] == '/') {
    size_t q = t.find('?');
    if (q == std::string_view::npos) {
      out->path = t;
    } else {
      out->path = t.substr(0, q);
      out->query = t.substr(q + 1);
    }
    return true;
  }
  if (t.size() == 1 && t[0] == '*') {
    if (out->method_id != Method::kOptions) return Fail(err, 400, "'*' target is only for OPTIONS");
    return true;
  }
  if (t.find('@') != std::string_view::npos) return Fail(err, 400, "userinfo in request-target");
  return ParseAbsoluteForm(t, out, err);
}

// Cross-field state gathered while the fields are parsed.
struct FieldState {
  bool host_seen = false;
  bool cl_seen = false;
  bool te_seen = false;
  bool te_chunked = false;          // chunked seen
  bool te_after_chunked = false;    // a coding after chunked
  bool te_chunked_twice = false;
  bool te_unknown = false;          // a coding other than chunked
  bool conn_close = false;
  bool conn_keep_alive = false;
  bool expect_bad = false;
  bool expect_continue = false;
};

bool OnContentLength(std::string_view v, RequestHead* out, FieldState* st, ParseError* err) {
  if (st->cl_seen) return Fail(err, 400, "more than one Content-Length");
  st->cl_seen = true;
  if (v.empty()) return Fail(err, 400, "empty Content-Length");
  uint64_t n = 0;
  for (char c : v) {
    if (c < '0' || c > '9') return Fail(err, 400, "invalid Content-Length");
    auto d = static_cast<uint64_t>(c - '0');
    if (n > (std::numeric_limits<uint64_t>::max() - d) / 10) {
      return Fail(err, 400, "Content-Length overflow");
    }
    n = n * 10 + d;
  }
  out->content_length = n;
  return true;
}

bool OnTransferEncoding(std::string_view v, FieldState* st, ParseError* err) {
  st->te_seen = true;
  size_t i = 0;
  for (;;) {
    size_t comma = v.find(',', i);
    std::string_view elem = TrimOws(v.substr(i, comma == std::string_view::npos ? v.npos : comma - i));
    if (!IsToken(elem)) return Fail(err, 400, "invalid Transfer-Encoding");
    if (st->te_chunked) st->te_after_chunked = true;
    if (EqualsLower(elem, "chunked")) {
      if (st->te_chunked) st->te_chunked_twice = true;
      st->te_chunked = true;
    } else {
      st->te_unknown = true;
    }
    if (comma == std::string_view::npos) break;
    i = comma + 1;
  }
  return true;
}

bool OnConnection(std::string_view v, FieldState* st, ParseError* err) {
  size_t i = 0;
  for (;;) {
    size_t comma = v.find(',', i);
    std::string_view elem = TrimOws(v.substr(i, comma == std::string_view::npos ? v.npos : comma - i));
    if (!elem.empty()) {
      if (!IsToken(elem)) return Fail(err, 400, "invalid Connection");
      if (EqualsLower(elem, "close")) {
        st->conn_close = true;
      } else if (EqualsLower(elem, "keep-alive")) {
        st->conn_keep_alive = true;
      }
    }
    if (comma == std::string_view::npos) break;
    i = comma + 1;
  }
  return true;
}

// Dispatches the fields the parser interprets. `name` is a non-empty token.
inline bool OnField(std::string_view name, std::string_view value, RequestHead* out, FieldState* st,
                    ParseError* err) {
  switch (name.size()) {
    case 4:
      if (EqualsLower(name, "host")) {
        if (st->host_seen) return Fail(err, 400, "more than one Host");
        st->host_seen = true;
        for (char c : value) {
          if (!Is(c, kHostc)) return Fail(err, 400, "invalid Host");
        }
        out->host = value;
      }
      break;
    case 6:
      if (EqualsLower(name, "expect")) {
        if (EqualsLower(value, "100-continue")) {
          st->expect_continue = true;
        } else {
          st->expect_bad = true;
        }
      }
      break;
    case 10:
      if (EqualsLower(name, "connection")) return OnConnection(value, st, err);
      break;
    case 14:
      if (EqualsLower(name, "content-length")) return OnContentLength(value, out, st, err);
      break;
    case 17:
      if (EqualsLower(name, "transfer-encoding")) return OnTransferEncoding(value, st, err);
      break;
    default:
      break;
  }
  return true;
}

// The semantic pass over the head starting at buf[start]. buf[end - 1] must be an LF: every scan
// stops at the CR or LF that ends its line (neither is in any character class), so the scans
// need no bounds checks. On success *head_end is the offset just past the empty line that ends
// the head. Two callers: with `end` the end of the head found by the search (then *head_end ==
// end), or optimistically with `end` the end of a buffer that ends in LF, where the head may end
// sooner or not at all (a failure then only means "take the general path").
bool ParseHead(const char* buf, size_t start, size_t end, const Limits& limits, RequestHead* out,
               ParseError* err, size_t* head_end) {
  const char* p = buf + start;
  const char* const e = buf + end;

  // method SP
  const char* m = p;
  p = Skip(p, e, kTchar);
  if (p == m || *p != ' ') return Fail(err, 400, "invalid method");
  out->method = std::string_view(m, static_cast<size_t>(p - m));
  out->method_id = MethodIdOf(out->method);
  ++p;

  // request-target SP
  const char* t = p;
  while (e - p >= 8 && AllVchar(Load8(p))) p += 8;
  while (Is(*p, kVchar)) ++p;
  if (p == t || *p != ' ') return Fail(err, 400, "invalid request-target");
  out->target = std::string_view(t, static_cast<size_t>(p - t));
  ++p;

  // HTTP-version CRLF. Byte by byte: the first mismatch stops before the end of the head.
  if (p[0] != 'H' || p[1] != 'T' || p[2] != 'T' || p[3] != 'P' || p[4] != '/' || p[5] < '0' ||
      p[5] > '9' || p[6] != '.' || p[7] < '0' || p[7] > '9' || p[8] != '\r' || p[9] != '\n') {
    return Fail(err, 400, "invalid HTTP version");
  }
  p += 10;
  if (static_cast<size_t>(p - (buf + start)) > limits.max_request_line_bytes) {
    return Fail(err, 414, "request line too long");
  }
  const char major = p[-5];
  if (major != '1') return Fail(err, 505, "HTTP version not supported");
  out->version_minor = p[-3] == '0' ? 0 : 1;

  if (!ParseTarget(out->target, out, err)) return false;

  // field-line CRLF ... CRLF
  const size_t max_count = std::min(limits.max_header_count, kHeaderCountMax);
  FieldState st;
  size_t n = 0;
  for (;;) {
    if (p == e) return Fail(err, 400, "malformed request head");  // only in optimistic mode
    if (*p == '\r') {
      if (p[1] != '\n') return Fail(err, 400, "bare CR in request head");
      p += 2;
      break;
    }
    const char* name = p;
    p = Skip(p, e, kTchar);
    if (*p != ':' || p == name) {
      if (p == name && IsWs(*p)) return Fail(err, 400, "obs-fold or whitespace before a field");
      if (IsWs(*p)) return Fail(err, 400, "whitespace between field name and colon");
      return Fail(err, 400, "invalid field name");
    }
    const auto name_len = static_cast<size_t>(p - name);
    ++p;
    while (IsWs(*p)) ++p;
    const char* v = p;
    while (e - p >= 8 && AllFieldBytes(Load8(p))) p += 8;
    p = Skip(p, e, kFvalue);
    if (*p != '\r' || p[1] != '\n') return Fail(err, 400, "invalid character in field value");
    const char* ve = p;
    while (ve > v && IsWs(ve[-1])) --ve;
    p += 2;
    if (n == max_count) return Fail(err, 431, "too many header fields");
    Header& h = out->headers[n++];
    h.name = std::string_view(name, name_len);
    h.value = std::string_view(v, static_cast<size_t>(ve - v));
    if (!OnField(h.name, h.value, out, &st, err)) {
      out->num_headers = n;
      return false;
    }
  }
  out->num_headers = n;
  *head_end = static_cast<size_t>(p - buf);

  // Framing and cross-field rules.
  const bool v11 = out->version_minor == 1;
  if (st.te_seen) {
    if (!v11) return Fail(err, 400, "Transfer-Encoding in HTTP/1.0");
    if (st.cl_seen) return Fail(err, 400, "both Transfer-Encoding and Content-Length");
  }
  if (v11 && !st.host_seen) return Fail(err, 400, "missing Host");
  if (st.te_seen) {
    if (st.te_chunked_twice) return Fail(err, 400, "chunked applied twice");
    if (st.te_chunked && st.te_after_chunked) return Fail(err, 400, "chunked is not the last coding");
    if (st.te_unknown) return Fail(err, 501, "unsupported transfer coding");
    out->body_kind = BodyKind::kChunked;
  } else if (st.cl_seen) {
    if (out->content_length > limits.max_body_bytes) return Fail(err, 413, "body too large");
    out->body_kind = BodyKind::kContentLength;
  }
  if (st.expect_bad) return Fail(err, 417, "unsupported expectation");
  out->expect_continue = v11 && st.expect_continue;
  out->keep_alive = !st.conn_close && (v11 || st.conn_keep_alive);
  return true;
}

void ResetHead(RequestHead* out) {
  out->method = {};
  out->method_id = Method::kOther;
  out->target = {};
  out->path = {};
  out->query = {};
  out->version_minor = 1;
  out->num_headers = 0;
  out->host = {};
  out->body_kind = BodyKind::kNone;
  out->content_length = 0;
  out->keep_alive = true;
  out->expect_continue = false;
}

inline ParseStatus Error(RequestHead* out, ParseError* err, int status, const char* reason) {
  err->status = status;
  err->reason = reason;
  out->keep_alive = false;
  return ParseStatus::kError;
}

}  // namespace

bool EqualsIgnoreCase(std::string_view a, std::string_view b) {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); ++i) {
    if (kLower[static_cast<unsigned char>(a[i])] != kLower[static_cast<unsigned char>(b[i])]) {
      return false;
    }
  }
  return true;
}

const std::string_view* RequestHead::Find(std::string_view name) const {
  for (size_t i = 0; i < num_headers; ++i) {
    if (EqualsIgnoreCase(headers[i].name, name)) return &headers[i].value;
  }
  return nullptr;
}

void RequestHead::Rebase(const char* old_base, const char* new_base) {
  // Integer arithmetic: the views point into the old buffer, but old_base and new_base are
  // unrelated objects. Null views (absent parts) stay null.
  const auto from = reinterpret_cast<uintptr_t>(old_base);
  const auto to = reinterpret_cast<uintptr_t>(new_base);
  auto shift = [from, to](std::string_view& v) {
    if (v.data() == nullptr) return;
    uintptr_t at = reinterpret_cast<uintptr_t>(v.data()) - from + to;
    v = std::string_view(reinterpret_cast<const char*>(at), v.size());
  };
  shift(method);
  shift(target);
  shift(path);
  shift(query);
  shift(host);
  for (size_t i = 0; i < num_headers; ++i) {
    shift(headers[i].name);
    shift(headers[i].value);
  }
}

ParseStatus ParseRequestHead(const char* buf, size_t len, size_t prev_len, const Limits& limits,
                             RequestHead* out, size_t* consumed, ParseError* err) {
  *consumed = 0;
  // 1. Leading empty lines.
  size_t start = 0;
  for (int empty = 0;; ++empty) {
    if (start >= len) return ParseStatus::kIncomplete;
    char c = buf[start];
    if (c != '\r' && c != '\n') break;
    if (empty == kLeadingEmptyLinesMax) {
      return Error(out, err, 400, "too many empty lines before the request line");
    }
    if (c == '\n') return Error(out, err, 400, "bare LF in request head");
    if (start + 1 == len) return ParseStatus::kIncomplete;
    if (buf[start + 1] != '\n') return Error(out, err, 400, "bare CR in request head");
    start += 2;
  }

  // Fast path for the common case, a buffer holding whole requests: when it ends in LF, parse
  // optimistically with that LF as the sentinel and skip the search for the end of the head.
  // Only on a first call (prev_len 0), so that a client sending line by line does not make every
  // call rescan the whole buffer. Any failure falls through to the general path, which is the
  // only one that reports errors.
  const size_t hb = limits.max_header_bytes;
  if (prev_len == 0 && buf[len - 1] == '\n') {
    size_t head_end = 0;
    ResetHead(out);
    if (ParseHead(buf, start, len, limits, out, err, &head_end) && head_end - start <= hb) {
      *consumed = head_end;
      return ParseStatus::kComplete;
    }
  }

  // 2. The end of the head: the first LF preceded by CR LF CR. LFs before prev_len were checked
  // by the previous call; a final LF can only be at prev_len or later.
  const size_t search_end = len - start > hb ? start + hb : len;
  prev_len = std::min(prev_len, len);
  const char* p = buf + std::max(start, prev_len);
  const char* const lim = buf + search_end;
  size_t end = 0;
  while (p < lim) {
    const char* lf = static_cast<const char*>(std::memchr(p, '\n', static_cast<size_t>(lim - p)));
    if (lf == nullptr) break;
    const auto i = static_cast<size_t>(lf - buf);
    if (i < start + 2 || lf[-1] != '\r') {
      // A bare LF: report the earliest lexical error (there is one, at i at the latest).
      FindLexicalError(buf, len, start, start, limits, err);
      out->keep_alive = false;
      return ParseStatus::kError;
    }
    if (lf[-2] == '\n') {
      end = i + 1;
      break;
    }
    p = lf + 1;
  }

  if (end == 0) {
    // 3. Incomplete (or over max_header_bytes, which FindLexicalError reports as 431 or earlier).
    const size_t from = prev_len > start ? prev_len - 1 : start;
    if (FindLexicalError(buf, len, start, len - start > hb ? start : from, limits, err)) {
      out->keep_alive = false;
      return ParseStatus::kError;
    }
    return ParseStatus::kIncomplete;
  }

  // 4. Complete.
  ResetHead(out);
  size_t head_end = 0;
  bool ok = ParseHead(buf, start, end, limits, out, err, &head_end);
  if (ok && head_end != end) ok = Fail(err, 400, "malformed request head");  // unreachable
  if (!ok) {
    FindLexicalError(buf, end, start, start, limits, err);  // overrides when it finds one
    out->keep_alive = false;
    return ParseStatus::kError;
  }
  // What every later stage relies on: a method, a target within the head, a version 1.x, and a
  // head within the limit that was given.
  assert(!out->method.empty() && !out->target.empty() && "a complete head has a request line");
  assert(out->target.data() >= buf && out->target.data() + out->target.size() <= buf + end);
  assert((out->version_minor == 0 || out->version_minor == 1) && out->num_headers <= limits.max_header_count);
  assert(out->body_kind != BodyKind::kContentLength || out->content_length <= limits.max_body_bytes);
  *consumed = end;
  return ParseStatus::kComplete;
}

// ---------------------------------------------------------------------------------------------
// ChunkedDecoder

namespace {

// Streaming validation of the trailer section; the state lives in line_len_ while in kTrailers
// (line_ holds only chunk-size lines, so trailer lines of any length up to max_header_bytes are
// checked without being buffered).
enum TrailerState : size_t { kTrLineStart = 0, kTrName, kTrValue, kTrLineCr, kTrFinalCr };

// Validates a chunk-size line [p, p + n), n >= 1, p[n - 1] == '\n', and returns the size.
// chunk = chunk-size [ chunk-ext ] CRLF; chunk-ext = *( BWS ";" BWS name [ BWS "=" BWS value ] ).
bool ParseSizeLine(const char* p, size_t n, uint64_t* size, ParseError* err) {
  if (n < 2 || p[n - 2] != '\r') return Fail(err, 400, "chunk-size line not ended by CRLF");
  const size_t end = n - 2;
  size_t i = 0;
  uint64_t v = 0;
  while (i < end && Is(p[i], kHexc)) {
    char c = p[i];
    int d = c <= '9' ? c - '0' : (kLower[static_cast<unsigned char>(c)] - 'a' + 10);
    v = (v << 4) | static_cast<uint64_t>(d);
    ++i;
  }
  if (i == 0) return Fail(err, 400, "invalid chunk size");
  if (i > 16) return Fail(err, 400, "chunk size overflow");
  while (i < end) {
    while (i < end && IsWs(p[i])) ++i;
    if (i == end || p[i] != ';') return Fail(err, 400, "invalid chunk extension");
    ++i;
    while (i < end && IsWs(p[i])) ++i;
    size_t name = i;
    while (i < end && Is(p[i], kTchar)) ++i;
    if (i == name) return Fail(err, 400, "invalid chunk extension name");
    size_t after_name = i;
    while (i < end && IsWs(p[i])) ++i;
    if (i < end && p[i] == '=') {
      ++i;
      while (i < end && IsWs(p[i])) ++i;
      if (i < end && p[i] == '"') {
        ++i;
        for (;;) {
          if (i >= end) return Fail(err, 400, "unterminated quoted string in chunk extension");
          char c = p[i];
          if (c == '"') {
            ++i;
            break;
          }
          if (c == '\\') {
            if (i + 1 >= end) return Fail(err, 400, "unterminated quoted string in chunk extension");
            char q = p[i + 1];
            if (!(Is(q, kVchar) || IsWs(q) || static_cast<unsigned char>(q) >= 0x80)) {
              return Fail(err, 400, "invalid quoted-pair in chunk extension");
            }
            i += 2;
            continue;
          }
          if (!Is(c, kQdtext)) return Fail(err, 400, "invalid character in chunk extension");
          ++i;
        }
      } else {
        size_t val = i;
        while (i < end && Is(p[i], kTchar)) ++i;
        if (i == val) return Fail(err, 400, "invalid chunk extension value");
      }
    } else {
      i = after_name;  // whitespace is only allowed before '=' or ';'
    }
  }
  *size = v;
  return true;
}

}  // namespace

void ChunkedDecoder::Reset() {
  state_ = State::kSize;
  chunk_left_ = 0;
  body_bytes_ = 0;
  line_len_ = 0;
  trailer_bytes_ = 0;
  trailer_count_ = 0;
}

ParseStatus ChunkedDecoder::Step(const char* in, size_t len, size_t* used, const char** data,
                                 size_t* data_len, ParseError* err) {
  *used = 0;
  switch (state_) {
    case State::kSize: {
      const size_t room = kChunkLineBytesMax - line_len_;
      const auto* lf = static_cast<const char*>(std::memchr(in, '\n', std::min(len, room)));
      if (lf == nullptr) {
        if (len >= room) {
          Fail(err, 400, "chunk-size line too long");
          return ParseStatus::kError;
        }
        std::memcpy(line_ + line_len_, in, len);
        line_len_ += len;
        *used = len;
        return ParseStatus::kIncomplete;
      }
      const auto n = static_cast<size_t>(lf - in) + 1;
      uint64_t size = 0;
      bool ok;
      if (line_len_ == 0) {
        ok = ParseSizeLine(in, n, &size, err);  // the whole line is in the input: no copy
      } else {
        std::memcpy(line_ + line_len_, in, n);
        ok = ParseSizeLine(line_, line_len_ + n, &size, err);
        line_len_ = 0;
      }
      if (!ok) return ParseStatus::kError;
      *used = n;
      if (size == 0) {
        state_ = State::kTrailers;
        line_len_ = kTrLineStart;
        return ParseStatus::kIncomplete;
      }
      if (size > limits_->max_body_bytes - std::min(body_bytes_, limits_->max_body_bytes)) {
        Fail(err, 413, "chunked body too large");
        return ParseStatus::kError;
      }
      chunk_left_ = size;
      state_ = State::kData;
      return ParseStatus::kIncomplete;
    }
    case State::kData: {
      const size_t n = static_cast<size_t>(std::min<uint64_t>(len, chunk_left_));
      *data = in;
      *data_len = n;
      *used = n;
      chunk_left_ -= n;
      body_bytes_ += n;
      if (chunk_left_ == 0) state_ = State::kDataCr;
      return ParseStatus::kIncomplete;
    }
    case State::kDataCr:
    case State::kDataLf: {
      size_t i = 0;
      if (state_ == State::kDataCr) {
        if (in[0] != '\r') {
          Fail(err, 400, "chunk data not followed by CRLF");
          return ParseStatus::kError;
        }
        state_ = State::kDataLf;
        i = 1;
        if (len == 1) {
          *used = 1;
          return ParseStatus::kIncomplete;
        }
      }
      if (in[i] != '\n') {
        Fail(err, 400, "chunk data not followed by CRLF");
        return ParseStatus::kError;
      }
      state_ = State::kSize;
      *used = i + 1;
      return ParseStatus::kIncomplete;
    }
    case State::kTrailers: {
      const size_t max_bytes = limits_->max_header_bytes;
      const size_t max_count = std::min(limits_->max_header_count, kHeaderCountMax);
      auto st = static_cast<TrailerState>(line_len_);
      size_t i = 0;
      ParseStatus result = ParseStatus::kIncomplete;
      while (i < len) {
        if (st == kTrValue) {
          // Fast path over a run of value bytes.
          size_t j = i;
          while (j < len && Is(in[j], kFvalue)) ++j;
          if (j - i > max_bytes - trailer_bytes_) {
            Fail(err, 431, "trailer section too large");
            return ParseStatus::kError;
          }
          trailer_bytes_ += j - i;
          i = j;
          if (i == len) break;
        }
        if (trailer_bytes_ == max_bytes) {
          Fail(err, 431, "trailer section too large");
          return ParseStatus::kError;
        }
        ++trailer_bytes_;
        const char c = in[i++];
        bool bad = false;
        switch (st) {
          case kTrLineStart:
            if (c == '\r') {
              st = kTrFinalCr;
            } else if (Is(c, kTchar)) {
              if (trailer_count_ == max_count) {
                Fail(err, 431, "too many trailer fields");
                return ParseStatus::kError;
              }
              ++trailer_count_;
              st = kTrName;
            } else {
              bad = true;
            }
            break;
          case kTrName:
            if (c == ':') {
              st = kTrValue;
            } else if (!Is(c, kTchar)) {
              bad = true;
            }
            break;
          case kTrValue:  // the run above stopped at a non-value byte
            if (c == '\r') {
              st = kTrLineCr;
            } else {
              bad = true;
            }
            break;
          case kTrLineCr:
            if (c == '\n') {
              st = kTrLineStart;
            } else {
              bad = true;
            }
            break;
          case kTrFinalCr:
            if (c == '\n') {
              state_ = State::kDone;
              result = ParseStatus::kComplete;
            } else {
              bad = true;
            }
            break;
        }
        if (bad) {
          Fail(err, 400, "invalid trailer section");
          return ParseStatus::kError;
        }
        if (result == ParseStatus::kComplete) break;
      }
      line_len_ = st;
      *used = i;
      return result;
    }
    case State::kDone:
      return ParseStatus::kComplete;
  }
  return ParseStatus::kIncomplete;
}

}  // namespace metronome::http
