// serialize: a response to its bytes on the wire (see serialize.cc).
// Thread-safety: runs on its lane only.
#pragma once

#include <ctime>
#include <string>

#include "runtime/stage.h"
#include "stages/http/shared.h"

namespace metronome::http {

class SerializeStage : public Stage {
 public:
  absl::Status Configure(ConfigNode entry, ConfigNode root, StageEnv& env) override;
  void Process(std::span<Item* const> batch, Outbox& out) override;
  // The drain: every response from now on ends its connection (Connection: close), so that
  // clients stop sending on connections that are about to close.
  void BeginStop(Outbox& out) override {
    (void)out;
    draining_ = true;
  }
  void ExtraStats(StatsSink& sink) const override;

 private:
  void Serialize(Request* r);
  void SerializeChunk(BodyChunk* c);
  void RefreshDate();

  HttpConfig config_;
  bool draining_ = false;
  std::string server_field_;  // "Server: metronome\r\n"
  time_t date_second_ = 0;
  std::string date_field_;    // "Date: Thu, 26 Nov 2026 15:05:00 GMT\r\n", refreshed each second
  Counter chunked_, streams_, chunks_, large_bodies_, dropped_headers_;
};

}  // namespace metronome::http
