// Stage types by name. Each stage file ends with one line:
//   METRONOME_REGISTER_STAGE("parse", ParseStage);
// Why it survives static linking: the stage libraries are linked with link_whole (meson.build),
// so the registration objects are never dropped. A duplicate name cannot fail inside static
// initialisation, so it is recorded and reported by Validate() at start-up.
//
// Thread-safety: registration happens during static initialisation; afterwards read-only.
#pragma once

#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "runtime/stage.h"

namespace metronome {

class StageRegistry {
 public:
  using Factory = std::function<std::unique_ptr<Stage>()>;
  static StageRegistry& Global();

  // Returns false (and records the duplicate) when `name` is already registered.
  bool Register(const std::string& name, Factory factory);
  std::unique_ptr<Stage> Create(const std::string& name) const;
  bool Has(const std::string& name) const { return factories_.count(name) > 0; }
  std::vector<std::string> Names() const;
  // Fails naming every duplicate registration.
  absl::Status Validate() const;

 private:
  std::map<std::string, Factory> factories_;
  std::vector<std::string> duplicates_;
};

namespace internal {
struct StageRegistration {
  StageRegistration(const char* name, StageRegistry::Factory factory) {
    StageRegistry::Global().Register(name, std::move(factory));
  }
};
}  // namespace internal

}  // namespace metronome

#define METRONOME_REGISTER_STAGE_CONCAT2(a, b) a##b
#define METRONOME_REGISTER_STAGE_CONCAT(a, b) METRONOME_REGISTER_STAGE_CONCAT2(a, b)
#define METRONOME_REGISTER_STAGE(name, Type)                                          \
  static ::metronome::internal::StageRegistration METRONOME_REGISTER_STAGE_CONCAT(    \
      metronome_stage_registration_, __LINE__)(name, [] { return std::make_unique<Type>(); })
