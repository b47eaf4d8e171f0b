// A handler's result (or exception) to the native Response that serialize writes.
//
// Return conventions (README "Handlers"):
//   dict or list                -> 200 application/json, encoded in C++ (json.h)
//   str                         -> 200 text/plain; charset=utf-8
//   bytes, bytearray, memoryview-> 200 application/octet-stream
//   None                        -> 204 No Content
//   metronome.Response          -> its status, headers, content_type and body (any of the above)
//   (body, status) or (body, status, headers)
//   an iterator or generator of str/bytes -> 200, streamed: resp->stream_source holds it (a new
//                                 reference) and the python stage steps it (stream.h)
// Header fields go through http::CheckResponseField (fields.h): invalid ones fail the
// conversion; framing, Date and Server belong to the server.
//   metronome.HTTPError raised  -> its status; detail as text, or JSON when a dict or list
//
// Thread-safety: REQUIRES the GIL.
#pragma once

#include <Python.h>

#include <string>

#include "stages/http/items.h"

namespace metronome::py {

// Fills *resp from a handler's result. On failure returns false with a Python exception set
// (TypeError for an unsupported result, ValueError for an invalid field or a Content-Length
// that disagrees with the body; the caller answers 500) and no stream source held.
bool ResultToResponse(PyObject* result, http::Response* resp);

// One field from the app into *resp under the rules of fields.h; false with ValueError set when
// it is invalid. Also used by the WSGI and ASGI adapters.
bool AddField(http::ExtraHeader field, http::Response* resp);
// After the fields and body: a declared Content-Length becomes a stream's framing, and must
// match a body known whole (false with ValueError set otherwise).
bool SettleFraming(http::Response* resp);
// Releases a stream source still held by *resp (the response is then not streamed).
void DropStreamSource(http::Response* resp);
// Fields the server owns that apps tried to set (dropped), process-wide.
uint64_t ServerOwnedFieldsDropped();

// If the pending exception is a metronome.HTTPError, fills *resp from it, clears it and returns
// true. Otherwise leaves the exception pending and returns false.
bool HttpErrorToResponse(http::Response* resp);

// Replaces *resp with the 500 every Python failure gets (the cause goes to the log only).
void SetInternalError(http::Response* resp);

// A metronome.Response object with the response's status, headers, content type and body (for
// plugins' on_response). New reference, or nullptr with an exception set.
PyObject* ResponseToPython(const http::Response& resp);

}  // namespace metronome::py
