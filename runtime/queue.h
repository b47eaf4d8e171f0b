// A bounded multi-producer, single-consumer queue of Item pointers between two lanes, built on
// moodycamel::ConcurrentQueue.
//
// Why a separate size counter: moodycamel's bound is per producer and approximate; the counter
// makes `capacity` exact across producers, so "full" means the same thing for every producer and
// a full queue is backpressure rather than a silent growth. It costs one atomic per bulk
// operation, not per item.
//
// Invariants:
//   1. Depth() <= capacity() at all times.
//   2. Nothing allocates after construction: blocks and per-producer indexes are preallocated
//      and only try_* operations are used.
//   3. An item accepted by TryEnqueueBulk is dequeued exactly once.
//
// Thread-safety: any number of producers, each with its own ProducerToken made once at start-up;
// one consumer.
#pragma once

#include <atomic>
#include <cassert>
#include <cstddef>
#include <cstdint>
#include <memory>

#include "runtime/item.h"

// liburing.h (through <linux/fs.h>) defines BLOCK_SIZE, which collides with moodycamel's traits.
#ifdef BLOCK_SIZE
#undef BLOCK_SIZE
#endif
#include "concurrentqueue/concurrentqueue.h"

namespace metronome {

// The largest capacity a queue may be configured with. Beyond it moodycamel's explicit producer
// index (sized at compile time below) could run out of slots and refuse items below capacity.
inline constexpr size_t kQueueCapacityMax = 65536;

struct QueueTraits : moodycamel::ConcurrentQueueDefaultTraits {
  static constexpr size_t BLOCK_SIZE = 64;
  // Each explicit producer needs one index slot per block it holds: capacity / BLOCK_SIZE,
  // plus slack for partly drained blocks.
  static constexpr size_t EXPLICIT_INITIAL_INDEX_SIZE = 2 * kQueueCapacityMax / BLOCK_SIZE;
};
static_assert((QueueTraits::EXPLICIT_INITIAL_INDEX_SIZE & (QueueTraits::EXPLICIT_INITIAL_INDEX_SIZE - 1)) == 0,
              "moodycamel requires power-of-two index sizes");

class BoundedQueue {
 public:
  using Impl = moodycamel::ConcurrentQueue<Item*, QueueTraits>;
  using ProducerToken = moodycamel::ProducerToken;
  using ConsumerToken = moodycamel::ConsumerToken;

  // REQUIRES: 1 <= capacity <= kQueueCapacityMax, max_producers >= 1.
  BoundedQueue(size_t capacity, size_t max_producers)
      : capacity_(capacity), impl_(capacity, max_producers, 0) {
    assert(capacity >= 1 && capacity <= kQueueCapacityMax);
  }

  std::unique_ptr<ProducerToken> MakeProducerToken() { return std::make_unique<ProducerToken>(impl_); }
  std::unique_ptr<ConsumerToken> MakeConsumerToken() { return std::make_unique<ConsumerToken>(impl_); }

  // Enqueues the longest prefix of items[0..n) that fits; returns its length.
  size_t TryEnqueueBulk(ProducerToken& token, Item* const* items, size_t n) {
    size_t depth = depth_.load(std::memory_order_relaxed);
    size_t take;
    do {
      if (depth >= capacity_) {
        full_events_.fetch_add(1, std::memory_order_relaxed);
        return 0;
      }
      take = std::min(n, capacity_ - depth);
    } while (!depth_.compare_exchange_weak(depth, depth + take, std::memory_order_acq_rel));
    if (take < n) full_events_.fetch_add(1, std::memory_order_relaxed);
    bool ok = impl_.try_enqueue_bulk(token, items, take);
    // Capacity was reserved above and blocks are preallocated for it: failure is a sizing bug.
    assert(ok && "moodycamel refused an item within the reserved capacity");
    (void)ok;
    return take;
  }

  // Dequeues up to `max` items into out; returns the count.
  size_t TryDequeueBulk(ConsumerToken& token, Item** out, size_t max) {
    size_t n = impl_.try_dequeue_bulk(token, out, max);
    if (n > 0) depth_.fetch_sub(n, std::memory_order_acq_rel);
    return n;
  }

  size_t Depth() const { return depth_.load(std::memory_order_acquire); }
  size_t capacity() const { return capacity_; }
  // Enqueue attempts that could not place every item (each one is backpressure, not a loss).
  uint64_t full_events() const { return full_events_.load(std::memory_order_relaxed); }

 private:
  const size_t capacity_;
  // Why alignment: producers and the consumer both touch depth_; keep it off the lines that
  // moodycamel's own counters use.
  alignas(64) std::atomic<size_t> depth_{0};
  std::atomic<uint64_t> full_events_{0};  // rare: a contended RMW is fine here
  alignas(64) Impl impl_;
};

}  // namespace metronome
