"""The long-program family (``synthetic-long``): three disjoint deterministic spaces, canonical solutions
that pass tests computed from the rules, every block reached by every test so that one wrong block
fails the program (the sparse whole-program reward CCCS is for), CCCS stages to walk, branches the
tests leave unexecuted (FGO's material), and every constant readable from the question."""
from __future__ import annotations

import ast
import random
import re

import pytest

from stepcoder.cccs import prefixes, split_points
from stepcoder.config import default_eval_data
from stepcoder.data import DataError, load_problems
from stepcoder.data.synthetic_long import MAX_BLOCKS, MIN_BLOCKS, SIZES, space
from stepcoder.sandbox import Sandbox


@pytest.fixture(scope="module")
def splits():
    return {split: load_problems(f"synthetic-long:{split}").problems for split in SIZES}


def test_the_three_spaces_are_disjoint_also_for_fresh_held_out_seeds(splits):
    assert {split: len(problems) for split, problems in splits.items()} == SIZES
    solutions = {split: {p.solutions[0] for p in problems} for split, problems in splits.items()}
    questions = {split: {p.question for p in problems} for split, problems in splits.items()}
    for split, problems in splits.items():
        assert len(solutions[split]) == len(questions[split]) == len(problems), split  # no repeats inside
        assert all(space(solution) == split for solution in solutions[split])
    assert not solutions["train"] & solutions["heldout"] and not solutions["train"] & solutions["warmup"]
    assert not solutions["warmup"] & solutions["heldout"] and not questions["train"] & questions["heldout"]
    fresh = load_problems("synthetic-long:heldout:7").problems
    assert {p.solutions[0] for p in fresh} != solutions["heldout"]
    assert all(space(p.solutions[0]) == "heldout" for p in fresh)
    assert default_eval_data("synthetic-long:train") == "synthetic-long:heldout"


def test_spaces_are_deterministic(splits):
    again = load_problems("synthetic-long:train").problems
    assert [(p.id, p.question, p.solutions, p.tests) for p in again] == \
        [(p.id, p.question, p.solutions, p.tests) for p in splits["train"]]
    assert load_problems("synthetic-long:heldout:1").problems == splits["heldout"]


def test_bad_specs_name_the_split():
    for spec, message in (("synthetic-long:test", "unknown split"), ("synthetic-long:heldout:x", "non-negative"),
                          ("synthetic-long:train:3", "fixed"), ("synthetic-long", "unknown split")):
        with pytest.raises(DataError, match=message):
            load_problems(spec)


def _blocks(solution: str) -> int:
    return sum(line.lstrip().startswith("if ") for line in solution.splitlines())


@pytest.mark.slow
def test_canonical_solutions_pass_every_block_runs_and_branches_stay_unexecuted(splits):
    """Expected outputs come from the rules (LongSpec.answer), so a pass checks the rendered code against
    them. Every block's `if` line runs (the blocks are in sequence), while some assignment under a branch
    never runs in most problems: FGO masks something."""
    problems = splits["train"] + splits["heldout"][:500] + splits["warmup"][:500]
    with Sandbox(workers=2, timeout=4.0, trace=True, stop_on_first_failure=False) as sandbox:
        results = list(sandbox.run_many([p.job(p.solutions[0]) for p in problems]))
    assert [(p.id, r.verdict) for p, r in zip(problems, results) if r.verdict != "pass"] == []
    unexecuted = 0
    for problem, result in zip(problems, results):
        lines = problem.solutions[0].splitlines()
        headers = [n for n, line in enumerate(lines, 1) if line.lstrip().startswith("if ")]
        assert MIN_BLOCKS <= len(headers) <= MAX_BLOCKS and set(headers) <= set(result.executed_lines), problem.id
        bodies = [n for n, line in enumerate(lines, 1) if line.startswith(("    ", "        ")) and " = " in line
                  and lines[n - 2].rstrip().endswith(":")]
        unexecuted += any(n not in result.executed_lines for n in bodies)
    assert unexecuted / len(problems) > 0.5  # 82 % when this was written


@pytest.mark.slow
def test_one_wrong_block_fails_the_program(splits):
    """The sparse reward: change one block's constant anywhere (first or last) and the tests catch it in
    most problems, so a passing whole program needs every block right. A check that mutated programs
    still pass when the mutation is in a branch no test takes keeps this honest: it is the tests'
    coverage, not the judge, that lets such a program through."""
    rng = random.Random(0)
    problems = splits["train"][:300]
    mutants = []
    for problem in problems:
        lines = problem.solutions[0].splitlines(keepends=True)
        bodies = [n for n, line in enumerate(lines) if re.match(r"\s+\w = \w [-+*/%]+ \d+\n", line)]
        if not bodies:
            continue
        n = rng.choice(bodies)
        number = int(re.search(r"(\d+)\n$", lines[n]).group(1))
        lines[n] = re.sub(r"\d+\n$", f"{number + 1}\n", lines[n])
        mutants.append((problem, "".join(lines), n + 1))
    with Sandbox(workers=2, timeout=4.0, trace=True, stop_on_first_failure=False) as sandbox:
        original = list(sandbox.run_many([p.job(p.solutions[0]) for p, _, _ in mutants]))
        mutated = list(sandbox.run_many([p.job(code) for p, code, _ in mutants]))
    reached = [(m, line in o.executed_lines) for m, o, (_, _, line) in zip(mutated, original, mutants)]
    caught_when_run = [m.verdict != "pass" for m, ran in reached if ran]
    assert len(caught_when_run) > 150 and sum(caught_when_run) / len(caught_when_run) > 0.75  # 84 % when written
    assert all(m.verdict == "pass" for m, ran in reached if not ran)  # only a line that ran can fail a test


def test_every_solution_has_several_cccs_stages(splits):
    for problem in splits["train"]:
        points = split_points(problem.solutions[0])
        stages = prefixes(problem.solutions[0])
        assert len(points) >= MIN_BLOCKS and len(stages) - 1 >= 2, problem.id
        assert stages[-2] != problem.starter_code  # the last prefix stage still gives code beyond the signature


def test_the_question_states_every_constant_and_name(splits):
    for problem in splits["train"][:300] + splits["heldout"][:300]:
        implied = set()  # `v % K == 0` says "divisible by K", `v % 2 == 1` "odd": the 0, 1 (and 2) are implied
        tree = ast.parse(problem.solutions[0])
        for node in ast.walk(tree):
            if isinstance(node, ast.Compare) and isinstance(node.left, ast.BinOp) and isinstance(node.left.op, ast.Mod):
                implied.update(id(c) for c in node.comparators)
                if node.left.right.value == 2 and re.search(r"is (even|odd)", problem.question):
                    implied.add(id(node.left.right))
        constants = [node for node in ast.walk(tree) if isinstance(node, ast.Constant) and id(node) not in implied]
        assert constants
        for node in constants:
            assert re.search(rf"\b{node.value}\b", problem.question), (problem.id, node.value)
        if problem.kind == "function":
            assert f"{problem.entry}(" in problem.question and problem.starter_code.startswith(f"def {problem.entry}(")
        else:
            assert problem.entry is None and problem.starter_code == ""
    assert {p.kind for p in splits["train"]} == {"stdin", "function"}
    assert len({_blocks(p.solutions[0]) for p in splits["train"]}) == MAX_BLOCKS - MIN_BLOCKS + 1
