"""A procedurally generated problem family: read the question, write the conditionals.

Each problem states a chain of 1-4 ``if``/``elif`` rules over one or two integers (constants, printed
words and arithmetic all chosen at random and given only in the question, so nothing can be
memorised across problems), with a derived value computed before the chain. The canonical solution
has one ``if``/``elif`` line per rule, so CCCS has two or more stages whenever there are two or more
rules; the 2-4 tests draw random inputs and, as in APPS, need not reach every branch, so generated
programs have lines that never run and FGO has something to mask. Kinds: stdin programs and
functions of one or two arguments.

Splits are disjoint by construction: a problem belongs to the held-out space when a hash of its
canonical solution falls in one fifth of its range, and every split only keeps problems of its own
space. ``synthetic:train`` (1000 problems, seed 0) and ``synthetic:heldout`` (1600, seed 1) are fixed;
``synthetic:heldout:SEED`` draws 1600 other held-out problems, still disjoint from train. Expected
outputs are computed from the rules themselves, never by running the canonical solution.
"""
from __future__ import annotations

import hashlib
import operator
import random
from dataclasses import dataclass

from stepcoder.data.problem import DataError, Problem
from stepcoder.sandbox import TestCase

TRAIN_SIZE, HELDOUT_SIZE = 1000, 1600
TRAIN_SEED, HELDOUT_SEED = 0, 1
HELDOUT_SHARE = 5  # one problem space in five is held out

WORDS = ("red", "blue", "green", "small", "large", "even", "odd", "yes", "no", "ok", "high", "low", "cold",
         "warm", "hot", "zero", "many", "few", "left", "right", "up", "down", "win", "lose", "draw", "fizz", "buzz",
         "alpha", "beta", "gamma")
FUNCTION_NAMES = ("grade", "classify", "score", "label", "judge", "rank", "bucket", "rate", "sort_out", "decide",
                  "pick", "tag")
ARITHMETIC = {"+": ("plus", operator.add), "-": ("minus", operator.sub), "*": ("times", operator.mul),
              "//": ("divided by (rounding down)", operator.floordiv), "%": ("modulo", operator.mod)}


@dataclass(frozen=True)
class Term:
    """`left op right`, or a bare variable when op is None; right is a variable name or a constant."""

    left: str
    op: str | None = None
    right: str | int | None = None

    def code(self) -> str:
        return self.left if self.op is None else f"{self.left} {self.op} {self.right}"

    def words(self) -> str:
        return self.left if self.op is None else f"{self.left} {ARITHMETIC[self.op][0]} {self.right}"

    def value(self, env: dict[str, int]) -> int:
        left = env[self.left]
        if self.op is None:
            return left
        right = env[self.right] if isinstance(self.right, str) else self.right
        return ARITHMETIC[self.op][1](left, right)


@dataclass(frozen=True)
class Condition:
    """A test on a variable: gt/lt/eq a constant or another variable, divisible by a constant, even, odd."""

    kind: str
    var: str
    other: str | int | None = None

    def code(self) -> str:
        return {"gt": f"{self.var} > {self.other}", "lt": f"{self.var} < {self.other}",
                "eq": f"{self.var} == {self.other}", "div": f"{self.var} % {self.other} == 0",
                "even": f"{self.var} % 2 == 0", "odd": f"{self.var} % 2 == 1"}[self.kind]

    def words(self) -> str:
        return {"gt": f"{self.var} is greater than {self.other}", "lt": f"{self.var} is less than {self.other}",
                "eq": f"{self.var} equals {self.other}", "div": f"{self.var} is divisible by {self.other}",
                "even": f"{self.var} is even", "odd": f"{self.var} is odd"}[self.kind]

    def holds(self, env: dict[str, int]) -> bool:
        value = env[self.var]
        other = env[self.other] if isinstance(self.other, str) else self.other
        return {"gt": lambda: value > other, "lt": lambda: value < other, "eq": lambda: value == other,
                "div": lambda: value % other == 0, "even": lambda: value % 2 == 0,
                "odd": lambda: value % 2 == 1}[self.kind]()


@dataclass(frozen=True)
class Outcome:
    """What a branch answers: a word (a string) or an arithmetic term (an integer)."""

    word: str | None = None
    term: Term | None = None

    def code(self) -> str:
        return repr(self.word) if self.word is not None else self.term.code()

    def words(self, verb: str) -> str:
        return f'{verb} the word "{self.word}"' if self.word is not None else f"{verb} {self.term.words()}"

    def value(self, env: dict[str, int]):
        return self.word if self.word is not None else self.term.value(env)


