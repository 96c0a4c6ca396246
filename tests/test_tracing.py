"""Executed lines: equal to what sys.settrace reports for the same program and input, restricted to
the program; kept after a timeout; not switchable off by the program. Both tracer paths: this
interpreter's, and Python 3.10 (C trace function) and 3.12 / 3.13 (sys.monitoring), with the
extension built for them here."""
from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest

from stepcoder.sandbox import Sandbox, TestCase
from trace_reference import random_program, settrace_lines

ROOT = Path(__file__).resolve().parents[1]

TRICKY = textwrap.dedent('''\
    import functools


    def decorate(f):
        @functools.wraps(f)
        def inner(*args):
            return f(*args)
        return inner


    @decorate
    def classify(n,
                 limit=10):
        """Docstring lines never report."""
        if n < 0:
            return "negative"
        elif n > limit:
            return "big"
        else:
            return "small"


    class Box:
        size = 3

        def grow(self, k):
            total = 0
            while k > 0:
                total += self.size
                k -= 1
            else:
                total += 1
            return total


    def unused(z):
        return z * 2


    squares = [
        i * i
        for i in range(4)
        if i % 2
    ]
    gen = (c for c in "ab")
    pick = lambda v: (v
                      + 1)
    n = int(input())
    try:
        print(classify(n), Box().grow(n % 3), pick(n), sum(squares), "".join(gen))
        1 / (n - 5)
    except ZeroDivisionError:
        print("five")
    finally:
        print("done")
    with open("scratch.txt", "w") as handle:
        handle.write(
            str(n),
        )
''')


MONITORING_TAMPER = textwrap.dedent("""\
    import sys
    def later(flag):
        if flag:
            return 1
        return 2
    import gc
    mon = sys.monitoring
    found = [o for o in gc.get_objects() if getattr(o, "__name__", "") in ("free_tool_id", "set_local_events")]
    found += [c.cell_contents for c in (getattr(mon.free_tool_id, "__closure__", None) or ())]
    for attempt in [lambda: mon.free_tool_id(4), lambda: mon.set_local_events(4, later.__code__, 0),
                    lambda: mon.set_events(4, 0), lambda: mon.register_callback(4, mon.events.LINE, None),
                    lambda: mon.use_tool_id(4, "mine")] + [lambda f=f: f(4) for f in found if callable(f)]:
        try:
            attempt()
        except Exception:
            pass
    print(later(True), later(False))
""")


def _reference_union(program: str, inputs: list[str]) -> tuple[list[int], list[str]]:
    lines: set[int] = set()
    outputs = []
    for stdin in inputs:
        ran, printed = settrace_lines(program, stdin)
        lines.update(ran)
        outputs.append(printed)
    return sorted(lines), outputs


def test_executed_lines_equal_settrace_on_a_tricky_program(sandbox):
    inputs = ["-3\n", "5\n", "42\n"]
    for chosen in ([inputs[0]], inputs):
        expected_lines, outputs = _reference_union(TRICKY, chosen)
        result = sandbox.run(TRICKY, [TestCase(i, o) for i, o in zip(chosen, outputs)])
        assert result.verdict == "pass"
        assert result.executed_lines == expected_lines
    assert 35 not in result.executed_lines  # the body of unused()


def test_executed_lines_equal_settrace_on_random_programs(sandbox):
    rng = random.Random()
    jobs, references = [], []
    for _ in range(40):
        program = random_program(rng)
        inputs = [f"{rng.randint(-5, 5)} {rng.randint(-5, 5)}\n" for _ in range(rng.randint(1, 3))]
        lines, outputs = _reference_union(program, inputs)
        jobs.append((program, [TestCase(i, o) for i, o in zip(inputs, outputs)]))
        references.append(lines)
    for (program, _), result, lines in zip(jobs, sandbox.run_many(jobs), references):
        assert result.verdict == "pass", program
        assert result.executed_lines == lines, program


def test_call_based_kinds_trace_only_the_program(sandbox):
    program = "def f(a):\n    if a:\n        return 1\n    return 2\n"
    checker = "\n".join(["x = 1"] * 20) + "\nassert f(0) == 2\n"
    result = sandbox.run(program, [TestCase(checker)], kind="assert")
    assert result.verdict == "pass" and result.executed_lines == [1, 2, 4]
    result = sandbox.run(program, [TestCase([5], 1)], kind="function", entry="f")
    assert result.executed_lines == settrace_lines(program, kind="function", entry="f", args=[5])[0] == [1, 2, 3]


def test_lines_survive_a_timeout_and_a_crash(sandbox):
    program = "print('start')\nx = 0\nwhile True:\n    x += 1\nprint('never')\n"
    result = sandbox.run(program, [TestCase("", "start\n")])
    assert result.verdict == "timeout" and result.executed_lines == [1, 2, 3, 4]
    crash = "import ctypes\nif True:\n    ctypes.string_at(0)\nprint('never')\n"
    result = sandbox.run(crash, [TestCase("", "")])
    assert result.verdict == "runtime_error" and result.executed_lines == [1, 2, 3]


