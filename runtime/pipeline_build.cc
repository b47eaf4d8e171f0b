// Pipeline::Build: the `runtime:` and `pipeline:` sections of the config into stage and lane
// specs, each stage created and configured, lane properties that follow from the stages, and
// the deadline bandwidth against the admission limit. Every error is collected into the
// document (file:line:key) so that `metronome check` lists them all at once.
#include <algorithm>
#include <map>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "runtime/lane.h"
#include "runtime/log.h"
#include "runtime/units.h"

namespace metronome {

absl::StatusOr<std::unique_ptr<Pipeline>> Pipeline::Build(ConfigDoc& doc,
                                                           const StageRegistry& registry,
                                                           bool check_only, int processes) {
  if (absl::Status s = registry.Validate(); !s.ok()) return s;
  std::unique_ptr<Pipeline> p(new Pipeline());
  p->check_only_ = check_only;
  p->processes_ = std::max(1, processes);
  p->shared_ = std::make_unique<SharedObjects>();
  ConfigNode root = doc.Root();
  ConfigNode rt = root.Map("runtime");
  p->options_.require_deadline = rt.Bool("require_deadline", false);
  p->options_.drain_timeout_ns = rt.DurationNs("drain_timeout", 5 * kNanosPerSecond, kNanosPerMilli, 600 * kNanosPerSecond);
  p->options_.deadline_retry_ns = rt.DurationNs("deadline_retry", p->options_.deadline_retry_ns, 0, 3600 * kNanosPerSecond);
  if (rt.Has("log_level")) {
    std::string level = rt.Enum("log_level", "info", {"debug", "info", "warn", "error"});
    SetLogLevel(level == "debug" ? LogLevel::kDebug : level == "warn" ? LogLevel::kWarn
                : level == "error" ? LogLevel::kError : LogLevel::kInfo);
  }

  std::vector<ConfigNode> entries = root.Seq("pipeline");
  if (entries.empty()) {
    doc.AddErrorAtLine(0, "pipeline", "missing or empty: list the stages, e.g. "
                       "- {stage: accept, policy: deadline, wait: block, runtime: 100us, period: 1ms}");
    return doc.status();
  }
  if (entries.size() > 0xffff) return absl::InvalidArgumentError("too many stages");

  const DeadlinePeriodLimits periods = ReadDeadlinePeriodLimits();
  const int64_t period_min_ns = periods.min_ns;
  const int64_t period_max_ns = periods.max_ns;

  std::map<std::string, int> names;
  std::map<std::string, int> thread_first_stage;
  static const char* kSchedKeys[] = {"policy", "wait", "runtime", "period", "deadline",
                                     "nice", "queue", "batch", "spin"};
  for (size_t i = 0; i < entries.size(); ++i) {
    ConfigNode& e = entries[i];
    if (!e.IsMap()) {
      e.Error("expected a mapping like {stage: parse, policy: deadline, ...}");
      p->stage_specs_.push_back(StageSpec{});  // keeps indices aligned with entries
      continue;
    }
    StageSpec spec;
    spec.type = e.String("stage", std::nullopt);
    spec.name = e.String("name", spec.type);
    // The thread defaults to the stage's name, cut to the kernel's 15 characters.
    bool explicit_thread = e.Has("thread");
    std::string thread = e.String("thread", spec.name.substr(0, kThreadNameMax));
    if (!spec.type.empty() && !registry.Has(spec.type)) {
      e.Error("stage", absl::StrCat("unknown stage type '", spec.type, "'; registered: ",
                                    absl::StrJoin(registry.Names(), ", ")));
    }
    if (names.count(spec.name)) {
      e.Error("name", absl::StrCat("stage name '", spec.name,
                                   "' is used twice; give one of them `name: ...`"));
    }
    names[spec.name] = static_cast<int>(i);
    if (explicit_thread && thread.size() > kThreadNameMax) {
      e.Error("thread", absl::StrCat("thread name '", thread, "' is longer than ", kThreadNameMax,
                                     " characters (the Linux limit for thread names)"));
    }

    bool new_lane = p->lane_specs_.empty() || p->lane_specs_.back().name != thread;
    if (new_lane && thread_first_stage.count(thread)) {
      e.Error("thread", absl::StrCat("thread '", thread, "' already ran stages that are not right "
                                     "before this one; only consecutive stages can share a thread"));
    }
    if (new_lane) {
      thread_first_stage[thread] = static_cast<int>(i);
      LaneSpec lane;
      lane.name = thread;
      lane.first_stage = lane.last_stage = static_cast<int>(i);
      std::string policy = e.Enum("policy", "other", {"deadline", "other"});
      lane.sched.policy = policy == "deadline" ? Policy::kDeadline : Policy::kOther;
      std::string wait = e.Enum("wait", "block", {"yield", "block", "spin"});
      lane.wait = wait == "yield" ? WaitMode::kYield : wait == "spin" ? WaitMode::kSpin : WaitMode::kBlock;
      if (lane.sched.policy == Policy::kDeadline) {
        lane.sched.runtime_ns = e.DurationNs("runtime", std::nullopt, 1 * kNanosPerMicro, period_max_ns);
        lane.sched.period_ns = e.DurationNs("period", std::nullopt, period_min_ns, period_max_ns);
        lane.sched.deadline_ns = e.DurationNs("deadline", lane.sched.period_ns, 1 * kNanosPerMicro, period_max_ns);
        if (lane.sched.runtime_ns > lane.sched.deadline_ns || lane.sched.deadline_ns > lane.sched.period_ns) {
          e.Error("runtime", absl::StrCat("need runtime <= deadline <= period; got ",
                                          FormatDuration(lane.sched.runtime_ns), " / ",
                                          FormatDuration(lane.sched.deadline_ns), " / ",
                                          FormatDuration(lane.sched.period_ns)));
        }
        if (e.Has("nice")) e.Error("nice", "nice applies to policy: other only");
      } else {
        for (const char* k : {"runtime", "period", "deadline"}) {
          if (e.Has(k)) e.Error(k, "runtime/period/deadline apply to policy: deadline only");
        }
        lane.sched.nice = static_cast<int>(e.Int("nice", 0, -20, 19));
      }
      lane.queue_capacity = static_cast<size_t>(e.Int("queue", kQueueCapacityDefault, 1, kQueueCapacityMax));
      lane.batch_max = static_cast<size_t>(e.Int("batch", kBatchDefault, 1, kBatchMax));
      lane.spin_before_sleep = static_cast<int>(e.Int("spin", 0, 0, kSpinBeforeSleepMax));
      p->lane_specs_.push_back(lane);
    } else {
      for (const char* k : kSchedKeys) {
        if (e.Has(k)) {
          e.Error(k, absl::StrCat("stage '", spec.name, "' runs on thread '", thread,
                                  "' after another stage; scheduling keys belong on the thread's "
                                  "first stage"));
        }
      }
      p->lane_specs_.back().last_stage = static_cast<int>(i);
    }
    spec.lane = static_cast<int>(p->lane_specs_.size()) - 1;
    p->stage_specs_.push_back(spec);
  }
  if (p->lane_specs_.size() > static_cast<size_t>(kLanesMax)) {
    doc.AddErrorAtLine(0, "pipeline", absl::StrCat("more than ", kLanesMax, " threads"));
  }
  const bool pipeline_valid = doc.status().ok();

  // Create and configure the stages (even after errors above, so that `check` reports their
  // keys too); an entry of unknown type is skipped whole.
  for (size_t i = 0; i < p->stage_specs_.size(); ++i) {
    p->stages_.push_back(registry.Create(p->stage_specs_[i].type));
    p->envs_.push_back(std::make_unique<PipelineEnv>(p.get(), static_cast<int>(i)));
  }
  for (size_t i = 0; i < p->stages_.size(); ++i) {
    if (p->stages_[i] == nullptr) {
      entries[i].MarkOpaque();
      continue;
    }
    absl::Status s = p->stages_[i]->Configure(entries[i], root, *p->envs_[i]);
    if (!s.ok()) {
      doc.AddError(entries[i].raw(), entries[i].path(),
                   absl::StrCat("stage '", p->stage_specs_[i].name, "': ", s.message()));
    }
  }
  doc.CheckUnknownKeys();
  if (!pipeline_valid) return doc.status();

  // Lane properties that follow from the stages.
  int main_lane = -1;
  for (size_t l = 0; l < p->lane_specs_.size(); ++l) {
    LaneSpec& lane = p->lane_specs_[l];
    for (int s = lane.first_stage; s <= lane.last_stage; ++s) {
      if (p->stages_[s]->NeedsRing()) lane.needs_ring = true;
      if (p->stages_[s]->NeedsMainThread()) {
        if (main_lane >= 0 && main_lane != static_cast<int>(l)) {
          doc.AddErrorAtLine(entries[s].line(), entries[s].path(),
                             "two threads need the process's main thread (e.g. two python "
                             "stages on different threads); put them on one thread");
        }
        main_lane = static_cast<int>(l);
        lane.main_thread = true;
      }
    }
    if (lane.last_stage - lane.first_stage + 1 >= Ring::kLaneTag) {
      doc.AddErrorAtLine(entries[lane.first_stage].line(), entries[lane.first_stage].path(),
                         "too many stages on one thread");
    }
  }

  // Admission: the kernel accepts at most `admission_.cpus` of deadline bandwidth in total.
  p->admission_ = ReadAdmissionLimit();
  p->bandwidth_ = 0;
  std::vector<std::string> parts;
  for (const LaneSpec& lane : p->lane_specs_) {
    double bw = lane.sched.Bandwidth();
    if (bw <= 0) continue;
    p->bandwidth_ += bw;
    parts.push_back(absl::StrFormat("%s %.3f", lane.name, bw));
  }
  if (p->bandwidth_ * p->processes_ > p->admission_.cpus + 1e-9) {
    doc.AddErrorAtLine(
        entries.front().line(), "pipeline",
        p->processes_ == 1
            ? absl::StrFormat("deadline bandwidth %.3f CPUs exceeds the %.2f CPUs the kernel admits "
                              "(%s). Per thread: %s. Lower runtime/period, or put stages on fewer "
                              "threads (same `thread:`)",
                              p->bandwidth_, p->admission_.cpus, p->admission_.explanation,
                              absl::StrJoin(parts, ", "))
            : absl::StrFormat("deadline bandwidth %.3f CPUs per worker x %d workers = %.3f CPUs exceeds the "
                              "%.2f CPUs the kernel admits for the whole machine (%s). Per thread: %s. Lower "
                              "runtime/period (each worker's threads need their own), use fewer "
                              "server.workers, or put stages on fewer threads",
                              p->bandwidth_, p->processes_, p->bandwidth_ * p->processes_, p->admission_.cpus,
                              p->admission_.explanation, absl::StrJoin(parts, ", ")));
  }
  if (!doc.status().ok()) return doc.status();
  return p;
}

}  // namespace metronome
