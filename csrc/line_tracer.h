// The C-level line tracer for Pythons before 3.12 (3.12+ use sys.monitoring from the harness).
#pragma once

#include <Python.h>

#include <cstddef>
#include <vector>

namespace sandbox {

// Marks bitmap[line] = 1 for every LINE event in a frame whose code object is one of `codes`, on the
// calling thread. Frames of other code (the harness, tests, the standard library) have their line
// events switched off at their CALL event, so they cost one call each. `owner` keeps `bitmap` alive.
void start_line_trace(std::vector<PyObject*> codes, unsigned char* bitmap, size_t size, PyObject* owner);

// Installs the same tracer on the calling thread (for threads the program starts).
void trace_current_thread();

}  // namespace sandbox
