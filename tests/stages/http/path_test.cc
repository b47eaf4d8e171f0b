#include "stages/http/path.h"

#include <gtest/gtest.h>

namespace metronome::http {
namespace {

std::string Norm(std::string_view raw) {
  std::string out;
  switch (NormalizePath(raw, &out)) {
    case PathCheck::kAsIs: return std::string(raw);
    case PathCheck::kNormalized: return out;
    case PathCheck::kNul: return "<NUL>";
  }
  return "?";
}

TEST(NormalizePath, UnreservedCharactersAreDecoded) {
  EXPECT_EQ(Norm("/%70lain%74ext"), "/plaintext");
  EXPECT_EQ(Norm("/%41%5a%61%7A%30%39%2D%2E%5F%7E"), "/AZaz09-._~");
  EXPECT_EQ(Norm("/a%2db"), "/a-b");  // lower-case hex too
}

TEST(NormalizePath, ReservedAndOtherEscapesStay) {
  EXPECT_EQ(Norm("/a%2Fb"), "/a%2Fb");
  EXPECT_EQ(Norm("/a%2fb"), "/a%2fb");
  EXPECT_EQ(Norm("/a%20b"), "/a%20b");
  EXPECT_EQ(Norm("/caf%C3%A9"), "/caf%C3%A9");
  EXPECT_EQ(Norm("/%3F%23"), "/%3F%23");
  // Malformed escapes are left as they are (the app sees them raw).
  EXPECT_EQ(Norm("/%zz"), "/%zz");
  EXPECT_EQ(Norm("/%4"), "/%4");
  EXPECT_EQ(Norm("/%"), "/%");
}

TEST(NormalizePath, EncodedNulIsRefused) {
  EXPECT_EQ(Norm("/hello/a%00b"), "<NUL>");
  EXPECT_EQ(Norm("/%00"), "<NUL>");
}

TEST(NormalizePath, DotSegmentsAreRemoved) {
  EXPECT_EQ(Norm("/a/./b"), "/a/b");
  EXPECT_EQ(Norm("/a/b/../c"), "/a/c");
  EXPECT_EQ(Norm("/a/b/.."), "/a/");
  EXPECT_EQ(Norm("/a/b/."), "/a/b/");
  EXPECT_EQ(Norm("/.."), "/");
  EXPECT_EQ(Norm("/../../etc/passwd"), "/etc/passwd");
  EXPECT_EQ(Norm("/."), "/");
  EXPECT_EQ(Norm("/a/../../../b"), "/b");
  // Not dot segments.
  EXPECT_EQ(Norm("/a/.b/..c/.../b."), "/a/.b/..c/.../b.");
  EXPECT_EQ(Norm("/a//b"), "/a//b");
}

TEST(NormalizePath, EncodedDotsAreDotsAfterDecoding) {
  EXPECT_EQ(Norm("/files/%2e%2e/%2e%2e/etc/passwd"), "/etc/passwd");
  EXPECT_EQ(Norm("/files/%2E%2e/x"), "/x");
  EXPECT_EQ(Norm("/files/.%2e/x"), "/x");
  // An encoded slash keeps "..%2F.." one (literal) segment.
  EXPECT_EQ(Norm("/files/..%2F../x"), "/files/..%2F../x");
}

TEST(NormalizePath, AlreadyNormalPathsAreLeftAlone) {
  std::string out = "untouched";
  EXPECT_EQ(NormalizePath("/plaintext", &out), PathCheck::kAsIs);
  EXPECT_EQ(NormalizePath("/", &out), PathCheck::kAsIs);
  EXPECT_EQ(NormalizePath("", &out), PathCheck::kAsIs);
  EXPECT_EQ(NormalizePath("/a%2Fb", &out), PathCheck::kAsIs);  // nothing to decode
  EXPECT_EQ(out, "untouched");
}

TEST(ParamValueIsSafe, DecodedDotSegmentsAndNulAreNot) {
  EXPECT_TRUE(ParamValueIsSafe("report.pdf"));
  EXPECT_TRUE(ParamValueIsSafe("a/b/c"));
  EXPECT_TRUE(ParamValueIsSafe("a%2Fb"));
  EXPECT_TRUE(ParamValueIsSafe("..a%2Fb.."));
  EXPECT_TRUE(ParamValueIsSafe("%2E%2E%2E"));
  EXPECT_FALSE(ParamValueIsSafe("..%2F..%2Fetc"));
  EXPECT_FALSE(ParamValueIsSafe("%2E%2E"));
  EXPECT_FALSE(ParamValueIsSafe("a%2F..%2Fb"));
  EXPECT_FALSE(ParamValueIsSafe("a%2F%2e%2e"));
  EXPECT_FALSE(ParamValueIsSafe("x%00y"));
}

}  // namespace
}  // namespace metronome::http
