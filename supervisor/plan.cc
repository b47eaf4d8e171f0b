#include "supervisor/plan.h"

#include <sched.h>

#include <cmath>
#include <fstream>
#include <sstream>

#include "absl/strings/str_cat.h"

namespace metronome::supervisor {

int UsableCpus(std::string* why) {
  cpu_set_t set;
  CPU_ZERO(&set);
  int cpus = sched_getaffinity(0, sizeof set, &set) == 0 ? CPU_COUNT(&set) : 1;
  *why = absl::StrCat(cpus, " CPU(s) in the affinity mask");
  // cgroup v2: "max 100000" (no quota) or "200000 100000" (2 CPUs). The path of this process's
  // cgroup is in /proc/self/cgroup ("0::/system.slice/x.service").
  std::ifstream cg("/proc/self/cgroup");
  std::string line, path;
  while (std::getline(cg, line)) {
    if (line.rfind("0::", 0) == 0) path = line.substr(3);
  }
  std::ifstream max("/sys/fs/cgroup" + path + "/cpu.max");
  std::string quota;
  int64_t period = 0;
  if (max >> quota >> period && quota != "max" && period > 0) {
    const double q = std::stod(quota) / static_cast<double>(period);
    const int limit = std::max(1, static_cast<int>(std::ceil(q - 1e-9)));
    if (limit < cpus) {
      cpus = limit;
      *why = absl::StrCat(cpus, " CPU(s): the cgroup CPU quota (", quota, "/", period, ")");
    } else {
      absl::StrAppend(why, " (the cgroup quota allows more)");
    }
  } else {
    absl::StrAppend(why, ", no cgroup CPU quota");
  }
  return cpus;
}

ProcessPlan ReadProcessPlan(ConfigDoc& doc) {
  ProcessPlan plan;
  ConfigNode server = doc.Root().Map("server");
  if (server.Has("workers")) {
    plan.supervised = true;
    const YAML::Node& raw = server.raw()["workers"];
    if (raw.IsScalar() && raw.Scalar() == "auto") {
      server.Consume("workers");
      std::string why;
      plan.workers = UsableCpus(&why);
      plan.workers_reason = absl::StrCat(plan.workers, " (auto: ", why, ")");
    } else {
      plan.workers = static_cast<int>(server.Int("workers", 1, 1, 256));
      plan.workers_reason = absl::StrCat(plan.workers);
    }
  }
  plan.reuse_port = server.Enum("balance", "reuseport", {"reuseport", "shared"}) == "reuseport";
  plan.max_requests = server.Int("max_requests", 0, 0, int64_t{1} << 40);
  plan.max_requests_jitter = server.Int("max_requests_jitter", 0, 0, int64_t{1} << 40);
  plan.max_rss_bytes = static_cast<int64_t>(server.SizeBytes("max_rss", 0, 0, uint64_t{1} << 44));
  ConfigNode budget = doc.Root().Map("python").Map("budget");
  plan.replace_stuck = budget.Enum("hard_action", "report", {"report", "replace"}) == "replace";
  if (!plan.supervised) {
    for (const char* k : {"max_requests", "max_requests_jitter", "max_rss"}) {
      if (server.Has(k)) server.Error(k, "recycling needs worker processes: set server.workers");
    }
    if (plan.replace_stuck) {
      budget.Error("hard_action", "replace needs worker processes: set server.workers");
    }
  }
  return plan;
}

}  // namespace metronome::supervisor
