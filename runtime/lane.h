// A lane: one thread's loop over its input queue, its stages, its io_uring and its single wait
// point (runtime/waker.h). The pipeline (pipeline.h) builds lanes from the config; this file is
// what one of them does while the server runs.
//
// One turn of the loop:
//   1. reap the ring's completions (each goes to the stage that tagged it);
//   2. unless stalled, take a batch from the input queue and run it through the lane's stages
//      (a stage's output for a later stage on this lane runs right after, by direct call);
//   3. Poll every stage (a stalled lane polls sinks only), then Tick those whose time came;
//   4. Flush the outbox: items for later lanes move into their queues in one bulk enqueue each;
//   5. if nothing happened, wait: block on the eventfd (through the ring when there is one),
//      sched_yield, or spin, as the lane's wait mode says.
//
// Invariants:
//   1. Only this lane's thread touches its stages (Start and later), its ring and its outbox.
//   2. Items move forward only: a lane enqueues only into lanes after it, so the queue graph is
//      acyclic and backpressure cannot deadlock (a stalled lane keeps serving its sinks).
//   3. A lane is stalled exactly while some item waits in its outbox for a full queue; it then
//      takes no input for its non-sink stages, and the consumer wakes it when it makes room
//      (stalled_producers_, one bit per producer lane: kLanesMax bounds the lane count).
//   4. A lane finishes its drain only after the lane before it finished, its queue and outbox
//      are empty and every one of its stages is Idle(); or when the drain timeout passes.
//   5. A lane never blocks anywhere but its wait point (step 5).
//
// Thread-safety: Wire/WireProducers on the starting thread before any lane runs; Setup and Run
// on the lane's own thread; done(), tid(), stats(), info(), input() and waker().Notify() from
// any thread.
#pragma once

#include <atomic>
#include <functional>
#include <map>
#include <memory>
#include <typeindex>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "runtime/outbox.h"
#include "runtime/pipeline.h"
#include "runtime/queue.h"
#include "runtime/stage.h"
#include "runtime/stats.h"
#include "runtime/uring.h"
#include "runtime/waker.h"

namespace metronome {

// SIGXCPU (SCHED_FLAG_DL_OVERRUN) counted on the lane it arrived on; installed once per process.
void InstallSigxcpuHandler();
// Overruns that arrived on a thread that is not a lane.
uint64_t UnattributedOverruns();

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
  void CheckStep(absl::string_view what) override { p_->CheckSend('W', what); }
  int64_t drain_timeout_ns() const override { return p_->options_.drain_timeout_ns; }
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

class Lane {
 public:
  Lane(Pipeline* p, int index) : p_(p), index_(index), spec_(p->lane_specs_[index]) {}

  // On the lane's own thread, before Run: ring, stages' Start, scheduling.
  absl::Status Setup();

  // The loop. Returns when the drain finished (or timed out).
  void Run();

  bool done() const { return done_.load(std::memory_order_acquire); }
  int tid() const { return tid_.load(std::memory_order_acquire); }
  Waker& waker() { return waker_; }
  LaneStats& stats() { return stats_; }
  LaneRunInfo& info() { return info_; }
  BoundedQueue& input() { return *in_; }
  int started() const { return started_; }

  // Wiring, on the starting thread before any lane runs.
  void Wire(int n_lanes);
  // After every lane has its queue: producer tokens for the later lanes.
  void WireProducers(std::vector<std::unique_ptr<Lane>>& lanes);
 private:
  void Enter(int s);

  // Runs, in order, every stage from `from` to the end of the lane on what was emitted for it.
  void RunLocal(int from);

  bool ReapCompletions();

  int64_t RunTicks(int64_t now);

  // Moves remote items into their queues. Items that do not fit stay (backpressure).
  void Flush(int64_t now);

  bool Stalled() const;

  void WakeStalledProducers();

  bool CanFinish();

  void Abandon();

  bool HasWork();

  void Wait(int64_t until_ns);
  void RetryDeadline(int64_t now);

  Pipeline* p_;
  const int index_;
  const LaneSpec& spec_;
  WaitMode wait_ = WaitMode::kBlock;
  LaneStats stats_;
  LaneRunInfo info_;
  Waker waker_;
  Ring ring_;
  bool eventfd_armed_ = false;
  int waitfd_armed_ = -1;
  int64_t deadline_retry_at_ns_ = kNeverNs;  // a refused deadline is asked for again then  // the stage fd a poll is armed for on the ring (-1: none)
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

}  // namespace metronome
