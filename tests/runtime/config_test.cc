#include "runtime/config.h"

#include <gtest/gtest.h>

#include <cmath>

#include "runtime/pipeline.h"
#include "runtime/registry.h"

namespace metronome {
namespace {

std::unique_ptr<ConfigDoc> Doc(const std::string& yaml) {
  auto doc = ConfigDoc::FromString(yaml, "test.yaml");
  EXPECT_TRUE(doc.ok()) << doc.status();
  return std::move(*doc);
}

// Builds a pipeline in check mode and returns the error text ("" when valid).
std::string BuildErrors(const std::string& yaml) {
  auto doc = ConfigDoc::FromString(yaml, "test.yaml");
  if (!doc.ok()) return std::string(doc.status().message());
  auto p = Pipeline::Build(**doc, StageRegistry::Global(), /*check_only=*/true);
  return p.ok() ? "" : std::string(p.status().message());
}

TEST(ConfigNode, EveryTypeValid) {
  auto doc = Doc(R"(
s:
  d: 250us
  z: 64KiB
  i: 42
  b: true
  str: hello
  e: two
  list: [a, b]
  m: {x: 1}
  q: [{k: 1}, {k: 2}]
  o: {anything: [goes, here]}
)");
  ConfigNode s = doc->Root().Map("s");
  EXPECT_EQ(s.DurationNs("d", std::nullopt), 250'000);
  EXPECT_EQ(s.SizeBytes("z", std::nullopt), 65536u);
  EXPECT_EQ(s.Int("i", std::nullopt, 0, 100), 42);
  EXPECT_TRUE(s.Bool("b", std::nullopt));
  EXPECT_EQ(s.String("str", std::nullopt), "hello");
  EXPECT_EQ(s.Enum("e", std::nullopt, {"one", "two"}), "two");
  EXPECT_EQ(s.StringList("list"), (std::vector<std::string>{"a", "b"}));
  EXPECT_EQ(s.Map("m").Int("x", std::nullopt, 0, 9), 1);
  auto q = s.Seq("q");
  ASSERT_EQ(q.size(), 2u);
  EXPECT_EQ(q[0].Int("k", std::nullopt, 0, 9), 1);
  EXPECT_EQ(q[1].Int("k", std::nullopt, 0, 9), 2);
  EXPECT_TRUE(s.Opaque("o").IsMap());
  // Defaults for absent keys.
  EXPECT_EQ(s.DurationNs("absent", 7), 7);
  doc->CheckUnknownKeys();
  EXPECT_TRUE(doc->status().ok()) << doc->status();
}

TEST(ConfigNode, ErrorsNameFileLineKeyAndForm) {
  auto doc = Doc("s:\n  d: 5\n  z: 64kb\n  i: 1000\n  b: yes\n  e: three\n");
  ConfigNode s = doc->Root().Map("s");
  s.DurationNs("d", std::nullopt);
  s.SizeBytes("z", std::nullopt);
  s.Int("i", std::nullopt, 0, 100);
  s.Bool("b", std::nullopt);
  s.Enum("e", std::nullopt, {"one", "two"});
  s.String("missing", std::nullopt);
  const auto& e = doc->errors();
  ASSERT_EQ(e.size(), 6u);
  EXPECT_EQ(e[0], "test.yaml:2: s.d: expected a duration with a unit, like 200us, 1ms or 5s, got '5'");
  EXPECT_EQ(e[1], "test.yaml:3: s.z: expected a size with a unit, like 512B, 64KiB or 1MiB, got '64kb'");
  EXPECT_EQ(e[2], "test.yaml:4: s.i: out of range: expected an integer in [0, 100], got 1000");
  EXPECT_EQ(e[3], "test.yaml:5: s.b: expected true or false, got 'yes'");
  EXPECT_EQ(e[4], "test.yaml:6: s.e: expected one of: one, two; got 'three'");
  EXPECT_EQ(e[5], "test.yaml:2: s.missing: missing required key; expected a string");
}

TEST(ConfigNode, WrongShapes) {
  auto doc = Doc("s:\n  m: 5\n  q: {a: 1}\n  d: [1ms]\n");
  ConfigNode s = doc->Root().Map("s");
  s.Map("m");
  s.Seq("q");
  s.DurationNs("d", 1);
  ASSERT_EQ(doc->errors().size(), 3u);
  EXPECT_NE(doc->errors()[0].find("s.m: expected a mapping"), std::string::npos);
  EXPECT_NE(doc->errors()[1].find("s.q: expected a list"), std::string::npos);
  EXPECT_NE(doc->errors()[2].find("test.yaml:4: s.d: expected a duration"), std::string::npos);
}

TEST(ConfigDoc, UnknownAndDuplicateKeys) {
  auto doc = Doc("s:\n  known: 1\n  typo: 2\nother: 3\ns2: {a: 1, a: 2}\n");
  ConfigNode root = doc->Root();
  root.Map("s").Int("known", std::nullopt, 0, 9);
  root.Map("s2").Int("a", std::nullopt, 0, 9);
  doc->CheckUnknownKeys();
  std::string all = std::string(doc->status().message());
  EXPECT_NE(all.find("test.yaml:3: s.typo: unknown key"), std::string::npos) << all;
  EXPECT_NE(all.find("test.yaml:4: other: unknown key"), std::string::npos) << all;
  EXPECT_NE(all.find("s2.a: duplicate key"), std::string::npos) << all;
}

TEST(ConfigDoc, SyntaxErrorNamesLine) {
  auto doc = ConfigDoc::FromString("a: [1, 2\nb: 3\n", "bad.yaml");
  ASSERT_FALSE(doc.ok());
  EXPECT_NE(doc.status().message().find("bad.yaml:"), absl::string_view::npos);
  EXPECT_NE(doc.status().message().find("YAML syntax"), absl::string_view::npos);
}

TEST(ConfigDoc, TopLevelMustBeMapping) {
  auto doc = ConfigDoc::FromString("- a\n- b\n", "list.yaml");
  ASSERT_FALSE(doc.ok());
}

// --- the pipeline section ---------------------------------------------------------------

constexpr char kValid[] = R"(
runtime: {require_deadline: false, drain_timeout: 2s}
pipeline:
  - {stage: synthetic-source, policy: deadline, wait: block, runtime: 100us, period: 1ms, queue: 128, batch: 32}
  - {stage: synthetic-relay, name: r1, policy: other, nice: 5, wait: yield}
  - {stage: synthetic-relay, name: r2, thread: r1}
  - {stage: synthetic-sink, policy: deadline, wait: spin, runtime: 50us, period: 500us, deadline: 400us, spin: 100}
)";

TEST(PipelineConfig, EveryKeyValid) {
  auto doc = Doc(kValid);
  auto p = Pipeline::Build(*doc, StageRegistry::Global(), true);
  ASSERT_TRUE(p.ok()) << p.status();
  EXPECT_EQ((*p)->num_stages(), 4);
  EXPECT_EQ((*p)->num_lanes(), 3);
  const LaneSpec& l0 = (*p)->lane_spec(0);
  EXPECT_EQ(l0.sched.policy, Policy::kDeadline);
  EXPECT_EQ(l0.sched.runtime_ns, 100'000);
  EXPECT_EQ(l0.sched.period_ns, 1'000'000);
  EXPECT_EQ(l0.sched.deadline_ns, 1'000'000);  // defaults to the period
  EXPECT_EQ(l0.queue_capacity, 128u);
  EXPECT_EQ(l0.batch_max, 32u);
  const LaneSpec& l1 = (*p)->lane_spec(1);
  EXPECT_EQ(l1.name, "r1");
  EXPECT_EQ(l1.first_stage, 1);
  EXPECT_EQ(l1.last_stage, 2);  // r2 shares the thread
  EXPECT_EQ(l1.sched.nice, 5);
  EXPECT_EQ(l1.wait, WaitMode::kYield);
  const LaneSpec& l2 = (*p)->lane_spec(2);
  EXPECT_EQ(l2.sched.deadline_ns, 400'000);
  EXPECT_EQ(l2.wait, WaitMode::kSpin);
  EXPECT_EQ(l2.spin_before_sleep, 100);
  EXPECT_NEAR((*p)->deadline_bandwidth(), 0.1 + 0.1, 1e-9);
  EXPECT_EQ((*p)->options().drain_timeout_ns, 2'000'000'000);
  std::string d = (*p)->Describe();
  EXPECT_NE(d.find("deadline bandwidth: 0.200 of"), std::string::npos) << d;
  EXPECT_NE(d.find("(direct call)"), std::string::npos) << d;
}

TEST(PipelineConfig, Errors) {
  struct Case {
    const char* yaml;
    const char* expect;
  } cases[] = {
      {"pipeline: []\n", "pipeline: missing or empty"},
      {"pipeline:\n  - {stage: nope}\n", "unknown stage type 'nope'"},
      {"pipeline:\n  - {name: x}\n", "test.yaml:2: pipeline[0].stage: missing required key"},
      {"pipeline:\n  - {stage: synthetic-source, polcy: deadline}\n",
       "test.yaml:2: pipeline[0].polcy: unknown key"},
      {"pipeline:\n  - {stage: synthetic-source, policy: fifo}\n", "expected one of: deadline, other"},
      {"pipeline:\n  - {stage: synthetic-source, policy: deadline, period: 1ms}\n",
       "pipeline[0].runtime: missing required key"},
      {"pipeline:\n  - {stage: synthetic-source, policy: deadline, runtime: 2ms, period: 1ms}\n",
       "need runtime <= deadline <= period"},
      {"pipeline:\n  - {stage: synthetic-source, policy: deadline, runtime: 10us, period: 10us}\n",
       "pipeline[0].period: out of range"},
      {"pipeline:\n  - {stage: synthetic-source, runtime: 1ms}\n", "apply to policy: deadline only"},
      {"pipeline:\n  - {stage: synthetic-source, queue: 0}\n", "pipeline[0].queue: out of range"},
      {"pipeline:\n  - {stage: synthetic-source, queue: 65537}\n", "pipeline[0].queue: out of range"},
      {"pipeline:\n  - {stage: synthetic-source, batch: 2000}\n", "pipeline[0].batch: out of range"},
      {"pipeline:\n  - {stage: synthetic-source, nice: -21}\n", "pipeline[0].nice: out of range"},
      {"pipeline:\n  - {stage: synthetic-source, thread: averyveryverylongname}\n",
       "longer than 15 characters"},
      {"pipeline:\n  - {stage: synthetic-source, thread: a}\n  - {stage: synthetic-relay, thread: a, policy: other}\n",
       "scheduling keys belong on the thread's first stage"},
      {"pipeline:\n  - {stage: synthetic-source, thread: a}\n  - {stage: synthetic-relay}\n  - {stage: synthetic-sink, thread: a}\n",
       "only consecutive stages can share a thread"},
      {"pipeline:\n  - {stage: synthetic-relay}\n  - {stage: synthetic-relay}\n", "is used twice"},
      {"pipeline:\n  - {stage: synthetic-source}\nmystery: 1\n", "test.yaml:3: mystery: unknown key"},
      {"pipeline:\n  - {stage: synthetic-source}\nruntime: {drain_timeout: 5}\n",
       "runtime.drain_timeout: expected a duration"},
      {"pipeline:\n  - {stage: synthetic-source, count: many}\n", "pipeline[0].count: expected an integer"},
  };
  for (const Case& c : cases) {
    std::string errors = BuildErrors(c.yaml);
    EXPECT_NE(errors.find(c.expect), std::string::npos) << "yaml:\n" << c.yaml << "errors:\n" << errors;
  }
}

TEST(PipelineConfig, BandwidthOverAdmissionIsRefusedNamingThreads) {
  AdmissionLimit lim = ReadAdmissionLimit();
  ASSERT_GT(lim.cpus, 0);
  // Three threads at 0.9 CPU each: above the limit on any machine with fewer than 3 CPUs of
  // admissible bandwidth (1.8 here).
  std::string yaml = "pipeline:\n";
  int n = static_cast<int>(lim.cpus / 0.9 + 1e-6) + 1;
  for (int i = 0; i < n; ++i) {
    yaml += "  - {stage: synthetic-relay, name: t" + std::to_string(i) +
            ", policy: deadline, runtime: 900us, period: 1ms}\n";
  }
  std::string errors = BuildErrors(yaml);
  EXPECT_NE(errors.find("exceeds the"), std::string::npos) << errors;
  EXPECT_NE(errors.find("t0 0.900"), std::string::npos) << errors;
  // Exactly at the limit passes (each thread's share rounded down to whole nanoseconds).
  int k = static_cast<int>(std::ceil(lim.cpus / 0.9 - 1e-6));
  std::string at = "pipeline:\n";
  for (int i = 0; i < k; ++i) {
    at += "  - {stage: synthetic-relay, name: a" + std::to_string(i) +
          ", policy: deadline, runtime: " + std::to_string(static_cast<int64_t>(lim.cpus * 1e6 / k)) +
          "ns, period: 1ms}\n";
  }
  EXPECT_EQ(BuildErrors(at), "");
}

TEST(PipelineConfig, AdmissionLimitMatchesThisKernel) {
  AdmissionLimit lim = ReadAdmissionLimit();
  EXPECT_GT(lim.online_cpus, 0);
  EXPECT_LE(lim.cpus, lim.online_cpus);
  EXPECT_NE(lim.explanation.find("CPUs"), std::string::npos);
}

}  // namespace
}  // namespace metronome
