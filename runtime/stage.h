// The Stage interface: a named, batch-shaped unit of work that runs on a lane (thread).
//
// Life of a stage:
//   1. Construction through the registry, by type name (REGISTER_STAGE below).
//   2. Configure(): reads its pipeline entry and any top-level sections it owns; validation only,
//      no resources (this is all `metronome check` runs).
//   3. Start(): acquires resources on the stage's own lane thread, before the lane's scheduling
//      policy is applied (so it may allocate, bind sockets, create rings) and publishes what
//      other stages will read (into StageEnv::Shared objects). Lanes start one by one: the
//      main-thread lane first, then the others in pipeline order, so a stage must not read in
//      Start what another stage publishes in its Start.
//   3b. Connect(): after every stage's Start, before any lane runs its loop: reads what the
//      others published (route builds its router from the python stage's routes here). On the
//      starting thread, stage by stage in pipeline order, single-threaded; an error stops the
//      server before it serves anything. It reads only what was published (never resources of
//      Start), because `metronome check` runs it after CheckDeep too.
//   (check) CheckDeep(): under `metronome check` only, instead of Start, in a child process
//      (Pipeline::CheckDeep): what Start would publish, without resources and without running
//      application code beyond loading it, so that the real Connect finds what serve would
//      refuse. Same start order as Start.
//   4. The lane loop calls Process() with batches from its input, OnCompletion() for the lane's
//      io_uring, Poll() for sources, Tick() when asked.
//   5. BeginStop() once when shutdown begins: stop taking new work. The lane finishes when its
//      queue is empty, every earlier lane finished, and Idle() is true.
//   6. Shutdown(): releases resources, on the main thread, after every lane was joined, in
//      reverse pipeline order.
//
// Thread-safety: steps 4-5 run on the stage's lane thread only. The stats are read concurrently
// by other threads (see stats.h). A stage never touches another stage's state: what two stages
// share goes through a shared object (StageEnv::Shared) with its own thread-safety contract.
#pragma once

#include <cstdint>
#include <functional>
#include <limits>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <typeindex>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "runtime/clock.h"
#include "runtime/config.h"
#include "runtime/item.h"
#include "runtime/stats.h"

struct io_uring_cqe;

namespace metronome {

class Outbox;
class Ring;

// An io_uring opcode a stage submits, for the start-up probe (uring.h).
struct RingOp {
  int op;             // IORING_OP_*
  const char* name;   // "SENDMSG"
  const char* since;  // the Linux version that brought it (as the stage uses it), "5.3"
};

// Receives a stage's own figures. Names are snake_case with their unit last
// ("requests_total", "busy_seconds"); /metrics prefixes them with metronome_<stage type>_ and
// adds a stage label. Called from the admin thread: a stage reads only its atomics here.
class StatsSink {
 public:
  virtual ~StatsSink() = default;
  virtual void Value(absl::string_view name, double value) = 0;
  // One labeled series, e.g. ("handler_seconds_total", "route", "GET /json", 1.5).
  virtual void Labeled(absl::string_view name, absl::string_view label, absl::string_view label_value,
                       double value) = 0;
  // A latency histogram (runtime/stats.h buckets), optionally labeled.
  virtual void Histogram(absl::string_view name, const LatencyHistogram& h, absl::string_view label = {},
                         absl::string_view label_value = {}) = 0;
};
class Waker;
class Pipeline;

// What the runtime offers a stage beyond its config.
class StageEnv {
 public:
  virtual ~StageEnv() = default;
  virtual const std::string& stage_name() const = 0;
  virtual int stage_index() const = 0;
  // The pipeline index of the stage instance named `name`, or -1.
  virtual int FindStage(absl::string_view name) const = 0;
  // The pipeline index of the first stage instance of registered type `type` after this
  // stage, or -1.
  virtual int FindStageOfType(absl::string_view type) const = 0;
  // The lane's io_uring (Start and later; only when NeedsRing() returned true). Tag the user
  // data of every request with Ring::Pack(ring_tag(), payload).
  virtual Ring* ring() = 0;
  virtual uint8_t ring_tag() const = 0;
  // Wakes this stage's lane; other stages may keep it to signal work that arrives outside the
  // queues (e.g. buffers returned to a ring).
  virtual Waker* lane_waker() = 0;
  // True under `metronome check`: Configure only, nothing will start (CheckDeep may run).
  virtual bool check_only() const = 0;
  // runtime.drain_timeout: how long the drain may take before the server gives up on it.
  virtual int64_t drain_timeout_ns() const = 0;
  // Under check, names what the stage is about to do in CheckDeep ("importing ..."), so that a
  // check that hangs or crashes says where. A no-op otherwise.
  virtual void CheckStep(absl::string_view what) { (void)what; }
  // Objects shared between stages of one pipeline, keyed by name and type, created on first
  // use by `make`. Only during Configure and Start (single-threaded).
  template <typename T>
  T& Shared(absl::string_view key, const std::function<std::unique_ptr<T>()>& make) {
    void* p = SharedImpl(key, std::type_index(typeid(T)), [&]() -> std::shared_ptr<void> {
      return std::shared_ptr<T>(make().release());
    });
    return *static_cast<T*>(p);
  }
  template <typename T>
  T& Shared(absl::string_view key) {
    return Shared<T>(key, [] { return std::make_unique<T>(); });
  }

