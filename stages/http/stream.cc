#include "stages/http/stream.h"

#include <cassert>

namespace metronome::http {

void ChunkPool::Init(size_t n) {
  all_.reserve(n);
  // Producers: the initial fill, send, and each python lane giving back an unused chunk.
  free_ = std::make_unique<moodycamel::ConcurrentQueue<BodyChunk*, QueueTraits>>(n * 2, 16, 0);
  auto fill = MakeGiverToken();
  for (size_t i = 0; i < n; ++i) {
    auto c = std::make_unique<BodyChunk>();
    c->wire.reserve(1024);
    free_->enqueue(*fill, c.get());
    all_.push_back(std::move(c));
  }
}

BodyChunk* ChunkPool::Take() {
  BodyChunk* c = nullptr;
  if (!free_->try_dequeue(c)) {
    empty_.fetch_add(1, std::memory_order_relaxed);
    return nullptr;
  }
  in_use_.fetch_add(1, std::memory_order_relaxed);
  return c;
}

void ChunkPool::Give(BodyChunk* c, GiverToken& token) {
  c->Reset();
  if (c->data.capacity() > kChunkKeepBytesMax) std::string().swap(c->data);
  if (c->wire.capacity() > kChunkKeepBytesMax) std::string().swap(c->wire);
  in_use_.fetch_sub(1, std::memory_order_relaxed);
  bool ok = free_->try_enqueue(token, c);
  assert(ok && "chunk pool free list sized for every chunk");
  (void)ok;
}

}  // namespace metronome::http
