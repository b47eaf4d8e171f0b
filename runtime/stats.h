// Per-stage and per-lane counters: written by one thread (the lane that owns them), read by any
// thread (the admin listener, `metronome-top`) without locks.
//
// Thread-safety: every field has a single writer. Writers use Counter::Add, a relaxed load+store
// (no locked instruction on the hot path); readers use relaxed loads and may see a snapshot that
// is a few increments old, never a torn value.
#pragma once

#include <atomic>
#include <cmath>
#include <cstdint>
#include <string>

namespace metronome {

// One writer, many readers.
class Counter {
 public:
  void Add(uint64_t n = 1) { v_.store(v_.load(std::memory_order_relaxed) + n, std::memory_order_relaxed); }
  void Set(uint64_t n) { v_.store(n, std::memory_order_relaxed); }
  uint64_t Get() const { return v_.load(std::memory_order_relaxed); }

 private:
  std::atomic<uint64_t> v_{0};
};

// A log-linear histogram of durations in nanoseconds: four buckets per power of two (each bucket
// ~19 % wide), from 64 ns to ~69 s. Fixed size, no allocation; single writer.
class LatencyHistogram {
 public:
  static constexpr int kSubBuckets = 4;
  static constexpr int kMinLog2 = 6;   // 64 ns
  static constexpr int kMaxLog2 = 36;  // ~69 s
  static constexpr int kBuckets = (kMaxLog2 - kMinLog2) * kSubBuckets + 2;

  void Record(uint64_t ns, uint64_t count = 1) { buckets_[BucketOf(ns)].Add(count); }

  static int BucketOf(uint64_t ns) {
    if (ns < (1ull << kMinLog2)) return 0;
    int log2 = 63 - __builtin_clzll(ns);
    if (log2 >= kMaxLog2) return kBuckets - 1;
    int sub = static_cast<int>((ns >> (log2 - 2)) & 3);  // next two bits after the leading one
    return 1 + (log2 - kMinLog2) * kSubBuckets + sub;
  }
  // Upper bound (exclusive) of bucket i in ns; the last bucket is unbounded.
  static uint64_t UpperBoundNs(int i) {
    if (i == 0) return 1ull << kMinLog2;
    if (i >= kBuckets - 1) return UINT64_MAX;
    int log2 = (i - 1) / kSubBuckets + kMinLog2;
    int sub = (i - 1) % kSubBuckets;
    return (1ull << log2) + ((static_cast<uint64_t>(sub) + 1) << (log2 - 2));
  }

  struct Snapshot {
    uint64_t counts[kBuckets] = {};
    uint64_t total = 0;
    // The q-quantile (0..1), interpolated inside its bucket; 0 when empty.
    double QuantileNs(double q) const;
    Snapshot& operator-=(const Snapshot& older);
  };
  Snapshot Read() const {
    Snapshot s;
    for (int i = 0; i < kBuckets; ++i) {
      s.counts[i] = buckets_[i].Get();
      s.total += s.counts[i];
    }
    return s;
  }

 private:
  Counter buckets_[kBuckets];
};

// Why cache-line alignment: each lane writes its own stats block; adjacent blocks written by
// different threads would otherwise share a line and bounce it between the two cores.
struct alignas(64) StageStats {
  Counter items_in;         // items handed to Process()
  Counter items_out;        // items the stage emitted
  Counter batches;          // Process() calls
  Counter busy_ns;          // time inside Process()/Poll() that did work
  LatencyHistogram service_ns;  // per item: batch time / batch size
};

// Per thread (lane): scheduling and wait-point activity.
struct alignas(64) LaneStats {
  Counter loops;
  Counter yields;           // sched_yield() calls (wait: yield)
  Counter sleeps;           // blocking waits (wait: block)
  Counter wakeups_sent;     // eventfd writes to wake this lane
  Counter overruns;         // SIGXCPU from SCHED_FLAG_DL_OVERRUN
  Counter stalls;           // flushes that found a downstream queue full (backpressure)
  Counter dequeued;         // items taken from this lane's input queue
  LatencyHistogram handoff_ns;  // enqueue -> dequeue delay of items entering this lane
};

}  // namespace metronome
