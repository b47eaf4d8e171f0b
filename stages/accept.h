// accept: the listening socket and every connection's read side (see accept.cc).
// Thread-safety: runs on its lane only; stats are counters (runtime/stats.h).
#pragma once

#include <string>
#include <vector>

#include "runtime/stage.h"
#include "stages/http/shared.h"

namespace metronome {
class Ring;
}

namespace metronome::http {

class AcceptStage : public Stage {
 public:
  static constexpr int kBufferGroup = 0;

  absl::Status Configure(ConfigNode entry, ConfigNode root, StageEnv& env) override;
  absl::Status Start(StageEnv& env) override;
  void Process(std::span<Item* const> batch, Outbox& out) override {
    (void)batch;
    (void)out;  // nothing is queued to accept: it is the pipeline's source
  }
  void OnCompletion(const io_uring_cqe& cqe, Outbox& out) override;
  bool Poll(Outbox& out) override;
  void BeginStop(Outbox& out) override;
  bool Idle() const override;
  void Shutdown() override;
  bool NeedsRing() const override { return true; }
  std::vector<RingOp> RingOps() const override;
  void ExtraStats(StatsSink& sink) const override;

 private:
  void ArmAccept();
  void ArmRecv(ConnId id);
  void OnAccept(const io_uring_cqe& cqe);
  void OnRecv(const io_uring_cqe& cqe, ConnId id, Outbox& out);
  void Reject(int fd);
  void AddConnection(int fd, const sockaddr_storage& peer, Outbox& out);
  void CloseListener();
  void EmitClosed(ConnId id, Outbox& out);
  void Hand(HttpItem* item, Outbox& out);
  bool BuffersLow() const;
  void QueueRearm(ConnId id);

  HttpConfig config_;
  HttpShared* shared_ = nullptr;
  Ring* ring_ = nullptr;
  Outbox* out_ = nullptr;  // during OnCompletion and BeginStop only
  uint8_t tag_ = 0;
  int listen_fd_ = -1;
  std::string bound_address_;
  bool accept_armed_ = false;
  bool stopping_ = false;
  void* ring_mem_ = nullptr;
  std::vector<char> buffers_;
  std::vector<uint8_t> live_;  // per slot: the read side is open
  uint32_t live_count_ = 0;
  std::vector<ConnId> rearm_;  // connections whose recv waits for buffers
  std::vector<HttpItem*> overflow_;  // items waiting for room in the outbox, in order
  std::string reject_response_;

  Counter rejected_, accept_errors_, bytes_in_, enobufs_, rearms_;
};

}  // namespace metronome::http
