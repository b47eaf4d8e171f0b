// How many processes serve, and when the supervisor replaces one: the config keys the
// supervisor owns (server.workers, server.max_requests[_jitter], server.max_rss,
// python.budget.hard_action), read before the pipeline (one worker's) is built.
//
// Thread-safety: pure functions over the config document.
#pragma once

#include <cstdint>
#include <string>

#include "runtime/config.h"

namespace metronome::supervisor {

struct ProcessPlan {
  bool supervised = false;  // server.workers is set: a supervisor and its workers
  int workers = 1;
  std::string workers_reason = "1";  // "2 (auto: 2 CPUs in the affinity mask, no cgroup quota)"
  int64_t max_requests = 0;
  int64_t max_requests_jitter = 0;
  int64_t max_rss_bytes = 0;
  bool replace_stuck = false;
  bool reuse_port = true;  // server.balance
};

// Reads the keys (errors go into the document, like every other key).
ProcessPlan ReadProcessPlan(ConfigDoc& doc);

// The CPUs this process may use: its affinity mask, bounded by a cgroup v2 CPU quota
// (cpu.max), rounded up; *why says which bound applied.
int UsableCpus(std::string* why);

}  // namespace metronome::supervisor
