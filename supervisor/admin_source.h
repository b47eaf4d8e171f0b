// The supervisor's admin view: every worker's /metrics and /stats, fetched from the worker's
// own admin socket (an abstract unix socket only the supervisor uses), with a `worker` label
// on every sample, and the supervisor's own figures (workers by state, restarts, RSS).
//
// Thread-safety: called on the admin listener's thread; reads the WorkerTable under its lock.
#pragma once

#include <string>

#include "admin/listener.h"
#include "supervisor/supervisor.h"

namespace metronome::supervisor {

// A worker's admin endpoint answers within this, or it is left out of that scrape.
inline constexpr int kWorkerScrapeTimeoutMs = 1000;

class WorkersSource : public admin::Source {
 public:
  explicit WorkersSource(WorkerTable* table) : table_(table) {}
  std::string Metrics() override;
  std::string Stats() override;
  bool Ready() override;

 private:
  WorkerTable* table_;
};

// GET `path` from the admin listener at unix socket `name` ("@abstract"); the body, or "" when
// it did not answer.
std::string FetchFromWorker(const std::string& name, const std::string& path);

// Prometheus text of one worker with worker="index" added to every sample, merged into
// `families` (name -> (HELP, TYPE, samples)) in first-seen order. Exposed for its unit test.
struct Family {
  std::string help, type;
  std::vector<std::string> samples;
};
void MergeWorkerMetrics(const std::string& text, int worker, std::vector<std::pair<std::string, Family>>* families);
std::string RenderFamilies(const std::vector<std::pair<std::string, Family>>& families);

}  // namespace metronome::supervisor
