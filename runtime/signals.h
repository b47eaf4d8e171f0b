// Process signals: SIGINT/SIGTERM begin a graceful drain of the pipeline; a second one exits at
// once. SIGPIPE is ignored (a peer that vanished is an error code on its socket, not a reason
// to die). SIGXCPU (deadline overruns) is handled per lane in pipeline.cc.
//
// Thread-safety: install once from the main thread before the pipeline runs.
#pragma once

#include <functional>

namespace metronome {

// `on_stop` runs inside the signal handler: it must be async-signal-safe (Pipeline::RequestStop
// is). The second signal calls _exit(128 + signo), after moving every registered thread back to
// SCHED_OTHER.
void InstallStopSignals(void (*on_stop)(void*), void* arg);

// Records a SCHED_DEADLINE thread (its kernel tid) so that an immediate exit first returns it to
// SCHED_OTHER. Why: a deadline thread killed while throttled was seen (kernel 6.18) to never get
// its replenishment, staying behind as a running zombie that holds its bandwidth until someone
// changes its policy. Lock-free; at most kDeadlineThreadsMax are kept.
inline constexpr int kDeadlineThreadsMax = 64;
void RegisterDeadlineThread(int tid);
// Returns every registered thread to SCHED_OTHER (before an exit that skips the drain).
// Async-signal-safe.
void ResetDeadlineThreadsToOther();

}  // namespace metronome
