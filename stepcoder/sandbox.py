"""Run untrusted programs against unit tests: a pool of sandbox workers, verdicts, executed lines.

The trainer process never forks (fork cost grows with its resident memory, and forking a threaded
process can deadlock). ``Sandbox`` instead ``posix_spawn``s a few small worker interpreters
(``stepcoder/_worker.py``) that fork one isolated child per test through the C++ extension
``stepcoder._sandbox``: seccomp-bpf, rlimits, Landlock (reads and writes), an unprivileged uid when
root, a session of its own, namespaces where the kernel allows (with a fresh /proc and a tmpfs per
test), a CPU-time limit enforced from outside with a wall-clock backstop, output caps, and line
tracing into shared memory. Programs are judged by the CPU time they used, not by the time they waited
for a CPU, so a busy machine does not turn a correct program into a timeout.
Each test's program, input and output files are memfds created here and handed to the worker by
descriptor, so a worker never holds a job's data. Expected outputs never leave this process: the
comparison happens here (``stepcoder.verdicts``), on what the program printed or returned.

    from stepcoder.sandbox import Sandbox, TestCase
    with Sandbox(workers=2, timeout=2.0, memory_mb=1024) as sb:
        r = sb.run("a, b = map(int, input().split())\\nprint(a + b)\\n", [TestCase("1 2\\n", "3\\n")])
        r.verdict, r.executed_lines   # "pass", [1, 2]
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import pickle
import queue
import signal
import site
import socket
import sys
import tempfile
import threading
import warnings
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterable, Sequence

from stepcoder import _worker
from stepcoder.verdicts import (
    KINDS,
    TAIL_BYTES,
    VERDICTS,
    Result,
    TestCase,
    TestResult,
    classify,
    compile_warnings,
    job_result,
    parse_report,
    values_equal,
)

__all__ = ["KINDS", "TAIL_BYTES", "VERDICTS", "Limits", "Result", "Sandbox", "SandboxError", "TestCase", "TestResult",
           "values_equal"]

C_TRACER_SLOWDOWN = 3.0    # limits stretch by this on Python < 3.12: the C trace function costs ~3x CPU
WALL_FACTOR, WALL_SLACK = 4.0, 1.0  # the default wall backstop: WALL_FACTOR x timeout + WALL_SLACK seconds
WORKER_START_TIMEOUT = 60.0
REPLY_SLACK = 10.0         # seconds a worker may take beyond a test's deadline before it is presumed dead


class SandboxError(RuntimeError):
    """The sandbox itself failed (not the program under test)."""


class _WorkerLost(Exception):
    """A worker died, stopped answering or failed; its job is retried once on a fresh one."""


@dataclass(frozen=True)
class Limits:
    """What one job is judged under. A pool's settings are the defaults; ``submit`` and ``run_many``
    take any of them per job (a server judging for many clients with different settings)."""

    timeout: float
    wall_timeout: float
    memory_mb: int
    trace: bool
    stop_on_first_failure: bool
    tail_bytes: int = TAIL_BYTES  # how much of each test's stdout and stderr a result keeps


@dataclass(frozen=True)
class _Job:
    program: str
    tests: tuple[TestCase, ...]
    kind: str
    entry: str | None
    setup: str
    limits: Limits


class Sandbox:
    """A pool of sandbox workers. Use as a context manager, or call ``close()``.

    Args:
        workers: worker processes (default: the CPU count); tests of one program run in order on one
            worker, programs run in parallel across workers.
        timeout: CPU seconds per test, every thread of the program counted: the limit a program is
            judged by, whatever else the machine is running.
        wall_timeout: wall-clock seconds per test, a backstop for programs that sleep or block
            (verdict ``timeout`` too); default ``4 x timeout + 1``. Both limits stretch x3 while
            tracing on Python < 3.12, where the C trace function triples a program's CPU time.
        memory_mb: address-space limit per test child (RLIMIT_AS).
        output_bytes: cap on stdout, on stderr and on any file the program writes.
        trace: record executed lines (``Result.executed_lines``).
        stop_on_first_failure: stop a program's tests at its first non-passing one.
        site_packages: let programs import third-party packages installed beside this Python
            (numpy, scipy); the standard library is always there.
        namespaces: let each worker enter new namespaces where the kernel allows (off: seccomp,
            Landlock, rlimits and the uid change still apply).
    """

    def __init__(self, workers: int | None = None, timeout: float = 2.0, memory_mb: int = 1024, *,
                 wall_timeout: float | None = None, output_bytes: int = 1 << 20, trace: bool = True, stop_on_first_failure: bool = True,
                 open_files: int = 64, processes: int = 64, site_packages: bool = True, namespaces: bool = True):
        workers = (os.cpu_count() or 1) if workers is None else workers
        _require(isinstance(workers, int) and workers >= 1, f"workers must be a positive int, got {workers!r}")
        _require(_positive(timeout), f"timeout must be a positive number of seconds, got {timeout!r}")
        wall_timeout = WALL_FACTOR * timeout + WALL_SLACK if wall_timeout is None else wall_timeout
        _require(_positive(wall_timeout) and wall_timeout >= timeout,
                 f"wall_timeout must be a number of seconds >= timeout ({timeout!r}), got {wall_timeout!r}")
        _require(isinstance(memory_mb, int) and memory_mb >= 64, f"memory_mb must be an int >= 64, got {memory_mb!r}")
        _require(isinstance(output_bytes, int) and output_bytes >= 1024,
                 f"output_bytes must be an int >= 1024, got {output_bytes!r}")
        _require(isinstance(open_files, int) and open_files >= 16,
                 f"open_files must be an int >= 16, got {open_files!r}")
        _require(isinstance(processes, int) and processes >= 1, f"processes must be a positive int, got {processes!r}")
        self.timeout = float(timeout)
        self.wall_timeout = float(wall_timeout)
        self.trace = trace
        self.stop_on_first_failure = stop_on_first_failure
        self.output_bytes = output_bytes
        self.defaults = Limits(self.timeout, self.wall_timeout, memory_mb, trace, stop_on_first_failure)
        self._limits = {"output_bytes": output_bytes, "open_files": open_files, "processes": processes}
        self._site_dirs = [d for d in site.getsitepackages() if os.path.isdir(d)] if site_packages else []
        self._namespaces = namespaces
        self._dev_null = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)  # stdin of call-based tests
        self._root = tempfile.mkdtemp(prefix="stepcoder-sandbox-")
        os.chmod(self._root, 0o711)
        self._spawned = 0
        self._spawn_lock = threading.Lock()
        self._idle: queue.SimpleQueue[_WorkerProcess | None] = queue.SimpleQueue()
        self._all: list[_WorkerProcess] = []
        self._closed = False
        self._broken: str | None = None
        self._finalizer = weakref.finalize(self, _shutdown, self._all, self._root, self._dev_null)
        self._threads = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="stepcoder-sandbox")
        try:
            for _ in range(workers):
                self._idle.put(self._spawn())
        except BaseException:
            self.close()
            raise
        self._layers = self._all[0].layers
        if not self._layers["landlock"]:
            reason = self._layers["refused"].get("landlock", "this kernel has no Landlock")
            warnings.warn(f"stepcoder.sandbox: Landlock is unavailable ({reason}), so reads are confined only by "
                          "the uid: programs can read world-readable files, datasets included", RuntimeWarning,
                          stacklevel=2)

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        """Stops every worker (and so every test child) and removes the pool's directories."""
        if self._closed:
            return
        self._closed = True
        self._threads.shutdown(wait=True)
        self._finalizer()

    def capabilities(self) -> dict:
        """The isolation layers active in the workers (a layer the kernel refused is False)."""
        return dict(self._layers)

    def worker_pids(self) -> list[int]:
        return [worker.pid for worker in self._all if worker.alive]

    def run(self, program: str, tests: Sequence[TestCase], kind: str = "stdin", entry: str | None = None,
            setup: str = "", **limits) -> Result:
        """Judges one program against its tests.

        `setup` is code run (untraced) in the program's namespace before it: the implicit imports of
        LeetCode-style problems, say. It never shifts the program's line numbers. Keyword arguments
        override the pool's ``Limits`` for this job (``timeout``, ``wall_timeout``, ``memory_mb``,
        ``trace``, ``stop_on_first_failure``, ``tail_bytes``).
        """
        return self.run_many([(program, tests, kind, entry, setup)], **limits)[0]

    def submit(self, program: str, tests: Sequence[TestCase], kind: str = "stdin", entry: str | None = None,
               setup: str = "", **limits) -> Future:
        """Like ``run``, but returns at once with a Future of the Result (to judge while generating)."""
        job = _check_job(0, (program, tests, kind, entry, setup), self.limits(**limits))
        return self._submit(job)

    def run_many(self, jobs: Iterable[tuple], progress: bool = False, **limits) -> list[Result]:
        """Judges many ``(program, tests[, kind[, entry[, setup]]])`` jobs in parallel; results in order."""
        jobs = list(jobs)
        futures = self.submit_many(jobs, [limits] * len(jobs))
        if progress:
            from tqdm.auto import tqdm

            for future in tqdm(futures, desc="sandbox", unit="program"):
                future.result()
        return [future.result() for future in futures]

    def submit_many(self, jobs: Sequence[tuple], limits: Sequence[dict]) -> list[Future]:
        """Futures of many jobs' Results, each job with its own limit overrides. Every job is checked
        before any is submitted: one bad job raises ValueError (naming it) and nothing runs."""
        _require(len(limits) == len(jobs), f"{len(jobs)} jobs but {len(limits)} limit overrides")
        checked = []
        for index, (job, overrides) in enumerate(zip(jobs, limits)):
            try:
                resolved = self.limits(**overrides)
            except ValueError as error:
                raise ValueError(f"job {index}: {error}") from None
            checked.append(_check_job(index, job, resolved))
        return [self._submit(job) for job in checked]

    def limits(self, **overrides) -> Limits:
        """The pool's defaults with `overrides`, checked. A new ``timeout`` without a ``wall_timeout``
        brings the default backstop for it (``4 x timeout + 1``)."""
        unknown = set(overrides) - set(Limits.__dataclass_fields__)
        _require(not unknown, f"unknown limit(s) {sorted(unknown)}; expected {list(Limits.__dataclass_fields__)}")
        given = {name: value for name, value in overrides.items() if value is not None}
        if not given:
            return self.defaults
        timeout = given.get("timeout", self.timeout)
        _require(_positive(timeout), f"timeout must be a positive number of seconds, got {timeout!r}")
        if "wall_timeout" not in given:
            given["wall_timeout"] = WALL_FACTOR * timeout + WALL_SLACK if "timeout" in given else self.wall_timeout
        wall = given["wall_timeout"]
        _require(_positive(wall) and wall >= timeout,
                 f"wall_timeout must be a number of seconds >= timeout ({timeout!r}), got {wall!r}")
        memory = given.get("memory_mb", self.defaults.memory_mb)
        _require(type(memory) is int and memory >= 64, f"memory_mb must be an int >= 64, got {memory!r}")
        for flag in ("trace", "stop_on_first_failure"):
            _require(type(given.get(flag, False)) is bool, f"{flag} must be a bool, got {given.get(flag)!r}")
        tail = given.get("tail_bytes", TAIL_BYTES)
        _require(type(tail) is int and tail >= 0, f"tail_bytes must be an int >= 0, got {tail!r}")
        return Limits(**{**self.defaults.__dict__, **given, "timeout": float(timeout), "wall_timeout": float(wall)})

    # ----------------------------------------------------------------------------------------------

    def _submit(self, job: _Job) -> Future:
        if self._closed:
            raise ValueError("this Sandbox is closed")
        return self._threads.submit(self._judge_with_retry, job)

    def _spawn(self) -> _WorkerProcess:
        with self._spawn_lock:
            self._spawned += 1
            work_dir = os.path.join(self._root, f"w{self._spawned}")
        os.mkdir(work_dir, 0o711)
        worker = _WorkerProcess({"work_root": work_dir, "site_dirs": self._site_dirs, "namespaces": self._namespaces})
        self._all.append(worker)
        return worker

    def _judge_with_retry(self, job: _Job) -> Result:
        """Every path gives the worker back to the pool, or a fresh one in its place: a job that fails
        in any way must never leave the pool a worker short (the next run would wait forever)."""
        for attempt in range(2):
            worker = self._idle.get()
            if worker is None:  # the pool could not replace a worker
                self._idle.put(None)
                raise SandboxError(f"the sandbox pool is broken: {self._broken}")
            try:
                result = self._judge(worker, job)
            except _WorkerLost as lost:
                self._replace(worker)
                if attempt == 1:
                    return Result("runtime_error",
                                  detail=f"the sandbox worker failed twice running this program ({lost})")
                continue
            except BaseException:  # bad test data (ValueError) or a child that could not be isolated
                self._replace(worker)
                raise
            self._idle.put(worker)
            return result
        raise AssertionError("unreachable")

    def _replace(self, worker: _WorkerProcess) -> None:
        worker.stop()
        self._all.remove(worker)
        try:
            self._idle.put(self._spawn())
        except BaseException as error:
            self._broken = f"{type(error).__name__}: {error}"
            self._idle.put(None)
            raise

    def _judge(self, worker: _WorkerProcess, job: _Job) -> Result:
        """Each test: the program, input and empty output files go to the worker as memfds; the child
        compiles and runs; its outputs are read back here. The worker never holds a job's data."""
        given = job.limits
        stretch = C_TRACER_SLOWDOWN if given.trace and worker.layers["line_tracer"] == "c-trace" else 1.0
        cpu, wall = given.timeout * stretch, given.wall_timeout * stretch
        # RLIMIT_CPU stays as the kernel's own backstop, a second past the limit the worker enforces
        limits = dict(self._limits, timeout=cpu, wall_timeout=wall, cpu_seconds=math.ceil(cpu) + 1,
                      memory_bytes=given.memory_mb << 20)
        message = {"op": "test", "kind": job.kind, "entry": job.entry, "setup": job.setup, "trace": given.trace,
                   "limits": limits, "lines": _line_count(job.program)}
        tests: list[TestResult] = []
        compiler_warnings: list[str] = []
        lines: list[int] = []
        cap = self.output_bytes
        with _Memfd("program", job.program.encode("utf-8", "surrogatepass")) as program:
            for index, test in enumerate(job.tests):
                # One sealed file carries the test's data: stdin for stdin programs, else the input
                # (arguments, test code), with /dev/null as stdin.
                data = _Memfd("input", _test_payload(job.kind, test))
                with data, _Memfd("stdout") as stdout, _Memfd("stderr") as stderr, _Memfd("result") as result:
                    stdin = data.fd if job.kind == "stdin" else self._dev_null
                    raw = worker.call(dict(message, first=index == 0), wall + REPLY_SLACK,
                                      (program.fd, stdin, stdout.fd, stderr.fd, result.fd, data.fd))
                    outputs = (stdout.read(cap + 1), stderr.read(cap + 1), result.read(cap + 1))
                report = parse_report(outputs[2]) if len(outputs[2]) < cap else None
                if report is not None and report.get("status") == "compile_error":
                    return Result("compile_error", detail=str(report.get("detail"))[:500])
                if index == 0 and report is not None:
                    compiler_warnings = compile_warnings(report)
                if raw["setup_error"] is not None:
                    raise SandboxError(f"a test child could not be isolated: {raw['setup_error']}")
                tests.append(classify(raw, test, job.kind, outputs, report, cap, given.tail_bytes))
                lines = raw["executed_lines"]
                if tests[-1].verdict != "pass" and given.stop_on_first_failure:
                    break
        return job_result(tests, lines, compiler_warnings)


