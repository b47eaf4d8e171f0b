#include "runtime/units.h"

#include <charconv>
#include <limits>

#include "absl/strings/str_cat.h"

namespace metronome {
namespace {

__extension__ typedef unsigned __int128 u128;  // overflow-free scaling

struct Unit {
  absl::string_view suffix;
  uint64_t scale;
};

// Parses digits with an optional fraction into value*scale, refusing overflow and fractions
// finer than one unit of the result.
template <typename T>
std::optional<T> ParseScaled(absl::string_view text, const Unit* units, size_t n_units) {
  size_t digits_end = 0;
  while (digits_end < text.size() &&
         ((text[digits_end] >= '0' && text[digits_end] <= '9') || text[digits_end] == '.')) {
    ++digits_end;
  }
  absl::string_view number = text.substr(0, digits_end);
  absl::string_view suffix = text.substr(digits_end);
  if (number.empty() || number.front() == '.' || number.back() == '.') return std::nullopt;
  const Unit* unit = nullptr;
  for (size_t i = 0; i < n_units; ++i) {
    if (units[i].suffix == suffix) unit = &units[i];
  }
  if (unit == nullptr) return std::nullopt;
  size_t dot = number.find('.');
  absl::string_view whole = number.substr(0, dot);
  absl::string_view frac = dot == absl::string_view::npos ? absl::string_view{} : number.substr(dot + 1);
  if (frac.find('.') != absl::string_view::npos) return std::nullopt;
  u128 value = 0;
  for (char c : whole) {
    value = value * 10 + static_cast<unsigned>(c - '0');
    if (value > UINT64_MAX) return std::nullopt;
  }
  value *= unit->scale;
  uint64_t denom = 1;
  u128 frac_value = 0;
  for (char c : frac) {
    if (denom > UINT64_MAX / 10) return std::nullopt;
    denom *= 10;
    frac_value = frac_value * 10 + static_cast<unsigned>(c - '0');
  }
  if (!frac.empty()) {
    u128 scaled = frac_value * unit->scale;
    if (scaled % denom != 0) return std::nullopt;  // finer than 1ns or 1B
    value += scaled / denom;
  }
  if (value > static_cast<u128>(std::numeric_limits<T>::max())) return std::nullopt;
  return static_cast<T>(value);
}

constexpr Unit kDurationUnits[] = {
    {"ns", 1}, {"us", kNanosPerMicro}, {"ms", kNanosPerMilli}, {"s", kNanosPerSecond}};
constexpr Unit kSizeUnits[] = {{"B", 1},
                               {"KiB", 1ull << 10},
                               {"MiB", 1ull << 20},
                               {"GiB", 1ull << 30},
                               {"KB", 1000},
                               {"MB", 1000 * 1000},
                               {"GB", 1000 * 1000 * 1000}};

}  // namespace

std::optional<int64_t> ParseDurationNs(absl::string_view text) {
  return ParseScaled<int64_t>(text, kDurationUnits, std::size(kDurationUnits));
}

std::optional<uint64_t> ParseSizeBytes(absl::string_view text) {
  return ParseScaled<uint64_t>(text, kSizeUnits, std::size(kSizeUnits));
}

std::string FormatDuration(int64_t ns) {
  if (ns != 0 && ns % kNanosPerSecond == 0) return absl::StrCat(ns / kNanosPerSecond, "s");
  if (ns != 0 && ns % kNanosPerMilli == 0) return absl::StrCat(ns / kNanosPerMilli, "ms");
  if (ns != 0 && ns % kNanosPerMicro == 0) return absl::StrCat(ns / kNanosPerMicro, "us");
  return absl::StrCat(ns, "ns");
}

std::string FormatSize(uint64_t bytes) {
  if (bytes != 0 && bytes % (1ull << 30) == 0) return absl::StrCat(bytes >> 30, "GiB");
  if (bytes != 0 && bytes % (1ull << 20) == 0) return absl::StrCat(bytes >> 20, "MiB");
  if (bytes != 0 && bytes % (1ull << 10) == 0) return absl::StrCat(bytes >> 10, "KiB");
  return absl::StrCat(bytes, "B");
}

}  // namespace metronome
