#include "stages/http/path.h"

#include <cassert>
#include <cstdint>

namespace metronome::http {
namespace {

int HexValue(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

bool Unreserved(unsigned char c) {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '-' ||
         c == '.' || c == '_' || c == '~';
}

// Whether `path` (starting with '/') has a "." or ".." segment.
bool HasDotSegment(std::string_view path) {
  for (size_t i = 0; i < path.size(); ++i) {
    if (path[i] != '/') continue;
    size_t j = i + 1;
    if (j < path.size() && path[j] == '.') {
      size_t k = j + 1;
      if (k < path.size() && path[k] == '.') ++k;
      if (k == path.size() || path[k] == '/') return true;
    }
  }
  return false;
}

// RFC 3986 5.2.4 for an absolute path, segment by segment.
std::string RemoveDotSegments(std::string_view in) {
  assert(!in.empty() && in[0] == '/');
  std::string out;
  out.reserve(in.size());
  size_t i = 1;  // after the leading '/'
  bool trailing = false;
  for (;;) {
    size_t slash = in.find('/', i);
    std::string_view seg = in.substr(i, slash == std::string_view::npos ? std::string_view::npos : slash - i);
    const bool last = slash == std::string_view::npos;
    trailing = false;
    if (seg == ".") {
      trailing = last;
    } else if (seg == "..") {
      size_t cut = out.rfind('/');
      out.resize(cut == std::string::npos ? 0 : cut);  // the root has nothing above it
      trailing = last;
    } else {
      out += '/';
      out.append(seg.data(), seg.size());
    }
    if (last) break;
    i = slash + 1;
  }
  if (out.empty() || trailing) out += '/';
  return out;
}

}  // namespace

PathCheck NormalizePath(std::string_view raw, std::string* out) {
  if (raw.empty() || raw[0] != '/') return PathCheck::kAsIs;
  const bool escaped = raw.find('%') != std::string_view::npos;
  if (!escaped && !HasDotSegment(raw)) return PathCheck::kAsIs;
  std::string decoded;
  if (escaped) {
    decoded.reserve(raw.size());
    for (size_t i = 0; i < raw.size(); ++i) {
      if (raw[i] == '%' && i + 2 < raw.size()) {
        int hi = HexValue(raw[i + 1]), lo = HexValue(raw[i + 2]);
        if (hi >= 0 && lo >= 0) {
          const auto c = static_cast<unsigned char>(hi * 16 + lo);
          if (c == 0) return PathCheck::kNul;
          if (Unreserved(c)) {
            decoded += static_cast<char>(c);
            i += 2;
            continue;
          }
        }
      }
      decoded += raw[i];
    }
  } else {
    decoded.assign(raw.data(), raw.size());
  }
  std::string normal = HasDotSegment(decoded) ? RemoveDotSegments(decoded) : std::move(decoded);
  if (normal == raw) return PathCheck::kAsIs;
  *out = std::move(normal);
  return PathCheck::kNormalized;
}

bool ParamValueIsSafe(std::string_view raw) {
  if (raw.find('%') == std::string_view::npos) {
    // Undecoded text: the path was normalised, so only a literal ".." segment could be here,
    // and normalisation removed those.
    return true;
  }
  std::string v;
  v.reserve(raw.size());
  for (size_t i = 0; i < raw.size(); ++i) {
    if (raw[i] == '%' && i + 2 < raw.size()) {
      int hi = HexValue(raw[i + 1]), lo = HexValue(raw[i + 2]);
      if (hi >= 0 && lo >= 0) {
        char c = static_cast<char>(hi * 16 + lo);
        if (c == '\0') return false;
        v += c;
        i += 2;
        continue;
      }
    }
    v += raw[i];
  }
  // Any ".." segment of the decoded value, wherever '/' (decoded from %2F) falls.
  size_t i = 0;
  for (;;) {
    size_t slash = v.find('/', i);
    std::string_view seg(v.data() + i, (slash == std::string::npos ? v.size() : slash) - i);
    if (seg == "..") return false;
    if (slash == std::string::npos) return true;
    i = slash + 1;
  }
}

}  // namespace metronome::http