class _Memfd:
    """A memory file for one test: sealed read-only when it carries data for the child (the program, its
    input), writable and empty for the child's outputs. Closed when the test is done."""

    def __init__(self, name: str, data: bytes | None = None):
        self.fd = os.memfd_create(name, os.MFD_CLOEXEC | (os.MFD_ALLOW_SEALING if data is not None else 0))
        try:
            if data is not None:
                view = memoryview(data)
                while view:
                    view = view[os.pwrite(self.fd, view, len(data) - len(view)):]
                fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS,
                            fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE)
        except BaseException:
            os.close(self.fd)
            raise

    def read(self, size: int) -> bytes:
        return os.pread(self.fd, size, 0)

    def __enter__(self) -> _Memfd:
        return self

    def __exit__(self, *exc_info) -> None:
        os.close(self.fd)


def _test_payload(kind: str, test: TestCase) -> bytes:
    """What one test gives the program: the stdin text, the test code, or the pickled arguments."""
    if kind in ("stdin", "assert"):
        return test.input.encode()
    return pickle.dumps(test.input, protocol=pickle.HIGHEST_PROTOCOL)


def _line_count(program: str) -> int:
    """An upper bound of the program's line numbers plus one (the bitmap's size): Python also breaks
    lines at a lone carriage return and at form feeds within a line never."""
    return program.count("\n") + program.count("\r") + 2


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _check_job(index: int, job, limits: Limits) -> _Job:
    where = f"job {index}"
    _require(isinstance(job, (tuple, list)) and 2 <= len(job) <= 5,
             f"{where}: expected (program, tests[, kind[, entry[, setup]]]), got {type(job).__name__}")
    program, tests, kind, entry, setup = (*job, *("stdin", None, "")[len(job) - 2:])
    _require(isinstance(program, str), f"{where}: program must be a str, got {type(program).__name__}")
    _require(kind in KINDS, f"{where}: unknown kind {kind!r}; expected one of {', '.join(KINDS)}")
    if kind in ("function", "method"):
        _require(isinstance(entry, str) and entry.isidentifier(),
                 f"{where}: kind {kind!r} needs entry, the name of the function to call (got {entry!r})")
    else:
        _require(entry is None or (isinstance(entry, str) and entry.isidentifier()),
                 f"{where}: entry must be None or a function name, got {entry!r}")
    _require(isinstance(setup, str), f"{where}: setup must be a str (code run before the program)")
    if setup:
        try:
            _worker.compile_quietly(setup, "<setup>")
        except (SyntaxError, ValueError, OverflowError, RecursionError, MemoryError) as error:
            raise ValueError(f"{where}: the setup code does not compile: {error!r}") from None
    _require(isinstance(tests, (list, tuple)) and len(tests) > 0, f"{where}: tests must be a non-empty list")
    for number, test in enumerate(tests):
        at = f"{where}, test {number}"
        _require(isinstance(test, TestCase), f"{at}: expected a TestCase, got {type(test).__name__}")
        if kind == "stdin":
            _require(isinstance(test.input, str), f"{at}: stdin input must be a str")
            _require(isinstance(test.expected, str), f"{at}: expected stdout must be a str")
        elif kind == "assert":
            _require(isinstance(test.input, str), f"{at}: assert input must be test code (a str)")
            _require(test.expected is None, f"{at}: assert tests have no expected value (passing = no exception)")
            try:
                _worker.compile_quietly(test.input, "<test>")
            except (SyntaxError, ValueError, OverflowError, RecursionError, MemoryError) as error:
                raise ValueError(f"{at}: the test code does not compile: {error!r}") from None
        else:
            _require(isinstance(test.input, (list, tuple)), f"{at}: input must be the argument list")
    return _Job(program, tuple(tests), kind, entry, setup, limits)


