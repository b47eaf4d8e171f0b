// The embedded CPython interpreter: one per process, initialised by the python stage on the
// process's main thread (the only thread Py_AddPendingCall reaches, which the budgets rely on).
//
// Thread-safety: Initialize/Finalize on the main thread only. The helpers REQUIRE the GIL.
#pragma once

#include <Python.h>

#include <string>
#include <vector>

#include "absl/status/status.h"

namespace metronome::py {

struct InterpreterOptions {
  std::vector<std::string> path;  // prepended to sys.path (relative to the working directory)
  // Runs after pre-initialisation and before the interpreter allocates: the place to install
  // allocator wrappers (PyMem_SetAllocator).
  void (*before_init)() = nullptr;
};

// Starts the interpreter with Debian's standard library, without Python's own signal handlers
// (the server owns SIGINT/SIGTERM), with `_metronome` built in and the metronome package on the
// path. Returns holding the GIL.
absl::Status Initialize(const InterpreterOptions& options);
bool Initialized();
// Finalises (REQUIRES the GIL, on the main thread).
void Finalize();

// "package.module:attr" -> new reference, or an error carrying the traceback.
absl::Status ImportObject(const std::string& spec, PyObject** out);

// The pending exception formatted as Python prints it (and cleared).
std::string FetchTraceback();
// The pending exception as "Type: message" (and cleared).
std::string FetchExceptionLine();

}  // namespace metronome::py
