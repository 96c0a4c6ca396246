"""A sandbox worker: one small interpreter that forks an isolated child per test.

``stepcoder.sandbox.Sandbox`` starts each worker with ``posix_spawn`` as
``python -I -S -B -X utf8 _worker.py CONFIG_JSON`` and talks to it over fd 3 (length-prefixed pickles
of small control messages; both ends are trusted code). The worker never runs untrusted code, and never
holds a job's data: the pool puts the program, the test's input and empty stdout/stderr/result files in
memfds and passes their descriptors over the socket (SCM_RIGHTS); the worker forks a child through
``stepcoder._sandbox.run_child`` (every isolation layer), which reads and compiles the program itself,
runs it (``_child_main`` here) and writes into those files, which only the pool reads. So whatever a
child can find in the memory it inherits holds no earlier program, input or output, and expected
outputs never leave the pool, which compares.

This file is also imported by the trainer (``stepcoder.sandbox``) for ``canonical``, the one
encoding of return values that both the child and the comparison use, and for the framing.
"""
from __future__ import annotations

import builtins
import io
import json
import os
import pickle
import socket
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
TEST_DIR_BYTES = 64 << 20   # a test's tmpfs: its files together, and
TEST_DIR_INODES = 16384     # its files, directories and hard links
# Read-only for test children (Landlock), beside the import directories: shared libraries that extension
# modules load, the dynamic linker's cache, time zones, CPU topology (BLAS libraries size their threads).
SYSTEM_READ_PATHS = ("/lib", "/lib64", "/usr/lib", "/usr/lib64", "/usr/local/lib", "/etc/ld.so.cache",
                     "/etc/localtime", "/usr/share/zoneinfo", "/sys/devices/system/cpu", "/dev/zero",
                     "/dev/urandom", "/dev/random")
HIDDEN_PACKAGE = "stepcoder"  # site-packages entries children may not read: this package (its data) and its dist-info
SELF_CHECK_LIMITS = {"timeout": 5.0, "wall_timeout": 10.0, "memory_bytes": 1 << 30, "cpu_seconds": 6,
                     "output_bytes": 1 << 20, "open_files": 64, "processes": 64}
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


MAX_FDS = 8  # descriptors one message may carry


def receive(channel: socket.socket) -> tuple[dict | None, list[int]]:
    """The next message and the descriptors sent with it; (None, []) once the pool has closed."""
    header, fds, _, _ = socket.recv_fds(channel, HEADER.size, MAX_FDS)
    if not header:
        return None, fds
    while len(header) < HEADER.size:
        more = channel.recv(HEADER.size - len(header))
        if not more:
            return None, fds
        header += more
    body = _read_exact(channel, HEADER.unpack(header)[0])
    return (None if body is None else pickle.loads(body)), fds


def send(channel: socket.socket, message, fds: list[int] | tuple[int, ...] = ()) -> None:
    body = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    data = HEADER.pack(len(body)) + body
    sent = socket.send_fds(channel, [data], list(fds)) if fds else 0  # the descriptors ride on the first bytes
    channel.sendall(data[sent:])


def _read_exact(channel: socket.socket, size: int) -> bytes | None:
    buffer = bytearray(size)
    view, got = memoryview(buffer), 0
    while got < size:
        n = channel.recv_into(view[got:])
        if n == 0:
            return None
        got += n
    return bytes(buffer)


# --------------------------------------------------------------------------------------------------
# Inside a test child (after isolation, before and around the untrusted program).


def _exit_builtin(code=None):
    raise SystemExit(code)


def _start_tracing(codes: list, sandbox_module) -> None:
    """Record the program's executed lines; the program cannot switch it off or write the record.

    The tracer and the bitmap live in the extension's C state (see line_tracer.h). The Python functions
    that could stop or redirect it are replaced by stubs that keep no reference to the originals (which
    are then freed), so not even a program digging through closures or ``gc.get_objects()`` finds them.
    """
    sandbox_module.start_line_trace(codes, MONITORING_TOOL)
    if sys.version_info >= (3, 12):
        monitoring = sys.monitoring
        for name in ("use_tool_id", "free_tool_id", "clear_tool_id", "register_callback", "set_events",
                     "set_local_events"):
            if hasattr(monitoring, name):
                setattr(monitoring, name, _refuse_monitoring)
        return
    import threading

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


def _run_program(kind: str, entry: str | None, code, setup, test_input) -> dict:
    """Runs the program for one test. Returns the report the supervisor classifies."""
    namespace = {"__name__": "__main__" if kind == "stdin" else "__solution__", "__builtins__": builtins}
    try:
        if setup is not None:
            exec(setup, namespace)
        exec(code, namespace)
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


def _read_all(fd: int) -> bytes:
    """A memfd the pool wrote (and sealed), read from the start; then closed."""
    try:
        return os.pread(fd, os.fstat(fd).st_size, 0)
    finally:
        os.close(fd)


