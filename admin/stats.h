// Renders the pipeline's live figures as Prometheus text (/metrics) and JSON (/stats).
//
// Everything is read from per-thread counters with relaxed loads (runtime/stats.h): the data
// path takes no lock and does no work for it.
//
// Thread-safety: call from one thread (the admin listener) while the pipeline runs.
#pragma once

#include <string>

#include "runtime/config.h"
#include "runtime/pipeline.h"

namespace metronome::admin {

// Prometheus text exposition format 0.0.4. Names carry units; per-stage series have a `stage`
// label, per-thread series a `thread` label.
std::string RenderMetrics(const Pipeline& p);

// The same figures as JSON, plus the resolved pipeline and the config document.
std::string RenderStats(const Pipeline& p, const ConfigDoc& doc, int64_t started_unix_ns);

// CPU seconds (user + system) the thread has used, from /proc/self/task/TID/stat; -1 if unknown.
double ThreadCpuSeconds(int tid);

}  // namespace metronome::admin
