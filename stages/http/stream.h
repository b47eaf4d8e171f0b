// Streamed response bodies: the pieces (BodyChunk, items.h) come from a fixed pool, and each
// connection has a flow-control record that bounds what a stream may have waiting in the server.
//
// The life of a stream (a handler that returned an iterator, a WSGI iterable, an ASGI body with
// more_body):
//   1. The producing python lane emits the Request (the head) and then, piece by piece, as the
//      app produces them, BodyChunks with the same seq and part 1, 2, ...; each passes through
//      serialize (which frames it) to send (which writes it in order after the head).
//   2. Every stream ends with exactly one terminal chunk: `last` (the body is complete) or
//      `abort` (cut short: an exception, a budget, a client that went away, a declared length
//      not honoured; send closes the connection, so a truncated body is never taken for a
//      complete one). The producer reserves that chunk when the stream starts, so it can always
//      end it. Send keeps the head (the Request) until the terminal chunk retires it; so the
//      connection (and its fd) cannot end while a chunk of it is still on its way.
//   3. Backpressure: the producer adds each chunk's bytes to its connection's `buffered_bytes`
//      and send subtracts them once written (or dropped). A stream with server.stream_buffer_bytes
//      (or kStreamChunksInFlightMax chunks) waiting does not ask the app for more: the lane goes on
//      with other work and send wakes it when the backlog is below half. A stream stalled longer
//      than server.stream_stall_timeout (paused, and not one byte written to its connection in
//      that time) is aborted; its terminal chunk is marked `stalled` and
//      send shuts the socket down on it, since the write in flight waits for that very client.
//   4. A client that went away: send marks the connection's generation cancelled; the producer
//      sees it before its next step, closes the iterator (so the app's `finally` runs) and ends
//      the stream with an abort chunk.
//
// Thread-safety: ChunkPool::Take from any producer lane, Give from send (and a producer giving
// back an unused chunk) with its own token. StreamFlow fields are atomics written as described.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <vector>

#include "runtime/queue.h"
#include "stages/http/conn.h"
#include "stages/http/items.h"

namespace metronome::http {

// A stream with this many chunks on their way to the client waits (whatever their bytes): it
// bounds the pool a slow client can hold with many tiny chunks (server-sent events).
inline constexpr int32_t kStreamChunksInFlightMax = 64;
// A chunk whose buffer grew past this is given a fresh one when it returns to the pool. The pool
// hands its chunks out in turn, so what one keeps, every one comes to keep: at 64 KiB, streams
// of 64 KiB items left RSS 120 MiB up after three 40 MiB bodies (and up to 4096 x 64 KiB). At
// 4 KiB small items (an event, a line) need no allocation, the pool keeps at most
// server.stream_chunks x 2 x 4 KiB, and a big item's one allocation is small next to its write.
inline constexpr size_t kChunkKeepBytesMax = 4 * 1024;

class ChunkPool {
 public:
  using GiverToken = moodycamel::ProducerToken;
  void Init(size_t n);
  BodyChunk* Take();  // nullptr when empty (counted)
  std::unique_ptr<GiverToken> MakeGiverToken() { return std::make_unique<GiverToken>(*free_); }
  void Give(BodyChunk* c, GiverToken& token);
  size_t capacity() const { return all_.size(); }
  size_t in_use() const { return in_use_.load(std::memory_order_relaxed); }
  uint64_t empty_events() const { return empty_.load(std::memory_order_relaxed); }

 private:
  std::vector<std::unique_ptr<BodyChunk>> all_;
  std::unique_ptr<moodycamel::ConcurrentQueue<BodyChunk*, QueueTraits>> free_;
  std::atomic<size_t> in_use_{0};
  std::atomic<uint64_t> empty_{0};
};

// Per connection slot.
struct StreamFlow {
  std::atomic<int64_t> buffered_bytes{0};   // produced and not yet written or dropped
  std::atomic<int32_t> buffered_chunks{0};
  std::atomic<uint32_t> cancelled_gen{0};   // send: this generation's client is gone
  std::atomic<uint32_t> read_closed_gen{0}; // send: this generation's read side ended (EOF)
  std::atomic<bool> producer_waiting{false};  // a producer paused on this connection
  // send: bytes written to this slot's connections, partial writes included. A paused producer
  // that sees it move knows its client is reading (the stall timeout counts from then).
  std::atomic<uint64_t> written_bytes{0};
  // send: (generation << 32) | responses of that connection accounted for (written or dropped).
  // Parse's idle timer counts from the last response, not from the last request it read.
  std::atomic<uint64_t> accounted{0};
};

// Whether a stream on `flow` may produce its next chunk (the bounds in point 3 above).
inline bool StreamMayProduce(const StreamFlow& flow, int64_t buffer_bytes_max) {
  return flow.buffered_bytes.load(std::memory_order_acquire) < buffer_bytes_max &&
         flow.buffered_chunks.load(std::memory_order_acquire) < kStreamChunksInFlightMax;
}

}  // namespace metronome::http
