// A pipeline: stages in config order, grouped into lanes (threads), joined by bounded queues.
//
// The life of a work item:
//   1. A source stage (or a stage's ring completion) creates it and calls Outbox::Emit.
//   2. If the next stage is on the same lane, the lane calls it directly with the batch of items
//      emitted for it (run to completion, no queue). Otherwise the item waits in the lane's
//      outbox until the end of the loop iteration, then moves to the next lane's input queue in
//      one bulk enqueue, and that lane is woken if it sleeps.
//   3. The item travels forward only, stage by stage (or skipping ahead with EmitTo), until a
//      stage retires it.
//
// Backpressure: when a queue is full the items stay in the producer's outbox; the producer lane
// stops taking input for its non-sink stages until they fit, and the consumer wakes it when it
// makes room. Nothing is dropped and nothing allocates.
//
// Thread-safety: Build/Describe on one thread before Run. Run blocks the calling thread (which
// becomes the main-thread lane when a stage needs it). RequestStop is async-signal-safe. Stats
// accessors may be used from any thread once Run has started the lanes.
#pragma once

#include <atomic>
#include <condition_variable>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "runtime/clock.h"
#include "runtime/config.h"
#include "runtime/drain_guard.h"
#include "runtime/queue.h"
#include "runtime/registry.h"
#include "runtime/scheduling.h"
#include "runtime/stage.h"
#include "runtime/waker.h"

namespace metronome {

// Bounds of the per-lane knobs; each sentence says what happens at the limit.
inline constexpr size_t kBatchMax = 1024;          // a larger batch only delays the next stage
inline constexpr size_t kQueueCapacityDefault = 4096;
inline constexpr size_t kBatchDefault = 64;
// A stage may emit this many items per input item it was handed (pipelined requests, fan-out);
// beyond it the stage must check Outbox::Room() and keep the rest for its next Poll().
inline constexpr size_t kOutboxFanout = 4;
inline constexpr int kSpinBeforeSleepMax = 1000000;
inline constexpr size_t kThreadNameMax = 15;       // Linux TASK_COMM_LEN - 1
inline constexpr int kLanesMax = 64;               // one bit per lane in the stall mask
static_assert(kBatchDefault <= kBatchMax);

struct StageSpec {
  std::string name;   // instance name, unique
  std::string type;   // registered type
  int lane = -1;
};

struct LaneSpec {
  std::string name;                 // thread name
  int first_stage = 0, last_stage = 0;  // inclusive pipeline indices
  SchedParams sched;
  WaitMode wait = WaitMode::kBlock;
  int spin_before_sleep = 0;
  size_t queue_capacity = kQueueCapacityDefault;
  size_t batch_max = kBatchDefault;
  bool main_thread = false;
  bool needs_ring = false;
  unsigned ring_entries = 256;
};

struct RuntimeOptions {
  bool require_deadline = false;
  // A thread refused SCHED_DEADLINE for bandwidth (EBUSY: held by another process, e.g. the old
  // workers of a reload) asks again this often; 0: never.
  int64_t deadline_retry_ns = 1'000'000'000;
  int64_t drain_timeout_ns = 5'000'000'000;
};

class Lane;

// What a lane ended up running under, set once at start.
// The strings are set once at start; a lane that later gets the deadline it was refused
// (runtime.deadline_retry) says so in `deadline_regained`, read from any thread.
struct LaneRunInfo {
  std::string policy_in_force;  // "deadline" / "other"
  WaitMode wait_in_force = WaitMode::kBlock;
  std::string fallback;         // empty, or why deadline was refused
  std::atomic<bool> deadline_regained{false};
  bool deadline_now() const { return policy_in_force == "deadline" || deadline_regained.load(std::memory_order_relaxed); }
};

class Pipeline {
 public:
  ~Pipeline();
  // Reads `runtime:` and `pipeline:`, creates and configures every stage, checks unknown keys,
  // lane grouping and bandwidth. `check_only`: stages must not expect Start.
  // `processes`: how many copies of this pipeline run on the machine (worker processes): the
  // deadline bandwidth they ask together must fit the admission limit.
  static absl::StatusOr<std::unique_ptr<Pipeline>> Build(ConfigDoc& doc,
                                                          const StageRegistry& registry,
                                                          bool check_only, int processes = 1);

  // The resolved pipeline as a table, with the deadline bandwidth against the admission limit.
  std::string Describe() const;

  // Per stage: items, batches, mean batch, busy time, service p50/p99; per thread: sleeps,
  // yields, overruns, stalls. For the log at shutdown and for tools.
  std::string StatsSummary() const;

