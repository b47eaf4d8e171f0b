// Connection identity and the fixed-capacity connection table.
//
// A connection id is (generation << 32 | slot). The slot indexes every stage's per-connection
// arrays; the generation changes each time a slot is reused, so an item that outlived its
// connection can never act on the next connection that gets the same slot (or the same fd).
//
// Ownership of a slot's life:
//   accept   takes a free slot, stores fd and peer, arms recv          (Acquire)
//   send     closes the fd once every response was written or dropped and the read side ended,
//            then returns the slot                                       (Release)
// Each stage keeps its own per-slot state and resets it when it sees a new generation.
//
// Thread-safety: Acquire from the accept thread only; Release from the send thread only; fd()/
// peer() may be read by any stage holding an item of the live connection (the queue hand-off
// orders them after accept's writes).
#pragma once

#include <netinet/in.h>
#include <sys/socket.h>

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "runtime/queue.h"  // moodycamel, with the BLOCK_SIZE fix

namespace metronome::http {

using ConnId = uint64_t;
inline uint32_t SlotOf(ConnId id) { return static_cast<uint32_t>(id); }
inline uint32_t GenOf(ConnId id) { return static_cast<uint32_t>(id >> 32); }
inline ConnId MakeConnId(uint32_t slot, uint32_t gen) { return (static_cast<uint64_t>(gen) << 32) | slot; }

// The most connections a table can hold: the free list is a moodycamel queue whose explicit
// producer index is sized for kQueueCapacityMax (runtime/queue.h); slots also travel in 20 bits
// of io_uring user data.
inline constexpr uint32_t kConnectionsMax = kQueueCapacityMax;
static_assert(kConnectionsMax <= (1u << 20));

class ConnectionTable {
 public:
  void Init(uint32_t capacity);
  uint32_t capacity() const { return static_cast<uint32_t>(slots_.size()); }

  // A free slot for `fd` with a new generation, or false when the table is full.
  bool Acquire(int fd, const sockaddr_storage& peer, ConnId* id);
  // Returns the slot (after its fd was closed).
  void Release(ConnId id);

  int fd(ConnId id) const { return slots_[SlotOf(id)].fd; }
  const sockaddr_storage& peer(ConnId id) const { return slots_[SlotOf(id)].peer; }
  uint64_t open() const { return open_.load(std::memory_order_relaxed); }
  uint64_t accepted_total() const { return accepted_.load(std::memory_order_relaxed); }

 private:
  struct Slot {
    std::atomic<uint32_t> gen{0};
    int fd = -1;
    sockaddr_storage peer{};
  };
  std::vector<Slot> slots_;
  std::unique_ptr<moodycamel::ConcurrentQueue<uint32_t, QueueTraits>> free_;
  std::unique_ptr<moodycamel::ProducerToken> release_token_;
  std::unique_ptr<moodycamel::ConsumerToken> acquire_token_;
  std::atomic<uint64_t> open_{0};
  std::atomic<uint64_t> accepted_{0};
};

// "1.2.3.4:5678" or "[::1]:5678".
std::string FormatPeer(const sockaddr_storage& peer);

}  // namespace metronome::http
