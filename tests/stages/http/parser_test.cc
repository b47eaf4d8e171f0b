#include "stages/http/parser.h"

#include <gtest/gtest.h>

#include <cstddef>
#include <cstring>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace metronome::http {
namespace {

using namespace std::string_literals;

constexpr int kIncompleteStatus = -1;
constexpr int kCompleteStatus = 0;

// Parses `buf` whole (prev_len 0) and keeps the bytes alive for the views. Not movable: the views
// point into `buf`.
class Req {
 public:
  explicit Req(std::string s, const Limits& limits = Limits(), size_t prev_len = 0)
      : buf(std::move(s)), head(std::make_unique<RequestHead>()) {
    status = ParseRequestHead(buf.data(), buf.size(), prev_len, limits, head.get(), &consumed, &err);
  }
  Req(const Req&) = delete;
  Req& operator=(const Req&) = delete;

  // 0 on kComplete, -1 on kIncomplete, else the error status.
  int Code() const {
    if (status == ParseStatus::kComplete) return kCompleteStatus;
    if (status == ParseStatus::kIncomplete) return kIncompleteStatus;
    return err.status;
  }
  std::string_view Header(std::string_view name) const {
    const std::string_view* v = head->Find(name);
    return v == nullptr ? std::string_view("<absent>") : *v;
  }

