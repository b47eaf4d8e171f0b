// Debian's abseil is built with its own absl::string_view (ABSL_OPTION_USE_STD_STRING_VIEW 0),
// so absl::StrCat does not take a std::string_view. Sv() bridges the two without a copy.
#pragma once

#include <string_view>

#include "absl/strings/string_view.h"

namespace metronome {

inline absl::string_view Sv(std::string_view s) { return absl::string_view(s.data(), s.size()); }
inline std::string_view Sv(absl::string_view s) { return std::string_view(s.data(), s.size()); }

}  // namespace metronome
