#include "stages/py/wsgi.h"

#include <strings.h>

#include "runtime/log.h"
#include "stages/py/convert.h"
#include "stages/py/interpreter.h"
#include "stages/py/module.h"

namespace metronome::py::wsgi {
namespace {

PyObject* g_bytes_io = nullptr;      // io.BytesIO
PyObject* g_errors = nullptr;        // metronome._wsgi.ErrorStream()
PyObject* g_file_wrapper = nullptr;  // metronome._wsgi.FileWrapper
PyObject* g_version = nullptr;       // (1, 0)

// --- start_response ---------------------------------------------------------------------

struct StartResponse {
  PyObject_HEAD
  PyObject* status;   // str, or nullptr before the call
  PyObject* headers;  // list of (str, str)
  std::string* written;  // write()'s bytes not yet taken
  bool headers_sent;
};

PyObject* Write(StartResponse* self, PyObject* data) {
  if (!PyBytes_Check(data)) {
    PyErr_Format(PyExc_TypeError, "write() takes bytes, not %s (PEP 3333)", Py_TYPE(data)->tp_name);
    return nullptr;
  }
  if (self->status == nullptr) {
    PyErr_SetString(PyExc_RuntimeError, "write() before start_response()");
    return nullptr;
  }
  self->written->append(PyBytes_AS_STRING(data), static_cast<size_t>(PyBytes_GET_SIZE(data)));
  Py_RETURN_NONE;
}

PyMethodDef kWriteDef = {"write", reinterpret_cast<PyCFunction>(Write), METH_O,
                         "PEP 3333 write(): bytes sent before the iterable's."};

PyObject* Call(StartResponse* self, PyObject* args, PyObject* kwargs) {
  static const char* kw[] = {"status", "headers", "exc_info", nullptr};
  PyObject *status, *headers, *exc_info = Py_None;
  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "UO|O:start_response", const_cast<char**>(kw), &status, &headers,
                                   &exc_info)) {
    return nullptr;
  }
  if (exc_info != Py_None) {
    if (self->headers_sent) {
      // PEP 3333: too late to change the head: re-raise what the app is handling.
      PyObject *type = nullptr, *value = nullptr, *tb = nullptr;
      if (!PyArg_ParseTuple(exc_info, "OOO", &type, &value, &tb)) return nullptr;
      PyErr_Restore(Py_NewRef(type), Py_NewRef(value), tb == Py_None ? nullptr : Py_NewRef(tb));
      return nullptr;
    }
  } else if (self->status != nullptr) {
    PyErr_SetString(PyExc_RuntimeError, "start_response() called twice without exc_info (PEP 3333)");
    return nullptr;
  }
  if (!PyList_Check(headers)) {
    PyErr_Format(PyExc_TypeError, "start_response() headers must be a list, not %s", Py_TYPE(headers)->tp_name);
    return nullptr;
  }
  Py_INCREF(status);
  Py_XSETREF(self->status, status);
  Py_INCREF(headers);
  Py_XSETREF(self->headers, headers);
  return PyCFunction_New(&kWriteDef, reinterpret_cast<PyObject*>(self));
}

void Dealloc(StartResponse* self) {
  Py_CLEAR(self->status);
  Py_CLEAR(self->headers);
  delete self->written;
  Py_TYPE(self)->tp_free(reinterpret_cast<PyObject*>(self));
}

PyTypeObject StartResponseType = [] {
  PyTypeObject t{PyVarObject_HEAD_INIT(nullptr, 0)};
  t.tp_name = "_metronome.StartResponse";
  t.tp_basicsize = sizeof(StartResponse);
  t.tp_dealloc = reinterpret_cast<destructor>(Dealloc);
  t.tp_call = reinterpret_cast<ternaryfunc>(Call);
  t.tp_flags = Py_TPFLAGS_DEFAULT;
  t.tp_doc = "PEP 3333 start_response(status, headers, exc_info=None) -> write";
  return t;
}();

StartResponse* Self(PyObject* o) { return reinterpret_cast<StartResponse*>(o); }

void SetItem(PyObject* env, const char* key, PyObject* value) {
  if (value == nullptr) {
    PyErr_Clear();
    return;
  }
  PyDict_SetItemString(env, key, value);
  Py_DECREF(value);
}

bool NameIs(std::string_view name, const char* want) {
  return name.size() == strlen(want) && strncasecmp(name.data(), want, name.size()) == 0;
}

}  // namespace

