// Durations and sizes as they appear in the config: "200us", "1ms", "5s"; "64KiB", "1MiB".
//
// Thread-safety: pure functions.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include "absl/strings/string_view.h"
#include <string_view>

namespace metronome {

inline constexpr int64_t kNanosPerMicro = 1000;
inline constexpr int64_t kNanosPerMilli = 1000 * kNanosPerMicro;
inline constexpr int64_t kNanosPerSecond = 1000 * kNanosPerMilli;

// Parses "<digits>[.<digits>]<unit>" with unit one of ns, us, ms, s. A bare number is refused:
// a duration without a unit is the classic misconfiguration (was it ms or s?).
std::optional<int64_t> ParseDurationNs(absl::string_view text);
// Parses "<digits><unit>" with unit one of B, KiB, MiB, GiB (also KB/MB/GB as powers of 1000).
std::optional<uint64_t> ParseSizeBytes(absl::string_view text);

// The shortest exact form: 100000 -> "100us", 1500000 -> "1500us", 2000000000 -> "2s".
std::string FormatDuration(int64_t ns);
std::string FormatSize(uint64_t bytes);

}  // namespace metronome
