// route: method + path -> native response or Python handler (see route.cc).
// Thread-safety: runs on its lane only.
#pragma once

#include "runtime/stage.h"
#include "stages/http/dispatch.h"
#include "stages/http/router.h"
#include "stages/http/shared.h"

namespace metronome::http {

class RouteStage : public Stage {
 public:
  absl::Status Configure(ConfigNode entry, ConfigNode root, StageEnv& env) override;
  absl::Status Connect(StageEnv& env) override;
  void Process(std::span<Item* const> batch, Outbox& out) override;
  void ExtraStats(StatsSink& sink) const override;

 private:
  void Answer(Request* r, int status, absl::string_view body, Outbox& out);
  static bool ParamsAreSafe(const Request& r);

  HttpConfig config_;
  RouteTable* table_ = nullptr;
  std::vector<RouteTarget> native_;
  Router router_;
  int serialize_ = -1;
  int next_ = -1;  // the stage after route (python or a plugin), when there is one
  bool dispatch_here_ = true;  // no plugin in between: route picks the python lane
  Dispatch* dispatch_ = nullptr;
  Counter found_, not_found_, not_allowed_, not_implemented_, shed_, unsafe_params_, options_;
};

}  // namespace metronome::http
