#include "stages/http/conn.h"

#include <arpa/inet.h>

#include <cassert>

#include "absl/strings/str_cat.h"

namespace metronome::http {

void ConnectionTable::Init(uint32_t capacity) {
  assert(capacity >= 1 && capacity <= kConnectionsMax);
  slots_ = std::vector<Slot>(capacity);
  free_ = std::make_unique<moodycamel::ConcurrentQueue<uint32_t, QueueTraits>>(capacity * 2, 1, 1);
  release_token_ = std::make_unique<moodycamel::ProducerToken>(*free_);
  acquire_token_ = std::make_unique<moodycamel::ConsumerToken>(*free_);
  for (uint32_t i = 0; i < capacity; ++i) free_->enqueue(*release_token_, i);
}

bool ConnectionTable::Acquire(int fd, const sockaddr_storage& peer, ConnId* id) {
  uint32_t slot;
  if (!free_->try_dequeue(*acquire_token_, slot)) return false;
  Slot& s = slots_[slot];
  s.fd = fd;
  s.peer = peer;
  uint32_t gen = s.gen.load(std::memory_order_relaxed) + 1;
  s.gen.store(gen, std::memory_order_release);
  *id = MakeConnId(slot, gen);
  open_.fetch_add(1, std::memory_order_relaxed);
  accepted_.fetch_add(1, std::memory_order_relaxed);
  return true;
}

void ConnectionTable::Release(ConnId id) {
  Slot& s = slots_[SlotOf(id)];
  assert(s.gen.load() == GenOf(id) && s.fd >= 0 && "slot released twice");
  s.fd = -1;
  open_.fetch_sub(1, std::memory_order_relaxed);
  // The free list was preallocated for every slot: this cannot fail or allocate.
  bool ok = free_->try_enqueue(*release_token_, SlotOf(id));
  assert(ok);
  (void)ok;
}

std::string FormatPeer(const sockaddr_storage& peer) {
  char buf[INET6_ADDRSTRLEN] = "?";
  if (peer.ss_family == AF_INET) {
    const auto* a = reinterpret_cast<const sockaddr_in*>(&peer);
    inet_ntop(AF_INET, &a->sin_addr, buf, sizeof buf);
    return absl::StrCat(buf, ":", ntohs(a->sin_port));
  }
  if (peer.ss_family == AF_INET6) {
    const auto* a = reinterpret_cast<const sockaddr_in6*>(&peer);
    inet_ntop(AF_INET6, &a->sin6_addr, buf, sizeof buf);
    return absl::StrCat("[", buf, "]:", ntohs(a->sin6_port));
  }
  return "unknown";
}

}  // namespace metronome::http
