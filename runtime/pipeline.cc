#include "runtime/pipeline.h"

#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <map>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "runtime/log.h"
#include "runtime/outbox.h"
#include "runtime/signals.h"
#include "runtime/units.h"
#include "runtime/uring.h"

namespace metronome {

int64_t MonotonicNowNs() {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<int64_t>(ts.tv_sec) * kNanosPerSecond + ts.tv_nsec;
}

namespace {

// Above this fill a queue counts as congested (Outbox::Congested): stages that can answer work
// themselves (e.g. with a 503) do so instead of queuing behind a full stage.
constexpr double kCongestedFill = 0.9;

// SIGXCPU arrives on the overrunning thread (FACTS.md); the handler finds that thread's counters
// here. Initial-exec TLS in the executable: safe to read in a signal handler.
thread_local LaneStats* t_lane_stats = nullptr;
// SIGXCPU that arrived on a thread that is not a lane (the kernel may pick another thread of
// the process): counted, not lost.
std::atomic<uint64_t> g_unattributed_overruns{0};

void OnSigxcpu(int) {
  if (t_lane_stats != nullptr) {
    t_lane_stats->overruns.Add();
  } else {
    g_unattributed_overruns.fetch_add(1, std::memory_order_relaxed);
  }
}

void InstallSigxcpuHandler() {
  static std::once_flag once;
  std::call_once(once, [] {
    struct sigaction sa {};
    sa.sa_handler = OnSigxcpu;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = SA_RESTART;
    sigaction(SIGXCPU, &sa, nullptr);
  });
}

}  // namespace

// Objects shared between stages, created on first use (StageEnv::Shared).
class SharedObjects {
 public:
  void* Get(absl::string_view key, std::type_index type,
            const std::function<std::shared_ptr<void>()>& make) {
    auto k = std::make_pair(std::string(key), type);
    auto it = objects_.find(k);
    if (it == objects_.end()) it = objects_.emplace(k, make()).first;
    return it->second.get();
  }

 private:
  std::map<std::pair<std::string, std::type_index>, std::shared_ptr<void>> objects_;
};

class PipelineEnv : public StageEnv {
 public:
  PipelineEnv(Pipeline* p, int index) : p_(p), index_(index) {}
  const std::string& stage_name() const override { return p_->stage_specs_[index_].name; }
  int stage_index() const override { return index_; }
  int FindStage(absl::string_view name) const override {
    for (size_t i = 0; i < p_->stage_specs_.size(); ++i) {
      if (p_->stage_specs_[i].name == name) return static_cast<int>(i);
    }
    return -1;
  }
  int FindStageOfType(absl::string_view type) const override {
    for (size_t i = static_cast<size_t>(index_) + 1; i < p_->stage_specs_.size(); ++i) {
      if (p_->stage_specs_[i].type == type) return static_cast<int>(i);
    }
    return -1;
  }
  Ring* ring() override { return ring_; }
  Waker* lane_waker() override { return waker_; }
  bool check_only() const override { return p_->check_only_; }
  uint8_t ring_tag() const override { return tag_; }
  void set_lane(Ring* ring, Waker* waker, uint8_t tag) {
    ring_ = ring;
    waker_ = waker;
    tag_ = tag;
  }

 protected:
  void* SharedImpl(absl::string_view key, std::type_index type,
                   const std::function<std::shared_ptr<void>()>& make) override {
    return p_->shared_->Get(key, type, make);
  }

 private:
  Pipeline* p_;
  int index_;
  Ring* ring_ = nullptr;
  Waker* waker_ = nullptr;
  uint8_t tag_ = 0;
};

// One thread's loop: its input queue, its stages, its ring, its single wait point.
class Lane {
 public:
  Lane(Pipeline* p, int index) : p_(p), index_(index), spec_(p->lane_specs_[index]) {}

