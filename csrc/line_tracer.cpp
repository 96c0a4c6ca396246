#include "line_tracer.h"

#include <frameobject.h>

#include <unordered_set>

namespace sandbox {
namespace {

struct TraceState {
  std::unordered_set<PyObject*> codes;
  unsigned char* bitmap = nullptr;
  size_t size = 0;
  PyObject* owner = nullptr;
};

// One tracer per process: a test child traces exactly one program, and never stops.
TraceState* state = nullptr;

int on_event(PyObject*, PyFrameObject* frame, int what, PyObject*) {
  if (what != PyTrace_LINE && what != PyTrace_CALL) return 0;
  PyCodeObject* code = PyFrame_GetCode(frame);
  const bool ours = state->codes.count(reinterpret_cast<PyObject*>(code)) != 0;
  Py_DECREF(code);
  if (!ours) {
    if (what == PyTrace_CALL && PyObject_SetAttrString(reinterpret_cast<PyObject*>(frame), "f_trace_lines", Py_False) != 0) {
      PyErr_Clear();
    }
    return 0;
  }
  if (what == PyTrace_LINE) {
    const int line = PyFrame_GetLineNumber(frame);
    if (line > 0 && static_cast<size_t>(line) < state->size) state->bitmap[line] = 1;
  }
  return 0;
}

}  // namespace

void start_line_trace(std::vector<PyObject*> codes, unsigned char* bitmap, size_t size, PyObject* owner) {
  if (state == nullptr) state = new TraceState();
  for (PyObject* code : codes) {
    Py_INCREF(code);
    state->codes.insert(code);
  }
  Py_XINCREF(owner);
  state->owner = owner;
  state->bitmap = bitmap;
  state->size = size;
  PyEval_SetTrace(on_event, nullptr);
}

void trace_current_thread() {
  if (state != nullptr) PyEval_SetTrace(on_event, nullptr);
}

}  // namespace sandbox
