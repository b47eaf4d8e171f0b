// Synthetic stages that prove the runtime without HTTP: a source that emits numbered items from
// a fixed pool, relays that burn a configured amount of CPU per item, and a sink that returns
// items to the pool and records end-to-end latency. Used by the runtime tests and by
// perf/runtime_bench.
//
// Registered types: synthetic-source, synthetic-relay, synthetic-sink.
// Thread-safety: SyntheticPool is shared by the source (takes) and the sink (returns); the
// moodycamel queue inside it is multi-producer/multi-consumer and never allocates after start.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <vector>

#include "runtime/item.h"
#include "runtime/queue.h"
#include "runtime/stage.h"
#include "runtime/stats.h"
#include "runtime/waker.h"

namespace metronome {
class Pipeline;
}

namespace metronome::synthetic {

struct SynthItem : Item {
  uint64_t seq = 0;
  int64_t created_ns = 0;
  uint32_t hops = 0;  // relays passed
};

// Shared by the source and the sink under the key "synthetic".
class SyntheticPool {
 public:
  void Init(size_t n);
  SynthItem* Take();
  void Give(SynthItem* item);
  size_t size() const { return items_.size(); }

  // Sink-side totals, readable from any thread.
  std::atomic<uint64_t> generated{0};
  std::atomic<uint64_t> received{0};
  std::atomic<uint64_t> hop_errors{0};  // items that skipped or repeated a relay
  LatencyHistogram latency_ns;          // written by the sink only
  Waker* source_waker = nullptr;

  // Lets a test wait for `received >= n` without sleeping.
  void WaitReceived(uint64_t n);
  void NotifyReceived();

 private:
  std::vector<SynthItem> items_;
  std::unique_ptr<moodycamel::ConcurrentQueue<SynthItem*>> free_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::atomic<int> waiters_{0};  // the sink takes the mutex only when a test waits
};

// The pool the pipeline's synthetic sink uses, or null.
SyntheticPool* FindPool(Pipeline& pipeline);

}  // namespace metronome::synthetic