  // On the lane's own thread, before Run: ring, stages' Start, scheduling.
  absl::Status Setup() {
    std::string name = spec_.name;
    pthread_setname_np(pthread_self(), name.c_str());
    tid_.store(static_cast<int>(gettid()), std::memory_order_release);
    t_lane_stats = &stats_;
    if (!waker_.ok()) return absl::InternalError(absl::StrCat("eventfd: ", std::strerror(errno)));
    if (spec_.needs_ring) {
      if (absl::Status s = ring_.Init(spec_.ring_entries); !s.ok()) return s;
    }
    for (int i = spec_.first_stage; i <= spec_.last_stage; ++i) {
      PipelineEnv& env = *p_->envs_[i];
      env.set_lane(spec_.needs_ring ? &ring_ : nullptr, &waker_,
                   static_cast<uint8_t>(i - spec_.first_stage));
      if (absl::Status s = p_->stages_[i]->Start(env); !s.ok()) {
        return absl::Status(s.code(), absl::StrCat("stage '", p_->stage_specs_[i].name,
                                                   "' failed to start: ", s.message()));
      }
      started_ = i + 1;
    }
    wait_ = spec_.wait;
    info_.wait_in_force = spec_.wait;
    absl::Status sched = ApplyToCurrentThread(spec_.sched);
    if (!sched.ok() && spec_.sched.policy == Policy::kDeadline) {
      if (p_->options_.require_deadline) {
        return absl::Status(sched.code(),
                            absl::StrCat("thread '", spec_.name, "': ", sched.message(),
                                         " (runtime.require_deadline is true, so this is fatal)"));
      }
      info_.fallback = std::string(sched.message());
      // Falling back to other/block: yield or spin under SCHED_OTHER would burn a core.
      wait_ = WaitMode::kBlock;
      info_.wait_in_force = wait_;
      LOG_WARN("thread '%s' falls back to policy other, wait block: %s", spec_.name.c_str(),
               info_.fallback.c_str());
    } else if (!sched.ok()) {
      return sched;
    }
    info_.policy_in_force = CurrentPolicyName();
    if (info_.policy_in_force == "deadline") RegisterDeadlineThread(tid_.load());
    return absl::OkStatus();
  }

  // The loop. Returns when the drain finished (or timed out).
  void Run() {
    const size_t batch_max = spec_.batch_max;
    std::vector<Item*> batch(batch_max);
    int64_t next_tick = MonotonicNowNs();
    bool stopping = false;
    int64_t drain_deadline = kNeverNs;
    for (;;) {
      const int64_t now = MonotonicNowNs();
      out_.now_ns_ = now;
      stats_.loops.Add();
      bool worked = false;
      const bool stalled = Stalled();

      if (spec_.needs_ring) worked |= ReapCompletions();
      if (!stalled) {
        size_t n = in_->TryDequeueBulk(*consumer_, batch.data(), batch_max);
        if (n > 0) {
          worked = true;
          stats_.dequeued.Add(n);
          WakeStalledProducers();
          for (size_t i = 0; i < n; ++i) {
            Item* item = batch[i];
            stats_.handoff_ns.Record(static_cast<uint64_t>(std::max<int64_t>(0, now - item->enqueued_ns)));
            out_.local_[static_cast<size_t>(item->next_stage - spec_.first_stage)].push_back(item);
          }
          RunLocal(spec_.first_stage);
        }
      }
      for (int s = spec_.first_stage; s <= spec_.last_stage; ++s) {
        Stage& st = *p_->stages_[s];
        // A stalled lane keeps serving sinks: they emit nothing, and a sink that stopped could
        // be the consumer the stall waits for (deadlock).
        if (stalled && !st.IsSink()) continue;
        Enter(s);
        int64_t t0 = MonotonicNowNs();
        if (st.Poll(out_)) {
          worked = true;
          st.stats().busy_ns.Add(static_cast<uint64_t>(MonotonicNowNs() - t0));
        }
        RunLocal(s + 1);
      }
      if (now >= next_tick) next_tick = RunTicks(now);
      Flush(now);

      if (!stopping && p_->stop_requested()) {
        stopping = true;
        int64_t stop_time = p_->stop_time_ns_.load();
        drain_deadline = (stop_time ? stop_time : now) + p_->options_.drain_timeout_ns;
        for (int s = spec_.first_stage; s <= spec_.last_stage; ++s) {
          Enter(s);
          p_->stages_[s]->BeginStop(out_);
          RunLocal(s + 1);
        }
        Flush(now);
        worked = true;
      }
      if (stopping) {
        if (CanFinish()) break;
        if (now >= drain_deadline) {
          Abandon();
          break;
        }
      }
      if (spec_.needs_ring && (worked || ring_.Pending() > 0)) {
        io_uring_submit_and_get_events(ring_.raw());
        if (io_uring_cq_ready(ring_.raw()) > 0) continue;
      }
      if (worked) continue;
      Wait(std::min(next_tick, drain_deadline));
    }
    done_.store(true, std::memory_order_release);
    // Let the next lane re-check its own finish condition.
    if (index_ + 1 < static_cast<int>(p_->lanes_.size())) p_->lanes_[index_ + 1]->waker_.Kick();
    // Teardown (Python finalisation, socket closes) must not run throttled by a deadline budget.
    ApplyToCurrentThread(SchedParams{}).IgnoreError();  // best effort; policy other always works
  }

