// The runtime end to end with synthetic stages: every policy and wait mode for real (CI runs as
// root, so SCHED_DEADLINE is granted), lanes, backpressure, fallback, overruns, drain.
#include "runtime/pipeline.h"

#include <dirent.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <sched.h>

#include <fstream>
#include <sstream>
#include <thread>

#include "absl/strings/str_join.h"
#include "runtime/testing/synthetic.h"
#include "runtime/units.h"

namespace metronome {
namespace {

using synthetic::SyntheticPool;

// A pipeline running on its own thread (which plays the process's main thread).
class Running {
 public:
  explicit Running(const std::string& yaml, int pin_cpu = -1) {
    auto doc = ConfigDoc::FromString(yaml, "test.yaml");
    EXPECT_TRUE(doc.ok()) << doc.status();
    doc_ = std::move(*doc);
    auto p = Pipeline::Build(*doc_, StageRegistry::Global(), false);
    EXPECT_TRUE(p.ok()) << p.status();
    p_ = std::move(*p);
    pool_ = synthetic::FindPool(*p_);
    thread_ = std::thread([this, pin_cpu] {
      if (pin_cpu >= 0) {
        cpu_set_t set;
        CPU_ZERO(&set);
        CPU_SET(pin_cpu, &set);
        sched_setaffinity(0, sizeof set, &set);  // lane threads inherit it
      }
      result_ = p_->Run();
    });
    started_ = p_->WaitUntilRunning();
  }
  ~Running() {
    if (thread_.joinable()) Stop().IgnoreError();
  }
  absl::Status Stop() {
    p_->RequestStop();
    thread_.join();
    return result_;
  }
  Pipeline& p() { return *p_; }
  SyntheticPool& pool() { return *pool_; }
  bool started() const { return started_; }

