#include "stages/http/dispatch.h"

#include <cassert>
#include <climits>

#include "runtime/log.h"
#include "runtime/units.h"

namespace metronome::http {
namespace {

// A lane whose handler has run this long counts as occupied when choosing: requests go to a
// lane that is free or about to be.
constexpr int64_t kLaneOccupiedNs = 2 * kNanosPerMilli;

}  // namespace

int Dispatch::AddLane(int stage, Serves serves) {
  if (lanes_.size() >= static_cast<size_t>(kPythonLanesMax)) return -1;
  auto l = std::make_unique<Lane>();
  l->stage = stage;
  l->serves = serves;
  lanes_.push_back(std::move(l));
  return static_cast<int>(lanes_.size()) - 1;
}

int Dispatch::Choose(const RouteTarget& target, int64_t now_ns) const {
  assert(!lanes_.empty());
  if (lanes_.size() == 1) return lanes_[0]->stage;
  const Serves want = target.heavy ? Serves::kHeavy : Serves::kLight;
  // Lanes dedicated to this class of route first; lanes serving all routes otherwise.
  bool dedicated = false;
  for (const auto& l : lanes_) dedicated |= l->serves == want;
  int best = -1;
  int64_t best_score = INT64_MAX;
  for (size_t i = 0; i < lanes_.size(); ++i) {
    const Lane& l = *lanes_[i];
    if (l.serves != (dedicated ? want : Serves::kAll)) continue;
    // Fewest requests waiting wins; a lane busy with a long handler only if nothing else fits.
    int64_t busy = l.busy_since_ns.load(std::memory_order_relaxed);
    int64_t score = l.backlog.load(std::memory_order_relaxed);
    if (busy != 0 && now_ns - busy > kLaneOccupiedNs) score += 1'000'000 + (now_ns - busy) / kNanosPerMilli;
    if (score < best_score) {
      best_score = score;
      best = static_cast<int>(i);
    }
  }
  if (best < 0) best = 0;  // no lane for this class: the main lane takes it
  return lanes_[static_cast<size_t>(best)]->stage;
}

bool Dispatch::Forward(Request* r, const RouteTarget& target, bool to_python, int next, int serialize,
                       int retry_after_s, Outbox& out, void (*before_shed)(Request*)) {
  const int to = to_python ? Choose(target, out.now_ns()) : next;
  if (out.Congested(to)) {
    LOG_RATE_LIMITED(LogLevel::kWarn, "shed %s %s with 503: the queue toward its python lane is full",
                     MethodName(target.method), target.pattern.c_str());
    if (before_shed != nullptr) before_shed(r);
    r->resp.SetBusy(retry_after_s);
    AnswerEarly(r, serialize, out);
    return false;
  }
  if (to_python && lanes_.size() > 1) {
    for (auto& l : lanes_) {
      if (l->stage == to) l->backlog.fetch_add(1, std::memory_order_relaxed);
    }
  }
  out.EmitTo(to, r);
  return true;
}

}  // namespace metronome::http
