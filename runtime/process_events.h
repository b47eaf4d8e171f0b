// Events a stage reports to whoever manages this process (a worker's supervisor), as lines of
// text ("stuck\n"): the runtime passes them on and knows nothing of their meaning.
//
// Thread-safety: SetProcessEventSink once, before the pipeline runs; ReportProcessEvent from any
// thread (the sink must be thread-safe; the supervisor's is one write(2)).
#pragma once

#include <atomic>

namespace metronome {

using ProcessEventSink = void (*)(const char* line);

inline std::atomic<ProcessEventSink>& ProcessEventSinkSlot() {
  static std::atomic<ProcessEventSink> sink{nullptr};
  return sink;
}
inline void SetProcessEventSink(ProcessEventSink sink) { ProcessEventSinkSlot().store(sink); }
inline void ReportProcessEvent(const char* line) {
  if (ProcessEventSink sink = ProcessEventSinkSlot().load()) sink(line);
}

}  // namespace metronome
