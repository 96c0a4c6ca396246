"""Verdicts, kinds, comparison rules, input validation and pool health of stepcoder.sandbox."""
from __future__ import annotations

import math
import os
import random
import signal
import threading
import time

import pytest

from stepcoder._worker import canonical
from stepcoder.sandbox import VERDICTS, Sandbox, TestCase, values_equal

ADD = "a, b = map(int, input().split())\nprint(a + b)\n"


def test_pass_and_wrong_answer(sandbox):
    tests = [TestCase("1 2\n", "3\n"), TestCase("10 -4\n", "6\n")]
    result = sandbox.run(ADD, tests)
    assert result.verdict == "pass" and result.passed
    assert [t.verdict for t in result.tests] == ["pass", "pass"]
    assert result.executed_lines == [1, 2]
    wrong = sandbox.run(ADD, [TestCase("1 2\n", "4\n")])
    assert wrong.verdict == "wrong_answer" and wrong.tests[0].stdout == "3\n"


def test_stdout_comparison_ignores_trailing_whitespace_only(sandbox):
    program = "print('a  ')\nprint('b')\nprint()\n"
    assert sandbox.run(program, [TestCase("", "a\nb")]).verdict == "pass"
    assert sandbox.run(program, [TestCase("", "a\r\nb\r\n\r\n")]).verdict == "pass"
    assert sandbox.run(program, [TestCase("", " a\nb\n")]).verdict == "wrong_answer"
    assert sandbox.run(program, [TestCase("", "b\na\n")]).verdict == "wrong_answer"


def test_stdin_kind_with_entry_calls_the_zero_argument_function(sandbox):
    program = "import sys\ndef solve():\n    n = int(input())\n    if n > 2:\n        print('big')\n    else:\n        print('small')\n"
    result = sandbox.run(program, [TestCase("1\n", "small\n")], kind="stdin", entry="solve")
    assert result.verdict == "pass"
    assert result.executed_lines == [1, 2, 3, 4, 7]
    missing = sandbox.run(program, [TestCase("1\n", "small\n")], kind="stdin", entry="main")
    assert missing.verdict == "runtime_error" and "main" in missing.detail


def test_function_kind_compares_return_values_structurally(sandbox):
    program = "def f(xs, k):\n    return tuple(sorted(xs))[:k]\n"
    result = sandbox.run(program, [TestCase([[3, 1, 2], 2], [1, 2])], kind="function", entry="f")
    assert result.verdict == "pass"  # a tuple equals a list
    assert sandbox.run(program, [TestCase([[3, 1, 2], 2], [2, 1])], "function", "f").verdict == "wrong_answer"


def test_method_kind_calls_solution_method(sandbox):
    program = ("class Solution:\n    def twice(self, x: int) -> int:\n        if x < 0:\n            return -2 * x\n"
               "        return 2 * x\n")
    result = sandbox.run(program, [TestCase([4], 8), TestCase([-1], 2)], kind="method", entry="twice")
    assert result.verdict == "pass"
    assert result.executed_lines == [1, 2, 3, 4, 5]
    assert sandbox.run(program, [TestCase([4], 9)], "method", "twice").verdict == "wrong_answer"


def test_assert_kind_runs_test_code_in_the_program_namespace(sandbox):
    program = "def add(a, b):\n    return a + b\n"
    good = "def check(candidate):\n    assert candidate(2, 3) == 5\n\ncheck(add)\n"
    bad = "assert add(2, 2) == 5, 'add is wrong'\n"
    assert sandbox.run(program, [TestCase(good)], kind="assert").verdict == "pass"
    failed = sandbox.run(program, [TestCase(bad)], kind="assert")
    assert failed.verdict == "runtime_error" and "AssertionError" in failed.detail


def test_exit_is_allowed_for_stdin_programs_but_never_passes_assert_tests(sandbox):
    assert sandbox.run("print(3)\nexit()\nprint(4)\n", [TestCase("", "3\n")]).verdict == "pass"
    assert sandbox.run("import sys\nprint(3)\nsys.exit(0)\n", [TestCase("", "3\n")]).verdict == "pass"
    assert sandbox.run("import sys\nprint(3)\nsys.exit(2)\n", [TestCase("", "3\n")]).verdict == "runtime_error"
    cheat = "import sys\ndef add(a, b):\n    return 0\nsys.exit(0)\n"
    result = sandbox.run(cheat, [TestCase("assert add(1, 1) == 2\n")], kind="assert")
    assert result.verdict == "runtime_error"


