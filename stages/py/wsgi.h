// WSGI (PEP 3333) on a python lane: the environ of a request, and start_response.
//
// The python stage calls app(environ, start_response) under the request's budgets, then:
//   - an iterable of at most one item (a list or tuple) with no write() data is a body known
//     whole: Content-Length (and the app's own Content-Length must match it, else a 500);
//   - anything else is streamed through the stream machinery (stages/http/stream.h): write()
//     data first, then the items; chunked, or exactly the app's Content-Length (a body that
//     does not honour it is cut and the connection closed, never mis-framed).
// start_response may be called late (a generator that calls it at its first item): the head
// is built after the first step. close() of the iterable is called in every case.
//
// Thread-safety: REQUIRES the GIL.
#pragma once

#include <Python.h>

#include <string>

#include "stages/http/items.h"
#include "stages/http/shared.h"

namespace metronome::py::wsgi {

// Once per process (the GIL held): the types and the metronome._wsgi helpers.
bool Init();

// What every environ of this server shares.
struct ServerInfo {
  std::string server_name, server_port;
  bool multithread = false;   // more than one python lane may call the app at once
  bool multiprocess = false;  // more than one process serves the app
};

// The environ for `r` (new reference), with wsgi.errors writing to the server log.
PyObject* NewEnviron(const http::Request& r, const http::HttpShared& shared, const ServerInfo& info);

// A start_response callable for one request (new reference).
PyObject* NewStartResponse();

// start_response's state, read by the python stage.
bool Called(PyObject* start_response);
bool HasWritten(PyObject* start_response);
// Moves what write() was given so far into *out (appended); false when there was none.
bool TakeWritten(PyObject* start_response, std::string* out);
// Marks the head as sent: a later start_response with exc_info re-raises it (PEP 3333).
void MarkHeadersSent(PyObject* start_response);
// The status and headers start_response was given, into *resp (fields under fields.h's
// rules). False with an exception set when it was not called or gave something invalid.
bool FillHead(PyObject* start_response, http::Response* resp);

// Calls iterable.close() if it has one (PEP 3333: in every case); a raise is logged.
void CloseIterable(PyObject* iterable, const char* label);

}  // namespace metronome::py::wsgi