  bool done() const { return done_.load(std::memory_order_acquire); }
  int tid() const { return tid_.load(std::memory_order_acquire); }
  Waker& waker() { return waker_; }
  LaneStats& stats() { return stats_; }
  LaneRunInfo& info() { return info_; }
  BoundedQueue& input() { return *in_; }
  int started() const { return started_; }

  // Wiring, on the starting thread before any lane runs.
  void Wire(int n_lanes) {
    in_ = std::make_unique<BoundedQueue>(spec_.queue_capacity, static_cast<size_t>(std::max(1, index_)));
    consumer_ = in_->MakeConsumerToken();
    out_.first_stage_ = spec_.first_stage;
    out_.last_stage_ = spec_.last_stage;
    out_.num_stages_ = p_->num_stages();
    out_.capacity_ = spec_.batch_max * kOutboxFanout;
    out_.local_.resize(static_cast<size_t>(spec_.last_stage - spec_.first_stage + 1));
    for (auto& l : out_.local_) l.reserve(out_.capacity_);
    out_.remote_.resize(static_cast<size_t>(n_lanes));
    out_.lane_of_.resize(static_cast<size_t>(p_->num_stages()));
    for (int s = 0; s < p_->num_stages(); ++s) out_.lane_of_[static_cast<size_t>(s)] = p_->stage_specs_[s].lane;
  }
  // After every lane has its queue: producer tokens for the later lanes.
  void WireProducers(std::vector<std::unique_ptr<Lane>>& lanes) {
    for (int l = index_ + 1; l < static_cast<int>(lanes.size()); ++l) {
      Outbox::Remote& r = out_.remote_[static_cast<size_t>(l)];
      r.queue = lanes[l]->in_.get();
      r.token = r.queue->MakeProducerToken();
      r.lane = l;
      r.items.reserve(out_.capacity_);
    }
  }
 private:
  void Enter(int s) {
    out_.current_ = s;
    out_.stats_ = &p_->stages_[s]->stats();
  }

  // Runs, in order, every stage from `from` to the end of the lane on what was emitted for it.
  void RunLocal(int from) {
    for (int s = from; s <= spec_.last_stage; ++s) {
      std::vector<Item*>& items = out_.local_[static_cast<size_t>(s - spec_.first_stage)];
      if (items.empty()) continue;
      Stage& st = *p_->stages_[s];
      Enter(s);
      int64_t t0 = MonotonicNowNs();
      st.Process(std::span<Item* const>(items.data(), items.size()), out_);
      int64_t dt = MonotonicNowNs() - t0;
      StageStats& ss = st.stats();
      ss.items_in.Add(items.size());
      ss.batches.Add();
      ss.busy_ns.Add(static_cast<uint64_t>(dt));
      ss.service_ns.Record(static_cast<uint64_t>(dt) / items.size(), items.size());
      items.clear();
    }
  }