def test_runtime_error_timeout_memory_output_compile_violation(sandbox):
    verdicts = {
        "runtime_error": "print(1 // 0)\n",
        "timeout": "while True:\n    pass\n",
        "memory_limit": "x = bytearray(4 << 30)\n",
        "output_limit": "while True:\n    print('y' * 1000)\n",
        "compile_error": "def f(:\n",
        "violation": "import os\nos.fork()\n",
    }
    results = sandbox.run_many([(program, [TestCase("", "")]) for program in verdicts.values()])
    assert [r.verdict for r in results] == list(verdicts)
    assert set(verdicts) | {"pass", "wrong_answer"} == set(VERDICTS)  # every verdict is covered
    assert results[0].detail.startswith("ZeroDivisionError")
    assert results[4].tests == [] and "SyntaxError" in results[4].detail


def test_compiler_warnings_go_to_the_result_not_the_console(capfd):
    """SyntaxWarnings from compiling a candidate must not reach the trainer's terminal (the workers inherit
    its stderr): they are returned, capped, with the verdict."""
    program = 'x = 1if 1 else 2\ny = x is 1\nz = "\\d"\nprint(x)\n'
    noisy = "".join(f"a{i} = {i}if 1 else 0\n" for i in range(1000)) + "print(1)\n"
    with Sandbox(workers=1, timeout=1.0) as sb:  # started here, so the worker writes into capfd's stderr
        result = sb.run(program, [TestCase("", "1\n")])
        flood = sb.run(noisy, [TestCase("", "1\n")])
        clean = sb.run("print(1)\n", [TestCase("", "1\n")])
    captured = capfd.readouterr()
    assert "Warning" not in captured.err + captured.out
    assert result.verdict == "pass" and flood.verdict == "pass"
    assert any("line 1: SyntaxWarning: invalid decimal literal" in w for w in result.warnings)
    assert any(w.startswith("line 2: SyntaxWarning") for w in result.warnings)
    assert any("line 3:" in w and "escape sequence" in w for w in result.warnings)
    assert len(flood.warnings) == 10 and clean.warnings == []


def test_per_test_measurements(sandbox):
    result = sandbox.run("s = sum(i * i for i in range(300000))\nprint(s > 0)\n", [TestCase("", "True\n")])
    test = result.tests[0]
    assert test.seconds > 0 and test.cpu_seconds > 0 and test.seconds >= test.cpu_seconds * 0.5
    assert test.max_rss_kb > 1000


def test_stop_on_first_failure_and_the_option_to_run_all(sandbox):
    tests = [TestCase("1 1\n", "3\n"), TestCase("1 2\n", "3\n")]
    assert len(sandbox.run(ADD, tests).tests) == 1
    with Sandbox(workers=1, timeout=1.0, stop_on_first_failure=False) as sb:
        result = sb.run(ADD, tests)
        assert [t.verdict for t in result.tests] == ["wrong_answer", "pass"]
        assert result.verdict == "wrong_answer"
        branches = "a, b = map(int, input().split())\nif a > b:\n    print(a)\nelse:\n    print(b)\n"
        every = sb.run(branches, [TestCase("1 2\n", "1\n"), TestCase("3 1\n", "3\n")])
    first = sandbox.run(branches, [TestCase("1 2\n", "1\n"), TestCase("3 1\n", "3\n")])
    assert first.verdict == every.verdict == "wrong_answer"
    assert first.executed_lines == [1, 2, 5] and every.executed_lines == [1, 2, 3, 5]  # the later test's branch


def test_run_many_keeps_order_and_judges_each_program(sandbox):
    rng = random.Random(7)
    numbers = [rng.randrange(-1000, 1000) for _ in range(60)]
    jobs = [("print(int(input()) * 3)\n", [TestCase(f"{n}\n", f"{n * 3 if n % 5 else n}\n")]) for n in numbers]
    results = sandbox.run_many(jobs)
    assert [r.verdict for r in results] == ["pass" if n % 5 else ("pass" if n == 0 else "wrong_answer") for n in numbers]


def test_state_does_not_leak_between_tests_or_programs(sandbox):
    program = "import builtins\nprint(getattr(builtins, 'seen', 0))\nbuiltins.seen = 1\nopen('f', 'a').write('x')\n"
    result = sandbox.run(program, [TestCase("", "0\n")] * 3)
    assert result.verdict == "pass" and len(result.tests) == 3
    assert sandbox.run("import os\nprint(os.listdir('.'))\n", [TestCase("", "[]\n")]).verdict == "pass"


def test_bad_input_raises_clear_errors(sandbox):
    cases = [
        ((b"print(1)", [TestCase("", "1\n")]), "program must be a str"),
        (("print(1)", [TestCase("", "1\n")], "shell"), "unknown kind 'shell'"),
        (("def f(): pass", [TestCase([], None)], "function"), "needs entry"),
        (("print(1)", []), "non-empty"),
        (("print(1)", ["1"]), "expected a TestCase"),
        (("print(1)", [TestCase("", "1\n")], "assert"), "no expected value"),
        (("print(1)", [TestCase(["x"], None)], "assert"), "assert input"),
        (("x = 1", [TestCase("assert (", None)], "assert"), "does not compile"),
        (("def f(x): pass", [TestCase(3, None)], "function", "f"), "argument list"),
    ]
    for job, message in cases:
        with pytest.raises(ValueError, match=message):
            sandbox.run_many([job])
    for kwargs, message in [({"timeout": -1}, "timeout"), ({"timeout": math.inf}, "timeout"),
                            ({"workers": 0}, "workers"), ({"memory_mb": 1}, "memory_mb")]:
        with pytest.raises(ValueError, match=message):
            Sandbox(**kwargs)


