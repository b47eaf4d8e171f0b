#include "stages/py/json.h"

#include <cmath>
#include <cstring>

#include "simdjson.h"

namespace metronome::py {
namespace {

// Why a depth rule of our own: simdjson counts the value inside the innermost container as a
// level, json.h's rule counts containers only (the root container is depth 0), the same rule
// as the encoder, so that whatever one side makes the other accepts.
struct BuildError {
  const char* what = nullptr;
};

PyObject* Build(simdjson::dom::element e, int depth, BuildError* err) {
  switch (e.type()) {
    case simdjson::dom::element_type::OBJECT: {
      if (depth >= kJsonDepthMax) {
        err->what = "nested deeper than the limit";
        return nullptr;
      }
      PyObject* d = PyDict_New();
      if (d == nullptr) return nullptr;
      for (auto field : simdjson::dom::object(e)) {
        PyObject* k = PyUnicode_DecodeUTF8(field.key.data(), static_cast<Py_ssize_t>(field.key.size()), "strict");
        if (k == nullptr) {
          Py_DECREF(d);
          return nullptr;
        }
        PyObject* v = Build(field.value, depth + 1, err);
        if (v == nullptr || PyDict_SetItem(d, k, v) < 0) {
          Py_DECREF(k);
          Py_XDECREF(v);
          Py_DECREF(d);
          return nullptr;
        }
        Py_DECREF(k);
        Py_DECREF(v);
      }
      return d;
    }
    case simdjson::dom::element_type::ARRAY: {
      if (depth >= kJsonDepthMax) {
        err->what = "nested deeper than the limit";
        return nullptr;
      }
      simdjson::dom::array a(e);
      PyObject* l = PyList_New(static_cast<Py_ssize_t>(a.size()));
      if (l == nullptr) return nullptr;
      Py_ssize_t i = 0;
      for (auto v : a) {
        PyObject* item = Build(v, depth + 1, err);
        if (item == nullptr) {
          Py_DECREF(l);
          return nullptr;
        }
        PyList_SET_ITEM(l, i++, item);
      }
      return l;
    }
    case simdjson::dom::element_type::STRING: {
      std::string_view s(e);
      return PyUnicode_DecodeUTF8(s.data(), static_cast<Py_ssize_t>(s.size()), "strict");
    }
    case simdjson::dom::element_type::INT64:
      return PyLong_FromLongLong(int64_t(e));
    case simdjson::dom::element_type::UINT64:
      return PyLong_FromUnsignedLongLong(uint64_t(e));
    case simdjson::dom::element_type::DOUBLE: {
      double d = double(e);
      if (!std::isfinite(d)) {  // 1e400: valid JSON, but no double holds it
        err->what = "a number is out of range";
        return nullptr;
      }
      return PyFloat_FromDouble(d);
    }
    case simdjson::dom::element_type::BOOL:
      return PyBool_FromLong(bool(e));
    case simdjson::dom::element_type::NULL_VALUE:
      Py_RETURN_NONE;
  }
  Py_RETURN_NONE;
}

// True if every string in `o` is valid Unicode without lone surrogates (what simdjson demands),
// every float finite, and containers within the depth rule.
bool StrictJsonValue(PyObject* o, int depth) {
  if (PyUnicode_Check(o)) {
    if (PyUnicode_AsUTF8AndSize(o, nullptr) != nullptr) return true;
    PyErr_Clear();
    return false;
  }
  if (PyFloat_Check(o)) return std::isfinite(PyFloat_AS_DOUBLE(o));
  if (PyList_Check(o)) {
    if (depth >= kJsonDepthMax) return false;
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(o); ++i) {
      if (!StrictJsonValue(PyList_GET_ITEM(o, i), depth + 1)) return false;
    }
    return true;
  }
  if (PyDict_Check(o)) {
    if (depth >= kJsonDepthMax) return false;
    Py_ssize_t pos = 0;
    PyObject *k, *v;
    while (PyDict_Next(o, &pos, &k, &v)) {
      if (!StrictJsonValue(k, depth + 1) || !StrictJsonValue(v, depth + 1)) return false;
    }
    return true;
  }
  return true;
}

// json.loads for what simdjson refuses but is valid JSON (integers beyond 64 bits). It is held
// to simdjson's rules otherwise: NaN/Infinity and lone surrogates, which json.loads accepts,
// are refused here too.
PyObject* PythonLoads(const char* data, size_t len, std::string* error) {
  static PyObject* loads = nullptr;
  if (loads == nullptr) {
    PyObject* globals = PyDict_New();
    PyObject* r = globals ? PyRun_String(
        "import json\n"
        "def _refuse(name):\n"
        "    raise ValueError(f'{name} is not JSON')\n"
        "def loads(text):\n"
        "    return json.loads(text, parse_constant=_refuse)\n",
        Py_file_input, globals, globals) : nullptr;
    Py_XDECREF(r);
    loads = r ? PyDict_GetItemString(globals, "loads") : nullptr;
    Py_XINCREF(loads);
    Py_XDECREF(globals);
    if (loads == nullptr) return nullptr;
  }
  PyObject* text = PyUnicode_DecodeUTF8(data, static_cast<Py_ssize_t>(len), "strict");
  if (text == nullptr) {
    PyErr_Clear();
    *error = "invalid JSON: not UTF-8";
    return nullptr;
  }
  PyObject* result = PyObject_CallOneArg(loads, text);
  Py_DECREF(text);
  if (result != nullptr && !StrictJsonValue(result, 0)) {
    Py_DECREF(result);
    *error = "invalid JSON: a lone surrogate, a number out of range, or nesting deeper than the limit";
    return nullptr;
  }
  if (result == nullptr && PyErr_ExceptionMatches(PyExc_ValueError)) {
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyObject* msg = value != nullptr ? PyObject_Str(value) : nullptr;
    *error = std::string("invalid JSON: ") + (msg != nullptr ? PyUnicode_AsUTF8(msg) : "?");
    Py_XDECREF(msg);
    Py_XDECREF(type);
    Py_XDECREF(value);
    Py_XDECREF(tb);
    PyErr_Clear();
  }
  return result;
}

class Encoder {
 public:
  explicit Encoder(std::string* out) : out_(out) {}

