#include "runtime/lane.h"

#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <cassert>
#include <cerrno>
#include <cstring>
#include <mutex>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "runtime/clock.h"
#include "runtime/log.h"
#include "runtime/signals.h"
#include "runtime/units.h"

namespace metronome {
namespace {

// Above this fill a queue counts as congested (Outbox::Congested): stages that can answer work
// themselves (e.g. with a 503) do so instead of queuing behind a full stage.
constexpr double kCongestedFill = 0.9;

// SIGXCPU arrives on the overrunning thread (docs/platform-facts.md); the handler finds that thread's counters
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

}  // namespace

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

uint64_t UnattributedOverruns() { return g_unattributed_overruns.load(std::memory_order_relaxed); }

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

// On the lane's own thread, before Run: ring, stages' Start, scheduling.
absl::Status Lane::Setup() {
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
      return p_->StageError(i, " failed to start", s);
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
    // Bandwidth held elsewhere may come free (a reload's old workers exit): ask again later.
    if (absl::StrContains(info_.fallback, std::strerror(EBUSY)) && p_->options_.deadline_retry_ns > 0) {
      deadline_retry_at_ns_ = MonotonicNowNs() + p_->options_.deadline_retry_ns;
    }
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

void Lane::RetryDeadline(int64_t now) {
  if (ApplyToCurrentThread(spec_.sched).ok()) {
    deadline_retry_at_ns_ = kNeverNs;
    wait_ = spec_.wait;
    RegisterDeadlineThread(tid_.load());
    info_.deadline_regained.store(true, std::memory_order_relaxed);
    LOG_INFO("thread '%s' now runs under SCHED_DEADLINE: the bandwidth it was refused at start is free again",
             spec_.name.c_str());
  } else {
    deadline_retry_at_ns_ = now + p_->options_.deadline_retry_ns;
  }
}

// The loop. Returns when the drain finished (or timed out).
void Lane::Run() {
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
          // Items only move forward, into this lane's stages (pipeline.h).
          assert(item->next_stage >= spec_.first_stage && item->next_stage <= spec_.last_stage);
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
    if (now >= deadline_retry_at_ns_) RetryDeadline(now);
    next_tick = std::min(next_tick, out_.tick_by_ns_);
    out_.tick_by_ns_ = kNeverNs;
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
    Wait(std::min({next_tick, out_.tick_by_ns_, drain_deadline, deadline_retry_at_ns_}));
  }
  done_.store(true, std::memory_order_release);
  // Let the next lane re-check its own finish condition.
  if (index_ + 1 < static_cast<int>(p_->lanes_.size())) p_->lanes_[index_ + 1]->waker_.Kick();
  // Teardown (Python finalisation, socket closes) must not run throttled by a deadline budget.
  ApplyToCurrentThread(SchedParams{}).IgnoreError();  // best effort; policy other always works
}

// Wiring, on the starting thread before any lane runs.
void Lane::Wire(int n_lanes) {
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
void Lane::WireProducers(std::vector<std::unique_ptr<Lane>>& lanes) {
  for (int l = index_ + 1; l < static_cast<int>(lanes.size()); ++l) {
    Outbox::Remote& r = out_.remote_[static_cast<size_t>(l)];
    r.queue = lanes[l]->in_.get();
    r.token = r.queue->MakeProducerToken();
    r.lane = l;
    r.items.reserve(out_.capacity_);
  }
}

void Lane::Enter(int s) {
  out_.current_ = s;
  out_.stats_ = &p_->stages_[s]->stats();
}

// Runs, in order, every stage from `from` to the end of the lane on what was emitted for it.
void Lane::RunLocal(int from) {
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

bool Lane::ReapCompletions() {
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
        // Payload 0: the eventfd read; 1: a stage's WaitFd became readable (one-shot poll).
        if (Ring::PayloadOf(cqe.user_data) == 0) eventfd_armed_ = false; else waitfd_armed_ = -1;
        worked = true;
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

int64_t Lane::RunTicks(int64_t now) {
  int64_t next = kNeverNs;
  for (int s = spec_.first_stage; s <= spec_.last_stage; ++s) {
    Enter(s);
    next = std::min(next, p_->stages_[s]->Tick(now, out_));
    RunLocal(s + 1);
  }
  return next;
}

// Moves remote items into their queues. Items that do not fit stay (backpressure).
void Lane::Flush(int64_t now) {
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

bool Lane::Stalled() const {
  for (int l = index_ + 1; l < static_cast<int>(out_.remote_.size()); ++l) {
    if (!out_.remote_[static_cast<size_t>(l)].items.empty()) return true;
  }
  return false;
}

void Lane::WakeStalledProducers() {
  if (stalled_producers_.load(std::memory_order_relaxed) == 0) return;
  uint64_t mask = stalled_producers_.exchange(0, std::memory_order_acq_rel);
  while (mask != 0) {
    int l = __builtin_ctzll(mask);
    mask &= mask - 1;
    p_->lanes_[l]->waker_.Notify();
  }
}

bool Lane::CanFinish() {
  if (index_ > 0 && !p_->lanes_[index_ - 1]->done()) return false;
  if (in_->Depth() != 0 || Stalled()) return false;
  for (int s = spec_.first_stage; s <= spec_.last_stage; ++s) {
    if (!p_->stages_[s]->Idle()) return false;
  }
  return true;
}

void Lane::Abandon() {
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

bool Lane::HasWork() {
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

void Lane::Wait(int64_t until_ns) {
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
  // A stage's own fd (an event loop's selector) wakes the lane too.
  int wait_fd = -1;
  for (int s = spec_.first_stage; s <= spec_.last_stage && wait_fd < 0; ++s) wait_fd = p_->stages_[s]->WaitFd();
  if (spec_.needs_ring) {
    if (!eventfd_armed_) {
      io_uring_sqe* sqe = ring_.GetSqe();
      io_uring_prep_read(sqe, waker_.fd(), &eventfd_value_, sizeof eventfd_value_, 0);
      sqe->user_data = Ring::Pack(Ring::kLaneTag, 0);
      eventfd_armed_ = true;
    }
    if (wait_fd >= 0 && waitfd_armed_ != wait_fd) {
      io_uring_sqe* sqe = ring_.GetSqe();
      io_uring_prep_poll_add(sqe, wait_fd, POLLIN);
      sqe->user_data = Ring::Pack(Ring::kLaneTag, 1);
      waitfd_armed_ = wait_fd;
    }
    io_uring_cqe* cqe = nullptr;
    if (timeout_ns < 0) {
      io_uring_submit_and_wait(ring_.raw(), 1);
    } else {
      __kernel_timespec ts{timeout_ns / kNanosPerSecond, timeout_ns % kNanosPerSecond};
      io_uring_submit_and_wait_timeout(ring_.raw(), &cqe, 1, &ts, nullptr);
    }
  } else if (timeout_ns < 0 && wait_fd < 0) {
    waker_.Drain();  // blocking read: sleeps until a producer writes
  } else {
    pollfd pfd[2] = {{waker_.fd(), POLLIN, 0}, {wait_fd, POLLIN, 0}};
    int ms = timeout_ns < 0 ? -1 : static_cast<int>((timeout_ns + kNanosPerMilli - 1) / kNanosPerMilli);
    if (poll(pfd, wait_fd >= 0 ? 2 : 1, ms) > 0 && (pfd[0].revents & POLLIN)) waker_.Drain();
  }
  waker_.CancelSleep();
}

}  // namespace metronome
