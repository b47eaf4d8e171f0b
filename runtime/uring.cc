#include "runtime/uring.h"

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <fstream>

#include "absl/strings/str_cat.h"
#include "runtime/log.h"

namespace metronome {
namespace {

std::string DisabledSysctl() {
  std::ifstream in("/proc/sys/kernel/io_uring_disabled");
  int v = 0;
  if (in >> v && v != 0) {
    return absl::StrCat(" /proc/sys/kernel/io_uring_disabled is ", v,
                        v == 2 ? " (disabled for everyone: set it to 0)"
                               : " (only the io_uring_group may use it: set it to 0 or run as "
                                 "a member of that group)");
  }
  return "";
}

std::string SetupFailure(int err, const char* what) {
  switch (err) {
    case ENOSYS:
      return absl::StrCat(what, ": io_uring_setup is not implemented: the kernel lacks "
                          "CONFIG_IO_URING, or a seccomp filter (Docker's default profile, for "
                          "one) blocks it; run with --security-opt seccomp=unconfined or on a "
                          "kernel >= 6.1");
    case EPERM:
      return absl::StrCat(what, ": io_uring_setup not permitted.", DisabledSysctl(),
                          " A seccomp filter in a container has the same effect.");
    case EINVAL:
      return absl::StrCat(what, ": the kernel refused IORING_SETUP_SINGLE_ISSUER|DEFER_TASKRUN; "
                          "they need Linux >= 6.1");
    case ENOMEM:
      return absl::StrCat(what, ": out of locked memory for the ring; raise RLIMIT_MEMLOCK "
                          "(ulimit -l)");
    default:
      return absl::StrCat(what, ": ", std::strerror(err));
  }
}

}  // namespace

Ring::~Ring() {
  if (initialized_) io_uring_queue_exit(&ring_);
}

absl::Status Ring::Init(unsigned entries) {
  io_uring_params params{};
  // SUBMIT_ALL: one bad SQE must not strand the rest of a batch. A CQ four times the SQ absorbs
  // multishot completions (accept, recv) that arrive between two reaps.
  params.flags = IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN |
                 IORING_SETUP_SUBMIT_ALL | IORING_SETUP_CQSIZE;
  params.cq_entries = entries * 4;
  int rc = io_uring_queue_init_params(entries, &ring_, &params);
  if (rc < 0) return absl::UnavailableError(SetupFailure(-rc, "io_uring"));
  initialized_ = true;
  return absl::OkStatus();
}

io_uring_sqe* Ring::GetSqe() {
  io_uring_sqe* sqe = io_uring_get_sqe(&ring_);
  if (sqe != nullptr) return sqe;
  int rc = io_uring_submit(&ring_);
  if (rc < 0 && rc != -EBUSY && rc != -EAGAIN) {
    Fatal("io_uring_submit failed while the SQ was full: %s", std::strerror(-rc));
  }
  sqe = io_uring_get_sqe(&ring_);
  if (sqe == nullptr) Fatal("io_uring SQ still full after submitting");
  return sqe;
}

absl::Status ProbeIoUring(const std::vector<RingOp>& ops) {
  io_uring ring{};
  io_uring_params params{};
  params.flags = IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN;
  int rc = io_uring_queue_init_params(8, &ring, &params);
  if (rc < 0) return absl::UnavailableError(SetupFailure(-rc, "io_uring probe"));
  std::vector<RingOp> needed = ops;
  needed.push_back({IORING_OP_READ, "READ (the lane's eventfd)", "5.6"});
  needed.push_back({IORING_OP_POLL_ADD, "POLL_ADD (a stage's wait fd)", "5.1"});
  io_uring_probe* probe = io_uring_get_probe_ring(&ring);
  std::string missing;
  if (probe == nullptr) {
    missing = "the opcode probe itself (kernel < 5.6)";
  } else {
    for (const RingOp& n : needed) {
      if (!io_uring_opcode_supported(probe, n.op)) {
        absl::StrAppend(&missing, missing.empty() ? "" : ", ", n.name, " (Linux ", n.since, ")");
      }
    }
    io_uring_free_probe(probe);
  }
  // Provided-buffer rings (IORING_REGISTER_PBUF_RING) arrived in 5.19.
  io_uring_buf_reg reg{};
  void* mem = nullptr;
  if (posix_memalign(&mem, 4096, 4096) == 0) {
    reg.ring_addr = reinterpret_cast<uint64_t>(mem);
    reg.ring_entries = 8;
    reg.bgid = 0;
    int r = io_uring_register_buf_ring(&ring, &reg, 0);
    if (r < 0) absl::StrAppend(&missing, missing.empty() ? "" : ", ", "registered buffer rings (Linux 5.19)");
    else io_uring_unregister_buf_ring(&ring, 0);
    free(mem);
  }
  bool nodrop = params.features & IORING_FEAT_NODROP;
  io_uring_queue_exit(&ring);
  if (!nodrop) absl::StrAppend(&missing, missing.empty() ? "" : ", ", "IORING_FEAT_NODROP (Linux 5.5)");
  if (!missing.empty()) {
    return absl::UnavailableError(absl::StrCat("io_uring lacks what metronome needs: ", missing,
                                               ". Upgrade to Linux >= 6.1."));
  }
  return absl::OkStatus();
}

}  // namespace metronome
