"""The JSON forms of sandbox jobs and results, shared by ``stepcoder.serve`` and its client
``stepcoder.remote``, so that a job judged remotely is the very job a local ``Sandbox`` would judge.

A job: ``{"program", "tests": [{"input", "output"} | {"assert"}], "kind", "entry", "setup", "timeout",
"wall_timeout", "memory_mb", "trace", "stop_on_first_failure"}`` (only ``program`` and ``tests`` are
required). Call arguments and return values are JSON values; the Python values JSON lacks travel tagged,
as one-key objects: ``{"$tuple": [...]}``, ``{"$set": [...]}``, ``{"$frozenset": [...]}``,
``{"$dict": [[key, value], ...]}`` (every dict, whatever its keys), ``{"$bytes": base64}``,
``{"$complex": [re, im]}``, ``{"$float": "inf" | "-inf" | "nan"}`` and ``{"$int": hex}`` for ints past
JSON's practical range. APPS+ arguments are Python literals, so tuples and sets do occur.

A result is ``dataclasses.asdict(Result)``: ``{"verdict", "tests": [{"verdict", "seconds",
"cpu_seconds", "max_rss_kb", "stdout", "stderr", "detail", "timed_out_by", "return_code"}],
"executed_lines", "detail", "warnings"}``.
"""
from __future__ import annotations

import base64
import binascii
import dataclasses
import math

from stepcoder.sandbox import KINDS, Limits, Result, TestCase, TestResult

MAX_DEPTH = 100        # nesting a decoded value may have (json itself stops near 1000)
BIG_INT_BITS = 4000    # ints this wide travel as hex: Python refuses to parse very long decimal ints
OPTIONAL_FIELDS = ("kind", "entry", "setup", *Limits.__dataclass_fields__)


class WireError(ValueError):
    """A request or reply that is not a valid job or result; the message names the field."""


def encode_value(value, depth: int = 0):
    """A Python value (what ``ast.literal_eval`` yields, and None) as JSON, losslessly."""
    if depth > MAX_DEPTH:
        raise WireError(f"a value nests deeper than {MAX_DEPTH}")
    kind = type(value)
    if value is None or kind in (bool, str):
        return value
    if kind is int:
        return {"$int": format(value, "x")} if value.bit_length() > BIG_INT_BITS else value
    if kind is float:
        return value if math.isfinite(value) else {"$float": repr(value)}
    if kind is list:
        return [encode_value(item, depth + 1) for item in value]
    if kind in (tuple, set, frozenset):
        items = sorted(value, key=repr) if kind is not tuple else value  # a set's order is not the value
        return {f"${kind.__name__}": [encode_value(item, depth + 1) for item in items]}
    if kind is dict:
        return {"$dict": [[encode_value(k, depth + 1), encode_value(v, depth + 1)] for k, v in value.items()]}
    if kind is bytes:
        return {"$bytes": base64.b64encode(value).decode()}
    if kind is complex:
        return {"$complex": [encode_value(value.real), encode_value(value.imag)]}
    raise WireError(f"cannot send a {kind.__name__} value; tests hold Python literals")


def decode_value(value, where: str, depth: int = 0):
    if depth > MAX_DEPTH:
        raise WireError(f"{where}: nests deeper than {MAX_DEPTH}")
    kind = type(value)
    if value is None or kind in (bool, int, float, str):
        return value
    if kind is list:
        return [decode_value(item, where, depth + 1) for item in value]
    if kind is not dict or len(value) != 1:
        raise WireError(f"{where}: an object must be one tagged value such as {{\"$tuple\": [...]}}")
    (tag, body), = value.items()
    if tag in ("$tuple", "$set", "$frozenset", "$dict"):
        if type(body) is not list:
            raise WireError(f"{where}: {tag} holds a list")
        items = [decode_value(item, where, depth + 1) for item in body]
        try:
            if tag == "$dict":
                if not all(type(pair) is list and len(pair) == 2 for pair in items):
                    raise WireError(f"{where}: $dict holds [key, value] pairs")
                return {_hashable(k, where): v for k, v in items}
            return {"$tuple": tuple, "$set": set, "$frozenset": frozenset}[tag](items)
        except TypeError:
            raise WireError(f"{where}: {tag} holds an unhashable value") from None
    try:
        if tag == "$bytes" and type(body) is str:
            return base64.b64decode(body, validate=True)
        if tag == "$complex" and type(body) is list and len(body) == 2:
            return complex(*(decode_value(part, where, depth + 1) for part in body))
        if tag == "$float" and body in ("inf", "-inf", "nan"):
            return float(body)
        if tag == "$int" and type(body) is str:
            return int(body, 16)
    except (binascii.Error, ValueError, TypeError):
        pass
    raise WireError(f"{where}: malformed or unknown tagged value {tag!r}")


