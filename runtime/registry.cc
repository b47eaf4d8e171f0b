#include "runtime/registry.h"

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace metronome {

StageRegistry& StageRegistry::Global() {
  static StageRegistry* registry = new StageRegistry();  // never destroyed: used at exit too
  return *registry;
}

bool StageRegistry::Register(const std::string& name, Factory factory) {
  if (!factories_.emplace(name, std::move(factory)).second) {
    duplicates_.push_back(name);
    return false;
  }
  return true;
}

std::unique_ptr<Stage> StageRegistry::Create(const std::string& name) const {
  auto it = factories_.find(name);
  if (it == factories_.end()) return nullptr;
  return it->second();
}

std::vector<std::string> StageRegistry::Names() const {
  std::vector<std::string> names;
  for (const auto& [name, factory] : factories_) names.push_back(name);
  return names;
}

absl::Status StageRegistry::Validate() const {
  if (duplicates_.empty()) return absl::OkStatus();
  return absl::FailedPreconditionError(
      absl::StrCat("stage type registered twice: ", absl::StrJoin(duplicates_, ", "),
                   " (two stage files end with the same METRONOME_REGISTER_STAGE name)"));
}

}  // namespace metronome
