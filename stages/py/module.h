// `_metronome`: the native half of the `metronome` Python package (pyhandlers/metronome).
//
//   _metronome.Request      what a handler receives. Its fields are read lazily from the C++
//                           request (no Python object is made for a field nobody reads).
//   _metronome.json_loads   simdjson -> Python objects (json.h)
//   _metronome.json_dumps   Python objects -> JSON bytes, in C++
//   _metronome._set_helpers the package hands over its classes (Headers, MultiDict, HTTPError,
//                           BudgetExceeded, Response) at import
//
// Lifetime: a Request object points at its C++ request only while the python stage (or a
// plugin) works on it. Detach() cuts that link when the C++ request moves on: if Python code
// kept a reference to the object, every field is copied into Python objects first, so a kept
// request stays readable and never reads freed memory.
//
// Thread-safety: REQUIRES the GIL for everything here.
#pragma once

#include <Python.h>

#include <string>

#include "stages/http/items.h"
#include "stages/http/shared.h"

namespace metronome::py {

struct Helpers {
  PyObject* headers = nullptr;          // metronome.Headers(pairs)
  PyObject* multidict = nullptr;        // metronome.MultiDict(pairs)
  PyObject* http_error = nullptr;       // metronome.HTTPError
  PyObject* budget_exceeded = nullptr;  // metronome.BudgetExceeded
  PyObject* response = nullptr;         // metronome.Response
};
// Filled by _set_helpers when the package is imported; null members until then.
const Helpers& GetHelpers();

// Registers `_metronome` as a built-in module. REQUIRES: before Py_Initialize.
void RegisterModule();

// A new Request object for `r` (new reference, or nullptr with an exception set).
PyObject* NewRequest(http::Request* r, const http::HttpShared* shared);
// Cuts the object's link to its C++ request (see above). Never fails: on an error while copying
// fields, the object is left detached with the fields it had.
void DetachRequest(PyObject* request);
// The last Python stage to see `r` lets go of its request object (if any): detach, then drop
// the reference. REQUIRES the GIL.
void ReleaseRequestObject(http::Request* r);

// Parses application/x-www-form-urlencoded text (a query string or a form body) into a list of
// (name, value) str pairs: '+' is a space, %XX is decoded, UTF-8 with replacement characters.
PyObject* ParseUrlEncoded(const char* data, size_t len);
// Decodes %XX escapes in a path segment (UTF-8, invalid sequences replaced).
PyObject* DecodePercent(const char* data, size_t len);
// Decodes %XX (and '+' as a space when `plus`) into *out, bytes as they are.
void Unescape(const char* s, size_t n, bool plus, std::string* out);
// The peer of a connection as (host, port), e.g. ("127.0.0.1", 50412). New reference.
PyObject* PeerTuple(const sockaddr_storage& peer);

}  // namespace metronome::py