 private:
  std::unique_ptr<ConfigDoc> doc_;
  std::unique_ptr<Pipeline> p_;
  SyntheticPool* pool_ = nullptr;
  std::thread thread_;
  absl::Status result_;
  bool started_ = false;
};

std::string Chain(const std::string& policy, const std::string& wait, int relays, uint64_t count,
                  const std::string& extra_relay = "") {
  std::string sched = policy == "deadline"
                          ? "policy: deadline, wait: " + wait + ", runtime: 150us, period: 1ms"
                          : "policy: other, wait: " + wait;
  std::string y = "pipeline:\n";
  y += "  - {stage: synthetic-source, count: " + std::to_string(count) + ", " + sched + "}\n";
  for (int i = 0; i < relays; ++i) {
    y += "  - {stage: synthetic-relay, name: relay" + std::to_string(i) + ", " + sched + extra_relay + "}\n";
  }
  y += "  - {stage: synthetic-sink, expect_hops: " + std::to_string(relays) + ", " + sched + "}\n";
  return y;
}

struct Combo {
  const char* policy;
  const char* wait;
  int relays;
  uint64_t count;
};

class PolicyWait : public ::testing::TestWithParam<Combo> {};

TEST_P(PolicyWait, DeliversEveryItemOnceInPolicyAsked) {
  const Combo c = GetParam();
  Running r(Chain(c.policy, c.wait, c.relays, c.count));
  ASSERT_TRUE(r.started());
  r.pool().WaitReceived(c.count);
  // Every lane runs the policy it asked for (no fallback as root).
  for (int l = 0; l < r.p().num_lanes(); ++l) {
    EXPECT_EQ(r.p().lane_run_info(l).policy_in_force, c.policy) << r.p().lane_spec(l).name;
    EXPECT_EQ(r.p().lane_run_info(l).fallback, "");
  }
  ASSERT_TRUE(r.Stop().ok());
  EXPECT_EQ(r.pool().generated.load(), c.count);
  EXPECT_EQ(r.pool().received.load(), c.count);
  EXPECT_EQ(r.pool().hop_errors.load(), 0u);
  // Stats agree with the pool: the sink took every item in, each relay passed every item on.
  EXPECT_EQ(r.p().stage(r.p().num_stages() - 1).stats().items_in.Get(), c.count);
  for (int s = 1; s < r.p().num_stages() - 1; ++s) {
    EXPECT_EQ(r.p().stage(s).stats().items_in.Get(), c.count);
    EXPECT_EQ(r.p().stage(s).stats().items_out.Get(), c.count);
    EXPECT_GT(r.p().stage(s).stats().batches.Get(), 0u);
  }
  EXPECT_EQ(r.p().items_abandoned(), 0u);
  if (std::string(c.wait) == "yield") {
    uint64_t yields = 0;
    for (int l = 0; l < r.p().num_lanes(); ++l) yields += r.p().lane_stats(l).yields.Get();
    EXPECT_GT(yields, 0u);
  }
}

INSTANTIATE_TEST_SUITE_P(
    Runtime, PolicyWait,
    ::testing::Values(Combo{"deadline", "block", 4, 20000}, Combo{"deadline", "yield", 4, 20000},
                      Combo{"deadline", "spin", 1, 2000}, Combo{"other", "block", 4, 20000},
                      Combo{"other", "yield", 4, 20000}, Combo{"other", "spin", 1, 2000}),
    [](const auto& info) { return std::string(info.param.policy) + "_" + info.param.wait; });

TEST(Lanes, AllStagesOnOneThreadRunByDirectCalls) {
  std::string y =
      "pipeline:\n"
      "  - {stage: synthetic-source, count: 50000, thread: solo}\n"
      "  - {stage: synthetic-relay, name: a, thread: solo}\n"
      "  - {stage: synthetic-relay, name: b, thread: solo}\n"
      "  - {stage: synthetic-sink, expect_hops: 2, thread: solo}\n";
  Running r(y);
  ASSERT_EQ(r.p().num_lanes(), 1);
  r.pool().WaitReceived(50000);
  ASSERT_TRUE(r.Stop().ok());
  EXPECT_EQ(r.pool().received.load(), 50000u);
  EXPECT_EQ(r.pool().hop_errors.load(), 0u);
  // No queue was crossed: nothing was ever dequeued.
  EXPECT_EQ(r.p().lane_stats(0).dequeued.Get(), 0u);
}

TEST(Lanes, TwoGroups) {
  std::string y =
      "pipeline:\n"
      "  - {stage: synthetic-source, count: 30000, thread: front}\n"
      "  - {stage: synthetic-relay, name: a, thread: front}\n"
      "  - {stage: synthetic-relay, name: b, thread: back}\n"
      "  - {stage: synthetic-sink, expect_hops: 2, thread: back}\n";
  Running r(y);
  ASSERT_EQ(r.p().num_lanes(), 2);
  r.pool().WaitReceived(30000);
  ASSERT_TRUE(r.Stop().ok());
  EXPECT_EQ(r.p().lane_stats(1).dequeued.Get(), 30000u);
  EXPECT_EQ(r.pool().hop_errors.load(), 0u);
}

TEST(Backpressure, FullQueueStallsProducerAndLosesNothing) {
  // A tiny queue in front of a slow relay: the source must stall, never drop.
  std::string y =
      "pipeline:\n"
      "  - {stage: synthetic-source, count: 3000, inflight: 512}\n"
      "  - {stage: synthetic-relay, name: slow, queue: 4, batch: 2, work: 20us}\n"
      "  - {stage: synthetic-sink, expect_hops: 1}\n";
  Running r(y);
  r.pool().WaitReceived(3000);
  ASSERT_TRUE(r.Stop().ok());
  EXPECT_EQ(r.pool().received.load(), 3000u);
  EXPECT_GT(r.p().queue_full_events(1), 0u);
  EXPECT_GT(r.p().lane_stats(0).stalls.Get(), 0u);
  EXPECT_EQ(r.pool().hop_errors.load(), 0u);
}

TEST(Fallback, RefusedDeadlineFallsBackToOtherBlock) {
  // A pinned thread cannot become SCHED_DEADLINE (EPERM): a real refusal by the kernel.
  Running r(Chain("deadline", "yield", 1, 5000), /*pin_cpu=*/0);
  ASSERT_TRUE(r.started());
  r.pool().WaitReceived(5000);
  for (int l = 0; l < r.p().num_lanes(); ++l) {
    const LaneRunInfo& info = r.p().lane_run_info(l);
    EXPECT_EQ(info.policy_in_force, "other");
    EXPECT_EQ(info.wait_in_force, WaitMode::kBlock);
    EXPECT_NE(info.fallback.find("SCHED_DEADLINE"), std::string::npos) << info.fallback;
  }
  ASSERT_TRUE(r.Stop().ok());
  EXPECT_EQ(r.pool().received.load(), 5000u);
}

TEST(Fallback, RequireDeadlineMakesRefusalFatal) {
  std::string y = "runtime: {require_deadline: true}\n" + Chain("deadline", "block", 1, 10);
  auto doc = ConfigDoc::FromString(y, "t.yaml");
  ASSERT_TRUE(doc.ok());
  auto p = Pipeline::Build(**doc, StageRegistry::Global(), false);
  ASSERT_TRUE(p.ok()) << p.status();
  absl::Status result;
  std::thread t([&] {
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(0, &set);
    sched_setaffinity(0, sizeof set, &set);
    result = (*p)->Run();
  });
  t.join();
  EXPECT_FALSE(result.ok());
  EXPECT_NE(result.message().find("require_deadline"), absl::string_view::npos) << result;
  EXPECT_FALSE((*p)->running());
}

TEST(Drain, StopMidStreamDeliversEverythingGenerated) {
  Running r(Chain("other", "block", 3, 0));  // unlimited source
  r.pool().WaitReceived(20000);
  ASSERT_TRUE(r.Stop().ok());
  EXPECT_GE(r.pool().received.load(), 20000u);
  EXPECT_EQ(r.pool().generated.load(), r.pool().received.load());
  EXPECT_EQ(r.p().items_abandoned(), 0u);
}

TEST(Drain, DeadlinePipelineDrainsToo) {
  Running r(Chain("deadline", "block", 3, 0));
  r.pool().WaitReceived(20000);
  ASSERT_TRUE(r.Stop().ok());
  EXPECT_EQ(r.pool().generated.load(), r.pool().received.load());
}

// Reads "policy" from /proc/self/task/TID/sched for the thread named `name`.
std::string ThreadPolicy(const std::string& name, bool* found) {
  *found = false;
  DIR* d = opendir("/proc/self/task");
  std::string policy;
  while (dirent* e = readdir(d)) {
    if (e->d_name[0] == '.') continue;
    std::string base = std::string("/proc/self/task/") + e->d_name;
    std::ifstream comm(base + "/comm");
    std::string c;
    std::getline(comm, c);
    if (c != name) continue;
    *found = true;
    std::ifstream sched(base + "/sched");
    std::string line;
    while (std::getline(sched, line)) {
      if (line.rfind("policy", 0) == 0) {
        policy = line.substr(line.find(':') + 1);
        policy.erase(0, policy.find_first_not_of(' '));
      }
    }
  }
  closedir(d);
  return policy;
}

TEST(Threads, NamedAfterStagesWithTheirPolicy) {
  Running r(Chain("deadline", "block", 2, 0));
  bool found;
  EXPECT_EQ(ThreadPolicy("synthetic-sourc", &found), "6");  // 15-char limit: type names are longer
  for (const char* name : {"relay0", "relay1", "synthetic-sink"}) {
    EXPECT_EQ(ThreadPolicy(name, &found), "6") << name;  // 6 = SCHED_DEADLINE
    EXPECT_TRUE(found) << name;
  }
  ASSERT_TRUE(r.Stop().ok());
}

TEST(Overruns, SigxcpuIsCountedNotFatal) {
  // A relay that burns 3 ms per item under a 100us/1ms budget overruns every period.
  std::string y =
      "pipeline:\n"
      "  - {stage: synthetic-source, count: 0, inflight: 4}\n"
      "  - {stage: synthetic-relay, name: hog, work: 3ms, policy: deadline, runtime: 100us, period: 1ms}\n"
      "  - {stage: synthetic-sink}\n";
  Running r(y);
  if (!r.p().lane_run_info(1).fallback.empty()) {
    // Another process holds the deadline bandwidth: nothing here can overrun.
    GTEST_SKIP() << "the hog thread was refused SCHED_DEADLINE: " << r.p().lane_run_info(1).fallback;
  }
  const LaneStats& hog = r.p().lane_stats(1);
  const uint64_t elsewhere = Pipeline::unattributed_overruns();
  auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(20);
  while (hog.overruns.Get() == 0 && Pipeline::unattributed_overruns() == elsewhere &&
         std::chrono::steady_clock::now() < give_up) {
    std::this_thread::yield();
  }
  // SIGXCPU goes to the overrunning thread, or to another thread of the process: either way it
  // is counted, and the process lives.
  EXPECT_GT(hog.overruns.Get() + (Pipeline::unattributed_overruns() - elsewhere), 0u);
  ASSERT_TRUE(r.Stop().ok());
  EXPECT_EQ(r.pool().generated.load(), r.pool().received.load());
}


// --- Pipeline::CheckDeep (`metronome check`) -------------------------------------------------

Pipeline::CheckReport CheckDeep(const std::string& relays, int64_t timeout_ns = 10 * kNanosPerSecond) {
  auto doc = ConfigDoc::FromString("pipeline:\n  - {stage: synthetic-source}\n" + relays + "  - {stage: synthetic-sink}\n",
                                   "test.yaml");
  EXPECT_TRUE(doc.ok()) << doc.status();
  auto p = Pipeline::Build(**doc, StageRegistry::Global(), /*check_only=*/true);
  EXPECT_TRUE(p.ok()) << p.status();
  return (*p)->CheckDeep(timeout_ns);
}

std::string Joined(const std::vector<std::string>& v) { return absl::StrJoin(v, "\n"); }

TEST(CheckDeep, NotesInStartOrderAndNoErrors) {
  Pipeline::CheckReport r = CheckDeep("  - {stage: synthetic-relay, name: a, check: note}\n"
                                      "  - {stage: synthetic-relay, name: b}\n"
                                      "  - {stage: synthetic-relay, name: c, check: note}\n");
  EXPECT_TRUE(r.errors.empty()) << Joined(r.errors);
  EXPECT_EQ(r.notes, (std::vector<std::string>{"a: checked a", "c: checked c"}));
  EXPECT_FALSE(r.timed_out);
}

// Every problem is listed: a failed CheckDeep does not hide a later stage's, nor Connect's.
TEST(CheckDeep, ListsEveryErrorAsRunWould) {
  Pipeline::CheckReport r = CheckDeep("  - {stage: synthetic-relay, name: a, check: fail}\n"
                                      "  - {stage: synthetic-relay, name: b, check: fail}\n"
                                      "  - {stage: synthetic-relay, name: c, connect: fail}\n");
  EXPECT_EQ(r.errors, (std::vector<std::string>{"stage 'a' would fail to start: fails its check on purpose",
                                                "stage 'b' would fail to start: fails its check on purpose",
                                                "stage 'c': fails to connect on purpose"}));
}

TEST(CheckDeep, HangIsKilledAtTheTimeoutAndNamed) {
  Pipeline::CheckReport r = CheckDeep("  - {stage: synthetic-relay, name: stuck, check: hang}\n",
                                      300 * kNanosPerMilli);
  EXPECT_TRUE(r.timed_out);
  ASSERT_EQ(r.errors.size(), 1u) << Joined(r.errors);
  EXPECT_EQ(r.errors[0], "stage 'stuck': did not finish within 300ms while doing 'hang' on purpose; "
                         "the check process was killed");
}

TEST(CheckDeep, CrashAndExitAreReportedWithTheStage) {
  Pipeline::CheckReport r = CheckDeep("  - {stage: synthetic-relay, name: boom, check: crash}\n");
  ASSERT_EQ(r.errors.size(), 1u) << Joined(r.errors);
  EXPECT_THAT(r.errors[0], ::testing::StartsWith("stage 'boom': the check process died of signal 6 ("));
  EXPECT_THAT(r.errors[0], ::testing::EndsWith(" while doing 'crash' on purpose"));
  r = CheckDeep("  - {stage: synthetic-relay, name: quits, check: exit}\n");
  ASSERT_EQ(r.errors.size(), 1u) << Joined(r.errors);
  EXPECT_EQ(r.errors[0], "stage 'quits': the check process exited with status 3 while doing 'exit' on purpose "
                         "before it finished");
}

}  // namespace
}  // namespace metronome