@dataclass(frozen=True)
class Spec:
    """One problem: its kind, inputs, a derived value, the rules in order and the fallback answer."""

    kind: str            # "stdin" or "function"
    inputs: tuple[str, ...]
    name: str | None     # the function's name (kind "function")
    derived: tuple[str, Term]
    rules: tuple[tuple[Condition, Outcome], ...]
    otherwise: Outcome

    def answer(self, values: tuple[int, ...]):
        env = dict(zip(self.inputs, values))
        env[self.derived[0]] = self.derived[1].value(env)
        for condition, outcome in self.rules:
            if condition.holds(env):
                return outcome.value(env)
        return self.otherwise.value(env)

    def solution(self) -> str:
        indent = "    " if self.kind == "function" else ""
        lines = [opening_line(self.kind, self.name, self.inputs),
                 f"{indent}{self.derived[0]} = {self.derived[1].code()}"]

        def answer(outcome: Outcome) -> str:
            return f"return {outcome.code()}" if self.kind == "function" else f"print({outcome.code()})"

        for index, (condition, outcome) in enumerate(self.rules):
            lines.append(f"{indent}{'if' if index == 0 else 'elif'} {condition.code()}:")
            lines.append(f"{indent}    {answer(outcome)}")
        lines.append(f"{indent}else:")
        lines.append(f"{indent}    {answer(self.otherwise)}")
        return "\n".join(lines) + "\n"

    def question(self) -> str:
        verb = "return" if self.kind == "function" else "print"
        sentences = [given_sentence(self.kind, self.name, self.inputs),
                     f"Let {self.derived[0]} be {self.derived[1].words()}."]
        for index, (condition, outcome) in enumerate(self.rules):
            lead = "If" if index == 0 else "Otherwise, if"
            sentences.append(f"{lead} {condition.words()}, {outcome.words(verb)}.")
        sentences.append(f"Otherwise, {self.otherwise.words(verb)}.")
        return " ".join(sentences)


def opening_line(kind: str, name: str | None, inputs: tuple[str, ...]) -> str:
    """A program's first line: the function's signature, or reading the input."""
    if kind == "function":
        return f"def {name}({', '.join(inputs)}):"
    if len(inputs) == 1:
        return f"{inputs[0]} = int(input())"
    return f"{', '.join(inputs)} = map(int, input().split())"


def given_sentence(kind: str, name: str | None, inputs: tuple[str, ...]) -> str:
    """A question's first sentence: what the program is given."""
    if kind == "function":
        return (f"The function {name}({', '.join(inputs)}) takes "
                + ("an integer " + inputs[0] if len(inputs) == 1 else f"two integers {inputs[0]} and {inputs[1]}") + ".")
    return ("The input is one integer " + inputs[0] if len(inputs) == 1 else
            f"The input is one line with two integers {inputs[0]} and {inputs[1]}") + "."


def draw_inputs(rng: random.Random) -> tuple[str, bool, tuple[str, ...]]:
    """(kind, whether there are two inputs, their names): stdin programs or functions, one or two integers."""
    kind = rng.choice(("stdin", "function"))
    two = rng.random() < 0.5
    return kind, two, (("a", "b") if kind == "stdin" else ("x", "y")) if two else (("n",) if kind == "stdin" else ("x",))


def _draw_spec(rng: random.Random) -> Spec:
    kind, two, inputs = draw_inputs(rng)
    derived_name = rng.choice(("s", "t", "d", "m", "k"))
    op = rng.choice(tuple(ARITHMETIC))
    if two and rng.random() < 0.5 and op in "+-*":
        derived = Term(inputs[0], op, inputs[1])
    else:
        constant = rng.randint(2, 9) if op in ("//", "%", "*") else rng.randint(1, 50)
        derived = Term(rng.choice(inputs), op, constant)
    variables = (*inputs, derived_name)
    rules = []
    for _ in range(rng.choices((1, 2, 3, 4), weights=(15, 40, 30, 15))[0]):
        var = rng.choice(variables)
        test = rng.choices(("gt", "lt", "eq", "div", "even", "odd", "cmp"), weights=(5, 5, 2, 3, 1, 1, 2))[0]
        if test == "cmp":
            condition = Condition(rng.choice(("gt", "lt")), var, rng.choice([v for v in variables if v != var]))
        elif test in ("gt", "lt", "eq"):
            condition = Condition(test, var, rng.randint(0, 99))
        elif test == "div":
            condition = Condition("div", var, rng.randint(2, 9))
        else:
            condition = Condition(test, var)
        rules.append((condition, _draw_outcome(rng, variables)))
    return Spec(kind, inputs, rng.choice(FUNCTION_NAMES) if kind == "function" else None, (derived_name, derived),
                tuple(rules), _draw_outcome(rng, variables))


