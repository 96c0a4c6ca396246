// stepcoder._sandbox: the Python face of the runner. The worker process (stepcoder/_worker.py) calls
// these; the trainer never does, so it never forks.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cerrno>
#include <cstring>
#include <fcntl.h>
#include <string>
#include <system_error>
#include <unistd.h>
#include <vector>

#include "child.h"
#include "landlock.h"
#include "line_tracer.h"
#include "namespaces.h"
#include "seccomp_filter.h"
#include "supervisor.h"
#include "test_dir.h"
#include "unique_fd.h"

namespace py = pybind11;
using namespace pybind11::literals;

namespace sandbox {
namespace {

constexpr char kSetupOk[] = "ok";

// The child reports its isolation on a pipe it closes before any untrusted code runs, so a program
// can neither forge a setup failure nor hide one.
void report_setup(int fd, const char* failed_step) {
  std::string message = kSetupOk;
  if (failed_step != nullptr) message = std::string(failed_step) + ": " + std::strerror(errno);
  ssize_t unused = write(fd, message.data(), message.size());
  (void)unused;
  close(fd);
}

std::string read_setup_report(int fd) {
  char buffer[512];
  const ssize_t n = read(fd, buffer, sizeof(buffer));
  return n > 0 ? std::string(buffer, static_cast<size_t>(n)) : std::string();
}

[[noreturn]] void run_body_and_exit(const py::function& body) {
  int code = 0;
  try {
    body();
  } catch (py::error_already_set& error) {
    error.restore();
    PyErr_Print();
    code = 1;
  }
  _exit(code);
}

py::object timeout_name(TimeoutKind kind) {
  switch (kind) {
    case TimeoutKind::kCpu: return py::str("cpu");
    case TimeoutKind::kWall: return py::str("wall");
    case TimeoutKind::kNone: break;
  }
  return py::none();
}

py::dict run_child(const py::function& body, const std::string& workdir, int stdin_fd, int stdout_fd, int stderr_fd,
                   int result_fd, std::vector<int> keep_fds, double cpu_timeout, double wall_timeout,
                   uint64_t memory_bytes,
                   uint64_t cpu_seconds, uint64_t file_size_bytes, uint64_t open_files, uint64_t processes,
                   bool drop_privileges, uint32_t uid, uint32_t gid, int landlock_ruleset, bool seccomp) {
  for (int fd : {stdin_fd, stdout_fd, stderr_fd, result_fd}) {
    if (fd < 4) throw py::value_error("run_child: stdio and result fds must be >= 4, got " + std::to_string(fd));
  }
  if (landlock_ruleset >= 0 && landlock_ruleset < 4) {
    throw py::value_error("run_child: the Landlock ruleset fd must be >= 4 (or -1 for none)");
  }
  if (!(cpu_timeout > 0) || !(wall_timeout > 0)) {
    throw py::value_error("run_child: cpu_timeout and wall_timeout must be positive");
  }
  int setup_pipe[2];
  if (pipe2(setup_pipe, O_CLOEXEC) != 0) throw_errno("pipe2");
  UniqueFd setup_read(setup_pipe[0]);
  UniqueFd setup_write(setup_pipe[1]);
  ChildSpec spec;
  spec.limits = {memory_bytes, cpu_seconds, file_size_bytes, open_files, processes};
  spec.workdir = workdir;
  spec.stdin_fd = stdin_fd;
  spec.stdout_fd = stdout_fd;
  spec.stderr_fd = stderr_fd;
  spec.result_fd = result_fd;
  spec.keep_fds = std::move(keep_fds);
  spec.keep_fds.push_back(setup_write.get());
  if (landlock_ruleset >= 0) spec.keep_fds.push_back(landlock_ruleset);
  spec.drop_privileges = drop_privileges;
  spec.uid = uid;
  spec.gid = gid;
  spec.landlock_ruleset = landlock_ruleset;
  spec.seccomp = seccomp;

  const long long start_ns = monotonic_ns();
  PyOS_BeforeFork();
  const pid_t pid = fork();
  if (pid == 0) {
    PyOS_AfterFork_Child();
    const char* failed = isolate_child(spec);
    report_setup(setup_write.get(), failed);
    if (failed != nullptr) _exit(127);
    run_body_and_exit(body);
  }
  const int fork_errno = errno;
  PyOS_AfterFork_Parent();
  if (pid < 0) {
    errno = fork_errno;
    throw_errno("fork");
  }
  setup_write.reset();
  ChildOutcome outcome;
  {
    py::gil_scoped_release release;
    outcome = supervise_child(pid, cpu_timeout, wall_timeout, start_ns);
  }
  const std::string setup = read_setup_report(setup_read.get());
  return py::dict("setup_error"_a = setup == kSetupOk ? py::object(py::none()) : py::object(py::str(setup.empty() ? "child died during setup" : setup)),
                  "timed_out"_a = timeout_name(outcome.timed_out), "exit_code"_a = outcome.exit_code, "signal"_a = outcome.signal,
                  "wall_seconds"_a = outcome.wall_seconds, "cpu_seconds"_a = outcome.cpu_seconds,
                  "max_rss_kb"_a = outcome.max_rss_kb);
}

py::dict namespaces(const std::string& work_root) {
  const NamespaceState state = enter_worker_namespaces(work_root);
  return py::dict("user"_a = state.user, "net"_a = state.net, "mount"_a = state.mount,
                  "readonly_root"_a = state.readonly_root, "pid"_a = state.pid, "fresh_proc"_a = state.fresh_proc,
                  "ipc"_a = state.ipc, "uts"_a = state.uts,
                  "refused"_a = state.refused.empty() ? py::object(py::none()) : py::object(py::str(state.refused)));
}

void line_trace(const py::list& codes, int monitoring_tool) {
  std::vector<PyObject*> pointers;
  for (const py::handle code : codes) {
    if (!PyCode_Check(code.ptr())) throw py::type_error("start_line_trace: codes must be code objects");
    pointers.push_back(code.ptr());
  }
  start_line_trace(pointers, monitoring_tool);
}

}  // namespace
}  // namespace sandbox