bool Init() {
  if (PyType_Ready(&StartResponseType) < 0) return false;
  PyObject* io = PyImport_ImportModule("io");
  g_bytes_io = io ? PyObject_GetAttrString(io, "BytesIO") : nullptr;
  Py_XDECREF(io);
  PyObject* helpers = PyImport_ImportModule("metronome._wsgi");
  PyObject* errors_class = helpers ? PyObject_GetAttrString(helpers, "ErrorStream") : nullptr;
  g_errors = errors_class ? PyObject_CallNoArgs(errors_class) : nullptr;
  Py_XDECREF(errors_class);
  g_file_wrapper = helpers ? PyObject_GetAttrString(helpers, "FileWrapper") : nullptr;
  Py_XDECREF(helpers);
  g_version = Py_BuildValue("(ii)", 1, 0);
  return g_bytes_io && g_errors && g_file_wrapper && g_version;
}

PyObject* NewEnviron(const http::Request& r, const http::HttpShared& shared, const ServerInfo& info) {
  const http::RequestHead& h = r.head;
  PyObject* env = PyDict_New();
  if (env == nullptr) return nullptr;
  SetItem(env, "REQUEST_METHOD", PyUnicode_DecodeLatin1(h.method.data(), static_cast<Py_ssize_t>(h.method.size()), nullptr));
  SetItem(env, "SCRIPT_NAME", PyUnicode_FromStringAndSize("", 0));
  // PEP 3333: PATH_INFO is the decoded path's bytes as a latin-1 str (the app re-encodes it).
  std::string path;
  const std::string_view p = r.path.data() != nullptr ? r.path : h.path;
  Unescape(p.data(), p.size(), false, &path);
  SetItem(env, "PATH_INFO", PyUnicode_DecodeLatin1(path.data(), static_cast<Py_ssize_t>(path.size()), nullptr));
  SetItem(env, "QUERY_STRING", PyUnicode_DecodeLatin1(h.query.data(), static_cast<Py_ssize_t>(h.query.size()), nullptr));
  std::string key;
  for (size_t i = 0; i < h.num_headers; ++i) {
    const http::Header& f = h.headers[i];
    PyObject* value = PyUnicode_DecodeLatin1(f.value.data(), static_cast<Py_ssize_t>(f.value.size()), nullptr);
    if (value == nullptr) {
      PyErr_Clear();
      continue;
    }
    if (NameIs(f.name, "content-type")) {
      key = "CONTENT_TYPE";
    } else if (NameIs(f.name, "content-length")) {
      key = "CONTENT_LENGTH";
    } else {
      // A name with '_' would collide with the '-' spelling once both become '_' (a header
      // smuggled past a proxy that checks X-Real-IP as X_Real_IP): dropped, as gunicorn does.
      if (f.name.find('_') != std::string_view::npos) {
        Py_DECREF(value);
        continue;
      }
      key = "HTTP_";
      for (char c : f.name) key += c == '-' ? '_' : static_cast<char>(c >= 'a' && c <= 'z' ? c - 32 : c);
    }
    PyObject* existing = PyDict_GetItemString(env, key.c_str());  // borrowed
    if (existing != nullptr && key[0] == 'H') {
      // Repeated fields are one, joined by ", " (PEP 3333, RFC 9110 5.3).
      PyObject* joined = PyUnicode_FromFormat("%U, %U", existing, value);
      Py_DECREF(value);
      value = joined;
    }
    SetItem(env, key.c_str(), value);
  }
  SetItem(env, "SERVER_NAME", PyUnicode_FromStringAndSize(info.server_name.data(), static_cast<Py_ssize_t>(info.server_name.size())));
  SetItem(env, "SERVER_PORT", PyUnicode_FromStringAndSize(info.server_port.data(), static_cast<Py_ssize_t>(info.server_port.size())));
  SetItem(env, "SERVER_PROTOCOL", PyUnicode_FromString(h.version_minor == 0 ? "HTTP/1.0" : "HTTP/1.1"));
  PyObject* peer = PeerTuple(shared.conns.peer(r.conn));
  if (peer != nullptr) {
    PyDict_SetItemString(env, "REMOTE_ADDR", PyTuple_GET_ITEM(peer, 0));
    SetItem(env, "REMOTE_PORT", PyObject_Str(PyTuple_GET_ITEM(peer, 1)));
    Py_DECREF(peer);
  }
  PyDict_SetItemString(env, "wsgi.version", g_version);
  SetItem(env, "wsgi.url_scheme", PyUnicode_FromString("http"));
  PyObject* body = PyBytes_FromStringAndSize(r.body.data(), static_cast<Py_ssize_t>(r.body.size()));
  SetItem(env, "wsgi.input", body ? PyObject_CallOneArg(g_bytes_io, body) : nullptr);
  Py_XDECREF(body);
  PyDict_SetItemString(env, "wsgi.errors", g_errors);
  PyDict_SetItemString(env, "wsgi.multithread", info.multithread ? Py_True : Py_False);
  PyDict_SetItemString(env, "wsgi.multiprocess", info.multiprocess ? Py_True : Py_False);
  PyDict_SetItemString(env, "wsgi.run_once", Py_False);
  // The body was read whole before the call: reading wsgi.input to its end is safe.
  PyDict_SetItemString(env, "wsgi.input_terminated", Py_True);
  PyDict_SetItemString(env, "wsgi.file_wrapper", g_file_wrapper);
  SetItem(env, "metronome.request_id", PyUnicode_FromStringAndSize(r.request_id, r.request_id_len));
  if (PyErr_Occurred()) {
    Py_DECREF(env);
    return nullptr;
  }
  return env;
}

