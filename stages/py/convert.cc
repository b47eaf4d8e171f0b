#include "stages/py/convert.h"

#include <atomic>

#include "stages/http/fields.h"
#include "stages/py/json.h"
#include "stages/py/module.h"

namespace metronome::py {
namespace {

constexpr std::string_view kJson = "application/json";
constexpr std::string_view kText = "text/plain; charset=utf-8";
constexpr std::string_view kBytes = "application/octet-stream";

std::atomic<uint64_t> g_server_owned_dropped{0};

bool Str(PyObject* o, std::string* out) {
  Py_ssize_t n;
  const char* s = PyUnicode_AsUTF8AndSize(o, &n);
  if (s == nullptr) return false;
  out->assign(s, static_cast<size_t>(n));
  return true;
}

// Sets the body from `body`; `default_type` is set unless the caller already chose one.
bool SetBody(PyObject* body, http::Response* resp, bool have_type) {
  auto type = [&](std::string_view t) {
    if (!have_type) resp->content_type = t;
  };
  if (body == Py_None) {
    resp->body = {};
    return true;
  }
  if (PyUnicode_Check(body)) {
    if (!Str(body, &resp->body_storage)) return false;
    resp->body = resp->body_storage;
    type(kText);
    return true;
  }
  if (PyBytes_Check(body)) {
    resp->body_storage.assign(PyBytes_AS_STRING(body), static_cast<size_t>(PyBytes_GET_SIZE(body)));
    resp->body = resp->body_storage;
    type(kBytes);
    return true;
  }
  if (PyDict_Check(body) || PyList_Check(body) || PyTuple_Check(body)) {
    resp->body_storage.clear();
    if (!PythonToJson(body, &resp->body_storage)) return false;
    resp->body = resp->body_storage;
    type(kJson);
    return true;
  }
  if (PyObject_CheckBuffer(body)) {
    Py_buffer view;
    if (PyObject_GetBuffer(body, &view, PyBUF_SIMPLE) < 0) return false;
    resp->body_storage.assign(static_cast<const char*>(view.buf), static_cast<size_t>(view.len));
    PyBuffer_Release(&view);
    resp->body = resp->body_storage;
    type(kBytes);
    return true;
  }
  if (PyIter_Check(body) || PyGen_Check(body)) {
    // Streamed: the python stage steps the iterator as the client takes the bytes (its first
    // item decides the content type when none was given). Nothing is consumed here, so a
    // plugin's on_response sees the iterator itself.
    Py_INCREF(body);
    resp->stream_source = body;
    resp->framing = http::Framing::kChunked;
    resp->body = {};
    return true;
  }
  PyErr_Format(PyExc_TypeError,
               "a handler returns dict, list, str, bytes, None, metronome.Response, a (body, status[, headers]) "
               "tuple or an iterator, not %s", Py_TYPE(body)->tp_name);
  return false;
}

bool SetStatus(PyObject* status, http::Response* resp) {
  long s = PyLong_AsLong(status);
  if (s == -1 && PyErr_Occurred()) return false;
  if (s < 100 || s > 599) {
    PyErr_Format(PyExc_ValueError, "HTTP status %ld is not within 100..599", s);
    return false;
  }
  resp->status = static_cast<int>(s);
  return true;
}

}  // namespace

bool AddField(http::ExtraHeader h, http::Response* resp) {
  const http::FieldCheck check = http::CheckResponseField(h.name, h.value);
  switch (check.rule) {
    case http::FieldRule::kInvalid:
      PyErr_Format(PyExc_ValueError, "response field '%.100s': %s", h.name.c_str(), check.why);
      return false;
    case http::FieldRule::kContentLength:
      if (resp->declared_length >= 0 && resp->declared_length != check.content_length) {
        PyErr_Format(PyExc_ValueError, "two different Content-Length fields (%lld and %lld)",
                     static_cast<long long>(resp->declared_length), static_cast<long long>(check.content_length));
        return false;
      }
      resp->declared_length = check.content_length;
      return true;
    case http::FieldRule::kConnection:
      if (check.close) resp->close = true;
      return true;
    case http::FieldRule::kServerOwned:
      g_server_owned_dropped.fetch_add(1, std::memory_order_relaxed);
      return true;
    case http::FieldRule::kKeep:
      break;
  }
  // A Content-Type field sets the content type (serialize writes it once).
  if (h.name.size() == 12 && strncasecmp(h.name.c_str(), "content-type", 12) == 0) {
    resp->content_type_storage = std::move(h.value);
    resp->content_type = resp->content_type_storage;
  } else {
    resp->headers.push_back(std::move(h));
  }
  return true;
}

bool SettleFraming(http::Response* resp) {
  if (resp->declared_length < 0) return true;
  if (resp->streaming()) {
    resp->framing = http::Framing::kDeclared;
    return true;
  }
  if (static_cast<uint64_t>(resp->declared_length) != resp->body.size()) {
    PyErr_Format(PyExc_ValueError, "the response declares Content-Length %lld but its body has %zu bytes",
                 static_cast<long long>(resp->declared_length), resp->body.size());
    return false;
  }
  return true;
}

void DropStreamSource(http::Response* resp) {
  if (resp->stream_source == nullptr) return;
  Py_DECREF(static_cast<PyObject*>(resp->stream_source));
  resp->stream_source = nullptr;
  resp->framing = http::Framing::kLength;
}

uint64_t ServerOwnedFieldsDropped() { return g_server_owned_dropped.load(std::memory_order_relaxed); }

namespace {

// headers: a dict, a metronome.Headers, or an iterable of (name, value) pairs.
bool SetHeaders(PyObject* headers, http::Response* resp) {
  if (headers == nullptr || headers == Py_None) return true;
  PyObject* items = PyDict_Check(headers) ? PyDict_Items(headers)
                    : PyObject_HasAttrString(headers, "items") ? PyObject_CallMethod(headers, "items", nullptr)
                                                               : (Py_INCREF(headers), headers);
  if (items == nullptr) return false;
  PyObject* it = PyObject_GetIter(items);
  Py_DECREF(items);
  if (it == nullptr) return false;
  PyObject* pair;
  bool ok = true;
  while (ok && (pair = PyIter_Next(it)) != nullptr) {
    PyObject *k, *v;
    http::ExtraHeader h;
    if (!PyArg_ParseTuple(pair, "OO", &k, &v)) {
      ok = false;
    } else {
      PyObject* ks = PyObject_Str(k);
      PyObject* vs = PyObject_Str(v);
      ok = ks && vs && Str(ks, &h.name) && Str(vs, &h.value);
      Py_XDECREF(ks);
      Py_XDECREF(vs);
    }
    Py_DECREF(pair);
    if (!ok) break;
    ok = AddField(std::move(h), resp);
  }
  Py_DECREF(it);
  return ok && !PyErr_Occurred();
}

bool FromResponseObject(PyObject* r, http::Response* resp) {
  PyObject* status = PyObject_GetAttrString(r, "status");
  bool ok = status && SetStatus(status, resp);
  Py_XDECREF(status);
  if (!ok) return false;
  bool have_type = false;
  PyObject* ct = PyObject_GetAttrString(r, "content_type");
  if (ct == nullptr) return false;
  if (ct != Py_None) {
    ok = Str(ct, &resp->content_type_storage);
    resp->content_type = resp->content_type_storage;
    have_type = true;
  }
  Py_DECREF(ct);
  if (!ok) return false;
  PyObject* headers = PyObject_GetAttrString(r, "headers");
  if (headers == nullptr) return false;
  size_t before = resp->content_type_storage.size();
  ok = SetHeaders(headers, resp);
  Py_DECREF(headers);
  if (!ok) return false;
  if (resp->content_type_storage.size() != before) have_type = true;
  PyObject* body = PyObject_GetAttrString(r, "body");
  if (body == nullptr) return false;
  ok = SetBody(body, resp, have_type);
  Py_DECREF(body);
  return ok;
}

}  // namespace

namespace {

bool Convert(PyObject* result, http::Response* resp) {
  const Helpers& h = GetHelpers();
  if (h.response != nullptr && PyObject_TypeCheck(result, reinterpret_cast<PyTypeObject*>(h.response))) {
    return FromResponseObject(result, resp);
  }
  if (PyTuple_Check(result) && (PyTuple_GET_SIZE(result) == 2 || PyTuple_GET_SIZE(result) == 3)) {
    if (!SetStatus(PyTuple_GET_ITEM(result, 1), resp)) return false;
    size_t before = resp->content_type_storage.size();
    if (PyTuple_GET_SIZE(result) == 3 && !SetHeaders(PyTuple_GET_ITEM(result, 2), resp)) return false;
    return SetBody(PyTuple_GET_ITEM(result, 0), resp, resp->content_type_storage.size() != before);
  }
  if (result == Py_None) {
    resp->status = 204;
    return true;
  }
  return SetBody(result, resp, false);
}

}  // namespace

bool ResultToResponse(PyObject* result, http::Response* resp) {
  if (Convert(result, resp) && SettleFraming(resp)) return true;
  DropStreamSource(resp);
  return false;
}

bool HttpErrorToResponse(http::Response* resp) {
  const Helpers& h = GetHelpers();
  if (h.http_error == nullptr || !PyErr_ExceptionMatches(h.http_error)) return false;
  PyObject *type, *value, *tb;
  PyErr_Fetch(&type, &value, &tb);
  PyErr_NormalizeException(&type, &value, &tb);
  bool ok = value != nullptr;
  if (ok) {
    PyObject* status = PyObject_GetAttrString(value, "status");
    ok = status && SetStatus(status, resp);
    Py_XDECREF(status);
  }
  if (ok) {
    PyObject* headers = PyObject_GetAttrString(value, "headers");
    ok = headers && SetHeaders(headers, resp);
    Py_XDECREF(headers);
  }
  if (ok) {
    PyObject* detail = PyObject_GetAttrString(value, "detail");
    if (detail == Py_None || detail == nullptr) {
      Py_XDECREF(detail);
      PyErr_Clear();
      resp->SetBodyCopy(std::string(http::ReasonPhrase(resp->status)) + "\n");
      resp->content_type = kText;
    } else {
      ok = SetBody(detail, resp, !resp->content_type_storage.empty());
      if (ok && PyUnicode_Check(detail)) resp->body_storage.push_back('\n'), resp->body = resp->body_storage;
      Py_DECREF(detail);
    }
  }
  Py_XDECREF(type);
  Py_XDECREF(value);
  Py_XDECREF(tb);
  if (!ok) {
    // A malformed HTTPError (e.g. status 42): answer 500 and say why in the log.
    resp->status = 500;
    PyErr_Clear();
    return false;
  }
  return true;
}

void SetInternalError(http::Response* resp) { resp->SetError(500, "internal server error"); }

PyObject* ResponseToPython(const http::Response& resp) {
  const Helpers& h = GetHelpers();
  if (h.response == nullptr) {
    PyErr_SetString(PyExc_RuntimeError, "metronome package not imported");
    return nullptr;
  }
  PyObject* body;
  if (resp.stream_source != nullptr) {
    body = static_cast<PyObject*>(resp.stream_source);  // the iterator itself: nothing is consumed
    Py_INCREF(body);
  } else {
    body = PyBytes_FromStringAndSize(resp.body.data(), static_cast<Py_ssize_t>(resp.body.size()));
  }
  if (body == nullptr) return nullptr;
  PyObject* headers = PyList_New(0);
  // What the conversion took out of the fields goes back in, so that a round trip through a
  // plugin keeps it.
  if (resp.framing == http::Framing::kDeclared) {
    PyObject* t = Py_BuildValue("(sL)", "Content-Length", static_cast<long long>(resp.declared_length));
    if (t != nullptr) PyList_Append(headers, t);
    Py_XDECREF(t);
  }
  if (resp.close) {
    PyObject* t = Py_BuildValue("(ss)", "Connection", "close");
    if (t != nullptr) PyList_Append(headers, t);
    Py_XDECREF(t);
  }
  for (const auto& f : resp.headers) {
    PyObject* t = Py_BuildValue("(ss)", f.name.c_str(), f.value.c_str());
    if (t == nullptr || PyList_Append(headers, t) < 0) {
      Py_XDECREF(t);
      Py_DECREF(headers);
      Py_DECREF(body);
      return nullptr;
    }
    Py_DECREF(t);
  }
  PyObject* kwargs = Py_BuildValue("{s:i,s:O,s:s#}", "status", resp.status, "headers", headers, "content_type",
                                   resp.content_type.data(), static_cast<Py_ssize_t>(resp.content_type.size()));
  Py_DECREF(headers);
  if (kwargs == nullptr) {
    Py_DECREF(body);
    return nullptr;
  }
  PyObject* args = PyTuple_Pack(1, body);
  Py_DECREF(body);
  PyObject* obj = args ? PyObject_Call(h.response, args, kwargs) : nullptr;
  Py_XDECREF(args);
  Py_DECREF(kwargs);
  return obj;
}

}  // namespace metronome::py