class _WorkerProcess:
    """One spawned worker and the socket to it."""

    def __init__(self, config: dict):
        from stepcoder import _sandbox  # the compiled extension; the worker loads it from this path

        ours, theirs = socket.socketpair()
        config = dict(config, extension=_sandbox.__file__)
        argv = [sys.executable, "-I", "-S", "-B", "-X", "utf8", _worker.__file__, json.dumps(config)]
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "OPENBLAS_NUM_THREADS": "1",
               "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MALLOC_ARENA_MAX": "2"}
        try:
            self.pid = os.posix_spawn(sys.executable, argv, env, file_actions=[
                (os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
                (os.POSIX_SPAWN_DUP2, theirs.fileno(), 3),
            ], setsigmask=())
        finally:
            theirs.close()
        self.work_dir = config["work_root"]
        self.sock = ours
        self.alive = True
        try:
            hello = self.call(None, WORKER_START_TIMEOUT)
        except _WorkerLost as lost:
            self.stop()
            raise SandboxError(f"a sandbox worker failed to start ({lost}); see its stderr above") from None
        self.layers = hello["layers"]

    def call(self, message: dict | None, timeout: float, fds: tuple[int, ...] = ()) -> dict:
        """Sends `message` (None: only receive) with `fds`, and waits at most `timeout` for the reply."""
        self.sock.settimeout(timeout)
        try:
            if message is not None:
                _worker.send(self.sock, message, fds)
            reply, _ = _worker.receive(self.sock)
        except OSError as error:
            raise _WorkerLost(f"{type(error).__name__}: {error}" if str(error) else type(error).__name__) from None
        if reply is None:
            raise _WorkerLost("the worker closed its socket")
        if "worker_error" in reply:  # e.g. cleanup after a hostile program: a fresh worker takes over
            raise _WorkerLost(f"sandbox worker error: {reply['worker_error']}")
        return reply

    def stop(self) -> None:
        if not self.alive:
            return
        self.alive = False
        self.sock.close()
        for wait in (1.0, None):
            if _wait_pid(self.pid, wait):
                break
            os.kill(self.pid, signal.SIGKILL)
        _remove_tree(self.work_dir)


def _wait_pid(pid: int, seconds: float | None) -> bool:
    """Reaps `pid`, waiting up to `seconds` (forever for None); False if it is still running."""
    import time

    end = None if seconds is None else time.monotonic() + seconds
    while True:
        try:
            done, _ = os.waitpid(pid, 0 if end is None else os.WNOHANG)
        except ChildProcessError:
            return True
        if done:
            return True
        if time.monotonic() >= end:
            return False
        time.sleep(0.01)


def _shutdown(workers: list[_WorkerProcess], root: str, dev_null: int) -> None:
    for worker in list(workers):
        worker.stop()
    workers.clear()
    _remove_tree(root)
    os.close(dev_null)


def _remove_tree(path: str) -> None:
    """Removes a pool or worker directory whatever a program left in it (shutil.rmtree recurses, and a
    program can nest directories deeper than Python's recursion limit)."""
    from stepcoder import _sandbox

    with contextlib.suppress(FileNotFoundError):
        _sandbox.empty_directory(path)
        os.rmdir(path)

