"""How a test's run becomes a verdict: the outcome of the child (signal, CPU or wall limit, exit code,
its own report) first; then what it printed or returned against the expected value. Everything here
reads what a hostile program could have written (its report on the result descriptor, its stdout),
so nothing may raise on it: a malformed report is a runtime error, never a crash of the judge.

Return values are compared as ``_worker.canonical`` encodes them (JSON), floats within 1e-6
relative, dicts and sets regardless of order.
"""
from __future__ import annotations

import json
import math
import signal
from dataclasses import dataclass, field
from typing import Any

from stepcoder import _worker

KINDS = ("stdin", "function", "method", "assert")
VERDICTS = ("pass", "wrong_answer", "runtime_error", "timeout", "memory_limit", "output_limit", "compile_error",
            "violation")
TAIL_BYTES = 2048          # how much of each test's stdout/stderr a result keeps
FLOAT_REL_TOL = 1e-6
FLOAT_ABS_TOL = 1e-9       # so that 0.0 and 1e-12 compare equal
FLOAT_INT_LIMIT = 1 << 1024  # ints at least this large have no float: compared exactly
CANONICAL_DEPTH = 102        # _worker.canonical nests at most this deep


@dataclass(frozen=True)
class TestCase:
    """One unit test.

    ``input`` is the stdin text (kind "stdin"), the argument list (kinds "function" and "method"), or
    test code run after the program in its namespace (kind "assert"). ``expected`` is the stdout text
    or the return value; None for "assert", where passing means the test code raised nothing.
    """

    __test__ = False  # not a pytest test class

    input: Any
    expected: Any = None


@dataclass
class TestResult:
    verdict: str
    seconds: float          # wall clock, fork to reap
    cpu_seconds: float      # user + system, every thread
    max_rss_kb: int
    stdout: str             # the last TAIL_BYTES
    stderr: str
    detail: str | None = None
    timed_out_by: str | None = None  # "cpu" (the limit) or "wall" (the backstop) when the verdict is timeout
    return_code: int | None = None   # the exit status a shell would see (-N: killed by signal N)


@dataclass
class Result:
    verdict: str
    tests: list[TestResult] = field(default_factory=list)
    executed_lines: list[int] = field(default_factory=list)  # 1-based lines of the program that ran
    detail: str | None = None                                 # the compile error, or the first failure's
    warnings: list[str] = field(default_factory=list)         # the compiler's warnings (SyntaxWarning, ...)

    @property
    def passed(self) -> bool:
        return self.verdict == "pass"

    @property
    def wall_timeout(self) -> bool:
        """Judged ``timeout`` by the wall-clock backstop (a program that slept or blocked) rather than by
        its CPU time."""
        return self.verdict == "timeout" and any(test.timed_out_by == "wall" for test in self.tests)


def compile_warnings(report: dict) -> list[str]:
    found = report.get("warnings")
    if type(found) is not list:
        return []
    return [text[:_worker.COMPILE_WARNING_CHARS] for text in found[:_worker.MAX_COMPILE_WARNINGS] if type(text) is str]


def verdict_of(raw: dict, report: dict | None, kind: str, stdout: bytes, stderr: bytes, cap: int, result_size: int):
    """The verdict from how the child ended, or (None, None) when its output decides."""
    sig = raw["signal"]
    if raw["timed_out"] == "wall":
        return "timeout", "killed by the wall-clock backstop (the program slept or waited)"
    if raw["timed_out"] == "cpu" or sig == signal.SIGXCPU:
        return "timeout", "CPU time limit"
    if sig == signal.SIGSYS:
        return "violation", "a forbidden system call (seccomp)"
    if len(stdout) >= cap or len(stderr) >= cap or (report is None and result_size >= cap):
        return "output_limit", f"output reached the {cap}-byte cap"
    if report is not None and report.get("status") == "memory":
        return "memory_limit", "MemoryError"
    if sig:
        name = signal.Signals(sig).name if sig in signal.valid_signals() else f"signal {sig}"
        return "runtime_error", f"killed by {name}"
    if report is None:
        if kind == "stdin" and raw["exit_code"] == 0:
            return None, None  # os._exit(0): what it printed still has to be right
        return "runtime_error", f"exited with code {raw['exit_code']} before finishing"
    if report.get("status") != "ok":
        return "runtime_error", str(report.get("detail"))[:500]
    return None, None


def compare(kind: str, test: TestCase, stdout: bytes, report: dict | None) -> tuple[str, str | None]:
    if kind == "assert":
        return "pass", None
    if kind == "stdin":
        if _lines(stdout.decode("utf-8", "replace")) == _lines(test.expected):
            return "pass", None
        return "wrong_answer", "stdout differs from the expected output"
    if report is None or "value" not in report:
        return "runtime_error", "no return value was reported"
    if not well_formed(report["value"]):  # the program can write its own report on the result fd
        return "runtime_error", "malformed return-value report"
    if values_equal(report["value"], _worker.canonical(test.expected)):
        return "pass", None
    return "wrong_answer", f"returned {json.dumps(report['value'])[:200]}"


def _lines(text: str) -> list[str]:
    """Stdout as compared: line by line, trailing whitespace and trailing blank lines ignored."""
    lines = [line.rstrip() for line in text.replace("\r\n", "\n").split("\n")]
    while lines and not lines[-1]:
        lines.pop()
    return lines


