// Logging to stderr: one line per event, with a timestamp and the thread's name.
//
// Thread-safety: every function may be called from any thread; a line is written with a single
// write(2), so lines from different threads never interleave.
#pragma once

#include <atomic>
#include <cstdarg>
#include <cstdint>

namespace metronome {

enum class LogLevel { kDebug, kInfo, kWarn, kError };

void SetLogLevel(LogLevel level);
void Log(LogLevel level, const char* fmt, ...) __attribute__((format(printf, 2, 3)));
#define LOG_INFO(...) ::metronome::Log(::metronome::LogLevel::kInfo, __VA_ARGS__)
#define LOG_WARN(...) ::metronome::Log(::metronome::LogLevel::kWarn, __VA_ARGS__)
#define LOG_ERROR(...) ::metronome::Log(::metronome::LogLevel::kError, __VA_ARGS__)

// Logs and aborts: for impossible states after start-up (STYLE.md: errors in three tiers).
[[noreturn]] void Fatal(const char* fmt, ...) __attribute__((format(printf, 1, 2)));

// At most `per_second` lines per second for one call site; the lines it drops are counted and
// reported on the next line it lets through. Lock-free.
class RateLimit {
 public:
  explicit constexpr RateLimit(int per_second) : per_second_(per_second) {}
  // True if the caller may log now; *dropped gets how many were suppressed before.
  bool Allow(uint64_t* dropped);

 private:
  const int per_second_;
  std::atomic<int64_t> window_start_s_{0};
  std::atomic<int> in_window_{0};
  std::atomic<uint64_t> dropped_{0};
};

// Logs through a per-call-site RateLimit of 5 lines a second.
#define LOG_RATE_LIMITED(level, fmt, ...)                                                    \
  do {                                                                                       \
    static ::metronome::RateLimit metronome_rl_(5);                                          \
    uint64_t metronome_dropped_;                                                             \
    if (metronome_rl_.Allow(&metronome_dropped_)) {                                          \
      if (metronome_dropped_ > 0)                                                            \
        ::metronome::Log(level, fmt " (%llu similar lines suppressed)", ##__VA_ARGS__,       \
                         static_cast<unsigned long long>(metronome_dropped_));               \
      else                                                                                   \
        ::metronome::Log(level, fmt, ##__VA_ARGS__);                                         \
    }                                                                                        \
  } while (0)

}  // namespace metronome
