#include "runtime/queue.h"

#include <gtest/gtest.h>

#include <set>
#include <thread>
#include <vector>

namespace metronome {
namespace {

TEST(BoundedQueue, RefusesBeyondCapacityAndCountsIt) {
  BoundedQueue q(100, 1);
  auto prod = q.MakeProducerToken();
  auto cons = q.MakeConsumerToken();
  std::vector<Item> items(150);
  std::vector<Item*> ptrs;
  for (auto& i : items) ptrs.push_back(&i);
  EXPECT_EQ(q.TryEnqueueBulk(*prod, ptrs.data(), 60), 60u);
  EXPECT_EQ(q.full_events(), 0u);
  // Only the prefix that fits goes in.
  EXPECT_EQ(q.TryEnqueueBulk(*prod, ptrs.data() + 60, 60), 40u);
  EXPECT_EQ(q.Depth(), 100u);
  EXPECT_EQ(q.full_events(), 1u);
  EXPECT_EQ(q.TryEnqueueBulk(*prod, ptrs.data() + 100, 1), 0u);
  EXPECT_EQ(q.full_events(), 2u);
  // Drain and check order and identity: nothing lost, nothing duplicated.
  std::vector<Item*> out(200);
  size_t n = q.TryDequeueBulk(*cons, out.data(), 200);
  ASSERT_EQ(n, 100u);
  for (size_t i = 0; i < n; ++i) EXPECT_EQ(out[i], ptrs[i]);
  EXPECT_EQ(q.Depth(), 0u);
  // Room again after the drain.
  EXPECT_EQ(q.TryEnqueueBulk(*prod, ptrs.data() + 100, 50), 50u);
}

TEST(BoundedQueue, ExactlyAtCapacityWithManyProducers) {
  constexpr size_t kCap = 4096;
  constexpr int kProducers = 4;
  BoundedQueue q(kCap, kProducers);
  std::vector<Item> items(kCap * 2);
  std::atomic<size_t> accepted{0};
  std::vector<std::thread> threads;
  for (int p = 0; p < kProducers; ++p) {
    threads.emplace_back([&, p] {
      auto tok = q.MakeProducerToken();
      for (size_t i = static_cast<size_t>(p); i < items.size(); i += kProducers) {
        Item* it = &items[i];
        accepted += q.TryEnqueueBulk(*tok, &it, 1);
      }
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(accepted.load(), kCap);
  EXPECT_EQ(q.Depth(), kCap);
  auto cons = q.MakeConsumerToken();
  std::vector<Item*> out(kCap * 2);
  size_t total = 0;
  while (size_t n = q.TryDequeueBulk(*cons, out.data() + total, out.size() - total)) total += n;
  EXPECT_EQ(total, kCap);
  std::set<Item*> unique(out.begin(), out.begin() + static_cast<long>(total));
  EXPECT_EQ(unique.size(), kCap);
}

TEST(BoundedQueue, LargestCapacityNeverRefusesBelowIt) {
  BoundedQueue q(kQueueCapacityMax, 1);
  auto prod = q.MakeProducerToken();
  auto cons = q.MakeConsumerToken();
  std::vector<Item> items(kQueueCapacityMax);
  std::vector<Item*> out(kQueueCapacityMax);
  // Cycle twice so that blocks are reused, not only freshly taken.
  for (int round = 0; round < 2; ++round) {
    for (auto& i : items) {
      Item* p = &i;
      ASSERT_EQ(q.TryEnqueueBulk(*prod, &p, 1), 1u);
    }
    Item* extra = &items[0];
    EXPECT_EQ(q.TryEnqueueBulk(*prod, &extra, 1), 0u);
    size_t total = 0;
    while (size_t n = q.TryDequeueBulk(*cons, out.data() + total, out.size() - total)) total += n;
    EXPECT_EQ(total, kQueueCapacityMax);
  }
}

}  // namespace
}  // namespace metronome