def _hashable(key, where: str):
    if type(key) is list:
        raise WireError(f"{where}: a $dict key cannot be a list")
    return key


def encode_job(program: str, tests, kind: str = "stdin", entry: str | None = None, setup: str = "",
               **limits) -> dict:
    """A ``Sandbox.submit`` call as a ``/judge`` job."""
    if kind == "assert":
        wire_tests = [{"assert": test.input} for test in tests]
    else:
        wire_tests = [{"input": encode_value(test.input), "output": encode_value(test.expected)} for test in tests]
    job = {"program": program, "tests": wire_tests, "kind": kind, "entry": entry, "setup": setup}
    job.update((name, value) for name, value in limits.items() if value is not None)
    return job


def decode_job(job, where: str) -> tuple[tuple, dict]:
    """A ``/judge`` job as ``Sandbox.submit``'s arguments: ``(program, tests, kind, entry, setup)`` and the
    limits it asks for. Types are checked here; values (kinds, limits) by the sandbox and the server."""
    if type(job) is not dict:
        raise WireError(f"{where}: a job is an object with program and tests, got {type(job).__name__}")
    unknown = set(job) - {"program", "tests", *OPTIONAL_FIELDS}
    if unknown:
        raise WireError(f"{where}: unknown field(s) {sorted(unknown)}")
    program = _field(job, "program", str, where)
    kind = _field(job, "kind", str, where, "stdin")
    if kind not in KINDS:
        raise WireError(f"{where}.kind: expected one of {', '.join(KINDS)}, got {kind!r}")
    entry = _field(job, "entry", (str, type(None)), where, None)
    setup = _field(job, "setup", str, where, "")
    tests = _field(job, "tests", list, where)
    if not tests:
        raise WireError(f"{where}.tests: at least one test is needed")
    cases = []
    for number, test in enumerate(tests):
        at = f"{where}.tests[{number}]"
        if kind == "assert":
            if type(test) is not dict or set(test) != {"assert"} or type(test["assert"]) is not str:
                raise WireError(f"{at}: an assert test is {{\"assert\": code}}")
            cases.append(TestCase(test["assert"]))
            continue
        if type(test) is not dict or set(test) != {"input", "output"}:
            raise WireError(f"{at}: a test is {{\"input\": ..., \"output\": ...}}")
        given, wanted = decode_value(test["input"], f"{at}.input"), decode_value(test["output"], f"{at}.output")
        if kind == "stdin" and not (type(given) is str and type(wanted) is str):
            raise WireError(f"{at}: stdin tests take a string input and output")
        if kind != "stdin" and type(given) not in (list, tuple):
            raise WireError(f"{at}.input: a call's input is its argument list")
        cases.append(TestCase(given, wanted))
    limits = {}
    for name in Limits.__dataclass_fields__:
        if job.get(name) is not None:
            expected = bool if name in ("trace", "stop_on_first_failure") else int if name in (
                "memory_mb", "tail_bytes") else (int, float)
            limits[name] = _field(job, name, expected, where)
    return (program, cases, kind, entry, setup), limits


def _field(job: dict, name: str, expected, where: str, default=...):
    if name not in job or (job[name] is None and default is not ...):
        if default is ...:
            raise WireError(f"{where}.{name}: missing")
        return default
    value = job[name]
    types = expected if isinstance(expected, tuple) else (expected,)
    if type(value) not in types:  # bool is not an int here, nor an int a bool
        names = " or ".join("null" if kind is type(None) else kind.__name__ for kind in types)
        raise WireError(f"{where}.{name}: expected {names}, got {type(value).__name__}")
    return value


def encode_result(result: Result) -> dict:
    return dataclasses.asdict(result)


def decode_result(data, where: str = "result") -> Result:
    """A ``/judge`` reply back into the ``Result`` a local ``Sandbox`` returns."""
    try:
        tests = [TestResult(**test) for test in data["tests"]]
        return Result(data["verdict"], tests, list(data["executed_lines"]), data["detail"], list(data["warnings"]))
    except (KeyError, TypeError) as error:
        raise WireError(f"{where}: not a sandbox result ({type(error).__name__}: {error})") from None