  bool ReapCompletions() {
    io_uring_cqe* cqes[256];
    bool worked = false;
    for (;;) {
      unsigned n = io_uring_peek_batch_cqe(ring_.raw(), cqes, 256);
      if (n == 0) break;
      worked = true;
      for (unsigned i = 0; i < n; ++i) {
        const io_uring_cqe& cqe = *cqes[i];
        uint8_t tag = Ring::TagOf(cqe.user_data);
        if (tag == Ring::kLaneTag) {
          eventfd_armed_ = false;
          continue;
        }
        int s = spec_.first_stage + tag;
        assert(s <= spec_.last_stage && "completion tagged for a stage not on this lane");
        Stage& st = *p_->stages_[s];
        Enter(s);
        int64_t t0 = MonotonicNowNs();
        st.OnCompletion(cqe, out_);
        st.stats().busy_ns.Add(static_cast<uint64_t>(MonotonicNowNs() - t0));
        RunLocal(s + 1);
      }
      io_uring_cq_advance(ring_.raw(), n);
      if (n < 256) break;
    }
    return worked;
  }

  int64_t RunTicks(int64_t now) {
    int64_t next = kNeverNs;
    for (int s = spec_.first_stage; s <= spec_.last_stage; ++s) {
      Enter(s);
      next = std::min(next, p_->stages_[s]->Tick(now, out_));
      RunLocal(s + 1);
    }
    return next;
  }

  // Moves remote items into their queues. Items that do not fit stay (backpressure).
  void Flush(int64_t now) {
    for (int l = index_ + 1; l < static_cast<int>(out_.remote_.size()); ++l) {
      Outbox::Remote& r = out_.remote_[static_cast<size_t>(l)];
      if (r.items.empty()) continue;
      for (Item* item : r.items) item->enqueued_ns = now;
      size_t n = r.queue->TryEnqueueBulk(*r.token, r.items.data(), r.items.size());
      Lane& target = *p_->lanes_[l];
      if (n > 0) target.waker_.Notify();
      if (n < r.items.size()) {
        r.items.erase(r.items.begin(), r.items.begin() + static_cast<long>(n));
        stats_.stalls.Add();
        // Ask the consumer to wake us when it makes room, then retry once in case it already did.
        target.stalled_producers_.fetch_or(1ull << index_, std::memory_order_acq_rel);
        size_t m = r.queue->TryEnqueueBulk(*r.token, r.items.data(), r.items.size());
        if (m > 0) {
          r.items.erase(r.items.begin(), r.items.begin() + static_cast<long>(m));
          target.waker_.Notify();
        }
      } else {
        r.items.clear();
      }
    }
  }

  bool Stalled() const {
    for (int l = index_ + 1; l < static_cast<int>(out_.remote_.size()); ++l) {
      if (!out_.remote_[static_cast<size_t>(l)].items.empty()) return true;
    }
    return false;
  }

  void WakeStalledProducers() {
    if (stalled_producers_.load(std::memory_order_relaxed) == 0) return;
    uint64_t mask = stalled_producers_.exchange(0, std::memory_order_acq_rel);
    while (mask != 0) {
      int l = __builtin_ctzll(mask);
      mask &= mask - 1;
      p_->lanes_[l]->waker_.Notify();
    }
  }

  bool CanFinish() {
    if (index_ > 0 && !p_->lanes_[index_ - 1]->done()) return false;
    if (in_->Depth() != 0 || Stalled()) return false;
    for (int s = spec_.first_stage; s <= spec_.last_stage; ++s) {
      if (!p_->stages_[s]->Idle()) return false;
    }
    return true;
  }

