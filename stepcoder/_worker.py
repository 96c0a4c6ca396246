"""A sandbox worker: one small interpreter that forks an isolated child per test.

``stepcoder.sandbox.Sandbox`` starts each worker with ``posix_spawn`` as
``python -I -S -B -X utf8 _worker.py CONFIG_JSON`` and talks to it over fd 3
(length-prefixed pickles; both ends are trusted code). The worker never runs untrusted code itself: it
compiles the program (a SyntaxError costs no fork), then for each test forks a child through
``stepcoder._sandbox.run_child``, which applies every isolation layer before calling back into
``_child_main`` here. The worker only ever holds a test's *input*: expected outputs stay in the
trainer, which compares, so nothing a child can read from its own memory gives the answer away.

This file is also imported by the trainer (``stepcoder.sandbox``) for ``canonical``, the one
encoding of return values that both the child and the comparison use.
"""
from __future__ import annotations

import builtins
import io
import json
import mmap
import os
import pickle
import shutil
import stat
import struct
import sys
import traceback
import warnings

# Imported once here, so a test child starts with them loaded (and can use them after it lost the
# right to read the interpreter's files).
PRELOADED_MODULES = (
    "abc", "array", "bisect", "calendar", "cmath", "collections", "collections.abc", "contextlib", "copy",
    "dataclasses", "datetime", "decimal", "enum", "fractions", "functools", "hashlib", "heapq", "itertools",
    "linecache", "math", "numbers", "operator", "queue", "random", "re", "statistics", "string", "struct",
    "textwrap", "threading", "time", "typing", "unicodedata",
)

MONITORING_TOOL = 4  # sys.monitoring tool ids 0-2 and 5 are named for debuggers, coverage, profilers, optimizers
BIG_INT_BITS = 10_000  # above this, ints travel as hex: decimal conversion is capped at 4300 digits
SANDBOX_UID_BASE = 1_000_000_000  # + worker pid: a uid of its own per worker, so RLIMIT_NPROC is per worker
HEADER = struct.Struct("<I")
MAX_COMPILE_WARNINGS = 10     # a program's compile-time warnings kept for its Result, each cut to
COMPILE_WARNING_CHARS = 300   # this many characters (a hostile program may trigger thousands)


