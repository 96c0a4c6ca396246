"""The independent reference for line tracing: Python's own ``sys.settrace``, plus a generator of
random programs with branches that do and do not run.

Also a script: ``python trace_reference.py BUILD_DIR CASES_JSON`` runs every case through the sandbox
found in BUILD_DIR (built for *this* interpreter) and through ``settrace_lines``, and prints both as
JSON, so the tests can check the tracer of another Python version (3.12+: sys.monitoring).
"""
from __future__ import annotations

import io
import json
import os
import random
import sys
import tempfile
import threading

FILENAME = "<solution>"


def settrace_lines(program: str, stdin: str = "", kind: str = "stdin", entry: str | None = None,
                   args: list | None = None) -> tuple[list[int], str]:
    """Lines of `program` that ``sys.settrace`` reports as run (all threads), and what it printed. It runs
    in a scratch directory of its own, as in the sandbox: files it writes must not land in the caller's."""
    with tempfile.TemporaryDirectory() as scratch:
        home = os.getcwd()
        os.chdir(scratch)
        try:
            return _traced_run(program, stdin, kind, entry, args)
        finally:
            os.chdir(home)


def _traced_run(program: str, stdin: str, kind: str, entry: str | None, args: list | None) -> tuple[list[int], str]:
    code = compile(program, FILENAME, "exec", dont_inherit=True)
    lines: set[int] = set()

    def tracer(frame, event, arg):
        if frame.f_code.co_filename != FILENAME:
            return None
        if event == "line":
            lines.add(frame.f_lineno)
        return tracer

    namespace = {"__name__": "__main__" if kind == "stdin" else "__solution__"}
    saved = sys.stdin, sys.stdout, sys.gettrace()
    sys.stdin, sys.stdout = io.StringIO(stdin), io.StringIO()
    threading.settrace(tracer)
    sys.settrace(tracer)
    try:
        exec(code, namespace)
        if kind == "stdin" and entry:
            namespace[entry]()
        elif kind == "function":
            namespace[entry](*args)
        elif kind == "method":
            getattr(namespace["Solution"](), entry)(*args)
    except (Exception, SystemExit):
        pass
    finally:
        sys.settrace(saved[2])
        threading.settrace(None)
        printed = sys.stdout.getvalue()
        sys.stdin, sys.stdout = saved[0], saved[1]
    return sorted(lines), printed


def random_program(rng: random.Random) -> str:
    """A stdin program over two ints: nested if/elif/else, loops, a helper function, multi-line
    statements, try/except and comprehensions. It always terminates."""
    out = ["import sys", "", "def helper(a, b):"]
    names = iter(range(10**6))

    def condition() -> str:
        return rng.choice(["x > {k}", "y % {m} == 0", "acc < {k}", "x + y > {k}", "a > {k}"]).format(
            k=rng.randint(-4, 4), m=rng.randint(2, 4))

    def block(depth: int, indent: int, in_helper: bool) -> None:
        pad = "    " * indent
        for _ in range(rng.randint(1, 3)):
            choice = rng.random()
            cond = condition() if in_helper else condition().replace("a >", "x >")
            if depth < 3 and choice < 0.3:
                out.append(f"{pad}if {cond}:")
                block(depth + 1, indent + 1, in_helper)
                if rng.random() < 0.5:
                    out.append(f"{pad}elif {condition() if in_helper else 'y > 1'}:")
                    block(depth + 1, indent + 1, in_helper)
                if rng.random() < 0.5:
                    out.append(f"{pad}else:")
                    block(depth + 1, indent + 1, in_helper)
            elif depth < 3 and choice < 0.42:
                out.append(f"{pad}for i{next(names)} in range({rng.randint(0, 3)}):")
                block(depth + 1, indent + 1, in_helper)
            elif choice < 0.5:
                out.append(f"{pad}while acc < {rng.randint(-3, 25)}:")
                out.append(f"{pad}    acc += 7")
            elif choice < 0.58:
                out.extend([f"{pad}acc += sum(", f"{pad}    v * 2", f"{pad}    for v in range({rng.randint(0, 4)})", f"{pad})"])
            elif choice < 0.66:
                out.extend([f"{pad}try:", f"{pad}    acc += 10 // ({'a' if in_helper else 'x'} - {rng.randint(-2, 2)})",
                            f"{pad}except ZeroDivisionError:", f"{pad}    acc -= 1"])
            elif choice < 0.72 and not in_helper:
                out.append(f"{pad}acc += helper(x + {rng.randint(-2, 2)}, y)")
            elif choice < 0.78:
                out.extend([f"{pad}acc += len([", f"{pad}    w for w in range(3)", f"{pad}    if w > {rng.randint(0, 3)}", f"{pad}])"])
            else:
                out.append(f"{pad}acc += {rng.randint(1, 9)}")

    out.append("    acc = 0")
    block(0, 1, True)
    out.append("    return acc")
    out += ["", "x, y = map(int, sys.stdin.readline().split())", "acc = 0"]
    block(0, 0, False)
    out.append("print(acc)")
    return "\n".join(out) + "\n"


def main() -> None:
    build_dir, cases_path = sys.argv[1], sys.argv[2]
    sys.path.insert(0, build_dir)
    from stepcoder.sandbox import Sandbox, TestCase

    cases = json.load(open(cases_path))
    rows = []
    with Sandbox(workers=2, timeout=5.0) as sandbox:
        for case in cases:
            reference: set[int] = set()
            tests = []
            for stdin in case["inputs"]:
                lines, printed = settrace_lines(case["program"], stdin)
                reference.update(lines)
                tests.append(TestCase(stdin, printed))
            result = sandbox.run(case["program"], tests)
            rows.append({"verdict": result.verdict, "sandbox": result.executed_lines, "settrace": sorted(reference)})
        layers = sandbox.capabilities()
    print(json.dumps({"tracer": layers["line_tracer"], "python": layers["python"], "rows": rows}))


if __name__ == "__main__":
    main()
