// The request path as the router and the application see it: RFC 3986 normalisation of the
// raw path from the request line, so that equivalent paths route alike and no decoded dot
// segment can climb out of a route.
//
//   1. Percent-encoded *unreserved* characters (ALPHA, DIGIT, "-", ".", "_", "~") are decoded
//      (§6.2.2.2): "/%70lain%74ext" is "/plaintext". Reserved ones stay encoded ("%2F" is not a
//      segment separator). An encoded NUL ("%00") is refused, as a raw NUL is.
//   2. Dot segments are removed after that (§5.2.4): "/a/./b/../c" is "/a/c", and "%2e%2e" is
//      a ".." segment like any other; a ".." at the root stays at the root.
//   3. A path parameter is checked once more after its own decoding (the handler gets it
//      decoded): a value in which "%2F" and "%2E" decode to a ".." segment (or a NUL) is
//      refused, so a decoded ".." never crosses a parameter ("{rest:path}" = "../../etc").
//
// Thread-safety: pure functions.
#pragma once

#include <string>
#include <string_view>

namespace metronome::http {

enum class PathCheck : uint8_t {
  kAsIs,        // already normal: use the raw path
  kNormalized,  // *out holds the normal form
  kNul,         // an encoded NUL: answer 400
};

// REQUIRES: `raw` is a path from the parser (starts with '/', or is empty for "*").
PathCheck NormalizePath(std::string_view raw, std::string* out);

// Whether a path parameter's raw value stays clear of ".." segments and NULs once fully
// percent-decoded (point 3).
bool ParamValueIsSafe(std::string_view raw);

}  // namespace metronome::http
