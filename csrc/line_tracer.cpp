#include "line_tracer.h"

#include <frameobject.h>
#include <pybind11/pybind11.h>
#include <structmember.h>
#include <sys/mman.h>

#include <cerrno>
#include <stdexcept>
#include <unordered_set>

#include "unique_fd.h"

namespace sandbox {
namespace {

struct TraceState {
  unsigned char* bitmap = nullptr;
  size_t size = 0;
  std::unordered_set<PyObject*> codes;  // strong references, held for the child's lifetime
  bool started = false;
};

TraceState state;

void mark(long line) {
  if (line > 0 && static_cast<size_t>(line) < state.size) state.bitmap[line] = 1;
}

#if PY_VERSION_HEX < 0x030C0000
bool ours(PyFrameObject* frame) {
  PyCodeObject* code = PyFrame_GetCode(frame);
  const bool found = state.codes.count(reinterpret_cast<PyObject*>(code)) != 0;
  Py_DECREF(code);
  return found;
}

Py_ssize_t trace_lines_offset = -1;  // of PyFrameObject.f_trace_lines, from its member descriptor

int on_event(PyObject*, PyFrameObject* frame, int what, PyObject*) {
  if (what != PyTrace_LINE && what != PyTrace_CALL) return 0;
  if (!ours(frame)) {
    // Line events off for frames of other code: one call event each, then full speed.
    if (what == PyTrace_CALL) *(reinterpret_cast<char*>(frame) + trace_lines_offset) = 0;
    return 0;
  }
  if (what == PyTrace_LINE) mark(PyFrame_GetLineNumber(frame));
  return 0;
}

// frame.f_trace_lines = False would stop line events for that frame: lines that run would be hidden.
// The member becomes read-only for Python code; the tracer writes it directly.
void protect_trace_lines() {
  PyObject* descriptor = PyDict_GetItemString(PyFrame_Type.tp_dict, "f_trace_lines");
  if (descriptor == nullptr || !Py_IS_TYPE(descriptor, &PyMemberDescr_Type)) {
    throw std::runtime_error("frame.f_trace_lines is not a member descriptor on this Python");
  }
  PyMemberDef* member = reinterpret_cast<PyMemberDescrObject*>(descriptor)->d_member;
  trace_lines_offset = member->offset;
  member->flags |= READONLY;
}
#else
// Calls `object.name(*args)` (a new reference, stolen) and drops the result; a Python error propagates.
void call_method(PyObject* object, const char* name, PyObject* args) {
  if (args == nullptr) throw pybind11::error_already_set();
  PyObject* method = PyObject_GetAttrString(object, name);
  PyObject* result = method != nullptr ? PyObject_CallObject(method, args) : nullptr;
  Py_XDECREF(method);
  Py_DECREF(args);
  if (result == nullptr) throw pybind11::error_already_set();
  Py_DECREF(result);
}

PyObject* disable = nullptr;  // sys.monitoring.DISABLE

// sys.monitoring calls this from the frame whose line starts; a program calling it directly can only
// mark the line it is calling from, which is running anyway.
PyObject* on_line(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs == 2 && state.codes.count(args[0]) != 0) {
    const long line = PyLong_AsLong(args[1]);
    if (line == -1 && PyErr_Occurred()) return nullptr;
    PyFrameObject* frame = PyEval_GetFrame();
    if (frame != nullptr) {
      PyCodeObject* code = PyFrame_GetCode(frame);
      const bool here = reinterpret_cast<PyObject*>(code) == args[0] && PyFrame_GetLineNumber(frame) == line;
      Py_DECREF(code);
      if (here) mark(line);
    }
  }
  return Py_NewRef(disable);
}

PyMethodDef on_line_definition = {"stepcoder_line_event", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(on_line)),
                                  METH_FASTCALL, nullptr};
#endif

}  // namespace

void reset_line_bitmap(size_t size) {
  if (state.started) throw std::runtime_error("the line bitmap cannot be replaced once tracing has started");
  if (state.bitmap != nullptr && munmap(state.bitmap, state.size) != 0) throw_errno("munmap");
  state.bitmap = nullptr;
  state.size = 0;
  void* mapping = mmap(nullptr, size == 0 ? 1 : size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
  if (mapping == MAP_FAILED) throw_errno("mmap(line bitmap)");
  state.bitmap = static_cast<unsigned char*>(mapping);
  state.size = size == 0 ? 1 : size;
}

std::vector<int> executed_lines() {
  std::vector<int> lines;
  for (size_t line = 1; line < state.size; ++line) {
    if (state.bitmap[line]) lines.push_back(static_cast<int>(line));
  }
  return lines;
}

void start_line_trace(const std::vector<PyObject*>& codes, int monitoring_tool) {
  if (state.started) throw std::runtime_error("line tracing is already running in this process");
  if (state.bitmap == nullptr) throw std::runtime_error("no line bitmap: call reset_line_bitmap first");
  state.started = true;
  for (PyObject* code : codes) {
    Py_INCREF(code);
    state.codes.insert(code);
  }
#if PY_VERSION_HEX < 0x030C0000
  (void)monitoring_tool;
  protect_trace_lines();
  PyEval_SetTrace(on_event, nullptr);
#else
  PyObject* monitoring = PySys_GetObject("monitoring");  // borrowed
  if (monitoring == nullptr) throw std::runtime_error("sys.monitoring is missing");
  disable = PyObject_GetAttrString(monitoring, "DISABLE");
  PyObject* events = PyObject_GetAttrString(monitoring, "events");
  PyObject* line_event = events != nullptr ? PyObject_GetAttrString(events, "LINE") : nullptr;
  Py_XDECREF(events);
  PyObject* callback = PyCFunction_New(&on_line_definition, nullptr);
  if (disable == nullptr || line_event == nullptr || callback == nullptr) {
    Py_XDECREF(line_event);
    Py_XDECREF(callback);
    throw pybind11::error_already_set();
  }
  call_method(monitoring, "use_tool_id", Py_BuildValue("(is)", monitoring_tool, "stepcoder"));
  call_method(monitoring, "register_callback", Py_BuildValue("(iOO)", monitoring_tool, line_event, callback));
  Py_DECREF(callback);  // sys.monitoring holds it
  for (PyObject* code : codes) {
    call_method(monitoring, "set_local_events", Py_BuildValue("(iOO)", monitoring_tool, code, line_event));
  }
  Py_DECREF(line_event);
#endif
}

void trace_current_thread() {
#if PY_VERSION_HEX < 0x030C0000
  if (state.started) PyEval_SetTrace(on_event, nullptr);
#endif
}

}  // namespace sandbox
