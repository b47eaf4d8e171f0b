#include "runtime/uring.h"

#include <gtest/gtest.h>
#include <liburing.h>

namespace metronome {
namespace {

TEST(ProbeIoUring, TheOpcodesTheStagesUseAreThere) {
  // What accept and send submit (stages/accept.cc, stages/send.cc): this kernel has them all.
  absl::Status s = ProbeIoUring({{IORING_OP_ACCEPT, "ACCEPT", "5.19"}, {IORING_OP_SENDMSG, "SENDMSG", "5.3"}});
  EXPECT_TRUE(s.ok()) << s;
}

TEST(ProbeIoUring, AnOpcodeTheKernelLacksIsNamed) {
  // Opcodes are 8 bits; no kernel has come near 250 (6.18 has ~60).
  absl::Status s = ProbeIoUring({{250, "IMAGINARY_OP", "9.9"}});
  ASSERT_FALSE(s.ok());
  EXPECT_NE(s.message().find("IMAGINARY_OP (Linux 9.9)"), std::string::npos) << s;
}

}  // namespace
}  // namespace metronome