def test_threads_of_the_program_are_traced(sandbox):
    program = ("import threading\nout = []\ndef work():\n    out.append(1)\n"
               "t = threading.Thread(target=work)\nt.start()\nt.join()\nprint(len(out))\n")
    result = sandbox.run(program, [TestCase("", "1\n")])
    assert result.verdict == "pass" and result.executed_lines == list(range(1, 9))


def test_the_program_cannot_switch_tracing_off(sandbox):
    program = textwrap.dedent("""\
        import sys, threading
        import gc
        hooks = [sys.settrace, threading.settrace]
        cells = [c.cell_contents for h in hooks for c in (getattr(h, "__closure__", None) or ())]
        builtins = [o for o in gc.get_objects() if getattr(o, "__name__", "") == "settrace"]
        attempts = [lambda: sys.settrace(None), lambda: threading.settrace(None)]
        for attempt in attempts + [lambda f=f: f(None) for f in cells + builtins if callable(f)]:
            try:
                attempt()
            except Exception:
                pass
        def later():
            return 1
        later()
        print('end')
    """)
    result = sandbox.run(program, [TestCase("", "end\n")])
    assert result.verdict == "pass"
    assert {12, 13, 14, 15} <= set(result.executed_lines)


def test_tracing_can_be_turned_off():
    with Sandbox(workers=1, timeout=1.0, trace=False) as sb:
        result = sb.run("print(1)\n", [TestCase("", "1\n")])
    assert result.verdict == "pass" and result.executed_lines == []


# ------------------------------------------------------------------------------------------------
# Other interpreters, both tracer paths: build the extension for each and compare there.


def _find_python(version: str) -> str | None:
    """A working interpreter of `version`: pyenv's own builds first (its shims may point elsewhere)."""
    candidates = [str(root / "bin" / f"python{version}")
                  for root in sorted(Path(os.path.expanduser("~/.pyenv/versions")).glob(f"{version}*"))]
    candidates.append(shutil.which(f"python{version}"))
    for candidate in filter(None, candidates):
        if os.path.exists(candidate) and subprocess.run([candidate, "-c", "pass"], capture_output=True).returncode == 0:
            return candidate
    return None


def _build_for(python: str, build_dir: Path) -> None:
    """Compiles csrc/ for `python` with this environment's pybind11 headers (header-only; the `test`
    extra declares pybind11, so its absence is a broken install and fails, never skips)."""
    import pybind11

    query = "import sysconfig; print(sysconfig.get_paths()['include']); print(sysconfig.get_config_var('EXT_SUFFIX'))"
    include, suffix = subprocess.run([python, "-c", query], capture_output=True, text=True, check=True).stdout.split()
    if not (Path(include) / "Python.h").is_file():
        pytest.skip(f"{python} has no C headers ({include}/Python.h): install its development package")
    package = build_dir / "stepcoder"
    package.mkdir(parents=True)
    for name in ("__init__.py", "_worker.py", "sandbox.py", "verdicts.py"):
        shutil.copy(ROOT / "stepcoder" / name, package / name)
    sources = sorted(str(p) for p in (ROOT / "csrc").glob("*.cpp"))
    subprocess.run(["g++", "-O1", "-std=c++17", "-shared", "-fPIC", "-fvisibility=hidden", f"-I{include}",
                    f"-I{pybind11.get_include()}", *sources, "-o", str(package / f"_sandbox{suffix}")],
                   check=True, capture_output=True)


@pytest.mark.slow
@pytest.mark.parametrize("version, tracer", [("3.10", "c-trace"), ("3.12", "sys.monitoring"),
                                             ("3.13", "sys.monitoring")])
def test_tracer_of_another_python_equals_settrace(version, tracer, tmp_path):
    python = _find_python(version)
    if python is None:
        pytest.skip(f"Python {version} is not installed (looked in ~/.pyenv/versions and for python{version} on PATH)")
    _build_for(python, tmp_path / "build")
    rng = random.Random()
    cases = [{"program": TRICKY, "inputs": ["-3\n", "5\n", "42\n"]}]
    if tracer == "sys.monitoring":
        cases.append({"program": MONITORING_TAMPER, "inputs": [""]})
    cases += [{"program": random_program(rng), "inputs": [f"{rng.randint(-5, 5)} {rng.randint(-5, 5)}\n"
                                                          for _ in range(rng.randint(1, 3))]} for _ in range(25)]
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    done = subprocess.run([python, "-I", str(Path(__file__).with_name("trace_reference.py")), str(tmp_path / "build"),
                           str(tmp_path / "cases.json")], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["tracer"] == tracer and report["python"].startswith(version)
    for case, row in zip(cases, report["rows"]):
        assert row["verdict"] == "pass", case["program"]
        assert row["sandbox"] == row["settrace"], case["program"]