  void Abandon() {
    uint64_t left = in_->Depth();
    for (const auto& r : out_.remote_) left += r.items.size();
    std::vector<std::string> busy;
    for (int s = spec_.first_stage; s <= spec_.last_stage; ++s) {
      if (!p_->stages_[s]->Idle()) busy.push_back(p_->stage_specs_[s].name);
    }
    p_->abandoned_.fetch_add(left);
    p_->drain_timed_out_.store(true);
    LOG_ERROR("thread '%s': drain timed out after %s with %llu queued items%s%s", spec_.name.c_str(),
              FormatDuration(p_->options_.drain_timeout_ns).c_str(),
              static_cast<unsigned long long>(left), busy.empty() ? "" : "; still busy: ",
              absl::StrJoin(busy, ", ").c_str());
  }

  bool HasWork() {
    if (in_->Depth() > 0 && !Stalled()) return true;
    if (Stalled()) {
      for (int l = index_ + 1; l < static_cast<int>(out_.remote_.size()); ++l) {
        const Outbox::Remote& r = out_.remote_[static_cast<size_t>(l)];
        if (!r.items.empty() && r.queue->Depth() < r.queue->capacity()) return true;
      }
    }
    if (p_->stop_requested() != saw_stop_) return true;
    if (index_ > 0 && p_->stop_requested() && p_->lanes_[index_ - 1]->done()) return true;
    if (spec_.needs_ring && io_uring_cq_ready(ring_.raw()) > 0) return true;
    return false;
  }

  void Wait(int64_t until_ns) {
    saw_stop_ = p_->stop_requested();
    switch (wait_) {
      case WaitMode::kSpin:
        // With DEFER_TASKRUN, completions exist only once this thread asks the kernel for them.
        if (spec_.needs_ring) io_uring_get_events(ring_.raw());
        __builtin_ia32_pause();
        return;
      case WaitMode::kYield:
        stats_.yields.Add();
        sched_yield();
        if (spec_.needs_ring) io_uring_get_events(ring_.raw());
        return;
      case WaitMode::kBlock:
        break;
    }
    for (int i = 0; i < spec_.spin_before_sleep; ++i) {
      if (HasWork()) return;
      __builtin_ia32_pause();
    }
    waker_.PrepareSleep();
    if (HasWork()) {
      waker_.CancelSleep();
      return;
    }
    stats_.sleeps.Add();
    int64_t now = MonotonicNowNs();
    int64_t timeout_ns = until_ns == kNeverNs ? -1 : std::max<int64_t>(0, until_ns - now);
    if (spec_.needs_ring) {
      if (!eventfd_armed_) {
        io_uring_sqe* sqe = ring_.GetSqe();
        io_uring_prep_read(sqe, waker_.fd(), &eventfd_value_, sizeof eventfd_value_, 0);
        sqe->user_data = Ring::Pack(Ring::kLaneTag, 0);
        eventfd_armed_ = true;
      }
      io_uring_cqe* cqe = nullptr;
      if (timeout_ns < 0) {
        io_uring_submit_and_wait(ring_.raw(), 1);
      } else {
        __kernel_timespec ts{timeout_ns / kNanosPerSecond, timeout_ns % kNanosPerSecond};
        io_uring_submit_and_wait_timeout(ring_.raw(), &cqe, 1, &ts, nullptr);
      }
    } else if (timeout_ns < 0) {
      waker_.Drain();  // blocking read: sleeps until a producer writes
    } else {
      pollfd pfd{waker_.fd(), POLLIN, 0};
      int ms = static_cast<int>((timeout_ns + kNanosPerMilli - 1) / kNanosPerMilli);
      if (poll(&pfd, 1, ms) > 0) waker_.Drain();
    }
    waker_.CancelSleep();
  }

