#include "stages/py/module.h"

#include "runtime/log.h"

#include <arpa/inet.h>

#include <string>

#include "stages/http/router.h"
#include "stages/py/json.h"

namespace metronome::py {
namespace {
int HexValue(char c);
}  // namespace

// Decodes %XX (and '+' as space when `plus`) into *out.
void Unescape(const char* s, size_t n, bool plus, std::string* out) {
  out->clear();
  out->reserve(n);
  for (size_t i = 0; i < n; ++i) {
    char c = s[i];
    if (c == '%' && i + 2 < n) {
      int hi = HexValue(s[i + 1]);
      int lo = HexValue(s[i + 2]);
      if (hi >= 0 && lo >= 0) {
        out->push_back(static_cast<char>(hi * 16 + lo));
        i += 2;
        continue;
      }
    }
    out->push_back(plus && c == '+' ? ' ' : c);
  }
}

PyObject* PeerTuple(const sockaddr_storage& peer) {
  char host[INET6_ADDRSTRLEN] = "";
  int port = 0;
  if (peer.ss_family == AF_INET) {
    const auto* a = reinterpret_cast<const sockaddr_in*>(&peer);
    inet_ntop(AF_INET, &a->sin_addr, host, sizeof host);
    port = ntohs(a->sin_port);
  } else if (peer.ss_family == AF_INET6) {
    const auto* a = reinterpret_cast<const sockaddr_in6*>(&peer);
    inet_ntop(AF_INET6, &a->sin6_addr, host, sizeof host);
    port = ntohs(a->sin6_port);
  }
  return Py_BuildValue("(si)", host, port);
}

namespace {

Helpers g_helpers;

int HexValue(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

PyObject* Utf8(const std::string& s) {
  return PyUnicode_DecodeUTF8(s.data(), static_cast<Py_ssize_t>(s.size()), "replace");
}

PyObject* Latin1(std::string_view s) {
  return PyUnicode_DecodeLatin1(s.data(), static_cast<Py_ssize_t>(s.size()), nullptr);
}

PyObject* RaiseHttpError(int status, const std::string& detail) {
  if (g_helpers.http_error == nullptr) {
    PyErr_SetString(PyExc_ValueError, detail.c_str());
    return nullptr;
  }
  PyObject* exc = PyObject_CallFunction(g_helpers.http_error, "is", status, detail.c_str());
  if (exc != nullptr) {
    PyErr_SetObject(reinterpret_cast<PyObject*>(Py_TYPE(exc)), exc);
    Py_DECREF(exc);
  }
  return nullptr;
}

// --- Request -----------------------------------------------------------------------------

enum Field { kMethod, kPath, kRawPath, kTarget, kQueryString, kQuery, kHeaders, kBody, kClient, kParams, kVersion, kRequestId, kFields };

struct RequestObject {
  PyObject_HEAD
  http::Request* req;
  const http::HttpShared* shared;
  PyObject* cache[kFields];
  PyObject* state;
};

PyObject* Make(RequestObject* self, int field) {
  http::Request* r = self->req;
  const http::RequestHead& h = r->head;
  switch (field) {
    case kMethod: {
      static PyObject* interned[http::kRouteMethods] = {};
      int m = static_cast<int>(h.method_id);
      if (m < http::kRouteMethods) {
        if (interned[m] == nullptr) interned[m] = PyUnicode_InternFromString(http::MethodName(h.method_id));
        Py_INCREF(interned[m]);
        return interned[m];
      }
      return Latin1(h.method);
    }
    case kPath: {
      // The normalised path (stages/http/path.h), fully decoded.
      std::string s;
      const std::string_view p = r->path.data() != nullptr ? r->path : h.path;
      Unescape(p.data(), p.size(), false, &s);
      return Utf8(s);
    }
    case kRawPath: return Latin1(h.path);
    case kTarget: return Latin1(h.target);
    case kQueryString: return Latin1(h.query);
    case kQuery: {
      PyObject* pairs = ParseUrlEncoded(h.query.data(), h.query.size());
      if (pairs == nullptr || g_helpers.multidict == nullptr) return pairs;
      PyObject* md = PyObject_CallOneArg(g_helpers.multidict, pairs);
      Py_DECREF(pairs);
      return md;
    }
    case kHeaders: {
      PyObject* pairs = PyList_New(static_cast<Py_ssize_t>(h.num_headers));
      if (pairs == nullptr) return nullptr;
      for (size_t i = 0; i < h.num_headers; ++i) {
        PyObject* k = Latin1(h.headers[i].name);
        PyObject* v = Latin1(h.headers[i].value);
        PyObject* t = (k && v) ? PyTuple_Pack(2, k, v) : nullptr;
        Py_XDECREF(k);
        Py_XDECREF(v);
        if (t == nullptr) {
          Py_DECREF(pairs);
          return nullptr;
        }
        PyList_SET_ITEM(pairs, static_cast<Py_ssize_t>(i), t);
      }
      if (g_helpers.headers == nullptr) return pairs;
      PyObject* hd = PyObject_CallOneArg(g_helpers.headers, pairs);
      Py_DECREF(pairs);
      return hd;
    }
    case kBody: return PyBytes_FromStringAndSize(r->body.data(), static_cast<Py_ssize_t>(r->body.size()));
    case kClient: return PeerTuple(self->shared->conns.peer(r->conn));
    case kParams: {
      PyObject* d = PyDict_New();
      if (d == nullptr) return nullptr;
      for (int i = 0; i < r->num_params; ++i) {
        const http::PathParam& p = r->params[i];
        PyObject* v = p.type == http::ParamType::kInt ? PyLong_FromLongLong(p.int_value)
                                                       : DecodePercent(p.value.data(), p.value.size());
        if (v == nullptr || PyDict_SetItemString(d, std::string(p.name).c_str(), v) < 0) {
          Py_XDECREF(v);
          Py_DECREF(d);
          return nullptr;
        }
        Py_DECREF(v);
      }
      return d;
    }
    case kVersion: return PyUnicode_FromString(h.version_minor == 0 ? "1.0" : "1.1");
    case kRequestId: return PyUnicode_FromStringAndSize(r->request_id, r->request_id_len);
  }
  Py_RETURN_NONE;
}

PyObject* Get(RequestObject* self, void* closure) {
  int field = static_cast<int>(reinterpret_cast<intptr_t>(closure));
  PyObject*& slot = self->cache[field];
  if (slot == nullptr) {
    if (self->req == nullptr) {
      PyErr_SetString(PyExc_RuntimeError, "request field not available after the request completed");
      return nullptr;
    }
    slot = Make(self, field);
    if (slot == nullptr) return nullptr;
  }
  Py_INCREF(slot);
  return slot;
}

PyObject* GetState(RequestObject* self, void*) {
  if (self->state == nullptr && (self->state = PyDict_New()) == nullptr) return nullptr;
  Py_INCREF(self->state);
  return self->state;
}

// The body bytes: in place while attached, else from the cached bytes object.
bool BodyView(RequestObject* self, const char** data, size_t* len) {
  if (self->req != nullptr) {
    *data = self->req->body.data();
    *len = self->req->body.size();
    return true;
  }
  PyObject* b = self->cache[kBody];
  if (b == nullptr) {
    PyErr_SetString(PyExc_RuntimeError, "request body not available after the request completed");
    return false;
  }
  *data = PyBytes_AS_STRING(b);
  *len = static_cast<size_t>(PyBytes_GET_SIZE(b));
  return true;
}

PyObject* Json(RequestObject* self, PyObject*) {
  const char* data;
  size_t len;
  if (!BodyView(self, &data, &len)) return nullptr;
  std::string error;
  PyObject* v = JsonToPython(data, len, &error);
  if (v == nullptr && !error.empty()) return RaiseHttpError(400, error);
  return v;
}

PyObject* Text(RequestObject* self, PyObject*) {
  const char* data;
  size_t len;
  if (!BodyView(self, &data, &len)) return nullptr;
  PyObject* s = PyUnicode_DecodeUTF8(data, static_cast<Py_ssize_t>(len), "strict");
  if (s == nullptr && PyErr_ExceptionMatches(PyExc_UnicodeDecodeError)) {
    PyErr_Clear();
    return RaiseHttpError(400, "request body is not valid UTF-8");
  }
  return s;
}

PyObject* Form(RequestObject* self, PyObject*) {
  const char* data;
  size_t len;
  if (!BodyView(self, &data, &len)) return nullptr;
  PyObject* pairs = ParseUrlEncoded(data, len);
  if (pairs == nullptr || g_helpers.multidict == nullptr) return pairs;
  PyObject* md = PyObject_CallOneArg(g_helpers.multidict, pairs);
  Py_DECREF(pairs);
  return md;
}

PyObject* Repr(RequestObject* self) {
  PyObject* m = Get(self, reinterpret_cast<void*>(kMethod));
  PyObject* t = m ? Get(self, reinterpret_cast<void*>(kTarget)) : nullptr;
  PyObject* out = t ? PyUnicode_FromFormat("<Request %U %U>", m, t) : nullptr;
  Py_XDECREF(m);
  Py_XDECREF(t);
  if (out == nullptr) {
    PyErr_Clear();
    return PyUnicode_FromString("<Request>");
  }
  return out;
}

void Dealloc(RequestObject* self) {
  for (PyObject*& p : self->cache) Py_CLEAR(p);
  Py_CLEAR(self->state);
  Py_TYPE(self)->tp_free(reinterpret_cast<PyObject*>(self));
}

#define FIELD(name, f, doc) {const_cast<char*>(name), reinterpret_cast<getter>(Get), nullptr, const_cast<char*>(doc), reinterpret_cast<void*>(f)}
PyGetSetDef kGetSet[] = {
    FIELD("method", kMethod, "The request method, e.g. 'GET'."),
    FIELD("path", kPath, "The path, percent-decoded (UTF-8)."),
    FIELD("raw_path", kRawPath, "The path as received."),
    FIELD("target", kTarget, "The request-target as received (path and query)."),
    FIELD("query_string", kQueryString, "The query as received, without '?'."),
    FIELD("query", kQuery, "The query parameters: a MultiDict."),
    FIELD("headers", kHeaders, "The header fields: case-insensitive Headers."),
    FIELD("body", kBody, "The body, bytes."),
    FIELD("client", kClient, "The peer address: (host, port)."),
    FIELD("params", kParams, "The path parameters: a dict, {id:int} values as int."),
    FIELD("http_version", kVersion, "'1.1' or '1.0'."),
    FIELD("request_id", kRequestId, "The client's X-Request-Id, or the one the server made."),
    {const_cast<char*>("state"), reinterpret_cast<getter>(GetState), nullptr,
     const_cast<char*>("A dict for plugins and handlers to share per-request data."), nullptr},
    {nullptr, nullptr, nullptr, nullptr, nullptr}};
#undef FIELD

PyMethodDef kMethods[] = {
    {"json", reinterpret_cast<PyCFunction>(Json), METH_NOARGS,
     "The body parsed as JSON (simdjson). Invalid JSON raises HTTPError(400)."},
    {"text", reinterpret_cast<PyCFunction>(Text), METH_NOARGS,
     "The body decoded as UTF-8. Invalid UTF-8 raises HTTPError(400)."},
    {"form", reinterpret_cast<PyCFunction>(Form), METH_NOARGS,
     "The body parsed as application/x-www-form-urlencoded: a MultiDict."},
    {nullptr, nullptr, 0, nullptr}};

PyTypeObject RequestType = [] {
  PyTypeObject t{PyVarObject_HEAD_INIT(nullptr, 0)};
  t.tp_name = "_metronome.Request";
  t.tp_basicsize = sizeof(RequestObject);
  t.tp_dealloc = reinterpret_cast<destructor>(Dealloc);
  t.tp_repr = reinterpret_cast<reprfunc>(Repr);
  t.tp_flags = Py_TPFLAGS_DEFAULT;
  t.tp_doc = "An HTTP request, as a handler sees it. Made by the server, not by Python code.";
  t.tp_getset = kGetSet;
  t.tp_methods = kMethods;
  return t;
}();

// --- module functions --------------------------------------------------------------------

PyObject* JsonLoads(PyObject*, PyObject* arg) {
  Py_buffer view;
  const char* data;
  Py_ssize_t len;
  bool release = false;
  if (PyUnicode_Check(arg)) {
    data = PyUnicode_AsUTF8AndSize(arg, &len);
    if (data == nullptr) return nullptr;
  } else {
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0) return nullptr;
    data = static_cast<const char*>(view.buf);
    len = view.len;
    release = true;
  }
  std::string error;
  PyObject* v = JsonToPython(data, static_cast<size_t>(len), &error);
  if (release) PyBuffer_Release(&view);
  if (v == nullptr && !error.empty()) PyErr_SetString(PyExc_ValueError, error.c_str());
  return v;
}

PyObject* JsonDumps(PyObject*, PyObject* arg) {
  std::string out;
  if (!PythonToJson(arg, &out)) return nullptr;
  return PyBytes_FromStringAndSize(out.data(), static_cast<Py_ssize_t>(out.size()));
}

PyObject* SetHelpers(PyObject*, PyObject* args, PyObject* kwargs) {
  static const char* kw[] = {"Headers", "MultiDict", "HTTPError", "BudgetExceeded", "Response", nullptr};
  PyObject *h = nullptr, *m = nullptr, *e = nullptr, *b = nullptr, *r = nullptr;
  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOOO", const_cast<char**>(kw), &h, &m, &e, &b, &r)) return nullptr;
  for (auto [slot, v] : {std::pair{&g_helpers.headers, h}, {&g_helpers.multidict, m}, {&g_helpers.http_error, e},
                         {&g_helpers.budget_exceeded, b}, {&g_helpers.response, r}}) {
    Py_INCREF(v);
    Py_XSETREF(*slot, v);
  }
  Py_RETURN_NONE;
}

PyObject* ParseQs(PyObject*, PyObject* arg) {
  Py_ssize_t len;
  const char* s = PyUnicode_AsUTF8AndSize(arg, &len);
  if (s == nullptr) return nullptr;
  return ParseUrlEncoded(s, static_cast<size_t>(len));
}

// log(level, message): a line in the server's log; level as Python's logging numbers.
PyObject* LogLine(PyObject*, PyObject* args) {
  int level;
  const char* message;
  if (!PyArg_ParseTuple(args, "is:log", &level, &message)) return nullptr;
  LogLevel l = level >= 40 ? LogLevel::kError : level >= 30 ? LogLevel::kWarn : level >= 20 ? LogLevel::kInfo : LogLevel::kDebug;
  Log(l, "%s", message);
  Py_RETURN_NONE;
}

PyMethodDef kModuleMethods[] = {
    {"log", LogLine, METH_VARARGS, "log(level, message): a line in the server's log (level: logging.INFO etc.)."},
    {"json_loads", JsonLoads, METH_O, "Parses JSON (str or bytes) with simdjson; ValueError if invalid."},
    {"json_dumps", JsonDumps, METH_O, "Encodes to compact JSON bytes, in C++."},
    {"parse_qs", ParseQs, METH_O, "Parses an urlencoded string into a list of (name, value) pairs."},
    {"_set_helpers", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(SetHelpers)), METH_VARARGS | METH_KEYWORDS,
     "Called by the metronome package at import."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef kModule = {PyModuleDef_HEAD_INIT, "_metronome",
                       "The native half of the metronome package (see pyhandlers/metronome).", -1,
                       kModuleMethods, nullptr, nullptr, nullptr, nullptr};

PyObject* InitModule() {
  if (PyType_Ready(&RequestType) < 0) return nullptr;
  PyObject* m = PyModule_Create(&kModule);
  if (m == nullptr) return nullptr;
  Py_INCREF(&RequestType);
  if (PyModule_AddObject(m, "Request", reinterpret_cast<PyObject*>(&RequestType)) < 0) {
    Py_DECREF(&RequestType);
    Py_DECREF(m);
    return nullptr;
  }
  PyModule_AddIntConstant(m, "embedded", 1);
  return m;
}

}  // namespace

const Helpers& GetHelpers() { return g_helpers; }

void RegisterModule() { PyImport_AppendInittab("_metronome", &InitModule); }

PyObject* NewRequest(http::Request* r, const http::HttpShared* shared) {
  auto* self = PyObject_New(RequestObject, &RequestType);
  if (self == nullptr) return nullptr;
  self->req = r;
  self->shared = shared;
  for (PyObject*& p : self->cache) p = nullptr;
  self->state = nullptr;
  return reinterpret_cast<PyObject*>(self);
}

void DetachRequest(PyObject* obj) {
  auto* self = reinterpret_cast<RequestObject*>(obj);
  if (self->req == nullptr) return;
  if (Py_REFCNT(obj) > 1) {
    // Someone kept the request: copy every field now, while the C++ request is still here.
    for (int f = 0; f < kFields; ++f) {
      PyObject* v = Get(self, reinterpret_cast<void*>(static_cast<intptr_t>(f)));
      if (v == nullptr) PyErr_Clear(); else Py_DECREF(v);
    }
  }
  self->req = nullptr;
}

void ReleaseRequestObject(http::Request* r) {
  if (r->py_request == nullptr) return;
  PyObject* obj = static_cast<PyObject*>(r->py_request);
  DetachRequest(obj);
  Py_DECREF(obj);
  r->py_request = nullptr;
}

PyObject* ParseUrlEncoded(const char* data, size_t len) {
  PyObject* list = PyList_New(0);
  if (list == nullptr) return nullptr;
  std::string name, value;
  size_t i = 0;
  while (i <= len && len > 0) {
    size_t amp = i;
    while (amp < len && data[amp] != '&') ++amp;
    if (amp > i) {
      const char* part = data + i;
      size_t plen = amp - i;
      size_t eq = 0;
      while (eq < plen && part[eq] != '=') ++eq;
      Unescape(part, eq, true, &name);
      if (eq < plen) Unescape(part + eq + 1, plen - eq - 1, true, &value); else value.clear();
      PyObject* k = Utf8(name);
      PyObject* v = Utf8(value);
      PyObject* t = (k && v) ? PyTuple_Pack(2, k, v) : nullptr;
      Py_XDECREF(k);
      Py_XDECREF(v);
      if (t == nullptr || PyList_Append(list, t) < 0) {
        Py_XDECREF(t);
        Py_DECREF(list);
        return nullptr;
      }
      Py_DECREF(t);
    }
    i = amp + 1;
  }
  return list;
}

PyObject* DecodePercent(const char* data, size_t len) {
  std::string s;
  Unescape(data, len, false, &s);
  return Utf8(s);
}

}  // namespace metronome::py
