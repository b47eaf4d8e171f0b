// Where a stage puts the items it hands on. One Outbox per lane; the lane points it at the stage
// it is running before each call.
//
// Items for a stage on the same lane are collected and handed to that stage right after the
// current call returns (run to completion). Items for another lane wait here until the end of
// the lane's loop iteration and then move in one bulk enqueue.
//
// Thread-safety: used only by the lane's thread.
#pragma once

#include <cassert>
#include <cstddef>
#include <algorithm>
#include <cstdint>
#include <vector>

#include "runtime/item.h"
#include "runtime/queue.h"
#include "runtime/stats.h"

namespace metronome {

class Outbox {
 public:
  // Hands `item` to the next stage in the pipeline.
  void Emit(Item* item) { EmitTo(current_ + 1, item); }
  // Hands `item` to a later stage (by pipeline index; see StageEnv::FindStage).
  // REQUIRES: current stage < stage_index < number of stages; Room() > 0.
  void EmitTo(int stage_index, Item* item) {
    assert(stage_index > current_ && stage_index < num_stages_ && "items only move forward");
    item->next_stage = static_cast<uint16_t>(stage_index);
    std::vector<Item*>& buf = stage_index <= last_stage_
                                  ? local_[static_cast<size_t>(stage_index - first_stage_)]
                                  : remote_[static_cast<size_t>(lane_of_[static_cast<size_t>(stage_index)])].items;
    // A stage that fans out must check Room(); running past it is a bug in that stage.
    assert(buf.size() < capacity_ && "stage emitted beyond Outbox::Room()");
    buf.push_back(item);
    stats_->items_out.Add();
  }
  // How many items the current stage may still emit in this call.
  size_t Room() const { return capacity_ - std::min(capacity_, max_fill_()); }
  // True when work for `stage_index` should be shed rather than queued: its queue is above its
  // high-water mark, or items for it already wait in this outbox because the queue was full.
  bool Congested(int stage_index) const;
  // The time at the start of this loop iteration (CLOCK_MONOTONIC ns).
  int64_t now_ns() const { return now_ns_; }
  // Asks the lane to call the stages' Tick no later than `at_ns` (for a deadline a stage set
  // up outside Tick, e.g. in Process or Poll; Tick's own return value covers the rest).
  void TickBy(int64_t at_ns) { tick_by_ns_ = std::min(tick_by_ns_, at_ns); }

 private:
  friend class Lane;
  struct Remote {
    std::vector<Item*> items;
    BoundedQueue* queue = nullptr;
    std::unique_ptr<BoundedQueue::ProducerToken> token;
    int lane = -1;
  };
  size_t max_fill_() const {
    size_t m = 0;
    for (const auto& l : local_) m = std::max(m, l.size());
    for (const auto& r : remote_) m = std::max(m, r.items.size());
    return m;
  }

  int current_ = 0;
  int first_stage_ = 0, last_stage_ = 0, num_stages_ = 0;
  size_t capacity_ = 0;
  int64_t now_ns_ = 0;
  int64_t tick_by_ns_ = INT64_MAX;
  StageStats* stats_ = nullptr;              // the current stage's
  std::vector<std::vector<Item*>> local_;    // per stage on this lane
  std::vector<Remote> remote_;               // per lane (only later lanes are used)
  std::vector<int> lane_of_;                 // stage index -> lane index
};

}  // namespace metronome