  Pipeline* p_;
  const int index_;
  const LaneSpec& spec_;
  WaitMode wait_ = WaitMode::kBlock;
  LaneStats stats_;
  LaneRunInfo info_;
  Waker waker_;
  Ring ring_;
  bool eventfd_armed_ = false;
  uint64_t eventfd_value_ = 0;
  bool saw_stop_ = false;
  int started_ = 0;  // stages [first, started_) were started
  std::unique_ptr<BoundedQueue> in_;
  std::unique_ptr<BoundedQueue::ConsumerToken> consumer_;
  Outbox out_;
  std::atomic<bool> done_{false};
  std::atomic<int> tid_{0};
  alignas(64) std::atomic<uint64_t> stalled_producers_{0};
};

bool Outbox::Congested(int stage_index) const {
  // The lane owning this outbox is found through the remote table: every Remote of a later lane
  // points at that lane's queue.
  int lane = lane_of_[static_cast<size_t>(stage_index)];
  if (stage_index <= last_stage_) return false;
  const Remote& r = remote_[static_cast<size_t>(lane)];
  if (r.queue == nullptr) return false;
  if (!r.items.empty() && r.queue->Depth() + r.items.size() >= r.queue->capacity()) return true;
  return static_cast<double>(r.queue->Depth()) >= kCongestedFill * static_cast<double>(r.queue->capacity());
}

Pipeline::~Pipeline() {
  for (auto& t : threads_) {
    if (t.joinable()) t.join();
  }
}

absl::StatusOr<std::unique_ptr<Pipeline>> Pipeline::Build(ConfigDoc& doc,
                                                           const StageRegistry& registry,
                                                           bool check_only) {
  if (absl::Status s = registry.Validate(); !s.ok()) return s;
  std::unique_ptr<Pipeline> p(new Pipeline());
  p->check_only_ = check_only;
  p->shared_ = std::make_unique<SharedObjects>();
  ConfigNode root = doc.Root();
  ConfigNode rt = root.Map("runtime");
  p->options_.require_deadline = rt.Bool("require_deadline", false);
  p->options_.drain_timeout_ns = rt.DurationNs("drain_timeout", 5 * kNanosPerSecond, kNanosPerMilli, 600 * kNanosPerSecond);
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
  if (p->bandwidth_ > p->admission_.cpus + 1e-9) {
    doc.AddErrorAtLine(
        entries.front().line(), "pipeline",
        absl::StrFormat("deadline bandwidth %.3f CPUs exceeds the %.2f CPUs the kernel admits "
                        "(%s). Per thread: %s. Lower runtime/period, or put stages on fewer "
                        "threads (same `thread:`)",
                        p->bandwidth_, p->admission_.cpus, p->admission_.explanation,
                        absl::StrJoin(parts, ", ")));
  }
  if (!doc.status().ok()) return doc.status();
  return p;
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
  absl::StrAppendFormat(&out, "deadline bandwidth: %.3f of %.2f CPUs admitted (%s)\n", bandwidth_,
                        admission_.cpus, admission_.explanation);
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
uint64_t Pipeline::unattributed_overruns() { return g_unattributed_overruns.load(std::memory_order_relaxed); }
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

absl::Status Pipeline::Run(const std::function<void()>& on_running) {
  InstallSigxcpuHandler();
  const int n = num_lanes();
  for (int l = 0; l < n; ++l) lanes_.push_back(std::make_unique<Lane>(this, l));
  for (auto& lane : lanes_) lane->Wire(n);
  for (auto& lane : lanes_) lane->WireProducers(lanes_);

  // Start lanes one at a time: the main-thread lane first (it may initialise what others need,
  // such as the interpreter), then the others in pipeline order.
  int main_lane = -1;
  for (int l = 0; l < n; ++l) {
    if (lane_specs_[l].main_thread) main_lane = l;
  }
  std::vector<int> order;
  if (main_lane >= 0) order.push_back(main_lane);
  for (int l = 0; l < n; ++l) {
    if (l != main_lane) order.push_back(l);
  }
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
  {
    std::lock_guard<std::mutex> lock(start_mu_);
    if (failure.ok()) go_ = true; else abort_start_ = true;
    start_cv_.notify_all();
  }
  if (failure.ok()) {
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
  pthread_setname_np(pthread_self(), main_name);
  return failure;
}

}  // namespace metronome