PyObject* NewStartResponse() {
  auto* self = PyObject_New(StartResponse, &StartResponseType);
  if (self == nullptr) return nullptr;
  self->status = nullptr;
  self->headers = nullptr;
  self->written = new std::string();
  self->headers_sent = false;
  return reinterpret_cast<PyObject*>(self);
}

bool Called(PyObject* sr) { return Self(sr)->status != nullptr; }
bool HasWritten(PyObject* sr) { return !Self(sr)->written->empty(); }

bool TakeWritten(PyObject* sr, std::string* out) {
  std::string& w = *Self(sr)->written;
  if (w.empty()) return false;
  out->append(w);
  w.clear();
  return true;
}

void MarkHeadersSent(PyObject* sr) { Self(sr)->headers_sent = true; }

bool FillHead(PyObject* sr, http::Response* resp) {
  StartResponse* self = Self(sr);
  if (self->status == nullptr) {
    PyErr_SetString(PyExc_RuntimeError, "the WSGI app returned without calling start_response()");
    return false;
  }
  // "200 OK": the code, then the reason (serialize writes its own phrase for the code).
  Py_ssize_t n;
  const char* s = PyUnicode_AsUTF8AndSize(self->status, &n);
  if (s == nullptr) return false;
  if (n < 3 || !(s[0] >= '1' && s[0] <= '5') || !(s[1] >= '0' && s[1] <= '9') || !(s[2] >= '0' && s[2] <= '9') ||
      (n > 3 && s[3] != ' ')) {
    PyErr_Format(PyExc_ValueError, "WSGI status %R is not \"NNN Reason\"", self->status);
    return false;
  }
  resp->status = (s[0] - '0') * 100 + (s[1] - '0') * 10 + (s[2] - '0');
  const Py_ssize_t count = PyList_GET_SIZE(self->headers);
  for (Py_ssize_t i = 0; i < count; ++i) {
    PyObject* pair = PyList_GET_ITEM(self->headers, i);
    PyObject *k, *v;
    if (!PyTuple_Check(pair) || PyTuple_GET_SIZE(pair) != 2 || !PyUnicode_Check(k = PyTuple_GET_ITEM(pair, 0)) ||
        !PyUnicode_Check(v = PyTuple_GET_ITEM(pair, 1))) {
      PyErr_Format(PyExc_TypeError, "WSGI headers must be (str, str) tuples, got %R", pair);
      return false;
    }
    http::ExtraHeader field;
    Py_ssize_t kn, vn;
    const char* ks = PyUnicode_AsUTF8AndSize(k, &kn);
    const char* vs = ks ? PyUnicode_AsUTF8AndSize(v, &vn) : nullptr;
    if (vs == nullptr) return false;
    field.name.assign(ks, static_cast<size_t>(kn));
    field.value.assign(vs, static_cast<size_t>(vn));
    if (!AddField(std::move(field), resp)) return false;
  }
  return true;
}

void CloseIterable(PyObject* iterable, const char* label) {
  if (iterable == nullptr || !PyObject_HasAttrString(iterable, "close")) return;
  PyObject* r = PyObject_CallMethod(iterable, "close", nullptr);
  if (r == nullptr) {
    LOG_RATE_LIMITED(LogLevel::kError, "%s: the WSGI iterable's close() raised:\n%s", label, FetchTraceback().c_str());
  }
  Py_XDECREF(r);
}

}  // namespace metronome::py::wsgi