 protected:
  virtual void* SharedImpl(absl::string_view key, std::type_index type,
                           const std::function<std::shared_ptr<void>()>& make) = 0;
};

class Stage {
 public:
  Stage() = default;
  virtual ~Stage() = default;
  Stage(const Stage&) = delete;
  Stage& operator=(const Stage&) = delete;

  // `entry` is this stage's pipeline entry (common keys already consumed by the runtime);
  // `root` the whole document, for sections the stage owns. Errors go into the document
  // (ConfigNode::Error); the returned status is for anything else.
  virtual absl::Status Configure(ConfigNode entry, ConfigNode root, StageEnv& env) = 0;
  virtual absl::Status Start(StageEnv& env) {
    (void)env;
    return absl::OkStatus();
  }

  virtual absl::Status Connect(StageEnv& env) {
    (void)env;
    return absl::OkStatus();
  }

  // See the life of a stage above. Shares its code with Start (one function loads what both
  // publish), so that check and serve refuse the same things with the same messages. Returns a
  // line for check's report (empty: nothing to say), or the error Start would return.
  virtual absl::StatusOr<std::string> CheckDeep(StageEnv& env) {
    (void)env;
    return std::string();
  }

  // Handles a batch taken from the lane's input (or emitted by an earlier stage on the same
  // lane). Each item is either emitted (Outbox::Emit / EmitTo) or retired by the stage.
  virtual void Process(std::span<Item* const> batch, Outbox& out) = 0;
  // For sources and stages with their own pending work; returns true if it did anything.
  // REQUIRES: emit at most out.Room() items.
  virtual bool Poll(Outbox& out) {
    (void)out;
    return false;
  }
  // A completion on the lane's ring whose user data this stage tagged (see Ring).
  virtual void OnCompletion(const io_uring_cqe& cqe, Outbox& out) {
    (void)cqe;
    (void)out;
  }
  // Called when `now_ns` passed the time the previous call returned; returns the next time.
  virtual int64_t Tick(int64_t now_ns, Outbox& out) {
    (void)now_ns;
    (void)out;
    return kNeverNs;
  }
  virtual void BeginStop(Outbox& out) { (void)out; }
  // Nothing in flight that still needs this lane (pending writes, buffered input, ...).
  virtual bool Idle() const { return true; }
  // What the stage is busy with, for the report of a drain that timed out (e.g. the request a
  // handler is stuck in). Called from another thread while the stage may be running: read
  // only what stays valid while the stage is stuck (atomics, the current item).
  virtual std::string BusyWith() const { return {}; }
  virtual void Shutdown() {}

  virtual bool NeedsRing() const { return false; }
  // The io_uring opcodes this stage submits (NeedsRing stages): probed before any thread starts,
  // by `serve` and `check`, so a kernel without one fails with its name, not mid-request.
  virtual std::vector<RingOp> RingOps() const { return {}; }
  // The stage must run on the process's main thread (the embedded interpreter's thread).
  virtual bool NeedsMainThread() const { return false; }
  // A file descriptor the lane also waits on when it sleeps (readable: Poll has work), e.g. an
  // event loop's selector; -1 for none. Asked before each sleep, on the lane's thread.
  virtual int WaitFd() const { return -1; }
  // A sink emits nothing; its lane keeps serving it while downstream queues are full.
  virtual bool IsSink() const { return false; }
  // Extra per-stage figures for /stats and /metrics (see StatsSink).
  virtual void ExtraStats(StatsSink& sink) const { (void)sink; }

  StageStats& stats() { return stats_; }
  const StageStats& stats() const { return stats_; }

 private:
  StageStats stats_;
};

}  // namespace metronome