PYBIND11_MODULE(_sandbox, m) {
  m.doc() = "stepcoder's sandbox runner: isolation layers, supervision and line tracing of test children.";
  py::register_exception_translator([](std::exception_ptr pointer) {
    try {
      if (pointer) std::rethrow_exception(pointer);
    } catch (const std::system_error& error) {
      PyObject* args = Py_BuildValue("(is)", error.code().value(), error.what());
      PyErr_SetObject(PyExc_OSError, args);
      Py_XDECREF(args);
    }
  });
  m.def(
      "capabilities",
      [] {
        return py::dict("seccomp"_a = sandbox::seccomp_available(), "landlock_abi"_a = sandbox::landlock_abi(),
                        "root"_a = geteuid() == 0);
      },
      "What this kernel and identity allow, probed without changing the calling process. A worker's "
      "active layers (namespaces included) are reported by stepcoder.sandbox.Sandbox.capabilities().");
  m.def("enter_worker_namespaces", &sandbox::namespaces, "work_root"_a,
        "Move this (single-threaded) worker into new namespaces once; returns which are active. With a PID "
        "namespace the caller returns as PID 1 inside it, and the original process stays behind as a shim.");
  m.def("hide_directory", &sandbox::hide_directory, "path"_a,
        "In the worker's mount namespace, cover a directory with an empty read-only tmpfs.");
  m.def(
      "landlock_ruleset",
      [](const std::string& test_dir, std::vector<std::string> read, std::vector<std::string> read_write,
         std::vector<std::string> list) {
        return sandbox::build_landlock_ruleset({test_dir, std::move(read), std::move(read_write), std::move(list)});
      },
      "test_dir"_a, "read"_a, "read_write"_a, "list"_a,
      "A Landlock ruleset fd: full access beneath test_dir, reading beneath `read`, read+write of the "
      "`read_write` files, listing (only) the `list` directories, nothing else.");
  m.def(
      "mount_test_dir",
      [](const std::string& path, uint32_t uid, uint32_t gid, uint64_t size_bytes, uint64_t inodes) {
        sandbox::mount_test_dir(path, uid, gid, {size_bytes, inodes});
      },
      "path"_a, "uid"_a, "gid"_a, "size_bytes"_a, "inodes"_a, "A tmpfs of its own on the test directory `path`.");
  m.def("make_read_only", &sandbox::make_read_only, "path"_a, "Remount the mount at `path` read-only.");
  m.def("empty_directory", &sandbox::empty_directory, "path"_a,
        "Delete everything below `path`, iteratively (any depth), never following links.");
  m.def("reset_line_bitmap", &sandbox::reset_line_bitmap, "size"_a,
        "A fresh shared bitmap of `size` lines, held in C state (refused once tracing started here).");
  m.def("executed_lines", &sandbox::executed_lines, "The line numbers marked in the bitmap.");
  m.def("run_child", &sandbox::run_child, "body"_a, py::kw_only(), "workdir"_a, "stdin_fd"_a, "stdout_fd"_a,
        "stderr_fd"_a, "result_fd"_a, "keep_fds"_a, "cpu_timeout"_a, "wall_timeout"_a, "memory_bytes"_a, "cpu_seconds"_a,
        "file_size_bytes"_a, "open_files"_a, "processes"_a, "drop_privileges"_a, "uid"_a, "gid"_a,
        "landlock_ruleset"_a, "seccomp"_a,
        "Fork one isolated test child that calls `body()` and exits; supervise it to its CPU-time limit "
        "(all threads) with a wall-clock backstop. timed_out: None, 'cpu' or 'wall'.");
  m.def("start_line_trace", &sandbox::line_trace, "codes"_a, "monitoring_tool"_a,
        "In a test child, once: mark the bitmap for every line of `codes` that runs (C trace function "
        "before 3.12, sys.monitoring LINE events with a C callback from 3.12).");
  m.def("trace_current_thread", &sandbox::trace_current_thread, "Install the line tracer on this thread too.");
}
