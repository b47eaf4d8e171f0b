// parse: bytes to requests (see parse.cc).
// Thread-safety: runs on its lane only.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "runtime/stage.h"
#include "stages/http/shared.h"

namespace metronome::http {

class ParseStage : public Stage {
 public:
  absl::Status Configure(ConfigNode entry, ConfigNode root, StageEnv& env) override;
  absl::Status Start(StageEnv& env) override;
  void Process(std::span<Item* const> batch, Outbox& out) override;
  bool Poll(Outbox& out) override;
  int64_t Tick(int64_t now_ns, Outbox& out) override;
  void BeginStop(Outbox& out) override;
  void Shutdown() override;
  void ExtraStats(StatsSink& sink) const override;

 private:
  enum class Phase : uint8_t { kIdle, kHead, kBody, kDiscard };
  enum TimerKind : uint8_t { kTimerFirst, kTimerIdle, kTimerHead, kTimerBody, kTimerLinger, kTimerDrain, kTimerKinds, kTimerNone = 0xff };
  static constexpr uint32_t kNoSlot = UINT32_MAX;

  struct Conn {
    uint32_t gen = 0;
    ConnId id = 0;
    Phase phase = Phase::kIdle;
    bool closing = false;        // no request after the current one is read
    bool shutdown_sent = false;
    bool blocked = false;        // waits in blocked_ for capacity
    uint32_t next_seq = 0;       // sequence number of the next request (or error response)
    RecvChunk* pending = nullptr;
    RecvChunk* pending_tail = nullptr;
    std::string carry;           // a head split across reads
    size_t carry_scanned = 0;
    Request* current = nullptr;  // head done, body arriving
    uint64_t body_left = 0;
    TimerKind timer = kTimerNone;
    int64_t deadline_ns = 0;
    uint32_t timer_prev = kNoSlot, timer_next = kNoSlot;
  };
  struct TimerList {
    uint32_t head = kNoSlot, tail = kNoSlot;
  };

  Conn* Lookup(ConnId id);
  void Forget(Conn* c);
  void DropCurrent(Conn* c);
  void Drive(Conn* c, Outbox& out);
  void Step(Conn* c, RecvChunk* ch, Outbox& out);
  size_t FeedBody(Conn* c, const char* data, size_t len, Outbox& out);
  void Finish(Conn* c, Request* r, Outbox& out);
  void Reject(Conn* c, const ParseError& err, Outbox& out);
  void Respond(Conn* c, int status, absl::string_view reason, Outbox& out);
  void EndConnection(Conn* c, Outbox& out);
  void AssignRequestId(Request* r);
  bool ResponsesOutstanding(const Conn* c) const;
  bool EnsureSpare();
  void Block(Conn* c);
  void Arm(Conn* c, TimerKind kind, int64_t now);
  void Disarm(Conn* c);
  void Expire(Conn* c, TimerKind kind, Outbox& out);

  HttpConfig config_;
  HttpShared* shared_ = nullptr;
  int serialize_ = -1, send_ = -1;
  bool draining_ = false;
  char id_prefix_[24] = {};
  uint64_t ids_made_ = 0;
  int64_t drain_deadline_ns_ = 0;  // every connection waiting for a request is done by then
  std::vector<Conn> conns_;
  std::vector<ConnId> blocked_, scratch_;
  Request* spare_ = nullptr;  // taken from the pool, not yet used
  std::unique_ptr<RequestPool::GiverToken> giver_;
  int64_t timeouts_[kTimerKinds] = {};
  TimerList timers_[kTimerKinds];

  Counter requests_, rejected_, abandoned_, blocked_total_, paths_normalized_;
  Counter timeouts_fired_[kTimerKinds];
};

}  // namespace metronome::http
