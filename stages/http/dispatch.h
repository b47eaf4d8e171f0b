// Where a request for application code goes: which python lane takes it, or a 503 when the
// queue toward it is congested. One object per pipeline (StageEnv::Shared<Dispatch>("dispatch")),
// owned by nobody in particular and filled in Configure:
//   - each python stage registers its lane (AddLane), in pipeline order; the first is the main
//     lane;
//   - the stage that hands requests on toward Python (route, or the last python-plugin when
//     there are plugins) calls Forward, which picks the lane, sheds by *that* lane's congestion,
//     and counts the request into the lane's backlog only when it is sent;
//   - the lane counts it out (Done) and marks when a handler runs (Busy/Idle), so that a lane
//     held by a long handler stops attracting work.
//
// Invariants:
//   1. A request is counted into exactly one lane's backlog, exactly when it is emitted to it,
//      and counted out by that lane once: a shed request leaves no count behind.
//   2. Lane choice has no side effect (a request may still be shed after it).
//
// Thread-safety: AddLane during Configure only (single-threaded). After start, Forward runs on
// the forwarding stage's lane, Done/Busy/Idle on each python lane; the counters are relaxed
// atomics (a racy read costs a less even spread, never a lost request).
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <vector>

#include "runtime/outbox.h"
#include "stages/http/items.h"
#include "stages/http/router.h"

namespace metronome::http {

// The watchdog's fixed table bounds the python lanes (stages/py/budget.h).
inline constexpr int kPythonLanesMax = 8;

class Dispatch {
 public:
  enum class Serves : uint8_t { kAll, kLight, kHeavy };

  // Registers the python stage at pipeline index `stage`; returns its lane number, or -1 when
  // there are kPythonLanesMax lanes already.
  int AddLane(int stage, Serves serves);
  int lanes() const { return static_cast<int>(lanes_.size()); }
  int lane_stage(int lane) const { return lanes_[static_cast<size_t>(lane)]->stage; }

  // The stage index of the python lane for a request of `target` (no side effect).
  int Choose(const RouteTarget& target, int64_t now_ns) const;

  // Hands r on toward Python: to the chosen lane when `to_python`, else to stage `next` (a
  // plugin). When that queue is congested, r is answered 503 + Retry-After and skips to
  // `serialize`, after `before_shed(r)` when given (a plugin releases the request's Python
  // object there); returns false then (the caller counts its shed).
  bool Forward(Request* r, const RouteTarget& target, bool to_python, int next, int serialize,
               int retry_after_s, Outbox& out, void (*before_shed)(Request*) = nullptr);

  // On a python lane: a dispatched request left it / a handler started or ended.
  void Done(int lane) {
    if (lanes_.size() > 1) lanes_[static_cast<size_t>(lane)]->backlog.fetch_sub(1, std::memory_order_relaxed);
  }
  void Busy(int lane, int64_t since_ns) {
    lanes_[static_cast<size_t>(lane)]->busy_since_ns.store(since_ns, std::memory_order_relaxed);
  }
  void Idle(int lane) { lanes_[static_cast<size_t>(lane)]->busy_since_ns.store(0, std::memory_order_relaxed); }

  // The route table's target for the server's own answers that the app wants to see (404,
  // 405, OPTIONS: its error handlers, its plugins' on_request/on_response), or -1 when route
  // answers them itself. Set by the python stage in Start, read by route in Connect.
  int error_target = -1;

 private:
  struct Lane {
    int stage = -1;
    Serves serves = Serves::kAll;
    alignas(64) std::atomic<int64_t> busy_since_ns{0};  // the running handler's start, 0 when idle
    std::atomic<int32_t> backlog{0};                     // dispatched and not yet done
  };
  std::vector<std::unique_ptr<Lane>> lanes_;
};

}  // namespace metronome::http