def _child_main(job: dict, sandbox_module) -> None:
    """The test child, isolated: compile the program, run it, report on fd 3, exit."""
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
    kind = job["kind"]
    source = _read_all(job["program_fd"]).decode("utf-8", "surrogatepass")
    if kind == "stdin":  # the input is stdin itself
        os.close(job["input_fd"])
        payload = b""
    else:
        payload = _read_all(job["input_fd"])
    try:
        code, compiler_warnings = compile_quietly(source, "<solution>")
    except (SyntaxError, ValueError, OverflowError, RecursionError, MemoryError) as error:
        report = {"status": "compile_error", "detail": f"{type(error).__name__}: {error}"[:500]}
    else:
        setup = compile_quietly(job["setup"], "<setup>")[0] if job["setup"] else None
        if kind == "assert":
            test_input = compile_quietly(payload.decode("utf-8"), "<test>")[0]
        else:
            test_input = pickle.loads(payload) if kind in ("function", "method") else None
        del source, payload
        if job["trace"]:
            _start_tracing(_code_objects(code), sandbox_module)
        report = _run_program(kind, job["entry"], code, setup, test_input)
        report["warnings"] = compiler_warnings
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
    """Set up once (namespaces, Landlock ruleset, preloaded modules); then one child per test message."""

    def __init__(self, config: dict):
        self.sandbox = _load_extension(config["extension"])
        self.work_root = config["work_root"]
        builtins.exit = builtins.quit = _exit_builtin  # -S leaves them out; contest programs call exit()
        sys.path.extend(config["site_dirs"])
        for name in PRELOADED_MODULES:
            __import__(name)
        import_dirs = [os.path.abspath(entry) for entry in sys.path if entry and os.path.isdir(entry)]
        sandbox_uid = SANDBOX_UID_BASE + os.getpid()  # the host pid: inside a PID namespace we become 1
        self.namespaces = (self.sandbox.enter_worker_namespaces(self.work_root) if config["namespaces"] else
                           {"user": False, "net": False, "mount": False, "readonly_root": False, "pid": False,
                            "fresh_proc": False, "ipc": False, "uts": False,
                            "refused": "turned off (namespaces=False)"})
        probe = self.sandbox.capabilities()
        self.drop_privileges = probe["root"] and not self.namespaces["user"]
        self.uid, self.gid = (sandbox_uid,) * 2 if self.drop_privileges else (os.geteuid(), os.getegid())
        self.refused: dict[str, str] = {}
        self.test_dir = os.path.join(self.work_root, "test")
        os.mkdir(self.test_dir, 0o700)
        if self.drop_privileges:
            os.chown(self.test_dir, self.uid, self.gid)
        self.test_tmpfs = self.namespaces["mount"] and self._mount_test_tmpfs()
        if self.test_tmpfs:  # writes beneath the worker's tmpfs: only inside each test's own tmpfs
            self.sandbox.make_read_only(self.work_root)
        self.landlock_ruleset = self._landlock_ruleset(import_dirs, config["site_dirs"]) \
            if probe["landlock_abi"] > 0 else -1
        self.seccomp = probe["seccomp"]
        self.keep_fds = self._keep_imports_reachable() if self.drop_privileges else []
        self._self_check()

    def _mount_test_tmpfs(self) -> bool:
        """A tmpfs of its own for the test directory: its size and inode caps bound what one test can
        leave there, and so what emptying it after the test costs."""
        try:
            self.sandbox.mount_test_dir(self.test_dir, self.uid, self.gid, TEST_DIR_BYTES, TEST_DIR_INODES)
        except OSError as error:
            self.refused["test_tmpfs"] = str(error)
            return False
        return True

    def _landlock_ruleset(self, import_dirs: list[str], site_dirs: list[str]) -> int:
        """Reads: the import directories (not this package's entries in site-packages), system
        libraries and a few files Python and its extension modules open; writes: the test directory.

        With a mount namespace this package's directories are covered by empty mounts and each
        site-packages directory is one rule; without, every other entry is a rule of its own (each
        rule costs every test child time when it restricts itself)."""
        sites = {os.path.abspath(d) for d in site_dirs}
        read = [d for d in import_dirs if d not in sites]
        for site_dir in sorted(sites & set(import_dirs)):
            names = sorted(os.listdir(site_dir))
            hidden = [os.path.join(site_dir, name) for name in names if _ours(name)]
            if self.namespaces["mount"] and self._hide(hidden):
                read.append(site_dir)
            else:
                read += [os.path.join(site_dir, name) for name in names if not _ours(name)]
        try:
            # Landlock ignores a rule on a mount point: with a tmpfs per test, the rule goes one level up.
            writable = self.work_root if self.test_tmpfs else self.test_dir
            return self.sandbox.landlock_ruleset(writable, read + list(SYSTEM_READ_PATHS), ["/dev/null"],
                                                 sorted(sites))
        except OSError as error:
            self.refused["landlock"] = str(error)
            return -1

    def _hide(self, paths: list[str]) -> bool:
        """Covers the directories among `paths` with empty mounts; False if a file is among them (a
        file cannot be covered so) or the kernel refuses."""
        if not all(os.path.isdir(path) for path in paths):
            return False
        try:
            for path in paths:
                self.sandbox.hide_directory(path)
        except OSError as error:
            self.refused["hide_package"] = str(error)
            return False
        return True

    def _self_check(self) -> None:
        """Forks one empty child with every layer on; a layer the kernel or container refuses is
        switched off (and reported) rather than failing every test."""
        streams = [os.memfd_create(name) for name in ("stdin", "stdout", "stderr", "result")]
        try:
            while True:
                error = self._fork(lambda: None, streams, [], SELF_CHECK_LIMITS)["setup_error"]
                if error is None:
                    return
                if "landlock" in error and self.landlock_ruleset >= 0:
                    os.close(self.landlock_ruleset)
                    self.landlock_ruleset = -1
                    self.refused["landlock"] = error
                elif "seccomp" in error and self.seccomp:
                    self.seccomp = False
                    self.refused["seccomp"] = error
                elif "setresuid" in error and self.drop_privileges:
                    self.drop_privileges = False
                    self.refused["drop_privileges"] = error
                else:
                    raise RuntimeError(f"a sandbox child could not be set up: {error}")
        finally:
            for fd in streams:
                os.close(fd)

    def layers(self) -> dict:
        return {
            "seccomp": self.seccomp,
            "landlock": self.landlock_ruleset >= 0,
            "rlimits": True,
            "no_new_privs": True,
            "unprivileged_uid": self.drop_privileges,
            "own_session": True,
            "test_tmpfs": self.test_tmpfs,
            "namespaces": self.namespaces,
            "refused": self.refused,
            "line_tracer": "sys.monitoring" if sys.version_info >= (3, 12) else "c-trace",
            "python": sys.version.split()[0],
        }

    def _keep_imports_reachable(self) -> list[int]:
        """Import paths the sandbox uid could not read (a Python under root's mode-700 home) are
        reopened as directory handles and put on sys.path as /proc/self/fd/N: a process may follow
        its own fd links, and Landlock keeps everything above those directories unreadable."""
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

    def handle(self, message: dict, fds: list[int]):
        if message["op"] != "test":
            raise ValueError(f"unknown op {message['op']!r}")
        return self.run_test(message, fds)

    def run_test(self, message: dict, fds: list[int]) -> dict:
        """One test child. `fds`: program, stdin, stdout, stderr, result and input files, which the
        child reads and writes and the pool reads back; this process never reads or writes them. The
        reply carries the lines run so far by this program's tests (the bitmap is reset at its first)."""
        if len(fds) != 6:
            raise ValueError(f"a test needs 6 descriptors, got {len(fds)}")
        program_fd, stdin_fd, stdout_fd, stderr_fd, result_fd, input_fd = fds
        if message["first"]:
            self.sandbox.reset_line_bitmap(message["lines"])
        job = {"kind": message["kind"], "entry": message["entry"], "setup": message["setup"],
               "trace": message["trace"], "program_fd": program_fd, "input_fd": input_fd}
        outcome = self._fork(lambda: _child_main(job, self.sandbox), (stdin_fd, stdout_fd, stderr_fd, result_fd),
                             [program_fd, input_fd], message["limits"])
        outcome["executed_lines"] = self.sandbox.executed_lines() if message["trace"] else []
        return outcome

    def _fork(self, body, streams, extra_fds: list[int], limits: dict) -> dict:
        """One test child in the test directory, which is empty again when this returns."""
        try:
            stdin_fd, stdout_fd, stderr_fd, result_fd = streams
            return self.sandbox.run_child(
                body, workdir=self.test_dir, stdin_fd=stdin_fd, stdout_fd=stdout_fd, stderr_fd=stderr_fd,
                result_fd=result_fd, keep_fds=self.keep_fds + extra_fds, cpu_timeout=limits["timeout"],
                wall_timeout=limits["wall_timeout"], memory_bytes=limits["memory_bytes"], cpu_seconds=limits["cpu_seconds"],
                file_size_bytes=limits["output_bytes"], open_files=limits["open_files"],
                processes=limits["processes"], drop_privileges=self.drop_privileges, uid=self.uid, gid=self.gid,
                landlock_ruleset=self.landlock_ruleset, seccomp=self.seccomp)
        finally:
            self.sandbox.empty_directory(self.test_dir)


def _ours(name: str) -> bool:
    return name == HIDDEN_PACKAGE or name.startswith(HIDDEN_PACKAGE + "-")


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
    channel = socket.socket(fileno=3)
    worker = Worker(json.loads(sys.argv[1]))
    send(channel, {"layers": worker.layers()})
    import gc

    gc.collect()
    gc.freeze()  # keep the forked children's copy-on-write pages untouched by the collector
    try:
        while True:
            message, fds = receive(channel)
            if message is None:
                break  # the pool closed its end
            try:
                reply = worker.handle(message, fds)
            except Exception as error:  # a worker-side failure goes back to the pool, which replaces us
                reply = {"worker_error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()}
            finally:
                for fd in fds:
                    os.close(fd)
            send(channel, reply)
    except ConnectionError:
        pass  # the pool went away


if __name__ == "__main__":
    main()
