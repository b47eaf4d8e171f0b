#include "runtime/registry.h"

#include <gtest/gtest.h>

namespace metronome {
namespace {

class Nop : public Stage {
 public:
  absl::Status Configure(ConfigNode, ConfigNode, StageEnv&) override { return absl::OkStatus(); }
  void Process(std::span<Item* const>, Outbox&) override {}
};

TEST(Registry, SyntheticStagesAreLinkedIn) {
  // Registered from a static library linked whole: proves registration survives static linking.
  const StageRegistry& r = StageRegistry::Global();
  EXPECT_TRUE(r.Has("synthetic-source"));
  EXPECT_TRUE(r.Has("synthetic-relay"));
  EXPECT_TRUE(r.Has("synthetic-sink"));
  EXPECT_TRUE(r.Validate().ok());
}

TEST(Registry, DuplicateNameFailsValidation) {
  StageRegistry r;
  EXPECT_TRUE(r.Register("a", [] { return std::make_unique<Nop>(); }));
  EXPECT_TRUE(r.Validate().ok());
  EXPECT_FALSE(r.Register("a", [] { return std::make_unique<Nop>(); }));
  absl::Status s = r.Validate();
  EXPECT_FALSE(s.ok());
  EXPECT_NE(s.message().find("registered twice: a"), absl::string_view::npos) << s;
}

TEST(Registry, CreateUnknownIsNull) {
  StageRegistry r;
  EXPECT_EQ(r.Create("nope"), nullptr);
  r.Register("x", [] { return std::make_unique<Nop>(); });
  EXPECT_NE(r.Create("x"), nullptr);
}

}  // namespace
}  // namespace metronome
