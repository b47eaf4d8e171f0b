// A handler's result (or exception) to the native Response that serialize writes.
//
// Return conventions (README "Handlers"):
//   dict or list                -> 200 application/json, encoded in C++ (json.h)
//   str                         -> 200 text/plain; charset=utf-8
//   bytes, bytearray, memoryview-> 200 application/octet-stream
//   None                        -> 204 No Content
//   metronome.Response          -> its status, headers, content_type and body (any of the above)
//   (body, status) or (body, status, headers)
//   an iterator or generator of str/bytes -> 200, chunked framing (collected under the GIL)
//   metronome.HTTPError raised  -> its status; detail as text, or JSON when a dict or list
//
// Thread-safety: REQUIRES the GIL.
#pragma once

#include <Python.h>

#include <string>

#include "stages/http/items.h"

namespace metronome::py {

// Fills *resp from a handler's result. On failure returns false with a Python exception set
// (TypeError for an unsupported result; the caller answers 500).
bool ResultToResponse(PyObject* result, http::Response* resp);

// If the pending exception is a metronome.HTTPError, fills *resp from it, clears it and returns
// true. Otherwise leaves the exception pending and returns false.
bool HttpErrorToResponse(http::Response* resp);

// Replaces *resp with the 500 every Python failure gets (the cause goes to the log only).
void SetInternalError(http::Response* resp);

// A metronome.Response object with the response's status, headers, content type and body (for
// plugins' on_response). New reference, or nullptr with an exception set.
PyObject* ResponseToPython(const http::Response& resp);

}  // namespace metronome::py