  const std::string buf;
  std::unique_ptr<RequestHead> head;
  ParseStatus status;
  size_t consumed = 0;
  ParseError err;
};

int Code(std::string s, const Limits& limits = Limits()) {
  Req r(std::move(s), limits);
  if (r.status == ParseStatus::kError) {
    EXPECT_FALSE(r.head->keep_alive) << "errors must close";
  }
  return r.Code();
}

// A 1.1 request with the given extra field lines (each ending in CRLF) after Host.
std::string Get(std::string_view fields = "", std::string_view target = "/") {
  return "GET "s + std::string(target) + " HTTP/1.1\r\nHost: example.com\r\n" + std::string(fields) +
         "\r\n";
}

std::string Post(std::string_view fields) {
  return "POST /upload HTTP/1.1\r\nHost: h\r\n"s + std::string(fields) + "\r\n";
}

// ---------------------------------------------------------------------------------------------
// Valid requests

TEST(ParseRequestHead, SimpleGet) {
  Req r("GET /index.html?a=1&b=2 HTTP/1.1\r\nHost: example.com\r\nAccept: */*\r\n\r\n");
  ASSERT_EQ(r.status, ParseStatus::kComplete) << r.err.reason;
  EXPECT_EQ(r.consumed, r.buf.size());
  EXPECT_EQ(r.head->method, "GET");
  EXPECT_EQ(r.head->method_id, Method::kGet);
  EXPECT_EQ(r.head->target, "/index.html?a=1&b=2");
  EXPECT_EQ(r.head->path, "/index.html");
  EXPECT_EQ(r.head->query, "a=1&b=2");
  EXPECT_EQ(r.head->version_minor, 1);
  ASSERT_EQ(r.head->num_headers, 2u);
  EXPECT_EQ(r.head->headers[0].name, "Host");
  EXPECT_EQ(r.head->headers[0].value, "example.com");
  EXPECT_EQ(r.head->headers[1].name, "Accept");
  EXPECT_EQ(r.head->headers[1].value, "*/*");
  EXPECT_EQ(r.head->host, "example.com");
  EXPECT_EQ(r.head->body_kind, BodyKind::kNone);
  EXPECT_TRUE(r.head->keep_alive);
  EXPECT_FALSE(r.head->expect_continue);
  // Zero-copy: the views point into the buffer.
  EXPECT_EQ(r.head->method.data(), r.buf.data());
  EXPECT_EQ(r.head->host.data(), r.buf.data() + r.buf.find("example.com"));
}

TEST(ParseRequestHead, NoQueryAndEmptyQuery) {
  Req a(Get("", "/p"));
  ASSERT_EQ(a.Code(), kCompleteStatus);
  EXPECT_EQ(a.head->path, "/p");
  EXPECT_TRUE(a.head->query.empty());
  Req b(Get("", "/p?"));
  ASSERT_EQ(b.Code(), kCompleteStatus);
  EXPECT_EQ(b.head->path, "/p");
  EXPECT_TRUE(b.head->query.empty());
  Req c(Get("", "/p?a?b"));
  ASSERT_EQ(c.Code(), kCompleteStatus);
  EXPECT_EQ(c.head->query, "a?b");
}

TEST(ParseRequestHead, MethodIds) {
  const std::pair<const char*, Method> cases[] = {
      {"GET", Method::kGet},         {"HEAD", Method::kHead},     {"POST", Method::kPost},
      {"PUT", Method::kPut},         {"DELETE", Method::kDelete}, {"PATCH", Method::kPatch},
      {"OPTIONS", Method::kOptions}, {"TRACE", Method::kTrace},   {"PROPFIND", Method::kOther},
      {"get", Method::kOther},       {"Get", Method::kOther},     {"GETS", Method::kOther},
      {"X-CUSTOM!#$%&'*+.^_`|~9", Method::kOther},
  };
  for (const auto& [m, id] : cases) {
    Req r(std::string(m) + " / HTTP/1.1\r\nHost: h\r\n\r\n");
    ASSERT_EQ(r.Code(), kCompleteStatus) << m << ": " << r.err.reason;
    EXPECT_EQ(r.head->method, m);
    EXPECT_EQ(r.head->method_id, id) << m;
  }
  Req c("CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n");
  ASSERT_EQ(c.Code(), kCompleteStatus) << c.err.reason;
  EXPECT_EQ(c.head->method_id, Method::kConnect);
}

TEST(ParseRequestHead, InvalidMethodTokens) {
  for (const char* m : {"GE(T", "G@T", "GE\"T", "GE/T", "GE:T", "GÉT", "GE\x7fT", "GE[T]", "GE,T"}) {
    EXPECT_EQ(Code(std::string(m) + " / HTTP/1.1\r\nHost: h\r\n\r\n"), 400) << m;
  }
  EXPECT_EQ(Code(" GET / HTTP/1.1\r\nHost: h\r\n\r\n"), 400);  // empty method
  EXPECT_EQ(Code("GET\t/ HTTP/1.1\r\nHost: h\r\n\r\n"), 400);  // HTAB is not SP
  EXPECT_EQ(Code("GET\r\nHost: h\r\n\r\n"), 400);
}

TEST(ParseRequestHead, MultipleSpacesInRequestLine) {
  EXPECT_EQ(Code("GET  / HTTP/1.1\r\nHost: h\r\n\r\n"), 400);
  EXPECT_EQ(Code("GET /  HTTP/1.1\r\nHost: h\r\n\r\n"), 400);
  EXPECT_EQ(Code("GET / HTTP/1.1 \r\nHost: h\r\n\r\n"), 400);
  EXPECT_EQ(Code("GET / HTTP/1.1\t\r\nHost: h\r\n\r\n"), 400);
  EXPECT_EQ(Code("GET / x HTTP/1.1\r\nHost: h\r\n\r\n"), 400);
  EXPECT_EQ(Code("GET /\x01 HTTP/1.1\r\nHost: h\r\n\r\n"), 400);  // CTL in target
  EXPECT_EQ(Code("GET /\x7f HTTP/1.1\r\nHost: h\r\n\r\n"), 400);
  EXPECT_EQ(Code("GET /\xc3\xa9 HTTP/1.1\r\nHost: h\r\n\r\n"), 400);  // not a URI character
}

TEST(ParseRequestHead, TargetForms) {
  {
    Req r(Get("", "http://example.com:8080/a/b?x=1"));
    ASSERT_EQ(r.Code(), kCompleteStatus) << r.err.reason;
    EXPECT_EQ(r.head->target, "http://example.com:8080/a/b?x=1");
    EXPECT_EQ(r.head->path, "/a/b");
    EXPECT_EQ(r.head->query, "x=1");
  }
  {
    Req r(Get("", "HTTPS://example.com"));
    ASSERT_EQ(r.Code(), kCompleteStatus) << r.err.reason;
    EXPECT_EQ(r.head->path, "/");
    EXPECT_TRUE(r.head->query.empty());
  }
  {
    Req r(Get("", "http://example.com?q"));
    ASSERT_EQ(r.Code(), kCompleteStatus) << r.err.reason;
    EXPECT_EQ(r.head->path, "/");
    EXPECT_EQ(r.head->query, "q");
  }
  {
    Req r("OPTIONS * HTTP/1.1\r\nHost: h\r\n\r\n");
    ASSERT_EQ(r.Code(), kCompleteStatus) << r.err.reason;
    EXPECT_EQ(r.head->target, "*");
    EXPECT_TRUE(r.head->path.empty());
  }
  {
    Req r("CONNECT [::1]:443 HTTP/1.1\r\nHost: [::1]:443\r\n\r\n");
    ASSERT_EQ(r.Code(), kCompleteStatus) << r.err.reason;
    EXPECT_EQ(r.head->target, "[::1]:443");
    EXPECT_TRUE(r.head->path.empty());
  }
  EXPECT_EQ(Code(Get("", "*")), 400);                  // "*" only for OPTIONS
  EXPECT_EQ(Code(Get("", "example.com:80")), 400);     // authority-form only for CONNECT
  EXPECT_EQ(Code(Get("", "ftp://example.com/")), 400);
  EXPECT_EQ(Code(Get("", "http://")), 400);
  EXPECT_EQ(Code(Get("", "http:///p")), 400);          // empty authority
  EXPECT_EQ(Code(Get("", "http://u:p@example.com/")), 400);  // userinfo
  EXPECT_EQ(Code(Get("", "http://exa\"mple.com/")), 400);
  EXPECT_EQ(Code(Get("", "index.html")), 400);
  EXPECT_EQ(Code("CONNECT / HTTP/1.1\r\nHost: h\r\n\r\n"), 400);
  EXPECT_EQ(Code("CONNECT example.com HTTP/1.1\r\nHost: h\r\n\r\n"), 400);
  EXPECT_EQ(Code("CONNECT example.com: HTTP/1.1\r\nHost: h\r\n\r\n"), 400);
  EXPECT_EQ(Code("CONNECT :443 HTTP/1.1\r\nHost: h\r\n\r\n"), 400);
  EXPECT_EQ(Code("CONNECT example.com:44a HTTP/1.1\r\nHost: h\r\n\r\n"), 400);
  EXPECT_EQ(Code("CONNECT u@example.com:443 HTTP/1.1\r\nHost: h\r\n\r\n"), 400);
  EXPECT_EQ(Code("OPTIONS ** HTTP/1.1\r\nHost: h\r\n\r\n"), 400);
}

TEST(ParseRequestHead, Versions) {
  {
    Req r("GET / HTTP/1.0\r\n\r\n");
    ASSERT_EQ(r.Code(), kCompleteStatus);
    EXPECT_EQ(r.head->version_minor, 0);
  }
  for (const char* v : {"HTTP/1.1", "HTTP/1.2", "HTTP/1.9"}) {
    Req r("GET / "s + v + "\r\nHost: h\r\n\r\n");
    ASSERT_EQ(r.Code(), kCompleteStatus) << v;
    EXPECT_EQ(r.head->version_minor, 1) << v;
  }
  for (const char* v : {"HTTP/2.0", "HTTP/0.9", "HTTP/3.0", "HTTP/9.9"}) {
    EXPECT_EQ(Code("GET / "s + v + "\r\nHost: h\r\n\r\n"), 505) << v;
  }
  for (const char* v : {"HTTP/1", "HTTP/2", "HTTP/1.", "HTTP/11.1", "HTTP/1.10", "http/1.1",
                        "HTTP/1.x", "HTTP 1.1", "HTTPS/1.1", "HTTP/1,1", "", "HTTP/a.1"}) {
    EXPECT_EQ(Code("GET / "s + v + "\r\nHost: h\r\n\r\n"), 400) << v;
  }
  EXPECT_EQ(Code("GET /\r\nHost: h\r\n\r\n"), 400);  // HTTP/0.9 style request line
}

TEST(ParseRequestHead, FieldValuesAreTrimmed) {
  Req r(Get("A:  spaced  value \t\r\nB:\r\nC: \t \r\nD:x\r\nE: \x80\xff obs-text\r\n"));
  ASSERT_EQ(r.Code(), kCompleteStatus) << r.err.reason;
  EXPECT_EQ(r.Header("a"), "spaced  value");
  EXPECT_EQ(r.Header("B"), "");
  EXPECT_EQ(r.Header("C"), "");
  EXPECT_EQ(r.Header("D"), "x");
  EXPECT_EQ(r.Header("E"), "\x80\xff obs-text");
}

TEST(ParseRequestHead, InvalidFieldLines) {
  EXPECT_EQ(Code(Get("X: a\x01" "b\r\n")), 400);  // CTL in value
  EXPECT_EQ(Code(Get("X: a\x7f\r\n")), 400);
  EXPECT_EQ(Code(Get("X Y: z\r\n")), 400);
  EXPECT_EQ(Code(Get("(X): z\r\n")), 400);
  EXPECT_EQ(Code(Get(": z\r\n")), 400);
  EXPECT_EQ(Code(Get("NoColon\r\n")), 400);
  EXPECT_EQ(Code(Get("X\xc3\xa9: z\r\n")), 400);
  // Whitespace before the first field line (not even obs-fold: there is no field to continue).
  EXPECT_EQ(Code("GET / HTTP/1.1\r\n Host: h\r\n\r\n"), 400);
}

// ---------------------------------------------------------------------------------------------
// Smuggling defences

TEST(Smuggling, SpaceOrTabBeforeColon) {
  Req r(Get("Content-Length : 5\r\n"));
  EXPECT_EQ(r.Code(), 400);
  EXPECT_STREQ(r.err.reason, "whitespace between field name and colon");
  EXPECT_EQ(Code("GET / HTTP/1.1\r\nHost : h\r\n\r\n"), 400);
  EXPECT_EQ(Code("GET / HTTP/1.1\r\nHost\t: h\r\n\r\n"), 400);
  EXPECT_EQ(Code(Post("Transfer-Encoding\t: chunked\r\n")), 400);
}

TEST(Smuggling, ObsFold) {
  Req r(Get("X-A: 1\r\n  continued\r\n"));
  EXPECT_EQ(r.Code(), 400);
  EXPECT_STREQ(r.err.reason, "obs-fold or whitespace before a field");
  EXPECT_EQ(Code(Get("X-A: 1\r\n\tcontinued\r\n")), 400);
  EXPECT_EQ(Code(Post("Transfer-Encoding: gzip,\r\n chunked\r\n")), 400);
}

TEST(Smuggling, BareCrBareLfAndNul) {
  // Bare LF: as a line ending anywhere, and inside a value.
  EXPECT_EQ(Code("GET / HTTP/1.1\nHost: h\r\n\r\n"), 400);
  EXPECT_EQ(Code("GET / HTTP/1.1\r\nHost: h\n\r\n"), 400);
  EXPECT_EQ(Code("GET / HTTP/1.1\r\nHost: h\r\n\n"), 400);
  EXPECT_EQ(Code("GET / HTTP/1.1\nHost: h\n\n"), 400);
  EXPECT_EQ(Code(Get("X: a\nb\r\n")), 400);
  // Bare CR.
  EXPECT_EQ(Code("GET / HTTP/1.1\rHost: h\r\n\r\n"), 400);
  EXPECT_EQ(Code(Get("X: a\rb\r\n")), 400);
  EXPECT_EQ(Code("GET / HTTP/1.1\r\nHost: h\r\n\r\r\n"), 400);
  EXPECT_EQ(Code("GET /a\rb HTTP/1.1\r\nHost: h\r\n\r\n"), 400);
  // NUL.
  EXPECT_EQ(Code(Get("X: a\0b\r\n"s)), 400);
  EXPECT_EQ(Code(Get("X\0: b\r\n"s)), 400);
  EXPECT_EQ(Code("GET /\0 HTTP/1.1\r\nHost: h\r\n\r\n"s), 400);
  EXPECT_EQ(Code("\0GET / HTTP/1.1\r\nHost: h\r\n\r\n"s), 400);
}

TEST(Smuggling, EarlyRejectionWhileIncomplete) {
  // The head is not complete yet, but the junk is already visible.
  Req nul("GET / HTTP/1.1\r\nHost: h\r\nX: a\0"s);
  EXPECT_EQ(nul.Code(), 400);
  EXPECT_STREQ(nul.err.reason, "NUL byte in request head");
  Req lf("GET / HTTP/1.1\nHost: h");
  EXPECT_EQ(lf.Code(), 400);
  EXPECT_STREQ(lf.err.reason, "bare LF in request head");
  Req cr("GET / HTTP/1.1\r\nHost: h\rX");
  EXPECT_EQ(cr.Code(), 400);
  EXPECT_STREQ(cr.err.reason, "bare CR in request head");
  // A CR as the last byte is pending, not bare.
  EXPECT_EQ(Code("GET / HTTP/1.1\r\nHost: h\r"), kIncompleteStatus);
  EXPECT_EQ(Code("GET / HTTP/1.1\r\nHost: h\r\n\r"), kIncompleteStatus);
  EXPECT_EQ(Code("GET / HTTP/1.1\r"), kIncompleteStatus);
  // Also when the junk arrives in a later call (prev_len set).
  std::string s = "GET / HTTP/1.1\r\nHost: h\r\nX: a\0b"s;
  Limits l;
  RequestHead h;
  size_t consumed = 0;
  ParseError err;
  EXPECT_EQ(ParseRequestHead(s.data(), 26, 0, l, &h, &consumed, &err), ParseStatus::kIncomplete);
  EXPECT_EQ(ParseRequestHead(s.data(), s.size(), 26, l, &h, &consumed, &err), ParseStatus::kError);
  EXPECT_EQ(err.status, 400);
  EXPECT_FALSE(h.keep_alive);
}

TEST(Smuggling, ContentLengthValid) {
  for (const auto& [v, n] : std::vector<std::pair<std::string, uint64_t>>{
           {"0", 0}, {"5", 5}, {"005", 5}, {"  42  ", 42}, {"1048576", 1 << 20}}) {
    Req r(Post("Content-Length: " + v + "\r\n"));
    ASSERT_EQ(r.Code(), kCompleteStatus) << v << ": " << r.err.reason;
    EXPECT_EQ(r.head->body_kind, BodyKind::kContentLength);
    EXPECT_EQ(r.head->content_length, n);
  }
}

TEST(Smuggling, ContentLengthInvalid) {
  for (const char* v : {"+5", "-1", "0x5", "5 5", "5,5", "5, 5", "", "5.0", "5;", "five", "1e3",
                        "99999999999999999999999", "18446744073709551616", "\xef\xbc\x95"}) {
    Req r(Post("Content-Length: "s + v + "\r\n"));
    EXPECT_EQ(r.Code(), 400) << "'" << v << "'";
  }
  // A second Content-Length is 400 even when equal.
  EXPECT_EQ(Code(Post("Content-Length: 5\r\nContent-Length: 5\r\n")), 400);
  EXPECT_EQ(Code(Post("Content-Length: 5\r\nContent-Length: 6\r\n")), 400);
  EXPECT_EQ(Code(Post("Content-Length: 5\r\ncontent-length: 5\r\n")), 400);
  // 2^64 - 1 parses, but is over max_body_bytes.
  EXPECT_EQ(Code(Post("Content-Length: 18446744073709551615\r\n")), 413);
}

TEST(Smuggling, TransferEncoding) {
  {
    Req r(Post("Transfer-Encoding: chunked\r\n"));
    ASSERT_EQ(r.Code(), kCompleteStatus) << r.err.reason;
    EXPECT_EQ(r.head->body_kind, BodyKind::kChunked);
  }
  EXPECT_EQ(Code(Post("Transfer-Encoding: Chunked\r\n")), kCompleteStatus);
  EXPECT_EQ(Code(Post("transfer-encoding:CHUNKED \r\n")), kCompleteStatus);
  // chunked not last: 400.
  EXPECT_EQ(Code(Post("Transfer-Encoding: chunked, gzip\r\n")), 400);
  EXPECT_EQ(Code(Post("Transfer-Encoding: chunked\r\nTransfer-Encoding: gzip\r\n")), 400);
  EXPECT_EQ(Code(Post("Transfer-Encoding: chunked, chunked\r\n")), 400);
  EXPECT_EQ(Code(Post("Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n")), 400);
  // Other codings: 501.
  EXPECT_EQ(Code(Post("Transfer-Encoding: gzip\r\n")), 501);
  EXPECT_EQ(Code(Post("Transfer-Encoding: gzip, chunked\r\n")), 501);
  EXPECT_EQ(Code(Post("Transfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n")), 501);
  EXPECT_EQ(Code(Post("Transfer-Encoding: identity\r\n")), 501);
  // Malformed lists.
  EXPECT_EQ(Code(Post("Transfer-Encoding: \r\n")), 400);
  EXPECT_EQ(Code(Post("Transfer-Encoding: chunked,\r\n")), 400);
  EXPECT_EQ(Code(Post("Transfer-Encoding: ,chunked\r\n")), 400);
  EXPECT_EQ(Code(Post("Transfer-Encoding: \"chunked\"\r\n")), 400);
  EXPECT_EQ(Code(Post("Transfer-Encoding: chunked;q=1\r\n")), 400);
  EXPECT_EQ(Code(Post("Transfer-Encoding: chunk ed\r\n")), 400);
}

TEST(Smuggling, TransferEncodingWithContentLength) {
  EXPECT_EQ(Code(Post("Content-Length: 4\r\nTransfer-Encoding: chunked\r\n")), 400);
  EXPECT_EQ(Code(Post("Transfer-Encoding: chunked\r\nContent-Length: 4\r\n")), 400);
  EXPECT_EQ(Code(Post("Transfer-Encoding: chunked\r\nContent-Length: 0\r\n")), 400);
}

TEST(Smuggling, TransferEncodingInHttp10) {
  EXPECT_EQ(Code("POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n"), 400);
  EXPECT_EQ(Code("POST / HTTP/1.0\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"), 400);
  Req ok("POST / HTTP/1.0\r\nContent-Length: 3\r\n\r\nabc");
  ASSERT_EQ(ok.Code(), kCompleteStatus);
  EXPECT_EQ(ok.head->body_kind, BodyKind::kContentLength);
  EXPECT_EQ(ok.consumed, ok.buf.size() - 3);
}

TEST(Smuggling, Host) {
  EXPECT_EQ(Code("GET / HTTP/1.1\r\nAccept: */*\r\n\r\n"), 400);  // missing in 1.1
  EXPECT_EQ(Code("GET / HTTP/1.1\r\n\r\n"), 400);
  EXPECT_EQ(Code("GET / HTTP/1.1\r\nHost: a\r\nHost: a\r\n\r\n"), 400);  // repeated
  EXPECT_EQ(Code("GET / HTTP/1.1\r\nHost: a\r\nhost: b\r\n\r\n"), 400);
  EXPECT_EQ(Code("GET / HTTP/1.0\r\nHost: a\r\nHost: b\r\n\r\n"), 400);
  for (const char* bad : {"a b", "a/b", "a@b", "a\\b", "a\"b", "a,b c", "a\tb"}) {
    EXPECT_EQ(Code("GET / HTTP/1.1\r\nHost: "s + bad + "\r\n\r\n"), 400) << bad;
  }
  {
    Req r("GET / HTTP/1.0\r\n\r\n");  // optional in 1.0
    ASSERT_EQ(r.Code(), kCompleteStatus);
    EXPECT_TRUE(r.head->host.empty());
  }
  {
    Req r("GET / HTTP/1.0\r\nhOsT: Example.COM:8080\r\n\r\n");
    ASSERT_EQ(r.Code(), kCompleteStatus);
    EXPECT_EQ(r.head->host, "Example.COM:8080");
  }
  {
    Req r("GET / HTTP/1.1\r\nHost:\r\n\r\n");  // an empty Host is allowed (RFC 9112 3.2)
    ASSERT_EQ(r.Code(), kCompleteStatus);
    EXPECT_TRUE(r.head->host.empty());
  }
  {
    Req r("GET / HTTP/1.1\r\nHost: [2001:db8::1]:80\r\n\r\n");
    ASSERT_EQ(r.Code(), kCompleteStatus);
    EXPECT_EQ(r.head->host, "[2001:db8::1]:80");
  }
}

// ---------------------------------------------------------------------------------------------
// Expect and Connection

TEST(ParseRequestHead, Expect) {
  {
    Req r(Post("Content-Length: 3\r\nExpect: 100-continue\r\n"));
    ASSERT_EQ(r.Code(), kCompleteStatus);
    EXPECT_TRUE(r.head->expect_continue);
  }
  {
    Req r(Post("Content-Length: 3\r\nExpect: 100-Continue\r\n"));
    ASSERT_EQ(r.Code(), kCompleteStatus);
    EXPECT_TRUE(r.head->expect_continue);
  }
  {
    // HTTP/1.0: a 100-continue expectation is ignored (RFC 9110 10.1.1).
    Req r("POST / HTTP/1.0\r\nContent-Length: 3\r\nExpect: 100-continue\r\n\r\n");
    ASSERT_EQ(r.Code(), kCompleteStatus);
    EXPECT_FALSE(r.head->expect_continue);
  }
  EXPECT_EQ(Code(Post("Content-Length: 3\r\nExpect: 200-ok\r\n")), 417);
  EXPECT_EQ(Code(Post("Content-Length: 3\r\nExpect: 100-continue, foo\r\n")), 417);
  EXPECT_EQ(Code(Post("Expect:\r\n")), 417);
  EXPECT_EQ(Code(Post("Expect: 100-continue\r\nExpect: x\r\n")), 417);
}

TEST(ParseRequestHead, Connection) {
  auto keep_alive = [](std::string s) {
    Req r(std::move(s));
    EXPECT_EQ(r.Code(), kCompleteStatus) << r.buf;
    return r.head->keep_alive;
  };
  EXPECT_TRUE(keep_alive("GET / HTTP/1.1\r\nHost: h\r\n\r\n"));
  EXPECT_FALSE(keep_alive("GET / HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n"));
  EXPECT_FALSE(keep_alive("GET / HTTP/1.1\r\nHost: h\r\nConnection: CLOSE\r\n\r\n"));
  EXPECT_FALSE(keep_alive("GET / HTTP/1.1\r\nHost: h\r\nConnection: Upgrade, close\r\n\r\n"));
  EXPECT_FALSE(keep_alive("GET / HTTP/1.1\r\nHost: h\r\nConnection: keep-alive\r\nConnection: close\r\n\r\n"));
  EXPECT_TRUE(keep_alive("GET / HTTP/1.1\r\nHost: h\r\nConnection: keep-alive, Upgrade\r\n\r\n"));
  EXPECT_TRUE(keep_alive("GET / HTTP/1.1\r\nHost: h\r\nConnection: closed\r\n\r\n"));
  EXPECT_TRUE(keep_alive("GET / HTTP/1.1\r\nHost: h\r\nConnection: , ,\r\n\r\n"));
  EXPECT_FALSE(keep_alive("GET / HTTP/1.0\r\n\r\n"));
  EXPECT_TRUE(keep_alive("GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"));
  EXPECT_TRUE(keep_alive("GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n"));
  EXPECT_FALSE(keep_alive("GET / HTTP/1.0\r\nConnection: keep-alive, close\r\n\r\n"));
  EXPECT_FALSE(keep_alive("GET / HTTP/1.0\r\nConnection: Upgrade\r\n\r\n"));
  EXPECT_EQ(Code(Get("Connection: keep alive\r\n")), 400);
  EXPECT_EQ(Code(Get("Connection: \"close\"\r\n")), 400);
}

// ---------------------------------------------------------------------------------------------
// Limits

Limits Small() {
  Limits l;
  l.max_request_line_bytes = 64;
  l.max_header_bytes = 256;
  l.max_header_count = 10;
  l.max_body_bytes = 1000;
  return l;
}

// "GET /aaa... HTTP/1.1\r\n" of exactly n bytes (CRLF included).
std::string RequestLineOf(size_t n) {
  const size_t fixed = std::strlen("GET / HTTP/1.1\r\n");
  return "GET /" + std::string(n - fixed, 'a') + " HTTP/1.1\r\n";
}

TEST(Limits, RequestLineExactlyAtAndOnePast) {
  const Limits l = Small();
  const std::string at = RequestLineOf(64);
  ASSERT_EQ(at.size(), 64u);
  EXPECT_EQ(Code(at + "Host: h\r\n\r\n", l), kCompleteStatus);
  EXPECT_EQ(Code(RequestLineOf(65) + "Host: h\r\n\r\n", l), 414);
  // Incomplete: 64 bytes without a line end may still become a valid line ("...\r" pending);
  // the 65th byte without an LF before it is 414 at once.
  EXPECT_EQ(Code(at.substr(0, 63), l), kIncompleteStatus);
  EXPECT_EQ(Code(at.substr(0, 64), l), kIncompleteStatus);
  EXPECT_EQ(Code(std::string("GET /") + std::string(59, 'a'), l), kIncompleteStatus);  // 64 bytes
  EXPECT_EQ(Code(std::string("GET /") + std::string(60, 'a'), l), 414);                // 65 bytes
  // Leading empty lines do not count toward the request line.
  EXPECT_EQ(Code("\r\n\r\n" + at + "Host: h\r\n\r\n", l), kCompleteStatus);
  // The limit wins over a version error further along the same line.
  EXPECT_EQ(Code(RequestLineOf(80).replace(70, 8, "HTTP/2.0") + "Host: h\r\n\r\n", l), 414);
  // Default limit: 8 KiB.
  EXPECT_EQ(Code(RequestLineOf(8192) + "Host: h\r\n\r\n"), kCompleteStatus);
  EXPECT_EQ(Code(RequestLineOf(8193) + "Host: h\r\n\r\n"), 414);
}

// A head (request line through the final CRLF) of exactly n bytes.
std::string HeadOf(size_t n) {
  std::string base = "GET / HTTP/1.1\r\nHost: h\r\nX-Pad: \r\n\r\n";
  return "GET / HTTP/1.1\r\nHost: h\r\nX-Pad: " + std::string(n - base.size(), 'p') + "\r\n\r\n";
}

TEST(Limits, HeaderBytesExactlyAtAndOnePast) {
  const Limits l = Small();
  const std::string at = HeadOf(256);
  ASSERT_EQ(at.size(), 256u);
  Req ok(at, l);
  ASSERT_EQ(ok.Code(), kCompleteStatus) << ok.err.reason;
  EXPECT_EQ(ok.consumed, 256u);
  EXPECT_EQ(Code(HeadOf(257), l), 431);
  // Incomplete: exactly max_header_bytes buffered without the end is still fine; one more is 431.
  const std::string big = HeadOf(300);
  EXPECT_EQ(Code(big.substr(0, 256), l), kIncompleteStatus);
  EXPECT_EQ(Code(big.substr(0, 257), l), 431);
  // The end of the head one byte too late: 431 even with a body behind it.
  EXPECT_EQ(Code(HeadOf(257) + "body", l), 431);
  // Leading empty lines are not counted.
  EXPECT_EQ(Code("\r\n\r\n\r\n\r\n" + at, l), kCompleteStatus);
  // Default limit: 16 KiB.
  EXPECT_EQ(Code(HeadOf(16 * 1024)), kCompleteStatus);
  EXPECT_EQ(Code(HeadOf(16 * 1024 + 1)), 431);
}

std::string WithFields(size_t count) {
  std::string s = "GET / HTTP/1.1\r\nHost: h\r\n";
  for (size_t i = 1; i < count; ++i) s += "X-" + std::to_string(i) + ": v\r\n";
  return s + "\r\n";
}

TEST(Limits, HeaderCountExactlyAtAndOnePast) {
  const Limits l = Small();
  Req ok(WithFields(10), l);
  ASSERT_EQ(ok.Code(), kCompleteStatus) << ok.err.reason;
  EXPECT_EQ(ok.head->num_headers, 10u);
  EXPECT_EQ(Code(WithFields(11), l), 431);
  // Default: 100.
  EXPECT_EQ(Code(WithFields(100)), kCompleteStatus);
  EXPECT_EQ(Code(WithFields(101)), 431);
  // A configured count above kHeaderCountMax is capped there.
  Limits big;
  big.max_header_count = 100000;
  big.max_header_bytes = 1 << 20;
  EXPECT_EQ(Code(WithFields(kHeaderCountMax), big), kCompleteStatus);
  EXPECT_EQ(Code(WithFields(kHeaderCountMax + 1), big), 431);
}

TEST(Limits, ContentLengthExactlyAtAndOnePast) {
  const Limits l = Small();
  Req ok(Post("Content-Length: 1000\r\n"), l);
  ASSERT_EQ(ok.Code(), kCompleteStatus);
  EXPECT_EQ(ok.head->content_length, 1000u);
  EXPECT_EQ(Code(Post("Content-Length: 1001\r\n"), l), 413);
  EXPECT_EQ(Code(Post("Content-Length: 1048576\r\n")), kCompleteStatus);
  EXPECT_EQ(Code(Post("Content-Length: 1048577\r\n")), 413);
}

TEST(Limits, LeadingEmptyLines) {
  for (int n = 0; n <= kLeadingEmptyLinesMax; ++n) {
    std::string pre;
    for (int i = 0; i < n; ++i) pre += "\r\n";
    Req r(pre + Get());
    ASSERT_EQ(r.Code(), kCompleteStatus) << n;
    EXPECT_EQ(r.consumed, r.buf.size());
    EXPECT_EQ(r.head->method.data(), r.buf.data() + pre.size());
  }
  EXPECT_EQ(Code("\r\n\r\n\r\n\r\n\r\n" + Get()), 400);
  EXPECT_EQ(Code("\r\n\r\n\r\n\r\n\r"), 400);
  EXPECT_EQ(Code("\r\n\r\n"), kIncompleteStatus);
  EXPECT_EQ(Code("\r\n\r"), kIncompleteStatus);
  EXPECT_EQ(Code("\n" + Get()), 400);
  EXPECT_EQ(Code("\r\n\n" + Get()), 400);
  EXPECT_EQ(Code("\rX"), 400);
  EXPECT_EQ(Code(""), kIncompleteStatus);
}

// ---------------------------------------------------------------------------------------------
// Pipelining and incremental parsing

TEST(ParseRequestHead, PipelinedRequestsStopAtTheFirstHead) {
  const std::string first = "GET /1 HTTP/1.1\r\nHost: h\r\n\r\n";
  const std::string second = "POST /2 HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\n\r\nhi";
  Req a(first + second);
  ASSERT_EQ(a.Code(), kCompleteStatus);
  EXPECT_EQ(a.consumed, first.size());
  EXPECT_EQ(a.head->path, "/1");
  Req b(a.buf.substr(a.consumed));
  ASSERT_EQ(b.Code(), kCompleteStatus);
  EXPECT_EQ(b.head->path, "/2");
  EXPECT_EQ(b.consumed, second.size() - 2);
  // The second head being invalid does not matter to the first.
  Req c(first + "GARBAGE\n\0\r\r"s);
  EXPECT_EQ(c.Code(), kCompleteStatus);
  EXPECT_EQ(c.consumed, first.size());
}

void ExpectSameHead(const RequestHead& a, const char* abase, const RequestHead& b, const char* bbase) {
  auto same = [&](std::string_view x, std::string_view y) {
    EXPECT_EQ(x, y);
    EXPECT_EQ(x.data() == nullptr, y.data() == nullptr);
    if (x.data() != nullptr && y.data() != nullptr) {
      EXPECT_EQ(x.data() - abase, y.data() - bbase);
    }
  };
  same(a.method, b.method);
  EXPECT_EQ(a.method_id, b.method_id);
  same(a.target, b.target);
  same(a.path, b.path);
  same(a.query, b.query);
  EXPECT_EQ(a.version_minor, b.version_minor);
  ASSERT_EQ(a.num_headers, b.num_headers);
  for (size_t i = 0; i < a.num_headers; ++i) {
    same(a.headers[i].name, b.headers[i].name);
    same(a.headers[i].value, b.headers[i].value);
  }
  same(a.host, b.host);
  EXPECT_EQ(a.body_kind, b.body_kind);
  EXPECT_EQ(a.content_length, b.content_length);
  EXPECT_EQ(a.keep_alive, b.keep_alive);
  EXPECT_EQ(a.expect_continue, b.expect_continue);
}

TEST(ParseRequestHead, EveryPrefixIsIncompleteThenComplete) {
  const std::string head =
      "\r\nPOST http://example.com/a/b?c=d HTTP/1.1\r\nHost: example.com\r\n"
      "User-Agent: test/1.0\r\nContent-Length: 4\r\nConnection: keep-alive\r\n"
      "Expect: 100-continue\r\nX-Empty:\r\n\r\n";
  const std::string full = head + "bodyGET";
  Req whole(full);
  ASSERT_EQ(whole.Code(), kCompleteStatus) << whole.err.reason;
  ASSERT_EQ(whole.consumed, head.size());
  Limits l;
  size_t prev = 0;
  for (size_t n = 0; n <= full.size(); ++n) {
    // Stateless from scratch (prev_len 0) and incrementally (prev_len = previous length).
    Req fresh(full.substr(0, n));
    std::string buf = full.substr(0, n);
    RequestHead h;
    size_t consumed = 0;
    ParseError err;
    ParseStatus s = ParseRequestHead(buf.data(), buf.size(), prev, l, &h, &consumed, &err);
    if (n < head.size()) {
      EXPECT_EQ(fresh.status, ParseStatus::kIncomplete) << n;
      EXPECT_EQ(s, ParseStatus::kIncomplete) << n;
      prev = n;
    } else {
      ASSERT_EQ(fresh.status, ParseStatus::kComplete) << n;
      ASSERT_EQ(s, ParseStatus::kComplete) << n;
      EXPECT_EQ(fresh.consumed, head.size());
      EXPECT_EQ(consumed, head.size());
      ExpectSameHead(*whole.head, whole.buf.data(), *fresh.head, fresh.buf.data());
      ExpectSameHead(*whole.head, whole.buf.data(), h, buf.data());
    }
  }
}

TEST(ParseRequestHead, IncrementalErrorsMatchWholeErrors) {
  // Whatever the split, the verdict is the one on the whole head.
  const Limits l = Small();
  const std::vector<std::string> inputs = {
      // A lexical error (NUL) wins over a semantic one (505): a prefix already rejects it.
      "GET / HTTP/2.0\r\nHost: h\r\nX: \0\r\n\r\n"s,
      "GET / HTTP/1.1\r\nHost: h\r\nX: \x01\r\n\r\n",      // not a lexical error: 400 at the end
      "GET /" + std::string(70, 'a') + "\0 HTTP/1.1\r\n\r\n"s,  // 414 before the NUL
      "GET /" + std::string(30, 'a') + "\0"s + std::string(40, 'a') + " HTTP/1.1\r\n\r\n"s,
      "GET / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: gzip\r\nX: \r\r\n\r\n",
  };
  for (const std::string& in : inputs) {
    Req whole(in, l);
    ASSERT_EQ(whole.status, ParseStatus::kError);
    for (size_t k = 0; k < in.size(); ++k) {
      Req part(in.substr(0, k), l);
      if (part.status == ParseStatus::kIncomplete) {
        Req rest(in, l, k);
        EXPECT_EQ(rest.Code(), whole.Code()) << k;
        EXPECT_STREQ(rest.err.reason, whole.err.reason) << k;
      } else {
        ASSERT_EQ(part.status, ParseStatus::kError) << k;
        EXPECT_EQ(part.Code(), whole.Code()) << k;
        EXPECT_STREQ(part.err.reason, whole.err.reason) << k;
      }
    }
  }
  EXPECT_EQ(Code(inputs[0], l), 400);
  EXPECT_EQ(Code(inputs[2], l), 414);
  EXPECT_EQ(Code(inputs[3], l), 400);
}

// ---------------------------------------------------------------------------------------------
// Find, EqualsIgnoreCase, Rebase

TEST(RequestHead, FindIsCaseInsensitiveAndReturnsTheFirst) {
  Req r(Get("Content-Type: text/plain\r\nX-Dup: 1\r\nx-dup: 2\r\n"));
  ASSERT_EQ(r.Code(), kCompleteStatus);
  ASSERT_NE(r.head->Find("content-type"), nullptr);
  EXPECT_EQ(*r.head->Find("content-type"), "text/plain");
  EXPECT_EQ(*r.head->Find("CONTENT-TYPE"), "text/plain");
  EXPECT_EQ(*r.head->Find("cOnTeNt-TyPe"), "text/plain");
  EXPECT_EQ(*r.head->Find("X-DUP"), "1");
  EXPECT_EQ(*r.head->Find("host"), "example.com");
  EXPECT_EQ(r.head->Find("content-typ"), nullptr);
  EXPECT_EQ(r.head->Find("content-typee"), nullptr);
  EXPECT_EQ(r.head->Find(""), nullptr);
}

TEST(RequestHead, EqualsIgnoreCase) {
  EXPECT_TRUE(EqualsIgnoreCase("Content-Length", "content-LENGTH"));
  EXPECT_TRUE(EqualsIgnoreCase("", ""));
  EXPECT_FALSE(EqualsIgnoreCase("abc", "abd"));
  EXPECT_FALSE(EqualsIgnoreCase("abc", "ab"));
  EXPECT_FALSE(EqualsIgnoreCase("[", "{"));  // not letters: '[' | 0x20 == '{'
  EXPECT_FALSE(EqualsIgnoreCase("\xc9", "\xe9"));
}

TEST(RequestHead, RebaseMovesEveryView) {
  for (const std::string& in :
       {"GET http://example.com?q HTTP/1.1\r\nHost: example.com\r\nA: 1\r\nB: \r\n\r\nrest"s,
        "GET /p/q?x=1 HTTP/1.0\r\nA: 1\r\n\r\n"s, "OPTIONS * HTTP/1.1\r\nHost: h\r\n\r\n"s}) {
    Req r(in);
    ASSERT_EQ(r.Code(), kCompleteStatus) << in;
    std::vector<char> copy(r.buf.begin(), r.buf.begin() + static_cast<ptrdiff_t>(r.consumed));
    RequestHead moved = *r.head;
    moved.Rebase(r.buf.data(), copy.data());
    ExpectSameHead(*r.head, r.buf.data(), moved, copy.data());
    // The views now point into the copy.
    auto inside = [&](std::string_view v) {
      if (v.data() == nullptr) return true;
      return v.data() >= copy.data() && v.data() + v.size() <= copy.data() + copy.size();
    };
    EXPECT_TRUE(inside(moved.method) && inside(moved.target) && inside(moved.path) &&
                inside(moved.query) && inside(moved.host));
    for (size_t i = 0; i < moved.num_headers; ++i) {
      EXPECT_TRUE(inside(moved.headers[i].name) && inside(moved.headers[i].value));
    }
    // Scribbling over the original does not change what the rebased head sees.
    std::string original_target(r.head->target);
    std::memset(const_cast<char*>(r.buf.data()), 'Z', r.buf.size());
    EXPECT_EQ(moved.target, original_target);
  }
}

// ---------------------------------------------------------------------------------------------
// ChunkedDecoder

struct Decoded {
  ParseStatus status = ParseStatus::kIncomplete;
  int err_status = 0;
  size_t consumed = 0;  // total, on kComplete
  std::string body;
  uint64_t body_bytes = 0;
};

// Feeds `in` in pieces of `piece` bytes (0: all at once), each piece in its own buffer.
Decoded Decode(std::string_view in, const Limits& limits, size_t piece = 0, size_t first = 0) {
  ChunkedDecoder dec(limits);
  Decoded d;
  size_t pos = 0;
  bool is_first = true;
  do {
    size_t take = is_first && first != 0 ? first : piece;
    is_first = false;
    if (take == 0 || take > in.size() - pos) take = in.size() - pos;
    std::string buf(in.substr(pos, take));
    size_t consumed = 0;
    ParseError err;
    d.status = dec.Feed(buf.data(), buf.size(), &consumed, &err,
                        [&](const char* p, size_t n) { d.body.append(p, n); });
    if (d.status == ParseStatus::kError) {
      d.err_status = err.status;
      break;
    }
    if (d.status == ParseStatus::kComplete) {
      d.consumed = pos + consumed;
      break;
    }
    EXPECT_EQ(consumed, take);
    pos += take;
  } while (pos < in.size());
  d.body_bytes = dec.body_bytes();
  return d;
}

int DecodeStatus(std::string_view in, const Limits& limits = Limits()) {
  Decoded d = Decode(in, limits);
  if (d.status == ParseStatus::kComplete) return kCompleteStatus;
  if (d.status == ParseStatus::kIncomplete) return kIncompleteStatus;
  // The same verdict one byte at a time.
  Decoded b = Decode(in, limits, 1);
  EXPECT_EQ(b.status, ParseStatus::kError) << in;
  EXPECT_EQ(b.err_status, d.err_status) << in;
  return d.err_status;
}

TEST(ChunkedDecoder, SimpleBody) {
  const std::string in = "5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n";
  Decoded d = Decode(in, Limits());
  ASSERT_EQ(d.status, ParseStatus::kComplete);
  EXPECT_EQ(d.body, "hello world");
  EXPECT_EQ(d.body_bytes, 11u);
  EXPECT_EQ(d.consumed, in.size());
}

TEST(ChunkedDecoder, ExtensionsAndTrailersWholeAndByteByByte) {
  const std::string body =
      "4;name=value\r\nWiki\r\n"
      "5 ; quoted = \"a \\\"b\\\" ;c\"\r\npedia\r\n"
      "E;flag;x=1\t;y=\"\"\r\n in\r\n\r\nchunks.\r\n"
      "00000000000A\r\n0123456789\r\n"
      "0;last=\"yes\"\r\n"
      "Expires: never\r\nX-Trailer:  \x80 v \r\nEmpty:\r\n\r\n";
  const std::string next = "GET / HTTP/1.1\r\n";
  const std::string in = body + next;
  const std::string expected = "Wikipedia in\r\n\r\nchunks.0123456789";
  Decoded whole = Decode(in, Limits());
  ASSERT_EQ(whole.status, ParseStatus::kComplete) << whole.err_status;
  EXPECT_EQ(whole.body, expected);
  EXPECT_EQ(whole.consumed, body.size());  // the pipelined request is not consumed
  Decoded bytes = Decode(in, Limits(), 1);
  ASSERT_EQ(bytes.status, ParseStatus::kComplete);
  EXPECT_EQ(bytes.body, expected);
  EXPECT_EQ(bytes.consumed, body.size());
  // Every split point.
  for (size_t k = 1; k < in.size(); ++k) {
    Decoded two = Decode(in, Limits(), 0, k);
    ASSERT_EQ(two.status, ParseStatus::kComplete) << k;
    EXPECT_EQ(two.body, expected) << k;
    EXPECT_EQ(two.consumed, body.size()) << k;
  }
  // Every prefix is incomplete.
  for (size_t k = 0; k < body.size(); ++k) {
    EXPECT_EQ(Decode(body.substr(0, k), Limits()).status, ParseStatus::kIncomplete) << k;
  }
}

TEST(ChunkedDecoder, DataRunsAreViewsIntoTheInput) {
  const std::string in = "3\r\nabc\r\n0\r\n\r\n";
  const Limits limits;
  ChunkedDecoder dec(limits);
  size_t consumed = 0;
  ParseError err;
  std::vector<std::pair<const char*, size_t>> runs;
  ASSERT_EQ(dec.Feed(in.data(), in.size(), &consumed, &err,
                     [&](const char* p, size_t n) { runs.emplace_back(p, n); }),
            ParseStatus::kComplete);
  ASSERT_EQ(runs.size(), 1u);
  EXPECT_EQ(runs[0].first, in.data() + 3);
  EXPECT_EQ(runs[0].second, 3u);
  // Done stays done; Reset starts over.
  EXPECT_EQ(dec.Feed(in.data(), in.size(), &consumed, &err, [](const char*, size_t) {}),
            ParseStatus::kComplete);
  EXPECT_EQ(consumed, 0u);
  dec.Reset();
  EXPECT_EQ(dec.body_bytes(), 0u);
  EXPECT_EQ(dec.Feed(in.data(), in.size(), &consumed, &err, [](const char*, size_t) {}),
            ParseStatus::kComplete);
  EXPECT_EQ(consumed, in.size());
  EXPECT_EQ(dec.body_bytes(), 3u);
}

TEST(ChunkedDecoder, ChunkSizeErrors) {
  EXPECT_EQ(DecodeStatus("g\r\n"), 400);
  EXPECT_EQ(DecodeStatus("\r\n"), 400);
  EXPECT_EQ(DecodeStatus("-1\r\n"), 400);
  EXPECT_EQ(DecodeStatus("+1\r\nx\r\n0\r\n\r\n"), 400);
  EXPECT_EQ(DecodeStatus("0x5\r\nhello\r\n0\r\n\r\n"), 400);
  EXPECT_EQ(DecodeStatus(" 5\r\nhello\r\n0\r\n\r\n"), 400);
  EXPECT_EQ(DecodeStatus("5 \r\nhello\r\n0\r\n\r\n"), 400);  // BWS only before ';'
  EXPECT_EQ(DecodeStatus("5\n"), 400);                        // bare LF
  EXPECT_EQ(DecodeStatus("5\r\r\n"), 400);
  EXPECT_EQ(DecodeStatus("5\0\r\n"s), 400);
  // At most 16 hex digits, even with leading zeros; 16 digits may still be over max_body_bytes.
  EXPECT_EQ(DecodeStatus("00000000000000001\r\nx\r\n0\r\n\r\n"), 400);
  EXPECT_EQ(DecodeStatus("0000000000000001\r\nx\r\n0\r\n\r\n"), kCompleteStatus);
  EXPECT_EQ(DecodeStatus("FFFFFFFFFFFFFFFF\r\n"), 413);
  EXPECT_EQ(DecodeStatus("10000000000000000\r\n"), 400);
}

TEST(ChunkedDecoder, ChunkExtensionErrors) {
  for (const char* ext : {";", "; ", ";=v", ";a=", ";a=\"x", ";a=\"x\\\"", ";a b", ";a;", "x",
                          ";a=b c", ";a=\"x\"y", ";a=\"\x01\"", ";a=\"\\\x01\"", ";a=b=c", ";a,b",
                          "; a = b ", ";a\r"}) {
    EXPECT_EQ(DecodeStatus("1"s + ext + "\r\nx\r\n0\r\n\r\n"), 400) << ext;
  }
  for (const char* ext : {";a", " ;a", "\t; a", ";a=b", ";a = b", ";a=\"\"", ";a=\"x y\\\\\"", ";a;b=c",
                          ";a=\"\x80\"", ";a=\"\\\x80\""}) {
    EXPECT_EQ(DecodeStatus("1"s + ext + "\r\nx\r\n0"s + ext + "\r\n\r\n"), kCompleteStatus) << ext;
  }
}

TEST(ChunkedDecoder, ChunkLineLengthExactlyAtAndOnePast) {
  // The chunk-size line, CRLF included, is at most kChunkLineBytesMax bytes.
  auto line = [](size_t n) { return "1;x=" + std::string(n - 6, 'v') + "\r\n"; };
  ASSERT_EQ(line(kChunkLineBytesMax).size(), kChunkLineBytesMax);
  const std::string at = line(kChunkLineBytesMax) + "x\r\n0\r\n\r\n";
  EXPECT_EQ(DecodeStatus(at), kCompleteStatus);
  EXPECT_EQ(Decode(at, Limits(), 1).status, ParseStatus::kComplete);
  EXPECT_EQ(Decode(at, Limits(), 1000).status, ParseStatus::kComplete);
  EXPECT_EQ(DecodeStatus(line(kChunkLineBytesMax + 1) + "x\r\n0\r\n\r\n"), 400);
  // Incomplete but already too long.
  EXPECT_EQ(DecodeStatus(std::string(kChunkLineBytesMax, '1')), 400);
  EXPECT_EQ(DecodeStatus("1;x=" + std::string(kChunkLineBytesMax - 5, 'v')), kIncompleteStatus);
}

TEST(ChunkedDecoder, DataMustBeFollowedByExactlyCrlf) {
  EXPECT_EQ(DecodeStatus("3\r\nabcX\r\n0\r\n\r\n"), 400);
  EXPECT_EQ(DecodeStatus("3\r\nabc\n0\r\n\r\n"), 400);
  EXPECT_EQ(DecodeStatus("3\r\nabc\rX0\r\n\r\n"), 400);
  EXPECT_EQ(DecodeStatus("3\r\nabcd\r\n0\r\n\r\n"), 400);
  EXPECT_EQ(DecodeStatus("3\r\nab\r\n0\r\n\r\n"), 400);  // "ab\r" is the data, then "\n0"
  EXPECT_EQ(DecodeStatus("3\r\nabc\r\n\r\n0\r\n\r\n"), 400);  // an empty size line
}

TEST(ChunkedDecoder, BodySizeExactlyAtAndOnePast) {
  Limits l;
  l.max_body_bytes = 10;
  Decoded d = Decode("4\r\n0123\r\n6\r\n456789\r\n0\r\n\r\n", l);
  ASSERT_EQ(d.status, ParseStatus::kComplete);
  EXPECT_EQ(d.body_bytes, 10u);
  EXPECT_EQ(DecodeStatus("a\r\n0123456789\r\n0\r\n\r\n", l), kCompleteStatus);
  EXPECT_EQ(DecodeStatus("b\r\n0123456789a\r\n0\r\n\r\n", l), 413);
  EXPECT_EQ(DecodeStatus("4\r\n0123\r\n7\r\n4567890\r\n0\r\n\r\n", l), 413);
  // 413 as soon as the size line says so, before any of that chunk's data.
  Decoded early = Decode("4\r\n0123\r\n7\r\n", l);
  EXPECT_EQ(early.status, ParseStatus::kError);
  EXPECT_EQ(early.err_status, 413);
  EXPECT_EQ(early.body, "0123");
}

TEST(ChunkedDecoder, TrailerErrors) {
  const std::string last = "1\r\nx\r\n0\r\n";
  EXPECT_EQ(DecodeStatus(last + "X: 1\r\n\r\n"), kCompleteStatus);
  EXPECT_EQ(DecodeStatus(last + "X: 1\r\n  folded\r\n\r\n"), 400);  // obs-fold
  EXPECT_EQ(DecodeStatus(last + " X: 1\r\n\r\n"), 400);
  EXPECT_EQ(DecodeStatus(last + "X : 1\r\n\r\n"), 400);
  EXPECT_EQ(DecodeStatus(last + "X\t: 1\r\n\r\n"), 400);
  EXPECT_EQ(DecodeStatus(last + ": 1\r\n\r\n"), 400);
  EXPECT_EQ(DecodeStatus(last + "X\r\n\r\n"), 400);
  EXPECT_EQ(DecodeStatus(last + "X: a\0b\r\n\r\n"s), 400);
  EXPECT_EQ(DecodeStatus(last + "X: a\x01\r\n\r\n"), 400);
  EXPECT_EQ(DecodeStatus(last + "X: a\nY: b\r\n\r\n"), 400);  // bare LF
  EXPECT_EQ(DecodeStatus(last + "X: a\rY: b\r\n\r\n"), 400);  // bare CR
  EXPECT_EQ(DecodeStatus(last + "\n"), 400);
  EXPECT_EQ(DecodeStatus(last + "\r\r"), 400);
  EXPECT_EQ(DecodeStatus(last + "X: 1\r\n"), kIncompleteStatus);
}

TEST(ChunkedDecoder, TrailerLimitsExactlyAtAndOnePast) {
  Limits l;
  l.max_header_count = 3;
  l.max_header_bytes = 64;
  const std::string last = "0\r\n";
  EXPECT_EQ(DecodeStatus(last + "A: 1\r\nB: 2\r\nC: 3\r\n\r\n", l), kCompleteStatus);
  EXPECT_EQ(DecodeStatus(last + "A: 1\r\nB: 2\r\nC: 3\r\nD: 4\r\n\r\n", l), 431);
  // Trailer section (fields and the final CRLF) of exactly 64 bytes, then 65.
  auto section = [](size_t n) { return "X: " + std::string(n - 7, 'v') + "\r\n\r\n"; };
  ASSERT_EQ(section(64).size(), 64u);
  EXPECT_EQ(DecodeStatus(last + section(64), l), kCompleteStatus);
  EXPECT_EQ(DecodeStatus(last + section(65), l), 431);
  EXPECT_EQ(Decode(last + section(64), l, 1).status, ParseStatus::kComplete);
  // Trailer lines longer than the chunk-line buffer are fine within max_header_bytes.
  Limits big;
  EXPECT_EQ(DecodeStatus(last + section(3 * kChunkLineBytesMax)), kCompleteStatus);
  EXPECT_EQ(Decode(last + section(3 * kChunkLineBytesMax), big, 7).status, ParseStatus::kComplete);
}

TEST(ChunkedDecoder, WithParsedHead) {
  const std::string in =
      "POST /c HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
      "3\r\nabc\r\n0\r\n\r\nGET /next HTTP/1.1\r\nHost: h\r\n\r\n";
  Req r(in);
  ASSERT_EQ(r.Code(), kCompleteStatus);
  ASSERT_EQ(r.head->body_kind, BodyKind::kChunked);
  Decoded d = Decode(std::string_view(in).substr(r.consumed), Limits());
  ASSERT_EQ(d.status, ParseStatus::kComplete);
  EXPECT_EQ(d.body, "abc");
  Req next(in.substr(r.consumed + d.consumed));
  ASSERT_EQ(next.Code(), kCompleteStatus);
  EXPECT_EQ(next.head->path, "/next");
}

}  // namespace
}  // namespace metronome::http
