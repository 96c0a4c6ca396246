"""The generated problem family: disjoint and deterministic splits, canonical solutions that pass
tests computed from the rules (not from the solutions), CCCS stages to walk and branches the tests
leave unexecuted (FGO's material), every constant and word readable from the question."""
from __future__ import annotations

import ast
import re

import pytest

from stepcoder.cccs import prefixes
from stepcoder.data import DataError, load_problems
from stepcoder.data.synthetic import HELDOUT_SIZE, TRAIN_SIZE, held_out_space
from stepcoder.sandbox import Sandbox


@pytest.fixture(scope="module")
def train():
    return load_problems("synthetic:train").problems


@pytest.fixture(scope="module")
def heldout():
    return load_problems("synthetic:heldout").problems


def test_splits_are_disjoint_also_for_fresh_held_out_seeds(train, heldout):
    assert len(train) == TRAIN_SIZE and len(heldout) == HELDOUT_SIZE
    seen_solutions = {p.solutions[0] for p in train}
    seen_questions = {p.question for p in train}
    assert len(seen_solutions) == len(seen_questions) == TRAIN_SIZE  # no repeats inside the split either
    for spec in ("synthetic:heldout", "synthetic:heldout:2", "synthetic:heldout:977"):
        drawn = heldout if spec == "synthetic:heldout" else load_problems(spec).problems
        assert len(drawn) == HELDOUT_SIZE and len({p.solutions[0] for p in drawn}) == HELDOUT_SIZE
        assert not seen_solutions & {p.solutions[0] for p in drawn}, spec
        assert not seen_questions & {p.question for p in drawn}, spec
        assert all(held_out_space(p.solutions[0]) for p in drawn)
    assert not any(held_out_space(p.solutions[0]) for p in train)
    other = load_problems("synthetic:heldout:2").problems
    assert {p.solutions[0] for p in other} != {p.solutions[0] for p in heldout}  # another seed, other problems


def test_splits_are_deterministic(train):
    again = load_problems("synthetic:train").problems
    assert [(p.id, p.question, p.solutions, p.tests) for p in again] == \
        [(p.id, p.question, p.solutions, p.tests) for p in train]
    assert load_problems("synthetic:heldout:1").problems == load_problems("synthetic:heldout").problems


def test_bad_specs_name_the_problem():
    for spec, message in (("synthetic:test", "unknown split"), ("synthetic:heldout:x", "non-negative integer"),
                          ("synthetic:train:3", "fixed"), ("synthetic", "unknown split")):
        with pytest.raises(DataError, match=message):
            load_problems(spec)


@pytest.mark.slow
def test_every_canonical_solution_passes_and_leaves_branches_unexecuted(train, heldout):
    """Expected outputs come from the rules, so a pass checks the rendered code against them; the
    line trace shows how often the few tests leave a branch's answer line unexecuted."""
    problems = train + heldout
    with Sandbox(workers=2, timeout=4.0, trace=True) as sandbox:
        results = list(sandbox.run_many([p.job(p.solutions[0]) for p in problems]))
    assert [(p.id, r.verdict) for p, r in zip(problems, results) if r.verdict != "pass"] == []
    unexecuted = 0
    for problem, result in zip(problems, results):
        answers = [number for number, line in enumerate(problem.solutions[0].splitlines(), 1)
                   if line.strip().startswith(("print(", "return "))]
        assert answers and set(result.executed_lines) & set(answers)
        unexecuted += any(line not in result.executed_lines for line in answers)
    assert unexecuted / len(problems) > 0.8  # 92.75 % when this was written


def test_most_solutions_give_two_or_more_cccs_stages(train):
    stages = [len(prefixes(p.solutions[0])) - 1 for p in train]  # prefix stages before full generation
    assert min(stages) >= 1
    assert sum(count >= 2 for count in stages) / len(stages) > 0.75  # 84.6 % when this was written
    for problem in train:  # the first stage gives more than the starter code: every stage is a distinct task
        assert prefixes(problem.solutions[0])[-2] != problem.starter_code


def test_the_question_states_every_constant_word_and_name(train, heldout):
    for problem in train[:300] + heldout:
        tree = ast.parse(problem.solutions[0])
        implied = set()  # `v % K == 0` says "divisible by K"; `v % 2 == 1` says "odd": the 0, 1 and 2 are implied
        for node in ast.walk(tree):
            if isinstance(node, ast.Compare) and isinstance(node.left, ast.BinOp) and isinstance(node.left.op, ast.Mod):
                implied.update(id(c) for c in node.comparators)
                if node.left.right.value == 2 and re.search(r"is (even|odd)", problem.question):
                    implied.add(id(node.left.right))
        for node in ast.walk(tree):
            if id(node) in implied:
                continue
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                assert f'"{node.value}"' in problem.question, (problem.id, node.value)
            elif isinstance(node, ast.Constant) and isinstance(node.value, int):
                assert re.search(rf"\b{node.value}\b", problem.question), (problem.id, node.value)
        if problem.kind == "function":
            assert f"{problem.entry}(" in problem.question and problem.starter_code.startswith(f"def {problem.entry}(")
        else:
            assert problem.entry is None and problem.starter_code == ""
    assert {p.kind for p in train} == {"stdin", "function"}