def test_a_killed_worker_is_replaced_and_its_job_still_reported():
    with Sandbox(workers=1, timeout=2.0) as sb:
        victim = sb.worker_pids()[0]
        threading.Timer(0.3, os.kill, (victim, signal.SIGKILL)).start()
        start = time.monotonic()
        result = sb.run("import time\ntime.sleep(1)\nprint(5)\n", [TestCase("", "5\n")])
        assert result.verdict == "pass"  # retried on the fresh worker
        assert time.monotonic() - start < 10
        assert victim not in sb.worker_pids() and len(sb.worker_pids()) == 1
        assert sb.run(ADD, [TestCase("2 2\n", "4\n")]).verdict == "pass"


def test_capabilities_report_every_layer(sandbox):
    layers = sandbox.capabilities()
    for name in ("seccomp", "landlock", "rlimits", "no_new_privs", "unprivileged_uid", "own_session", "test_tmpfs",
                 "namespaces", "line_tracer"):
        assert name in layers
    # The CI machines allow these; a refusal here would be a regression.
    assert layers["seccomp"] is True and layers["landlock"] is True and layers["test_tmpfs"] is True
    assert set(layers["namespaces"]) >= {"user", "net", "mount", "pid", "fresh_proc"}
    assert layers["namespaces"]["fresh_proc"] is True


# ------------------------------------------------------------------------------------------------
# The comparison of return values, against Python's own equality on values where the two must agree.


def _random_value(rng: random.Random, depth: int = 0):
    choice = rng.randrange(8 if depth < 3 else 4)
    if choice == 0:
        return rng.randrange(-10**6, 10**6)
    if choice == 1:
        return rng.choice(["", "a", "xyz", "é"])
    if choice == 2:
        return rng.choice([None, True, False])
    if choice == 3:
        return rng.uniform(-1e3, 1e3)
    if choice == 4:
        return [_random_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    if choice == 5:
        return tuple(_random_value(rng, depth + 1) for _ in range(rng.randrange(4)))
    if choice == 6:
        return {str(rng.randrange(5)): _random_value(rng, depth + 1) for _ in range(rng.randrange(4))}
    return frozenset(rng.randrange(10) for _ in range(rng.randrange(4)))


def _python_equal(a, b) -> bool:
    """Python's ==, with tuples as lists: the documented rules."""
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_python_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_python_equal(a[k], b[k]) for k in a)
    return a == b


def test_values_equal_agrees_with_python_equality_on_random_values():
    rng = random.Random()
    for _ in range(3000):
        a = _random_value(rng)
        b = a if rng.random() < 0.3 else _random_value(rng)
        assert values_equal(canonical(a), canonical(b)) == _python_equal(a, b), (a, b)


def test_values_equal_float_tolerance_and_special_values():
    assert values_equal(canonical(1.0 + 1e-8), canonical(1))
    assert not values_equal(canonical(1.0 + 1e-4), canonical(1))
    assert values_equal(canonical(1e-12), canonical(0.0))
    assert values_equal(canonical(float("nan")), canonical(float("nan")))
    assert values_equal(canonical(True), canonical(1)) and not values_equal(canonical(False), canonical(1))
    assert values_equal(canonical({3: "a", 1: "b"}), canonical({1: "b", 3: "a"}))
    assert not values_equal(canonical({1: "a"}), canonical({"1": "a"}))
    big = 7 ** 9000
    assert values_equal(canonical(big), canonical(big)) and not values_equal(canonical(big), canonical(big + 1))
    assert values_equal(canonical({0.1 + 0.2, 2.0}), canonical({0.3, 2.0}))


def test_returned_values_round_trip_through_the_child(sandbox):
    literal = '[[1, (2, 3)], {"k": [1.5, None]}, {1, 2}, 2 ** 20000, -0.0, "\u00fc", b"\\x00\\xff", 3 + 4j]'
    values = eval(literal)
    program = "def f(i):\n    return VALUES[i]\nVALUES = " + literal + "\n"
    jobs = [(program, [TestCase([i], value)], "function", "f") for i, value in enumerate(values)]
    assert [r.verdict for r in sandbox.run_many(jobs)] == ["pass"] * len(values)
    jobs = [(program, [TestCase([i], values[i - 1])], "function", "f") for i in range(len(values))]
    assert [r.verdict for r in sandbox.run_many(jobs)] == ["wrong_answer"] * len(values)