def well_formed(value, depth: int = 0) -> bool:
    """Whether `value` is a ``canonical`` encoding (JSON as the child's report carries it), so that the
    comparison below cannot raise on whatever a program wrote to its result fd instead."""
    kind = type(value)
    if value is None or kind in (bool, int, float, str):
        return True
    if depth > CANONICAL_DEPTH:
        return False
    if kind is list:
        return all(well_formed(item, depth + 1) for item in value)
    if kind is not dict or len(value) != 1:
        return False
    (tag, body), = value.items()
    if tag in ("__int__", "__bytes__", "__repr__"):
        return type(body) is str
    if tag == "__complex__":
        return type(body) is list and len(body) == 2 and all(type(part) in (int, float) for part in body)
    if tag == "__set__":
        return type(body) is list and all(well_formed(item, depth + 1) for item in body)
    if tag == "__dict__":
        return type(body) is list and all(type(pair) is list and len(pair) == 2
                                          and all(well_formed(part, depth + 1) for part in pair) for pair in body)
    return False


def values_equal(actual, expected) -> bool:
    """Structural equality of two ``canonical`` encodings: floats within 1e-6 relative, tuples equal
    lists (both encode as lists), bools equal 0 and 1 (as in Python, and as Codewars-style tests
    expect), dicts and sets regardless of order."""
    if type(actual) in (bool, int, float) and type(expected) in (bool, int, float):
        if type(actual) is not float and type(expected) is not float:
            return actual == expected
        if _beyond_float(actual) or _beyond_float(expected):
            return actual == expected  # exact in Python, where float() of such an int would overflow
        if math.isnan(actual) or math.isnan(expected):
            return math.isnan(actual) and math.isnan(expected)
        return math.isclose(actual, expected, rel_tol=FLOAT_REL_TOL, abs_tol=FLOAT_ABS_TOL)
    if type(actual) is list and type(expected) is list:
        return len(actual) == len(expected) and all(map(values_equal, actual, expected))
    if type(actual) is dict and type(expected) is dict:
        if actual.keys() != expected.keys() or len(actual) != 1:
            return False
        tag = next(iter(actual))
        if tag in ("__dict__", "__set__"):
            return _unordered_equal(actual[tag], expected[tag])
        return actual == expected
    return type(actual) is type(expected) and actual == expected


def _beyond_float(number) -> bool:
    return type(number) is int and abs(number) >= FLOAT_INT_LIMIT


def _unordered_equal(actual: list, expected: list) -> bool:
    if len(actual) != len(expected):
        return False
    key = lambda item: json.dumps(item, sort_keys=True)  # noqa: E731
    if sorted(map(key, actual)) == sorted(map(key, expected)):
        return True
    left = list(expected)  # slow path: elements equal only within float tolerance
    for item in actual:
        match = next((i for i, other in enumerate(left) if values_equal(item, other)), None)
        if match is None:
            return False
        left.pop(match)
    return True


def parse_report(data: bytes) -> dict | None:
    try:
        report = json.loads(data)
    except (ValueError, RecursionError):
        return None
    return report if type(report) is dict else None


def tail(data: bytes, size: int) -> str:
    return data[max(0, len(data) - size):].decode("utf-8", "replace") if size else ""


def return_code(raw: dict, report: dict | None) -> int:
    """What ``python program.py`` would have exited with: -N when killed by signal N, the program's own
    exit code, 1 for an uncaught exception (the child itself reports and exits 0)."""
    if raw["signal"]:
        return -raw["signal"]
    if report is None:
        return raw["exit_code"]
    status = report.get("status")
    if status == "ok":
        return 0
    if status == "exit":  # detail is "SystemExit(code)"; a non-int code prints and exits 1, as Python does
        code = str(report.get("detail"))[len("SystemExit("):-1]
        return int(code) if code.lstrip("-").isdigit() and len(code) < 10 else (0 if code == "None" else 1)
    return 1


def classify(raw: dict, test: TestCase, kind: str, outputs: tuple[bytes, bytes, bytes], report: dict | None,
             cap: int, tail_bytes: int) -> TestResult:
    """One test's result from the worker's account of the child (`raw`), its outputs (stdout, stderr,
    result descriptor, each read up to `cap` + 1 bytes) and its parsed report."""
    stdout, stderr, result = outputs
    verdict, detail = verdict_of(raw, report, kind, stdout, stderr, cap, len(result))
    if verdict is None:
        verdict, detail = compare(kind, test, stdout, report)
    timed_out_by = (raw["timed_out"] or "cpu") if verdict == "timeout" else None  # no flag: SIGXCPU
    return TestResult(verdict, raw["wall_seconds"], raw["cpu_seconds"], raw["max_rss_kb"], tail(stdout, tail_bytes),
                      tail(stderr, tail_bytes), detail, timed_out_by, return_code(raw, report))


def job_result(tests: list[TestResult], lines: list[int], warnings: list[str]) -> Result:
    """A program's verdict: its first failing test's, or pass."""
    failure = next((t for t in tests if t.verdict != "pass"), None)
    if failure is None:
        return Result("pass", tests, lines, warnings=warnings)
    return Result(failure.verdict, tests, lines, failure.detail, warnings)