def compile_quietly(source: str, filename: str):
    """compile(), returning the compiler's warnings (SyntaxWarning for `1if x`, bad escapes, `is` with a
    literal, ...) as short strings instead of printing them: the worker's stderr is the trainer's console."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code = compile(source, filename, "exec", dont_inherit=True)
    return code, [f"line {w.lineno}: {w.category.__name__}: {w.message}"[:COMPILE_WARNING_CHARS]
                  for w in caught[:MAX_COMPILE_WARNINGS]]


def canonical(value, depth: int = 0):
    """A JSON-able, type-exact encoding of a value, for structural comparison outside the child.

    Types are tested with ``type(x) is``, never ``isinstance`` or ``==``, so a subclass or an object
    with a lying ``__eq__`` becomes its repr and cannot equal an expected value.
    """
    kind = type(value)
    if value is None or kind is bool or kind is str or kind is float:
        return value
    if kind is int:
        return value if value.bit_length() <= BIG_INT_BITS else {"__int__": hex(value)}
    if depth > 100:
        return {"__repr__": "<nested too deeply>"}
    if kind is list or kind is tuple:
        return [canonical(item, depth + 1) for item in value]
    if kind is dict:
        return {"__dict__": [[canonical(k, depth + 1), canonical(v, depth + 1)] for k, v in value.items()]}
    if kind is set or kind is frozenset:
        return {"__set__": [canonical(item, depth + 1) for item in value]}
    if kind is bytes:
        return {"__bytes__": value.hex()}
    if kind is complex:
        return {"__complex__": [value.real, value.imag]}
    try:
        text = repr(value)[:1000]
    except Exception:  # the object's own __repr__ is untrusted code; any failure just means "unequal"
        text = "<unrepresentable>"
    return {"__repr__": f"{kind.__name__}: {text}"}


# --------------------------------------------------------------------------------------------------
# Framing between the pool and the worker.


def read_exact(fd: int, size: int) -> bytes | None:
    chunks, left = [], size
    while left:
        chunk = os.read(fd, min(left, 1 << 20))
        if not chunk:
            return None
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def receive(fd: int):
    header = read_exact(fd, HEADER.size)
    if header is None:
        return None
    body = read_exact(fd, HEADER.unpack(header)[0])
    return None if body is None else pickle.loads(body)


def send(fd: int, message) -> None:
    body = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    view = memoryview(HEADER.pack(len(body)) + body)
    while view:
        view = view[os.write(fd, view):]


# --------------------------------------------------------------------------------------------------
# Inside a test child (after isolation, before and around the untrusted program).


def _exit_builtin(code=None):
    raise SystemExit(code)


def _start_tracing(codes: list, bitmap, sandbox_module) -> None:
    """Record the program's executed lines into the shared bitmap; the program cannot switch it off.

    The functions that could stop the tracer are replaced by stubs that keep no reference to the
    originals (which are then freed), so not even a program digging through closures or
    ``gc.get_objects()`` can reach them.
    """
    if sys.version_info >= (3, 12):
        monitoring = sys.monitoring
        disable, line_event = monitoring.DISABLE, monitoring.events.LINE

        def on_line(code, line):
            bitmap[line] = 1
            return disable  # each (code, line) reports once, then runs at full speed

        monitoring.use_tool_id(MONITORING_TOOL, "stepcoder")
        monitoring.register_callback(MONITORING_TOOL, line_event, on_line)
        for code in codes:
            monitoring.set_local_events(MONITORING_TOOL, code, line_event)
        for name in ("use_tool_id", "free_tool_id", "clear_tool_id", "register_callback", "set_events",
                     "set_local_events"):
            if hasattr(monitoring, name):
                setattr(monitoring, name, _refuse_monitoring)
        return
    import threading

    sandbox_module.start_line_trace(codes, bitmap)
    sys.settrace = _refuse_settrace
    threading.settrace = _refuse_settrace
    threading._trace_hook = _trace_new_thread  # threading passes it to sys.settrace in each new thread
    _trace_new_thread.install = sandbox_module.trace_current_thread


def _trace_new_thread(frame, event, arg):
    """Marker handed to sys.settrace by threading for each new thread (Python < 3.12)."""


def _refuse_settrace(function):
    if function is _trace_new_thread:
        _trace_new_thread.install()  # the C tracer, on the thread that is starting
        return
    raise RuntimeError("sys.settrace is reserved by the stepcoder sandbox's line tracer")


def _refuse_monitoring(*args, **kwargs):
    raise ValueError("sys.monitoring is reserved by the stepcoder sandbox's line tracer")


def _run_program(job: dict, test_input):
    """Runs the program for one test. Returns the report the supervisor classifies."""
    kind, entry = job["kind"], job["entry"]
    namespace = {"__name__": "__main__" if kind == "stdin" else "__solution__", "__builtins__": builtins}
    try:
        if job["setup"] is not None:
            exec(job["setup"], namespace)
        exec(job["code"], namespace)
        if kind == "stdin":
            if entry is not None:
                _lookup(namespace, entry)()
            return {"status": "ok"}
        if kind == "assert":
            exec(test_input, namespace)
            return {"status": "ok"}
        if kind == "function":
            function = _lookup(namespace, entry)
        else:
            function = getattr(_lookup(namespace, "Solution")(), entry)
        value = function(*test_input)
    except SystemExit as exit_:
        if kind == "stdin" and exit_.code in (None, 0):
            return {"status": "ok"}
        return {"status": "exit", "detail": f"SystemExit({exit_.code!r})"}
    except MemoryError:
        return {"status": "memory", "detail": "MemoryError"}
    except BaseException as error:  # the program's own failure, reported as a runtime error
        traceback.print_exc()
        return {"status": "error", "detail": f"{type(error).__name__}: {error}"[:500]}
    try:
        return {"status": "ok", "value": canonical(value)}
    except BaseException as error:  # a value whose encoding fails (deep recursion, a raising __repr__)
        return {"status": "error", "detail": f"unencodable return value: {type(error).__name__}"}


def _lookup(namespace: dict, name: str):
    if name not in namespace:
        raise NameError(f"the program does not define {name!r}")
    return namespace[name]


def _child_main(job: dict, test_input, sandbox_module) -> None:
    # A home, a temp dir and a user name of its own: without them libraries ask NSS, which opens a socket.
    here = os.getcwd()
    os.environ.update(HOME=here, TMPDIR=here, USER="sandbox", LOGNAME="sandbox")
    sys.stdin = sys.__stdin__ = io.TextIOWrapper(io.BufferedReader(io.FileIO(0, "r", closefd=False)),
                                                 encoding="utf-8", errors="replace")
    stdout = io.TextIOWrapper(io.BufferedWriter(io.FileIO(1, "w", closefd=False), 1 << 16), encoding="utf-8",
                              errors="backslashreplace")
    stderr = io.TextIOWrapper(io.BufferedWriter(io.FileIO(2, "w", closefd=False)), encoding="utf-8",
                              errors="backslashreplace", line_buffering=True)
    sys.stdout = sys.__stdout__ = stdout
    sys.stderr = sys.__stderr__ = stderr
    if job["trace"]:
        _start_tracing(job["codes"], job["bitmap"], sandbox_module)
    report = _run_program(job, test_input)
    for stream in (stdout, stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed by the program, or over the output cap
            pass
    try:
        data = json.dumps(report).encode()
    except (TypeError, ValueError, RecursionError) as error:
        data = json.dumps({"status": "error", "detail": f"unencodable return value: {error}"[:500]}).encode()
    view = memoryview(data)
    try:
        while view:
            view = view[os.write(3, view):]
    except OSError:  # fd 3 closed or the result over the cap: the supervisor sees a missing report
        pass
    os._exit(0)


# --------------------------------------------------------------------------------------------------
# The worker.


class Worker:
    def __init__(self, config: dict):
        self.sandbox = _load_extension(config["extension"])
        self.work_root = config["work_root"]
        builtins.exit = builtins.quit = _exit_builtin  # -S leaves them out; contest programs call exit()
        sys.path.extend(config["site_dirs"])
        for name in PRELOADED_MODULES:
            __import__(name)
        self.namespaces = (self.sandbox.enter_worker_namespaces(self.work_root) if config["namespaces"] else
                           {"user": False, "net": False, "mount": False, "readonly_root": False, "pid": False,
                            "ipc": False, "uts": False, "pid_init": -1, "refused": "turned off (namespaces=False)"})
        probe = self.sandbox.capabilities()
        self.drop_privileges = probe["root"] and not self.namespaces["user"]
        self.uid, self.gid = ((SANDBOX_UID_BASE + os.getpid(),) * 2 if self.drop_privileges else
                              (os.geteuid(), os.getegid()))
        self.landlock = probe["landlock_abi"] > 0
        self.seccomp = probe["seccomp"]
        self.refused: dict[str, str] = {}
        self.keep_fds = self._keep_imports_reachable() if self.drop_privileges else []
        self.stdin, self.stdout, self.stderr, self.result = (os.memfd_create(name) for name in
                                                             ("stdin", "stdout", "stderr", "result"))
        self.tests_run = 0
        self.job: dict | None = None
        self.limits: dict = {"timeout": 5.0, "memory_bytes": 1 << 30, "cpu_seconds": 6, "output_bytes": 1 << 20,
                             "open_files": 64, "processes": 64}
        self._self_check()

    def _self_check(self) -> None:
        """Forks one empty child with every layer on; a layer the kernel or container refuses is
        switched off (and reported) rather than failing every test."""
        switches = {"landlock": "landlock", "seccomp": "seccomp", "setresuid": "drop_privileges"}
        while True:
            error = self._fork(lambda: None)["setup_error"]
            if error is None:
                return
            layer = next((attr for step, attr in switches.items() if step in error and getattr(self, attr)), None)
            if layer is None:
                raise RuntimeError(f"a sandbox child could not be set up: {error}")
            setattr(self, layer, False)
            self.refused[layer] = error

    def layers(self) -> dict:
        return {
            "seccomp": self.seccomp,
            "landlock": self.landlock,
            "rlimits": True,
            "no_new_privs": True,
            "unprivileged_uid": self.drop_privileges,
            "namespaces": self.namespaces,
            "refused": self.refused,
            "line_tracer": "sys.monitoring" if sys.version_info >= (3, 12) else "c-trace",
            "python": sys.version.split()[0],
        }

    def _keep_imports_reachable(self) -> list[int]:
        """Import paths the sandbox uid could not read (a Python under root's mode-700 home) are
        reopened as directory handles and put on sys.path as /proc/self/fd/N: a process may follow
        its own fd links, and nothing above those directories becomes reachable."""
        moved = {}
        for index, entry in enumerate(sys.path):
            if not entry or not os.path.isdir(entry) or _world_readable(entry):
                continue
            fd = os.open(entry, os.O_PATH | os.O_DIRECTORY)
            moved[os.path.abspath(entry)] = sys.path[index] = f"/proc/self/fd/{fd}"
        for module in list(sys.modules.values()):  # packages already imported (encodings, json, ...)
            search = getattr(module, "__path__", None)
            if isinstance(search, list):
                search[:] = [_relocate(path, moved) for path in search]
        sys.path_importer_cache.clear()
        return [int(path.rsplit("/", 1)[1]) for path in moved.values()]

    def handle(self, message: dict):
        op = message["op"]
        if op == "load":
            return self.load(message)
        if op == "test":
            return self.run_test(message["input"])
        if op == "finish":
            return self.finish()
        raise ValueError(f"unknown op {op!r}")

    def load(self, message: dict) -> dict:
        try:
            code, compiler_warnings = compile_quietly(message["program"], "<solution>")
        except (SyntaxError, ValueError, OverflowError, RecursionError, MemoryError) as error:
            return {"compile_error": f"{type(error).__name__}: {error}"}
        codes = _code_objects(code)
        last_line = max((line for c in codes for *_, line in c.co_lines() if line), default=0)
        setup = compile_quietly(message["setup"], "<setup>")[0] if message["setup"] else None
        self.job = {"code": code, "codes": codes, "setup": setup, "kind": message["kind"], "entry": message["entry"],
                    "trace": message["trace"], "bitmap": mmap.mmap(-1, last_line + 1)}
        self.limits = message["limits"]
        return {"ok": True, "warnings": compiler_warnings}

    def run_test(self, test_input) -> dict:
        job, limits = self.job, self.limits
        if job["kind"] == "assert":
            try:
                test_input = compile_quietly(test_input, "<test>")[0]
            except (SyntaxError, ValueError) as error:
                return {"test_error": f"the test code does not compile: {type(error).__name__}: {error}"}
        stdin = test_input.encode() if job["kind"] == "stdin" else b""
        for fd in (self.stdin, self.stdout, self.stderr, self.result):
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
        os.write(self.stdin, stdin)
        os.lseek(self.stdin, 0, os.SEEK_SET)
        outcome = self._fork(lambda: _child_main(job, test_input, self.sandbox))
        cap = limits["output_bytes"]
        outcome["stdout"] = os.pread(self.stdout, cap + 1, 0)
        outcome["stderr"] = os.pread(self.stderr, cap + 1, 0)
        outcome["result"] = os.pread(self.result, cap + 1, 0)
        return outcome

    def _fork(self, body) -> dict:
        limits = self.limits
        self.tests_run += 1
        workdir = os.path.join(self.work_root, f"t{self.tests_run}")
        os.mkdir(workdir, 0o700)
        try:
            if self.drop_privileges:
                os.chown(workdir, self.uid, self.gid)
            return self.sandbox.run_child(
                body, workdir=workdir, stdin_fd=self.stdin, stdout_fd=self.stdout, stderr_fd=self.stderr,
                result_fd=self.result, keep_fds=self.keep_fds, timeout=limits["timeout"],
                memory_bytes=limits["memory_bytes"], cpu_seconds=limits["cpu_seconds"],
                file_size_bytes=limits["output_bytes"], open_files=limits["open_files"],
                processes=limits["processes"], drop_privileges=self.drop_privileges, uid=self.uid, gid=self.gid,
                landlock=self.landlock, seccomp=self.seccomp)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)

    def finish(self) -> dict:
        bitmap = self.job["bitmap"]
        lines = [line for line in range(len(bitmap)) if bitmap[line]]
        bitmap.close()
        self.job = None
        return {"executed_lines": lines}


def _world_readable(path: str) -> bool:
    """Whether any uid can list `path` and reach it from "/"."""
    path = os.path.abspath(path)
    if (os.stat(path).st_mode & 0o005) != 0o005:
        return False
    while path != "/":
        path = os.path.dirname(path)
        if not os.stat(path).st_mode & stat.S_IXOTH:
            return False
    return True


def _relocate(path: str, moved: dict[str, str]) -> str:
    for old, new in sorted(moved.items(), key=lambda item: -len(item[0])):  # the deepest match
        if path == old or path.startswith(old + os.sep):
            return new + path[len(old):]
    return path


def _code_objects(code) -> list:
    found, stack = [], [code]
    while stack:
        current = stack.pop()
        found.append(current)
        stack.extend(const for const in current.co_consts if type(const) is type(code))
    return found


def _load_extension(path: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location("stepcoder._sandbox", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    channel = 3
    worker = Worker(json.loads(sys.argv[1]))
    send(channel, {"layers": worker.layers()})
    import gc

    gc.collect()
    gc.freeze()  # keep the forked children's copy-on-write pages untouched by the collector
    try:
        while (message := receive(channel)) is not None:
            try:
                reply = worker.handle(message)
            except Exception as error:  # a worker-side failure goes back to the pool, which raises it
                reply = {"worker_error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()}
            send(channel, reply)
    except ConnectionError:
        pass  # the pool went away: its end of the socket closed
    reaper = worker.namespaces["pid_init"]
    if reaper > 0:
        os.kill(reaper, 9)
        os.waitpid(reaper, 0)


if __name__ == "__main__":
    main()
