#include "runtime/units.h"

#include <gtest/gtest.h>

namespace metronome {
namespace {

TEST(Units, Durations) {
  EXPECT_EQ(ParseDurationNs("200us"), 200'000);
  EXPECT_EQ(ParseDurationNs("1ms"), 1'000'000);
  EXPECT_EQ(ParseDurationNs("5s"), 5'000'000'000);
  EXPECT_EQ(ParseDurationNs("750ns"), 750);
  EXPECT_EQ(ParseDurationNs("1.5ms"), 1'500'000);
  EXPECT_EQ(ParseDurationNs("0us"), 0);
}

TEST(Units, DurationsRejected) {
  for (const char* bad : {"", "5", "ms", "1.ms", ".5ms", "1..5ms", "1 ms", "-1ms", "+1ms", "1h",
                          "1.0000000001s" /* finer than 1ns */, "99999999999999999999s"}) {
    EXPECT_FALSE(ParseDurationNs(bad).has_value()) << bad;
  }
}

TEST(Units, Sizes) {
  EXPECT_EQ(ParseSizeBytes("512B"), 512u);
  EXPECT_EQ(ParseSizeBytes("64KiB"), 64u * 1024);
  EXPECT_EQ(ParseSizeBytes("1MiB"), 1u << 20);
  EXPECT_EQ(ParseSizeBytes("2GiB"), 2ull << 30);
  EXPECT_EQ(ParseSizeBytes("1KB"), 1000u);
  EXPECT_EQ(ParseSizeBytes("1.5KiB"), 1536u);
  for (const char* bad : {"", "64", "KiB", "64kib", "64 KiB", "1.1B", "-1B"}) {
    EXPECT_FALSE(ParseSizeBytes(bad).has_value()) << bad;
  }
}

TEST(Units, FormatRoundTrips) {
  for (int64_t ns : {int64_t{1}, int64_t{1000}, int64_t{1500000}, int64_t{2000000000}, int64_t{999}}) {
    EXPECT_EQ(ParseDurationNs(FormatDuration(ns)), ns);
  }
  EXPECT_EQ(FormatDuration(100'000), "100us");
  EXPECT_EQ(FormatSize(65536), "64KiB");
  EXPECT_EQ(FormatSize(1000), "1000B");
}

}  // namespace
}  // namespace metronome
