#include "stages/py/interpreter.h"

#include "absl/strings/str_cat.h"
#include "stages/py/module.h"

#ifndef METRONOME_PYTHON_HOME
#define METRONOME_PYTHON_HOME "/usr"
#endif
#ifndef METRONOME_PYHANDLERS_DIR
#error "METRONOME_PYHANDLERS_DIR must name the directory of the metronome Python package"
#endif

namespace metronome::py {
namespace {

bool g_initialized = false;

std::string StatusText(PyStatus st) {
  return absl::StrCat(st.func ? st.func : "", st.func ? ": " : "", st.err_msg ? st.err_msg : "unknown error");
}

}  // namespace

absl::Status Initialize(const InterpreterOptions& options) {
  if (g_initialized) return absl::OkStatus();
  PyPreConfig pre;
  PyPreConfig_InitPythonConfig(&pre);
  pre.utf8_mode = 1;
  PyStatus st = Py_PreInitialize(&pre);
  if (PyStatus_Exception(st)) return absl::InternalError(StatusText(st));
  if (options.before_init != nullptr) options.before_init();
  RegisterModule();

  PyConfig config;
  PyConfig_InitPythonConfig(&config);
  config.install_signal_handlers = 0;  // SIGINT/SIGTERM drain the server (runtime/signals.h)
  config.parse_argv = 0;
  config.buffered_stdio = 0;
  // The binary is not python3: point the path computation at Debian's installation.
  st = PyConfig_SetBytesString(&config, &config.home, METRONOME_PYTHON_HOME);
  if (!PyStatus_Exception(st)) st = PyConfig_SetBytesString(&config, &config.program_name, "metronome");
  if (!PyStatus_Exception(st)) st = Py_InitializeFromConfig(&config);
  PyConfig_Clear(&config);
  if (PyStatus_Exception(st)) {
    return absl::InternalError(absl::StrCat("cannot start the Python interpreter (", StatusText(st),
                                            "); is python3.11 installed under ", METRONOME_PYTHON_HOME, "?"));
  }
  g_initialized = true;

  // threading records the thread that imports it first as its main thread and waits for it at
  // finalisation: that must be this thread, not a plugin thread importing a module that happens
  // to import threading (Py_FinalizeEx would then wait forever).
  PyObject* threading = PyImport_ImportModule("threading");
  if (threading == nullptr) return absl::InternalError(absl::StrCat("cannot import threading: ", FetchExceptionLine()));
  Py_DECREF(threading);

  // sys.path: the configured directories first, then the metronome package.
  PyObject* sys_path = PySys_GetObject("path");  // borrowed
  std::vector<std::string> dirs = options.path;
  dirs.push_back(METRONOME_PYHANDLERS_DIR);
  for (size_t i = 0; i < dirs.size(); ++i) {
    PyObject* d = PyUnicode_FromString(dirs[i].c_str());
    if (d == nullptr || PyList_Insert(sys_path, static_cast<Py_ssize_t>(i), d) < 0) {
      Py_XDECREF(d);
      return absl::InternalError(absl::StrCat("cannot extend sys.path: ", FetchExceptionLine()));
    }
    Py_DECREF(d);
  }
  return absl::OkStatus();
}

bool Initialized() { return g_initialized; }

void Finalize() {
  if (!g_initialized) return;
  Py_FinalizeEx();
  g_initialized = false;
}

absl::Status ImportObject(const std::string& spec, PyObject** out) {
  size_t colon = spec.find(':');
  if (colon == std::string::npos || colon == 0 || colon + 1 == spec.size()) {
    return absl::InvalidArgumentError(absl::StrCat("'", spec, "' is not of the form \"package.module:attribute\""));
  }
  std::string module = spec.substr(0, colon);
  std::string attr = spec.substr(colon + 1);
  PyObject* mod = PyImport_ImportModule(module.c_str());
  if (mod == nullptr) {
    return absl::FailedPreconditionError(absl::StrCat("cannot import '", module, "':\n", FetchTraceback()));
  }
  PyObject* obj = mod;
  Py_INCREF(obj);
  size_t start = 0;
  while (start <= attr.size()) {
    size_t dot = attr.find('.', start);
    std::string part = attr.substr(start, dot == std::string::npos ? std::string::npos : dot - start);
    PyObject* next = PyObject_GetAttrString(obj, part.c_str());
    Py_DECREF(obj);
    if (next == nullptr) {
      Py_DECREF(mod);
      return absl::FailedPreconditionError(absl::StrCat("module '", module, "' has no attribute '", attr,
                                                        "': ", FetchExceptionLine()));
    }
    obj = next;
    if (dot == std::string::npos) break;
    start = dot + 1;
  }
  Py_DECREF(mod);
  *out = obj;
  return absl::OkStatus();
}

std::string FetchTraceback() {
  PyObject *type, *value, *tb;
  PyErr_Fetch(&type, &value, &tb);
  if (type == nullptr) return "(no exception)";
  PyErr_NormalizeException(&type, &value, &tb);
  std::string text;
  PyObject* mod = PyImport_ImportModule("traceback");
  PyObject* lines = mod ? PyObject_CallMethod(mod, "format_exception", "OOO", type, value ? value : Py_None, tb ? tb : Py_None) : nullptr;
  if (lines != nullptr) {
    PyObject* empty = PyUnicode_FromString("");
    PyObject* joined = empty ? PyUnicode_Join(empty, lines) : nullptr;
    if (joined != nullptr) text = PyUnicode_AsUTF8(joined);
    Py_XDECREF(joined);
    Py_XDECREF(empty);
  }
  if (text.empty()) {
    PyErr_Clear();
    PyObject* s = value ? PyObject_Str(value) : nullptr;
    text = absl::StrCat(reinterpret_cast<PyTypeObject*>(type)->tp_name, ": ", s ? PyUnicode_AsUTF8(s) : "");
    Py_XDECREF(s);
  }
  Py_XDECREF(lines);
  Py_XDECREF(mod);
  Py_XDECREF(type);
  Py_XDECREF(value);
  Py_XDECREF(tb);
  PyErr_Clear();
  while (!text.empty() && text.back() == '\n') text.pop_back();
  return text;
}

std::string FetchExceptionLine() {
  PyObject *type, *value, *tb;
  PyErr_Fetch(&type, &value, &tb);
  if (type == nullptr) return "(no exception)";
  PyErr_NormalizeException(&type, &value, &tb);
  PyObject* s = value ? PyObject_Str(value) : nullptr;
  std::string text = absl::StrCat(reinterpret_cast<PyTypeObject*>(type)->tp_name, ": ",
                                  s && PyUnicode_Check(s) ? PyUnicode_AsUTF8(s) : "");
  Py_XDECREF(s);
  Py_XDECREF(type);
  Py_XDECREF(value);
  Py_XDECREF(tb);
  PyErr_Clear();
  return text;
}

}  // namespace metronome::py
