#include "runtime/testing/synthetic.h"

#include <unistd.h>

#include <cstdlib>

#include "absl/strings/str_cat.h"

#include "runtime/outbox.h"
#include "runtime/pipeline.h"
#include "runtime/registry.h"
#include "runtime/units.h"

namespace metronome::synthetic {

void SyntheticPool::Init(size_t n) {
  items_.resize(n);
  free_ = std::make_unique<moodycamel::ConcurrentQueue<SynthItem*>>(n * 2);
  for (auto& it : items_) free_->enqueue(&it);
}

SynthItem* SyntheticPool::Take() {
  SynthItem* item = nullptr;
  return free_->try_dequeue(item) ? item : nullptr;
}

void SyntheticPool::Give(SynthItem* item) {
  // enqueue, not try_enqueue: the sink thread's first return creates its implicit producer,
  // which allocates once.
  free_->enqueue(item);
}

void SyntheticPool::WaitReceived(uint64_t n) {
  std::unique_lock<std::mutex> lock(mu_);
  waiters_.fetch_add(1);
  cv_.wait(lock, [&] { return received.load() >= n; });
  waiters_.fetch_sub(1);
}

void SyntheticPool::NotifyReceived() {
  if (waiters_.load() == 0) return;
  std::lock_guard<std::mutex> lock(mu_);
  cv_.notify_all();
}

namespace {

void BurnNs(int64_t ns) {
  if (ns <= 0) return;
  int64_t end = MonotonicNowNs() + ns;
  while (MonotonicNowNs() < end) {
  }
}

// Emits items until `count` (0: until stopped), at most `inflight` at once.
class SourceStage : public Stage {
 public:
  absl::Status Configure(ConfigNode entry, ConfigNode, StageEnv& env) override {
    count_ = static_cast<uint64_t>(entry.Int("count", 0, 0, INT64_MAX));
    inflight_ = static_cast<size_t>(entry.Int("inflight", 1024, 1, 1 << 20));
    pool_ = &env.Shared<SyntheticPool>("synthetic");
    pool_->Init(inflight_);
    return absl::OkStatus();
  }
  absl::Status Start(StageEnv& env) override {
    pool_->source_waker = env.lane_waker();
    return absl::OkStatus();
  }
  void Process(std::span<Item* const> batch, Outbox& out) override {
    for (Item* item : batch) out.Emit(item);  // nothing is queued to a source; pass through
  }
  bool Poll(Outbox& out) override {
    if (stopping_) return false;
    bool worked = false;
    size_t room = out.Room();
    while (room-- > 0 && (count_ == 0 || next_seq_ < count_)) {
      SynthItem* item = pool_->Take();
      if (item == nullptr) break;
      item->seq = next_seq_++;
      item->created_ns = out.now_ns();
      item->hops = 0;
      pool_->generated.fetch_add(1, std::memory_order_relaxed);
      out.Emit(item);
      worked = true;
    }
    return worked;
  }
  void BeginStop(Outbox&) override { stopping_ = true; }

 private:
  uint64_t count_ = 0, next_seq_ = 0;
  size_t inflight_ = 0;
  bool stopping_ = false;
  SyntheticPool* pool_ = nullptr;
};

// `check:` and `connect:` make CheckDeep and Connect misbehave on purpose, for the tests of
// Pipeline::CheckDeep: note, fail, hang (forever), crash (SIGABRT), exit (status 3).
class RelayStage : public Stage {
 public:
  absl::Status Configure(ConfigNode entry, ConfigNode, StageEnv&) override {
    work_ns_ = entry.DurationNs("work", 0, 0, kNanosPerSecond);
    check_ = entry.Enum("check", "ok", {"ok", "note", "fail", "hang", "crash", "exit"});
    connect_fails_ = entry.Enum("connect", "ok", {"ok", "fail"}) == "fail";
    return absl::OkStatus();
  }
  absl::StatusOr<std::string> CheckDeep(StageEnv& env) override {
    env.CheckStep(absl::StrCat("doing '", check_, "' on purpose"));
    if (check_ == "note") return absl::StrCat("checked ", env.stage_name());
    if (check_ == "fail") return absl::FailedPreconditionError("fails its check on purpose");
    if (check_ == "hang") {
      for (;;) pause();
    }
    if (check_ == "crash") abort();
    if (check_ == "exit") _exit(3);
    return std::string();
  }
  absl::Status Connect(StageEnv&) override {
    return connect_fails_ ? absl::FailedPreconditionError("fails to connect on purpose") : absl::OkStatus();
  }
  void Process(std::span<Item* const> batch, Outbox& out) override {
    for (Item* item : batch) {
      BurnNs(work_ns_);
      static_cast<SynthItem*>(item)->hops++;
      out.Emit(item);
    }
  }

 private:
  int64_t work_ns_ = 0;
  std::string check_;
  bool connect_fails_ = false;
};

class SinkStage : public Stage {
 public:
  absl::Status Configure(ConfigNode entry, ConfigNode, StageEnv& env) override {
    expect_hops_ = static_cast<uint32_t>(entry.Int("expect_hops", -1, -1, 1 << 16));
    pool_ = &env.Shared<SyntheticPool>("synthetic");
    return absl::OkStatus();
  }
  void Process(std::span<Item* const> batch, Outbox& out) override {
    for (Item* it : batch) {
      auto* item = static_cast<SynthItem*>(it);
      pool_->latency_ns.Record(static_cast<uint64_t>(std::max<int64_t>(0, MonotonicNowNs() - item->created_ns)));
      if (expect_hops_ != UINT32_MAX && item->hops != expect_hops_) pool_->hop_errors.fetch_add(1);
      pool_->Give(item);
    }
    (void)out;
    pool_->received.fetch_add(batch.size(), std::memory_order_release);
    pool_->NotifyReceived();
    if (pool_->source_waker != nullptr) pool_->source_waker->Notify();
  }
  bool IsSink() const override { return true; }
  SyntheticPool* pool() const { return pool_; }

 private:
  uint32_t expect_hops_ = UINT32_MAX;
  SyntheticPool* pool_ = nullptr;
};

METRONOME_REGISTER_STAGE("synthetic-source", SourceStage);
METRONOME_REGISTER_STAGE("synthetic-relay", RelayStage);
METRONOME_REGISTER_STAGE("synthetic-sink", SinkStage);

}  // namespace

SyntheticPool* FindPool(Pipeline& pipeline) {
  for (int i = 0; i < pipeline.num_stages(); ++i) {
    if (auto* sink = dynamic_cast<SinkStage*>(&pipeline.stage(i))) return sink->pool();
  }
  return nullptr;
}

}  // namespace metronome::synthetic