  bool Encode(PyObject* o, int depth) {
    if (depth >= kJsonDepthMax && (PyDict_Check(o) || PyList_Check(o) || PyTuple_Check(o))) {
      PyErr_Format(PyExc_ValueError, "JSON nesting deeper than %d", kJsonDepthMax);
      return false;
    }
    if (o == Py_None) {
      out_->append("null");
    } else if (o == Py_True) {
      out_->append("true");
    } else if (o == Py_False) {
      out_->append("false");
    } else if (PyUnicode_Check(o)) {
      return String(o);
    } else if (PyLong_Check(o)) {
      return Int(o);
    } else if (PyFloat_Check(o)) {
      return Float(PyFloat_AS_DOUBLE(o));
    } else if (PyDict_Check(o)) {
      return Dict(o, depth);
    } else if (PyList_Check(o) || PyTuple_Check(o)) {
      PyObject* seq = o;
      Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
      out_->push_back('[');
      for (Py_ssize_t i = 0; i < n; ++i) {
        if (i) out_->push_back(',');
        // Borrowed; the list may not change under us: we hold the GIL and call no Python code.
        if (!Encode(PySequence_Fast_GET_ITEM(seq, i), depth + 1)) return false;
      }
      out_->push_back(']');
    } else {
      PyErr_Format(PyExc_TypeError, "Object of type %s is not JSON serializable", Py_TYPE(o)->tp_name);
      return false;
    }
    return true;
  }

 private:
  bool String(PyObject* o) {
    Py_ssize_t n;
    const char* s = PyUnicode_AsUTF8AndSize(o, &n);
    if (s == nullptr) return false;
    out_->push_back('"');
    Py_ssize_t run = 0;
    for (Py_ssize_t i = 0; i < n; ++i) {
      unsigned char c = static_cast<unsigned char>(s[i]);
      if (c >= 0x20 && c != '"' && c != '\\') continue;
      out_->append(s + run, static_cast<size_t>(i - run));
      run = i + 1;
      switch (c) {
        case '"': out_->append("\\\""); break;
        case '\\': out_->append("\\\\"); break;
        case '\n': out_->append("\\n"); break;
        case '\r': out_->append("\\r"); break;
        case '\t': out_->append("\\t"); break;
        case '\b': out_->append("\\b"); break;
        case '\f': out_->append("\\f"); break;
        default: {
          char buf[8];
          snprintf(buf, sizeof buf, "\\u%04x", c);
          out_->append(buf);
        }
      }
    }
    out_->append(s + run, static_cast<size_t>(n - run));
    out_->push_back('"');
    return true;
  }

