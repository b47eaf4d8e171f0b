#include "runtime/pipeline.h"

#include <pthread.h>

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "runtime/lane.h"
#include "runtime/log.h"
#include "runtime/units.h"

namespace metronome {

Pipeline::~Pipeline() {
  for (auto& t : threads_) {
    if (t.joinable()) t.join();
  }
}

std::string Pipeline::Describe() const {
  std::string out = absl::StrFormat("pipeline: %d stages on %d threads\n", num_stages(), num_lanes());
  absl::StrAppendFormat(&out, "  %-3s %-14s %-12s %-14s %-9s %-6s %-16s %7s %6s %5s\n", "#", "stage",
                        "type", "thread", "policy", "wait", "runtime/period", "bw", "queue", "batch");
  for (int i = 0; i < num_stages(); ++i) {
    const StageSpec& s = stage_specs_[i];
    const LaneSpec& l = lane_specs_[s.lane];
    bool first = l.first_stage == i;
    std::string rp = l.sched.policy == Policy::kDeadline
                         ? absl::StrCat(FormatDuration(l.sched.runtime_ns), "/", FormatDuration(l.sched.period_ns))
                         : (l.sched.nice != 0 ? absl::StrCat("nice ", l.sched.nice) : "-");
    std::string thread = l.main_thread ? absl::StrCat(l.name, " (main)") : l.name;
    if (first) {
      absl::StrAppendFormat(&out, "  %-3d %-14s %-12s %-14s %-9s %-6s %-16s %7.3f %6d %5d\n", i, s.name,
                            s.type, thread, PolicyName(l.sched.policy), WaitModeName(l.wait), rp,
                            l.sched.Bandwidth(), static_cast<int>(l.queue_capacity),
                            static_cast<int>(l.batch_max));
    } else {
      absl::StrAppendFormat(&out, "  %-3d %-14s %-12s %-14s %-9s %-6s %-16s %7s %6s %5s\n", i, s.name,
                            s.type, absl::StrCat("  \"", l.name, "\""), "", "", "(direct call)", "", "", "");
    }
  }
  if (processes_ > 1) {
    absl::StrAppendFormat(&out, "deadline bandwidth: %.3f per worker x %d workers = %.3f of %.2f CPUs admitted (%s)\n",
                          bandwidth_, processes_, bandwidth_ * processes_, admission_.cpus, admission_.explanation);
  } else {
    absl::StrAppendFormat(&out, "deadline bandwidth: %.3f of %.2f CPUs admitted (%s)\n", bandwidth_,
                          admission_.cpus, admission_.explanation);
  }
  absl::StrAppendFormat(&out, "runtime: require_deadline %s, drain_timeout %s\n",
                        options_.require_deadline ? "true" : "false",
                        FormatDuration(options_.drain_timeout_ns));
  return out;
}

std::string Pipeline::StatsSummary() const {
  std::string out = absl::StrFormat("  %-14s %12s %10s %7s %9s %9s %9s\n", "stage", "items", "batches",
                                    "batch", "busy s", "p50 us", "p99 us");
  for (int i = 0; i < num_stages(); ++i) {
    const StageStats& s = stages_[i]->stats();
    auto h = s.service_ns.Read();
    uint64_t items = s.items_in.Get(), batches = s.batches.Get();
    absl::StrAppendFormat(&out, "  %-14s %12llu %10llu %7.1f %9.3f %9.2f %9.2f\n", stage_specs_[i].name,
                          static_cast<unsigned long long>(items), static_cast<unsigned long long>(batches),
                          batches ? static_cast<double>(items) / static_cast<double>(batches) : 0.0,
                          static_cast<double>(s.busy_ns.Get()) / 1e9, h.QuantileNs(0.5) / 1e3, h.QuantileNs(0.99) / 1e3);
  }
  absl::StrAppendFormat(&out, "  %-14s %12s %10s %9s %9s %9s %9s\n", "thread", "loops", "sleeps", "yields",
                        "overruns", "stalls", "hop p99us");
  for (int l = 0; l < static_cast<int>(lanes_.size()); ++l) {
    const LaneStats& s = lanes_[l]->stats();
    absl::StrAppendFormat(&out, "  %-14s %12llu %10llu %9llu %9llu %9llu %9.1f\n", lane_specs_[l].name,
                          static_cast<unsigned long long>(s.loops.Get()), static_cast<unsigned long long>(s.sleeps.Get()),
                          static_cast<unsigned long long>(s.yields.Get()), static_cast<unsigned long long>(s.overruns.Get()),
                          static_cast<unsigned long long>(s.stalls.Get()), s.handoff_ns.Read().QuantileNs(0.99) / 1e3);
  }
  return out;
}

void Pipeline::RequestStop() {
  int64_t expected = 0;
  stop_time_ns_.compare_exchange_strong(expected, MonotonicNowNs());
  stop_.store(true, std::memory_order_release);
  for (auto& lane : lanes_) lane->waker().Kick();
  drain_guard_.Arm();
}

std::string Pipeline::DescribeBusy() const {
  std::string out;
  for (size_t l = 0; l < lanes_.size(); ++l) {
    if (lanes_[l]->done()) continue;
    const LaneSpec& spec = lane_specs_[l];
    absl::StrAppend(&out, out.empty() ? "" : "; ", "thread '", spec.name, "'");
    for (int s = spec.first_stage; s <= spec.last_stage; ++s) {
      std::string what = stages_[s]->BusyWith();
      if (!what.empty()) absl::StrAppend(&out, " (", stage_specs_[s].name, ": ", what, ")");
    }
  }
  return out;
}

bool Pipeline::WaitUntilRunning() {
  std::unique_lock<std::mutex> lock(start_mu_);
  start_cv_.wait(lock, [&] { return go_ || abort_start_; });
  return go_;
}

const LaneStats& Pipeline::lane_stats(int lane) const { return lanes_[lane]->stats(); }
const LaneRunInfo& Pipeline::lane_run_info(int lane) const { return lanes_[lane]->info(); }
size_t Pipeline::queue_depth(int lane) const { return lanes_[lane]->input().Depth(); }
int Pipeline::lane_tid(int lane) const { return lanes_[lane]->tid(); }
uint64_t Pipeline::unattributed_overruns() { return UnattributedOverruns(); }
uint64_t Pipeline::queue_full_events(int lane) const { return lanes_[lane]->input().full_events(); }

void Pipeline::ReportSetup(int lane, absl::Status status) {
  std::lock_guard<std::mutex> lock(start_mu_);
  setup_reported_ = lane;
  setup_status_ = std::move(status);
  start_cv_.notify_all();
}

void Pipeline::StartLaneThread(int l) {
  threads_.emplace_back([this, l] {
    Lane& lane = *lanes_[l];
    absl::Status s = lane.Setup();
    bool ok = s.ok();
    ReportSetup(l, std::move(s));
    {
      std::unique_lock<std::mutex> lock(start_mu_);
      start_cv_.wait(lock, [&] { return go_ || abort_start_; });
      if (abort_start_ || !ok) return;
    }
    lane.Run();
  });
}

std::string Pipeline::RunningSummary() const {
  std::string out;
  int fallbacks = 0;
  for (int l = 0; l < num_lanes(); ++l) {
    const LaneRunInfo& info = lanes_[l]->info();
    const LaneSpec& spec = lane_specs_[l];
    absl::StrAppendFormat(&out, "  thread %-14s %-8s %-5s%s\n", spec.name, info.policy_in_force,
                          WaitModeName(info.wait_in_force),
                          info.fallback.empty() ? "" : absl::StrCat("  FALLBACK from ", PolicyName(spec.sched.policy), ": ", info.fallback));
    fallbacks += info.fallback.empty() ? 0 : 1;
  }
  absl::StrAppendFormat(&out, "  %d thread(s) fell back from SCHED_DEADLINE", fallbacks);
  return out;
}

std::vector<int> Pipeline::LaneStartOrder() const {
  const int n = num_lanes();
  int main_lane = -1;
  for (int l = 0; l < n; ++l) {
    if (lane_specs_[l].main_thread) main_lane = l;
  }
  std::vector<int> order;
  if (main_lane >= 0) order.push_back(main_lane);
  for (int l = 0; l < n; ++l) {
    if (l != main_lane) order.push_back(l);
  }
  return order;
}

absl::Status Pipeline::StageError(int stage, absl::string_view phase, const absl::Status& s) const {
  return absl::Status(s.code(), absl::StrCat("stage '", stage_specs_[stage].name, "'", phase, ": ", s.message()));
}

absl::Status Pipeline::Run(const std::function<void()>& on_running) {
  InstallSigxcpuHandler();
  const int n = num_lanes();
  for (int l = 0; l < n; ++l) lanes_.push_back(std::make_unique<Lane>(this, l));
  for (auto& lane : lanes_) lane->Wire(n);
  for (auto& lane : lanes_) lane->WireProducers(lanes_);

  // Start lanes one at a time, in LaneStartOrder.
  const std::vector<int> order = LaneStartOrder();
  const int main_lane = !order.empty() && lane_specs_[order[0]].main_thread ? order[0] : -1;
  char main_name[16] = {};
  pthread_getname_np(pthread_self(), main_name, sizeof main_name);
  absl::Status failure;
  for (int l : order) {
    if (l == main_lane) {
      failure = lanes_[l]->Setup();
    } else {
      StartLaneThread(l);
      std::unique_lock<std::mutex> lock(start_mu_);
      start_cv_.wait(lock, [&] { return setup_reported_ == l; });
      failure = setup_status_;
    }
    if (!failure.ok()) break;
  }
  // Connect: every stage reads what the others published in Start. The lanes wait for `go_`.
  for (int i = 0; i < num_stages() && failure.ok(); ++i) {
    if (absl::Status s = stages_[i]->Connect(*envs_[i]); !s.ok()) failure = StageError(i, "", s);
  }
  {
    std::lock_guard<std::mutex> lock(start_mu_);
    if (failure.ok()) go_ = true; else abort_start_ = true;
    start_cv_.notify_all();
  }
  if (failure.ok()) {
    drain_guard_.Start(options_.drain_timeout_ns, &stop_time_ns_, [this] { return DescribeBusy(); });
    if (stop_requested()) drain_guard_.Arm();  // a signal that came during the start
    running_.store(true, std::memory_order_release);
    if (on_running) on_running();
    if (main_lane >= 0) {
      lanes_[main_lane]->Run();
    }
  }
  for (auto& t : threads_) t.join();
  threads_.clear();
  if (main_lane < 0 || !failure.ok()) ApplyToCurrentThread(SchedParams{}).IgnoreError();
  // Shutdown in reverse pipeline order, only the stages that started.
  for (int l = n - 1; l >= 0; --l) {
    const LaneSpec& spec = lane_specs_[l];
    for (int s = lanes_[l]->started() - 1; s >= spec.first_stage; --s) stages_[s]->Shutdown();
  }
  drain_guard_.Finish();
  pthread_setname_np(pthread_self(), main_name);
  return failure;
}


}  // namespace metronome
