#include "stages/http/fields.h"

#include <strings.h>

namespace metronome::http {
namespace {

bool NameIs(std::string_view name, std::string_view want) {
  return name.size() == want.size() && strncasecmp(name.data(), want.data(), want.size()) == 0;
}

// Whether the comma-separated list `value` holds `token` (case-insensitive, OWS trimmed).
bool ListHas(std::string_view value, std::string_view token) {
  size_t i = 0;
  while (i <= value.size()) {
    size_t comma = value.find(',', i);
    if (comma == std::string_view::npos) comma = value.size();
    std::string_view item = value.substr(i, comma - i);
    while (!item.empty() && (item.front() == ' ' || item.front() == '\t')) item.remove_prefix(1);
    while (!item.empty() && (item.back() == ' ' || item.back() == '\t')) item.remove_suffix(1);
    if (NameIs(item, token)) return true;
    i = comma + 1;
  }
  return false;
}

}  // namespace

bool IsTokenChar(char c) {
  if ((c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z')) return true;
  switch (c) {
    case '!': case '#': case '$': case '%': case '&': case '\'': case '*': case '+': case '-':
    case '.': case '^': case '_': case '`': case '|': case '~':
      return true;
    default:
      return false;
  }
}

FieldCheck CheckResponseField(std::string_view name, std::string_view value) {
  FieldCheck r;
  if (name.empty()) {
    r.rule = FieldRule::kInvalid;
    r.why = "an empty field name";
    return r;
  }
  for (char c : name) {
    if (!IsTokenChar(c)) {
      r.rule = FieldRule::kInvalid;
      r.why = "a field name that is not a token (RFC 9110 5.1)";
      return r;
    }
  }
  for (char c : value) {
    const auto u = static_cast<unsigned char>(c);
    if ((u < 0x20 && c != '\t') || u == 0x7f) {
      r.rule = FieldRule::kInvalid;
      r.why = "a control character (CR, LF, NUL, ...) in a field value (response splitting)";
      return r;
    }
  }
  if (NameIs(name, "content-length")) {
    std::string_view v = value;
    while (!v.empty() && (v.front() == ' ' || v.front() == '\t')) v.remove_prefix(1);
    while (!v.empty() && (v.back() == ' ' || v.back() == '\t')) v.remove_suffix(1);
    int64_t n = 0;
    if (v.empty() || v.size() > 18) {
      r.rule = FieldRule::kInvalid;
      r.why = "a Content-Length that is not a number of bytes";
      return r;
    }
    for (char c : v) {
      if (c < '0' || c > '9') {
        r.rule = FieldRule::kInvalid;
        r.why = "a Content-Length that is not a number of bytes";
        return r;
      }
      n = n * 10 + (c - '0');
    }
    r.rule = FieldRule::kContentLength;
    r.content_length = n;
    return r;
  }
  if (NameIs(name, "connection")) {
    r.rule = FieldRule::kConnection;
    r.close = ListHas(value, "close");
    return r;
  }
  if (NameIs(name, "transfer-encoding") || NameIs(name, "date") || NameIs(name, "server") ||
      NameIs(name, "keep-alive")) {
    r.rule = FieldRule::kServerOwned;
    return r;
  }
  return r;
}

}  // namespace metronome::http