  bool Int(PyObject* o) {
    int overflow = 0;
    long long v = PyLong_AsLongLongAndOverflow(o, &overflow);
    if (overflow == 0) {
      if (v == -1 && PyErr_Occurred()) return false;
      char buf[24];
      int len = snprintf(buf, sizeof buf, "%lld", v);
      out_->append(buf, static_cast<size_t>(len));
      return true;
    }
    // Beyond 64 bits: JSON numbers have no limit; Python's decimal text is exact.
    PyObject* text = PyLong_Type.tp_repr(o);
    if (text == nullptr) return false;
    Py_ssize_t n;
    const char* s = PyUnicode_AsUTF8AndSize(text, &n);
    out_->append(s, static_cast<size_t>(n));
    Py_DECREF(text);
    return true;
  }

  bool Float(double d) {
    if (!std::isfinite(d)) {
      PyErr_SetString(PyExc_ValueError, "Out of range float values are not JSON compliant");
      return false;
    }
    char* s = PyOS_double_to_string(d, 'r', 0, Py_DTSF_ADD_DOT_0, nullptr);
    if (s == nullptr) return false;
    out_->append(s);
    PyMem_Free(s);
    return true;
  }

  bool Dict(PyObject* o, int depth) {
    out_->push_back('{');
    Py_ssize_t pos = 0;
    PyObject *k, *v;
    bool first = true;
    while (PyDict_Next(o, &pos, &k, &v)) {
      if (!first) out_->push_back(',');
      first = false;
      if (PyUnicode_Check(k)) {
        if (!String(k)) return false;
      } else if (k == Py_None || k == Py_True || k == Py_False || PyLong_Check(k) || PyFloat_Check(k)) {
        // json.dumps turns these keys into strings too.
        out_->push_back('"');
        if (!Encode(k, depth + 1)) return false;
        out_->push_back('"');
      } else {
        PyErr_Format(PyExc_TypeError, "keys must be str, int, float, bool or None, not %s", Py_TYPE(k)->tp_name);
        return false;
      }
      out_->push_back(':');
      if (!Encode(v, depth + 1)) return false;
    }
    out_->push_back('}');
    return true;
  }

  std::string* out_;
};

}  // namespace

PyObject* JsonToPython(const char* data, size_t len, std::string* error) {
  thread_local simdjson::dom::parser parser;
  thread_local bool sized = false;
  if (!sized) {
    if (parser.allocate(4096, kJsonDepthMax + 1) != simdjson::SUCCESS) {
      PyErr_NoMemory();
      return nullptr;
    }
    sized = true;
  }
  if (parser.capacity() < len) {
    if (parser.allocate(len, kJsonDepthMax + 1) != simdjson::SUCCESS) {
      PyErr_NoMemory();
      return nullptr;
    }
  }
  simdjson::dom::element root;
  auto err = parser.parse(data, len, /*realloc_if_needed=*/true).get(root);
  // Numbers simdjson cannot hold (integers beyond 64 bits) are valid JSON: let Python decide,
  // which also words the error for numbers that really are malformed.
  if (err == simdjson::NUMBER_ERROR || err == simdjson::NUMBER_OUT_OF_RANGE) return PythonLoads(data, len, error);
  if (err) {
    *error = std::string("invalid JSON: ") + (err == simdjson::DEPTH_ERROR
                                                  ? "nested deeper than " + std::to_string(kJsonDepthMax)
                                                  : simdjson::error_message(err));
    return nullptr;
  }
  BuildError build_error;
  PyObject* v = Build(root, 0, &build_error);
  if (v == nullptr && build_error.what != nullptr) {
    PyErr_Clear();
    *error = std::string("invalid JSON: ") + build_error.what + " (" + std::to_string(kJsonDepthMax) + " levels)";
    if (std::string(build_error.what).find("range") != std::string::npos) *error = std::string("invalid JSON: ") + build_error.what;
  }
  return v;
}

bool PythonToJson(PyObject* obj, std::string* out) {
  Encoder e(out);
  return e.Encode(obj, 0);
}

}  // namespace metronome::py
