// Process signals: SIGINT/SIGTERM begin a graceful drain of the pipeline; a second one exits at
// once. SIGPIPE is ignored (a peer that vanished is an error code on its socket, not a reason
// to die). SIGXCPU (deadline overruns) is handled per lane in pipeline.cc.
//
// Thread-safety: install once from the main thread before the pipeline runs.
#pragma once

#include <functional>

namespace metronome {

// `on_stop` runs inside the signal handler: it must be async-signal-safe (Pipeline::RequestStop
// is). The second signal calls _exit(128 + signo).
void InstallStopSignals(void (*on_stop)(void*), void* arg);

}  // namespace metronome
