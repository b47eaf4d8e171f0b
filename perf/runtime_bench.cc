// The runtime alone, with synthetic stages: six stages (a source, four relays, a sink) on six
// threads in every policy x wait combination, and on one lane. Reports items/s, the per-hop
// hand-off latency (enqueue -> dequeue) and end-to-end latency, p50/p99.
//
//   build/perf/runtime_bench [--seconds S] [--inflight N] [--only NAME]
//
// Not a test: numbers depend on the machine and its load. Report medians of several runs.
#include <cstdio>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "runtime/pipeline.h"
#include "runtime/testing/synthetic.h"

namespace metronome {
namespace {

struct Scenario {
  std::string name;
  std::string yaml;
};

std::string Sched(const std::string& policy, const std::string& wait, const std::string& rt,
                  const std::string& period) {
  if (policy == "deadline") {
    return absl::StrCat("policy: deadline, wait: ", wait, ", runtime: ", rt, ", period: ", period);
  }
  return absl::StrCat("policy: other, wait: ", wait);
}

std::string SixThreads(const std::string& sched, int inflight) {
  std::string y = "pipeline:\n";
  absl::StrAppend(&y, "  - {stage: synthetic-source, inflight: ", inflight, ", ", sched, "}\n");
  for (int i = 0; i < 4; ++i) absl::StrAppend(&y, "  - {stage: synthetic-relay, name: relay", i, ", ", sched, "}\n");
  absl::StrAppend(&y, "  - {stage: synthetic-sink, expect_hops: 4, ", sched, "}\n");
  return y;
}

std::string OneLane(int inflight) {
  std::string y = "pipeline:\n";
  absl::StrAppend(&y, "  - {stage: synthetic-source, inflight: ", inflight, ", thread: lane, policy: other, wait: block}\n");
  for (int i = 0; i < 4; ++i) absl::StrAppend(&y, "  - {stage: synthetic-relay, name: relay", i, ", thread: lane}\n");
  absl::StrAppend(&y, "  - {stage: synthetic-sink, expect_hops: 4, thread: lane}\n");
  return y;
}

int Run(const Scenario& sc, double seconds) {
  auto doc = ConfigDoc::FromString(sc.yaml, sc.name);
  if (!doc.ok()) return 1;
  auto p = Pipeline::Build(**doc, StageRegistry::Global(), false);
  if (!p.ok()) {
    fprintf(stderr, "%s: %s\n", sc.name.c_str(), std::string(p.status().message()).c_str());
    return 1;
  }
  Pipeline& pipe = **p;
  synthetic::SyntheticPool& pool = *synthetic::FindPool(pipe);
  absl::Status result;
  std::thread runner([&] { result = pipe.Run(); });
  if (!pipe.WaitUntilRunning()) {
    runner.join();
    fprintf(stderr, "%s: %s\n", sc.name.c_str(), std::string(result.message()).c_str());
    return 1;
  }
  // Warm up, then measure a window.
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  uint64_t r0 = pool.received.load();
  auto lat0 = pool.latency_ns.Read();
  std::vector<LatencyHistogram::Snapshot> hop0;
  for (int l = 0; l < pipe.num_lanes(); ++l) hop0.push_back(pipe.lane_stats(l).handoff_ns.Read());
  auto t0 = std::chrono::steady_clock::now();
  std::this_thread::sleep_for(std::chrono::duration<double>(seconds));
  auto t1 = std::chrono::steady_clock::now();
  uint64_t r1 = pool.received.load();
  auto lat = pool.latency_ns.Read();
  lat -= lat0;
  LatencyHistogram::Snapshot hop;
  for (int l = 1; l < pipe.num_lanes(); ++l) {
    auto h = pipe.lane_stats(l).handoff_ns.Read();
    h -= hop0[static_cast<size_t>(l)];
    for (int i = 0; i < LatencyHistogram::kBuckets; ++i) hop.counts[i] += h.counts[i];
    hop.total += h.total;
  }
  uint64_t overruns = 0, yields = 0, sleeps = 0;
  std::string fallback;
  for (int l = 0; l < pipe.num_lanes(); ++l) {
    overruns += pipe.lane_stats(l).overruns.Get();
    yields += pipe.lane_stats(l).yields.Get();
    sleeps += pipe.lane_stats(l).sleeps.Get();
    if (!pipe.lane_run_info(l).fallback.empty()) fallback = " FALLBACK";
  }
  pipe.RequestStop();
  runner.join();
  double dt = std::chrono::duration<double>(t1 - t0).count();
  printf("%-22s %12.0f %10.1f %10.1f %10.1f %10.1f %9llu%s\n", sc.name.c_str(),
         static_cast<double>(r1 - r0) / dt, hop.QuantileNs(0.5) / 1000, hop.QuantileNs(0.99) / 1000,
         lat.QuantileNs(0.5) / 1000, lat.QuantileNs(0.99) / 1000,
         static_cast<unsigned long long>(overruns), fallback.c_str());
  fflush(stdout);
  return 0;
}

}  // namespace
}  // namespace metronome

int main(int argc, char** argv) {
  double seconds = 2;
  int inflight = 256;
  std::string only;
  for (int i = 1; i + 1 < argc; i += 2) {
    if (!strcmp(argv[i], "--seconds")) seconds = atof(argv[i + 1]);
    else if (!strcmp(argv[i], "--inflight")) inflight = atoi(argv[i + 1]);
    else if (!strcmp(argv[i], "--only")) only = argv[i + 1];
  }
  using metronome::Scenario;
  std::vector<Scenario> scenarios;
  for (const char* policy : {"deadline", "other"}) {
    for (const char* wait : {"block", "yield", "spin"}) {
      // 6 x 250us/1ms = 1.5 CPUs: fits the 1.8 admitted here.
      std::string sched = metronome::Sched(policy, wait, "250us", "1ms");
      scenarios.push_back({absl::StrCat(policy, "/", wait), metronome::SixThreads(sched, inflight)});
    }
  }
  scenarios.push_back({"deadline/yield 50/200us",
                       metronome::SixThreads(metronome::Sched("deadline", "yield", "50us", "200us"), inflight)});
  scenarios.push_back({"one lane (other/block)", metronome::OneLane(inflight)});
  printf("runtime_bench: 6 stages, inflight %d, %.1fs window\n", inflight, seconds);
  printf("%-22s %12s %10s %10s %10s %10s %9s\n", "scenario", "items/s", "hop p50us", "hop p99us",
         "e2e p50us", "e2e p99us", "overruns");
  for (const auto& sc : scenarios) {
    if (!only.empty() && sc.name.find(only) == std::string::npos) continue;
    metronome::Run(sc, seconds);
  }
  return 0;
}
