// send: writes responses in request order per connection, and ends connections (see send.cc).
// Thread-safety: runs on its lane only.
#pragma once

#include <sys/socket.h>

#include <memory>
#include <vector>

#include "runtime/stage.h"
#include "stages/http/shared.h"

namespace metronome {
class Ring;
}

namespace metronome::http {

class SendStage : public Stage {
 public:
  // iovecs in one sendmsg: up to half as many pipelined responses (two iovecs each).
  static constexpr int kIovMax = 32;

  absl::Status Configure(ConfigNode entry, ConfigNode root, StageEnv& env) override;
  absl::Status Start(StageEnv& env) override;
  void Process(std::span<Item* const> batch, Outbox& out) override;
  void OnCompletion(const io_uring_cqe& cqe, Outbox& out) override;
  bool Idle() const override;
  bool IsSink() const override { return true; }
  bool NeedsRing() const override { return true; }
  std::vector<RingOp> RingOps() const override;
  void Shutdown() override;
  void ExtraStats(StatsSink& sink) const override;

 private:
  struct Conn {
    uint32_t gen = 0;
    ConnId id = 0;
    uint32_t next_seq = 0;          // the response to write next
    uint32_t next_part = 0;         // ... and its piece (streams: head 0, then chunks)
    uint32_t accounted = 0;         // responses written or dropped
    WirePiece* waiting = nullptr;   // pieces not yet written, by (seq, part)
    uint64_t body_bytes = 0;        // body bytes of the response being written (access log)
    bool writing = false;           // a sendmsg is in flight
    bool writing_continue = false;  // ... and it is the 100 Continue
    int batch = 0;                  // pieces in the in-flight sendmsg
    iovec iov[kIovMax];
    int iov_n = 0;
    msghdr msg{};
    bool peer_gone = false;         // a write failed: later responses are dropped
    bool read_closed = false;       // kClosed seen
    uint32_t issued = 0;            // ... with this many responses to account for
    bool shutdown_wanted = false;   // kShutdown seen
    uint32_t shutdown_seq = 0;
    bool shut = false;              // the write side is shut down: nothing more is written
    bool shut_read = false;         // ... and the read side too (its recv ends, kClosed follows)
    bool continue_wanted = false;
    uint32_t continue_seq = 0;
  };

  Conn* Lookup(ConnId id);
  void Enqueue(Conn* c, WirePiece* p);
  void TryWrite(Conn* c);
  void OnWritten(Conn* c, int res);
  // The batch's pieces were written: retire them in order; true if one of them ends the
  // connection.
  bool RetireBatch(Conn* c);
  // A piece leaves send, written or not. A response is accounted for when its last piece
  // (the Request itself, or a stream's terminal chunk) retires.
  void RetirePiece(Conn* c, WirePiece* p, bool written);
  void Retire(Conn* c, Request* r, bool written);
  void ReleaseChunk(Conn* c, BodyChunk* chunk);
  void EndWrites(Conn* c);
  static bool EndsConnection(const WirePiece* p);
  void PeerGone(Conn* c);
  void DropAll(Conn* c);
  void MaybeEnd(Conn* c);
  void AccessLog(const Conn* c, const Request* r, uint64_t body_bytes);
  void FlushAccessLog();

  HttpConfig config_;
  HttpShared* shared_ = nullptr;
  Ring* ring_ = nullptr;
  uint8_t tag_ = 0;
  std::vector<Conn> conns_;
  std::unique_ptr<RequestPool::GiverToken> giver_;
  std::unique_ptr<ChunkPool::GiverToken> chunk_giver_;
  int access_fd_ = -1;          // server.access_log; lines are buffered per batch
  std::string access_buf_;
  time_t access_second_ = 0;
  char access_time_[40] = {};

  Counter responses_[6];  // by status class: [1] 1xx ... [5] 5xx
  LatencyHistogram latency_ns_;  // request head complete -> response written
  Counter bytes_out_, sendmsgs_, partial_writes_, write_errors_, dropped_, closed_, continues_;
  Counter chunks_written_, chunks_dropped_, streams_aborted_;
};

}  // namespace metronome::http