  // `metronome check` past the config: what serve would refuse at start-up. In a forked child
  // (REQUIRES: built with check_only, no thread started yet, so the fork copies one thread)
  // runs every stage's CheckDeep in start order, then every Connect in pipeline order, as Run
  // runs Start and Connect, and sends back the notes and errors; waits at most `timeout_ns`
  // for it, then kills it and says which stage it was in and what it was doing (CheckStep).
  // The child ends with _exit: nothing it made (an interpreter, say) is torn down.
  struct CheckReport {
    std::vector<std::string> notes;   // one line per stage that had something to say
    std::vector<std::string> errors;  // "stage 'name' ...: message", as Run would report them
    bool timed_out = false;           // the child was killed at the timeout
  };
  CheckReport CheckDeep(int64_t timeout_ns);

  // Starts every lane, runs until RequestStop and the drain finish, joins, shuts stages down.
  // `on_running` (optional) runs on the calling thread once every lane has started.
  absl::Status Run(const std::function<void()>& on_running = nullptr);
  // One line per thread: the policy in force and any fallback (for the start-up banner).
  std::string RunningSummary() const;
  // Async-signal-safe. Begins the drain: sources stop taking work, in-flight work finishes.
  void RequestStop();
  bool stop_requested() const { return stop_.load(std::memory_order_acquire); }
  // True once every lane was set up and the pipeline is running (for tests and tools).
  bool running() const { return running_.load(std::memory_order_acquire); }
  // Blocks until running() or Run() failed; returns running().
  bool WaitUntilRunning();

  int num_stages() const { return static_cast<int>(stages_.size()); }
  int num_lanes() const { return static_cast<int>(lane_specs_.size()); }
  const StageSpec& stage_spec(int i) const { return stage_specs_[i]; }
  const LaneSpec& lane_spec(int i) const { return lane_specs_[i]; }
  Stage& stage(int i) { return *stages_[i]; }
  const Stage& stage(int i) const { return *stages_[i]; }
  // REQUIRES: running() or after Run() returned.
  const LaneStats& lane_stats(int lane) const;
  const LaneRunInfo& lane_run_info(int lane) const;
  size_t queue_depth(int lane) const;
  // The lane's kernel thread id (for /proc/self/task/TID), 0 before it started.
  int lane_tid(int lane) const;
  // Deadline overruns (SIGXCPU) that arrived on a thread that is not a lane, process-wide.
  static uint64_t unattributed_overruns();
  uint64_t queue_full_events(int lane) const;
  double deadline_bandwidth() const { return bandwidth_; }
  const AdmissionLimit& admission() const { return admission_; }
  const RuntimeOptions& options() const { return options_; }
  // Items left in queues and outboxes when a drain timed out (0 after a clean drain).
  uint64_t items_abandoned() const { return abandoned_.load(); }
  // True when the drain timeout cut the drain short (items abandoned or stages still busy).
  bool drain_timed_out() const { return drain_timed_out_.load(); }

 private:
  friend class Lane;
  friend class PipelineEnv;
  Pipeline() = default;
  void StartLaneThread(int lane);
  // The order lanes start in: the main-thread lane first (it may initialise what others need,
  // such as the interpreter), then the others in pipeline order.
  std::vector<int> LaneStartOrder() const;
  // The stage's Start or Connect error as Run reports it.
  absl::Status StageError(int stage, absl::string_view phase, const absl::Status& s) const;
  // CheckDeep's child side (pipeline_check.cc).
  void CheckChild();
  void CheckSend(char kind, absl::string_view text);
  void ReportSetup(int lane, absl::Status status);
  // For the drain guard: the lanes not done, with what their stages say they are busy with.
  std::string DescribeBusy() const;

  std::vector<std::unique_ptr<Stage>> stages_;
  std::vector<StageSpec> stage_specs_;
  std::vector<LaneSpec> lane_specs_;
  std::vector<std::unique_ptr<class PipelineEnv>> envs_;
  std::vector<std::unique_ptr<Lane>> lanes_;
  std::vector<std::thread> threads_;
  std::unique_ptr<class SharedObjects> shared_;
  RuntimeOptions options_;
  AdmissionLimit admission_;
  double bandwidth_ = 0;  // one process's
  int processes_ = 1;
  bool check_only_ = false;
  int check_fd_ = -1;  // in CheckDeep's child: the pipe to the parent

  std::atomic<bool> stop_{false};
  std::atomic<bool> running_{false};
  std::atomic<bool> failed_{false};
  std::atomic<int64_t> stop_time_ns_{0};
  std::atomic<uint64_t> abandoned_{0};
  std::atomic<bool> drain_timed_out_{false};
  DrainGuard drain_guard_;

  // Start-up handshake only (never on the data path).
  std::mutex start_mu_;
  std::condition_variable start_cv_;
  int setup_reported_ = -1;  // lane index whose setup result is in setup_status_
  absl::Status setup_status_;
  bool go_ = false;
  bool abort_start_ = false;
};

}  // namespace metronome
