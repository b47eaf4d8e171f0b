#include "admin/stats.h"

#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <fstream>
#include <map>
#include <sstream>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "runtime/units.h"

namespace metronome::admin {
namespace {

// --- JSON -------------------------------------------------------------------------------

void JsonString(std::string* out, absl::string_view s) {
  out->push_back('"');
  for (char c : s) {
    switch (c) {
      case '"': *out += "\\\""; break;
      case '\\': *out += "\\\\"; break;
      case '\n': *out += "\\n"; break;
      case '\r': *out += "\\r"; break;
      case '\t': *out += "\\t"; break;
      default:
        if (static_cast<unsigned char>(c) < 0x20) {
          absl::StrAppendFormat(out, "\\u%04x", static_cast<unsigned char>(c));
        } else {
          out->push_back(c);
        }
    }
  }
  out->push_back('"');
}

void JsonNumber(std::string* out, double v) {
  if (!std::isfinite(v)) {
    *out += "null";
  } else if (v == std::floor(v) && std::fabs(v) < 9e15) {
    absl::StrAppendFormat(out, "%.0f", v);
  } else {
    absl::StrAppendFormat(out, "%.9g", v);
  }
}

void YamlToJson(std::string* out, const YAML::Node& n) {
  if (!n.IsDefined() || n.IsNull()) {
    *out += "null";
  } else if (n.IsMap()) {
    out->push_back('{');
    bool first = true;
    for (const auto& kv : n) {
      if (!first) out->push_back(',');
      first = false;
      JsonString(out, kv.first.Scalar());
      out->push_back(':');
      YamlToJson(out, kv.second);
    }
    out->push_back('}');
  } else if (n.IsSequence()) {
    out->push_back('[');
    for (size_t i = 0; i < n.size(); ++i) {
      if (i) out->push_back(',');
      YamlToJson(out, n[i]);
    }
    out->push_back(']');
  } else {
    // Unquoted YAML scalars that read as numbers or booleans are written as such; everything
    // else (durations like 5s, quoted values) stays a string.
    const std::string& v = n.Scalar();
    double d;
    if (n.Tag() != "!" && (v == "true" || v == "false")) {
      *out += v;
    } else if (n.Tag() != "!" && !v.empty() && v.find_first_not_of("-0123456789.eE+") == std::string::npos &&
               absl::SimpleAtod(v, &d) && std::isfinite(d)) {
      JsonNumber(out, d);
    } else {
      JsonString(out, v);
    }
  }
}

// Cumulative counts per bucket, for Prometheus; every fourth bound (powers of two) is enough.
void PromHistogram(std::string* out, const std::string& name, const std::string& labels,
                   const LatencyHistogram::Snapshot& h, double sum_seconds) {
  uint64_t cum = 0;
  for (int i = 0; i < LatencyHistogram::kBuckets - 1; ++i) {
    cum += h.counts[i];
    if (i % LatencyHistogram::kSubBuckets != 0) continue;
    absl::StrAppendFormat(out, "%s_bucket{%s%sle=\"%.9g\"} %llu\n", name, labels, labels.empty() ? "" : ",",
                          static_cast<double>(LatencyHistogram::UpperBoundNs(i)) / 1e9,
                          static_cast<unsigned long long>(cum));
  }
  absl::StrAppendFormat(out, "%s_bucket{%s%sle=\"+Inf\"} %llu\n", name, labels, labels.empty() ? "" : ",",
                        static_cast<unsigned long long>(h.total));
  absl::StrAppendFormat(out, "%s_sum{%s} %.9g\n%s_count{%s} %llu\n", name, labels, sum_seconds, name, labels,
                        static_cast<unsigned long long>(h.total));
}

// Estimated sum of a histogram (bucket midpoints), in seconds, when no exact sum is kept.
double ApproxSumSeconds(const LatencyHistogram::Snapshot& h) {
  double sum = 0;
  for (int i = 0; i < LatencyHistogram::kBuckets; ++i) {
    if (h.counts[i] == 0) continue;
    double lo = i == 0 ? 0 : static_cast<double>(LatencyHistogram::UpperBoundNs(i - 1));
    double hi = i == LatencyHistogram::kBuckets - 1 ? lo : static_cast<double>(LatencyHistogram::UpperBoundNs(i));
    sum += static_cast<double>(h.counts[i]) * (lo + hi) / 2;
  }
  return sum / 1e9;
}

std::string EscapeLabel(absl::string_view v) {
  std::string out;
  for (char c : v) {
    if (c == '\\' || c == '"') out.push_back('\\');
    if (c == '\n') {
      out += "\\n";
      continue;
    }
    out.push_back(c);
  }
  return out;
}

// Collects a stage's ExtraStats for both renderings.
struct Collected : StatsSink {
  struct Series {
    std::string name, label, label_value;
    double value;
  };
  struct Hist {
    std::string name, label, label_value;
    LatencyHistogram::Snapshot snap;
  };
  std::vector<Series> series;
  std::vector<Hist> hists;
  void Value(absl::string_view name, double value) override { series.push_back({std::string(name), "", "", value}); }
  void Labeled(absl::string_view name, absl::string_view label, absl::string_view lv, double value) override {
    series.push_back({std::string(name), std::string(label), std::string(lv), value});
  }
  void Histogram(absl::string_view name, const LatencyHistogram& h, absl::string_view label,
                 absl::string_view lv) override {
    hists.push_back({std::string(name), std::string(label), std::string(lv), h.Read()});
  }
};

std::string MetricName(absl::string_view type, absl::string_view name) {
  std::string out = absl::StrCat("metronome_", type, "_", name);
  for (char& c : out) {
    if (c == '-') c = '_';
  }
  return out;
}

void JsonQuantiles(std::string* out, const LatencyHistogram::Snapshot& h) {
  *out += "{\"count\":";
  JsonNumber(out, static_cast<double>(h.total));
  *out += ",\"p50_ns\":";
  JsonNumber(out, h.QuantileNs(0.5));
  *out += ",\"p90_ns\":";
  JsonNumber(out, h.QuantileNs(0.9));
  *out += ",\"p99_ns\":";
  JsonNumber(out, h.QuantileNs(0.99));
  *out += ",\"buckets\":[";
  bool first = true;
  for (int i = 0; i < LatencyHistogram::kBuckets; ++i) {
    if (h.counts[i] == 0) continue;
    if (!first) out->push_back(',');
    first = false;
    absl::StrAppendFormat(out, "[%d,%llu]", i, static_cast<unsigned long long>(h.counts[i]));
  }
  *out += "]}";
}

}  // namespace

double ThreadCpuSeconds(int tid) {
  if (tid <= 0) return -1;
  // schedstat's first field is the time on CPU in ns (stat's utime/stime tick at 10 ms, too
  // coarse for a per-second utilisation bar).
  std::ifstream in(absl::StrCat("/proc/self/task/", tid, "/schedstat"));
  double ns;
  if (!(in >> ns)) return -1;
  return ns / 1e9;
}

std::string RenderMetrics(const Pipeline& p) {
  std::string out;
  out.reserve(64 * 1024);
  auto help = [&](const char* name, const char* type, const char* text) {
    absl::StrAppendFormat(&out, "# HELP %s %s\n# TYPE %s %s\n", name, text, name, type);
  };
  help("metronome_stage_items_in_total", "counter", "Items handed to the stage.");
  for (int i = 0; i < p.num_stages(); ++i) {
    absl::StrAppendFormat(&out, "metronome_stage_items_in_total{stage=\"%s\"} %llu\n", p.stage_spec(i).name,
                          static_cast<unsigned long long>(p.stage(i).stats().items_in.Get()));
  }
  help("metronome_stage_items_out_total", "counter", "Items the stage passed on.");
  for (int i = 0; i < p.num_stages(); ++i) {
    absl::StrAppendFormat(&out, "metronome_stage_items_out_total{stage=\"%s\"} %llu\n", p.stage_spec(i).name,
                          static_cast<unsigned long long>(p.stage(i).stats().items_out.Get()));
  }
  help("metronome_stage_batches_total", "counter", "Batches the stage processed.");
  for (int i = 0; i < p.num_stages(); ++i) {
    absl::StrAppendFormat(&out, "metronome_stage_batches_total{stage=\"%s\"} %llu\n", p.stage_spec(i).name,
                          static_cast<unsigned long long>(p.stage(i).stats().batches.Get()));
  }
  help("metronome_stage_busy_seconds_total", "counter", "Time the stage spent working.");
  for (int i = 0; i < p.num_stages(); ++i) {
    absl::StrAppendFormat(&out, "metronome_stage_busy_seconds_total{stage=\"%s\"} %.9f\n", p.stage_spec(i).name,
                          static_cast<double>(p.stage(i).stats().busy_ns.Get()) / 1e9);
  }
  help("metronome_stage_service_seconds", "histogram", "Service time per item (batch time / batch size).");
  for (int i = 0; i < p.num_stages(); ++i) {
    PromHistogram(&out, "metronome_stage_service_seconds", absl::StrCat("stage=\"", p.stage_spec(i).name, "\""),
                  p.stage(i).stats().service_ns.Read(), static_cast<double>(p.stage(i).stats().busy_ns.Get()) / 1e9);
  }
  // Per thread (lane): its queue, its scheduling, its wait point.
  struct LaneMetric {
    const char* name;
    const char* type;
    const char* help;
    std::function<double(int)> get;
  };
  const LaneMetric lane_metrics[] = {
      {"metronome_queue_depth", "gauge", "Items waiting in the thread's input queue.",
       [&](int l) { return static_cast<double>(p.queue_depth(l)); }},
      {"metronome_queue_capacity", "gauge", "Capacity of the thread's input queue.",
       [&](int l) { return static_cast<double>(p.lane_spec(l).queue_capacity); }},
      {"metronome_queue_full_total", "counter", "Enqueues that found the thread's queue full (backpressure).",
       [&](int l) { return static_cast<double>(p.queue_full_events(l)); }},
      {"metronome_thread_stalls_total", "counter", "Times the thread found a downstream queue full.",
       [&](int l) { return static_cast<double>(p.lane_stats(l).stalls.Get()); }},
      {"metronome_thread_yields_total", "counter", "sched_yield() calls (wait: yield).",
       [&](int l) { return static_cast<double>(p.lane_stats(l).yields.Get()); }},
      {"metronome_thread_sleeps_total", "counter", "Blocking waits (wait: block).",
       [&](int l) { return static_cast<double>(p.lane_stats(l).sleeps.Get()); }},
      {"metronome_thread_deadline_overruns_total", "counter", "SIGXCPU: the thread overran its SCHED_DEADLINE runtime.",
       [&](int l) { return static_cast<double>(p.lane_stats(l).overruns.Get()); }},
      {"metronome_thread_cpu_seconds_total", "counter", "CPU time the thread used (user + system).",
       [&](int l) { return ThreadCpuSeconds(p.lane_tid(l)); }},
      {"metronome_thread_runtime_seconds", "gauge", "SCHED_DEADLINE runtime per period (0 under other).",
       [&](int l) { return p.lane_spec(l).sched.policy == Policy::kDeadline ? static_cast<double>(p.lane_spec(l).sched.runtime_ns) / 1e9 : 0; }},
      {"metronome_thread_period_seconds", "gauge", "SCHED_DEADLINE period (0 under other).",
       [&](int l) { return p.lane_spec(l).sched.policy == Policy::kDeadline ? static_cast<double>(p.lane_spec(l).sched.period_ns) / 1e9 : 0; }},
  };
  for (const LaneMetric& m : lane_metrics) {
    help(m.name, m.type, m.help);
    for (int l = 0; l < p.num_lanes(); ++l) {
      absl::StrAppendFormat(&out, "%s{thread=\"%s\"} %.9g\n", m.name, p.lane_spec(l).name, m.get(l));
    }
  }
  help("metronome_thread_policy", "gauge", "1 for the policy the thread runs under; fallback=\"true\" when the kernel refused the one asked for.");
  for (int l = 0; l < p.num_lanes(); ++l) {
    const LaneRunInfo& info = p.lane_run_info(l);
    absl::StrAppendFormat(&out, "metronome_thread_policy{thread=\"%s\",policy=\"%s\",requested=\"%s\",wait=\"%s\",fallback=\"%s\"} 1\n",
                          p.lane_spec(l).name, info.policy_in_force, PolicyName(p.lane_spec(l).sched.policy),
                          WaitModeName(info.wait_in_force), info.fallback.empty() ? "false" : "true");
  }
  help("metronome_thread_handoff_seconds", "histogram", "Queue delay of items entering the thread.");
  for (int l = 0; l < p.num_lanes(); ++l) {
    auto h = p.lane_stats(l).handoff_ns.Read();
    PromHistogram(&out, "metronome_thread_handoff_seconds", absl::StrCat("thread=\"", p.lane_spec(l).name, "\""), h,
                  ApproxSumSeconds(h));
  }
  absl::StrAppendFormat(&out, "# HELP metronome_deadline_overruns_unattributed_total SIGXCPU received by a thread that is not a lane.\n"
                              "# TYPE metronome_deadline_overruns_unattributed_total counter\n"
                              "metronome_deadline_overruns_unattributed_total %llu\n",
                        static_cast<unsigned long long>(Pipeline::unattributed_overruns()));
  absl::StrAppendFormat(&out, "# HELP metronome_deadline_bandwidth_cpus Deadline bandwidth asked for, and what the kernel admits.\n"
                              "# TYPE metronome_deadline_bandwidth_cpus gauge\n"
                              "metronome_deadline_bandwidth_cpus{kind=\"asked\"} %.6f\n"
                              "metronome_deadline_bandwidth_cpus{kind=\"admitted\"} %.6f\n",
                        p.deadline_bandwidth(), p.admission().cpus);
  // Each stage's own figures: metronome_<type>_<name>{stage="..."}.
  std::map<std::string, bool> typed;
  for (int i = 0; i < p.num_stages(); ++i) {
    Collected c;
    p.stage(i).ExtraStats(c);
    const std::string& type = p.stage_spec(i).type;
    const std::string stage_label = absl::StrCat("stage=\"", p.stage_spec(i).name, "\"");
    for (const auto& s : c.series) {
      std::string name = MetricName(type, s.name);
      if (!typed[name]) {
        typed[name] = true;
        absl::StrAppendFormat(&out, "# TYPE %s %s\n", name,
                              absl::EndsWith(s.name, "_total") ? "counter" : "gauge");
      }
      std::string labels = stage_label;
      if (!s.label.empty()) absl::StrAppend(&labels, ",", s.label, "=\"", EscapeLabel(s.label_value), "\"");
      absl::StrAppendFormat(&out, "%s{%s} %.9g\n", name, labels, s.value);
    }
    for (const auto& h : c.hists) {
      std::string name = MetricName(type, h.name);
      if (!typed[name]) {
        typed[name] = true;
        absl::StrAppendFormat(&out, "# TYPE %s histogram\n", name);
      }
      std::string labels = stage_label;
      if (!h.label.empty()) absl::StrAppend(&labels, ",", h.label, "=\"", EscapeLabel(h.label_value), "\"");
      PromHistogram(&out, name, labels, h.snap, ApproxSumSeconds(h.snap));
    }
  }
  return out;
}

std::string RenderStats(const Pipeline& p, const ConfigDoc& doc, int64_t started_unix_ns) {
  std::string out;
  out.reserve(64 * 1024);
  timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  double now = static_cast<double>(ts.tv_sec) + static_cast<double>(ts.tv_nsec) / 1e9;
  absl::StrAppendFormat(&out, "{\"version\":\"%s\",\"time\":%.6f,\"uptime_seconds\":%.3f,", METRONOME_VERSION, now,
                        now - static_cast<double>(started_unix_ns) / 1e9);
  absl::StrAppendFormat(&out, "\"admission\":{\"admitted_cpus\":%.6f,\"deadline_bandwidth\":%.6f,\"explanation\":",
                        p.admission().cpus, p.deadline_bandwidth());
  JsonString(&out, p.admission().explanation);
  out += "},\"bucket_upper_bounds_ns\":[";
  for (int i = 0; i < LatencyHistogram::kBuckets; ++i) {
    if (i) out.push_back(',');
    uint64_t b = LatencyHistogram::UpperBoundNs(i);
    if (b == UINT64_MAX) out += "null"; else absl::StrAppend(&out, b);
  }
  out += "],\"threads\":[";
  for (int l = 0; l < p.num_lanes(); ++l) {
    const LaneSpec& spec = p.lane_spec(l);
    const LaneRunInfo& info = p.lane_run_info(l);
    const LaneStats& st = p.lane_stats(l);
    if (l) out.push_back(',');
    out += "{\"name\":";
    JsonString(&out, spec.name);
    out += ",\"stages\":[";
    for (int s = spec.first_stage; s <= spec.last_stage; ++s) {
      if (s != spec.first_stage) out.push_back(',');
      JsonString(&out, p.stage_spec(s).name);
    }
    absl::StrAppendFormat(&out, "],\"main_thread\":%s,\"policy\":\"%s\",\"policy_in_force\":\"%s\",\"wait\":\"%s\",\"wait_in_force\":\"%s\",",
                          spec.main_thread ? "true" : "false", PolicyName(spec.sched.policy), info.policy_in_force,
                          WaitModeName(spec.wait), WaitModeName(info.wait_in_force));
    absl::StrAppendFormat(&out, "\"runtime_ns\":%lld,\"deadline_ns\":%lld,\"period_ns\":%lld,\"nice\":%d,\"bandwidth\":%.6f,",
                          static_cast<long long>(spec.sched.runtime_ns), static_cast<long long>(spec.sched.deadline_ns),
                          static_cast<long long>(spec.sched.period_ns), spec.sched.nice, spec.sched.Bandwidth());
    out += "\"fallback\":";
    JsonString(&out, info.fallback);
    absl::StrAppendFormat(&out, ",\"queue_depth\":%llu,\"queue_capacity\":%llu,\"queue_full_total\":%llu,\"batch_max\":%llu,",
                          static_cast<unsigned long long>(p.queue_depth(l)), static_cast<unsigned long long>(spec.queue_capacity),
                          static_cast<unsigned long long>(p.queue_full_events(l)), static_cast<unsigned long long>(spec.batch_max));
    absl::StrAppendFormat(&out, "\"loops\":%llu,\"sleeps\":%llu,\"yields\":%llu,\"overruns\":%llu,\"stalls\":%llu,\"dequeued\":%llu,\"cpu_seconds\":",
                          static_cast<unsigned long long>(st.loops.Get()), static_cast<unsigned long long>(st.sleeps.Get()),
                          static_cast<unsigned long long>(st.yields.Get()), static_cast<unsigned long long>(st.overruns.Get()),
                          static_cast<unsigned long long>(st.stalls.Get()), static_cast<unsigned long long>(st.dequeued.Get()));
    JsonNumber(&out, ThreadCpuSeconds(p.lane_tid(l)));
    out += ",\"handoff\":";
    JsonQuantiles(&out, st.handoff_ns.Read());
    out += "}";
  }
  out += "],\"stages\":[";
  for (int i = 0; i < p.num_stages(); ++i) {
    const StageStats& s = p.stage(i).stats();
    if (i) out.push_back(',');
    out += "{\"name\":";
    JsonString(&out, p.stage_spec(i).name);
    out += ",\"type\":";
    JsonString(&out, p.stage_spec(i).type);
    out += ",\"thread\":";
    JsonString(&out, p.lane_spec(p.stage_spec(i).lane).name);
    absl::StrAppendFormat(&out, ",\"items_in\":%llu,\"items_out\":%llu,\"batches\":%llu,\"busy_seconds\":%.9f,\"service\":",
                          static_cast<unsigned long long>(s.items_in.Get()), static_cast<unsigned long long>(s.items_out.Get()),
                          static_cast<unsigned long long>(s.batches.Get()), static_cast<double>(s.busy_ns.Get()) / 1e9);
    JsonQuantiles(&out, s.service_ns.Read());
    Collected c;
    p.stage(i).ExtraStats(c);
    out += ",\"extra\":{";
    bool first = true;
    for (const auto& e : c.series) {
      if (!e.label.empty()) continue;
      if (!first) out.push_back(',');
      first = false;
      JsonString(&out, e.name);
      out.push_back(':');
      JsonNumber(&out, e.value);
    }
    // Labeled series and histograms share their head: name, label, value_label.
    auto labeled_head = [&](const std::string& name, const std::string& label, const std::string& value_label) {
      out += "{\"name\":";
      JsonString(&out, name);
      out += ",\"label\":";
      JsonString(&out, label);
      out += ",\"value_label\":";
      JsonString(&out, value_label);
    };
    out += "},\"labeled\":[";
    first = true;
    for (const auto& e : c.series) {
      if (e.label.empty()) continue;
      if (!first) out.push_back(',');
      first = false;
      labeled_head(e.name, e.label, e.label_value);
      out += ",\"value\":";
      JsonNumber(&out, e.value);
      out += "}";
    }
    out += "],\"histograms\":[";
    first = true;
    for (const auto& h : c.hists) {
      if (!first) out.push_back(',');
      first = false;
      labeled_head(h.name, h.label, h.label_value);
      out += ",\"histogram\":";
      JsonQuantiles(&out, h.snap);
      out += "}";
    }
    out += "]}";
  }
  out += "],\"config\":";
  YamlToJson(&out, const_cast<ConfigDoc&>(doc).raw_root());
  out += "}";
  return out;
}

}  // namespace metronome::admin