def _draw_outcome(rng: random.Random, variables: tuple[str, ...]) -> Outcome:
    if rng.random() < 0.5:
        return Outcome(word=rng.choice(WORDS))
    op = rng.choice(("+", "-", "*", "//", "%"))
    return Outcome(term=Term(rng.choice(variables), op, rng.randint(2, 9) if op in ("*", "//", "%")
                             else rng.randint(1, 50)))


def held_out_space(solution: str) -> bool:
    """Whether a problem with this canonical solution belongs to the held-out space (one in five)."""
    return hashlib.sha256(solution.encode()).digest()[0] % HELDOUT_SHARE == 0


def make_problem(spec, rng: random.Random, ident: str, tests: int, difficulty: str) -> Problem:
    """The Problem for a spec (``kind``, ``inputs``, ``name``, ``answer``, ``solution``, ``question``) with
    `tests` random inputs in 0..99, their expected outputs computed by ``spec.answer`` from the rules."""
    cases = []
    for _ in range(tests):
        values = tuple(rng.randint(0, 99) for _ in spec.inputs)
        answer = spec.answer(values)
        if spec.kind == "stdin":
            cases.append(TestCase(" ".join(map(str, values)) + "\n", f"{answer}\n"))
        else:
            cases.append(TestCase(list(values), answer))
    solution = spec.solution()
    starter = solution.splitlines(keepends=True)[0] if spec.kind == "function" else ""
    return Problem(id=ident, question=spec.question(), starter_code=starter, solutions=[solution], tests=cases,
                   kind=spec.kind, entry=spec.name, difficulty=difficulty, source="synthetic")


def distinct_problems(rng: random.Random, draw, belongs, size: int, make) -> list[Problem]:
    """`size` problems with distinct canonical solutions: specs from ``draw(rng)`` whose solution
    ``belongs`` to the wanted space, each made into a Problem by ``make(spec, index)``."""
    problems, seen = [], set()
    while len(problems) < size:
        spec = draw(rng)
        solution = spec.solution()
        if solution in seen or not belongs(solution):
            continue
        seen.add(solution)
        problems.append(make(spec, len(problems)))
    return problems


def generate(split: str, seed: int, size: int) -> list[Problem]:
    """`size` distinct problems of the train or held-out space, deterministic in (split, seed)."""
    if split not in ("train", "heldout"):
        raise DataError(f"synthetic:{split}: unknown split; expected synthetic:train, synthetic:heldout or "
                        "synthetic:heldout:SEED")
    rng = random.Random(f"stepcoder-synthetic-{split}-{seed}")
    return distinct_problems(rng, _draw_spec, lambda solution: held_out_space(solution) == (split == "heldout"), size,
                             lambda spec, index: make_problem(spec, rng, f"synthetic/{split}-{seed}/{index:04d}",
                                                              rng.randint(2, 4), "introductory" if len(spec.rules) <= 2
                                                              else "interview"))


def load_synthetic(spec: str) -> list[Problem]:
    """``train``, ``heldout`` or ``heldout:SEED`` (the part of a ``--data synthetic:...`` spec after the colon)."""
    split, _, seed = spec.partition(":")
    if split == "train":
        if seed:
            raise DataError(f"synthetic:{spec}: the train split is fixed (seed {TRAIN_SEED}); only the held-out "
                            "split takes a seed")
        return generate("train", TRAIN_SEED, TRAIN_SIZE)
    if seed and not seed.isdigit():
        raise DataError(f"synthetic:{spec}: the seed must be a non-negative integer, got {seed!r}")
    return generate(split, int(seed) if seed else HELDOUT_SEED, HELDOUT_SIZE)
