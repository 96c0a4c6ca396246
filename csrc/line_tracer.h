// Line tracing of a test child's program. The bitmap of executed lines lives here, in C state, in a
// MAP_SHARED mapping the job creates before forking its test children: no Python object refers to it,
// so a program cannot write it (or redirect the tracer) from Python, only the tracer below can.
#pragma once

#include <Python.h>

#include <cstddef>
#include <vector>

namespace sandbox {

// A fresh, zeroed bitmap with one byte per line number 0..size-1 (the previous one is unmapped).
// Refused once tracing has started in this process.
void reset_line_bitmap(size_t size);

// The line numbers marked in the bitmap, ascending.
std::vector<int> executed_lines();

// In a test child: marks the bitmap for every line of `codes` that runs, on every thread. Python < 3.12:
// a C trace function (frames of other code get their line events switched off at their call), and
// frame.f_trace_lines becomes read-only to Python code. Python >= 3.12: sys.monitoring LINE events on
// `codes` only, for `monitoring_tool`, with a C callback that disables each location after its first
// hit and marks a line only when called for the line its calling frame is really at. Once per process:
// afterwards neither the bitmap nor the tracer can be replaced.
void start_line_trace(const std::vector<PyObject*>& codes, int monitoring_tool);

// Python < 3.12: installs the tracer on the calling thread too (threads the program starts). No-op on
// 3.12+, where sys.monitoring covers every thread, and before start_line_trace.
void trace_current_thread();

}  // namespace sandbox
