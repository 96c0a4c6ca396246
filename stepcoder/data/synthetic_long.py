"""A generated family of long programs, where whole-program reward is sparse: StepCoder's regime.

A problem states how to compute one value: an accumulator starts from the input, then a chain of
3-5 conditional blocks each may change it (``if``, sometimes ``elif`` and ``else``,
each branch setting the accumulator to an arithmetic term of itself), and the program prints or
returns it. Every block is reached by every test and later conditions test the accumulator as the
earlier blocks left it, so one wrong block anywhere fails the program: the chance of a whole passing
program falls geometrically with the number of blocks, which is the exploration problem CCCS is for
(StepCoder §3.1). Completing only the last block, given the rest as the prefix, is the first CCCS
stage; the canonical solutions have 3-5 blocks and 3-9 split points (an ``elif`` is one), so two or
three prefix stages before the whole program. The 3 tests draw random inputs, so branches no test
takes are common: FGO's material.

Three spaces, disjoint by construction (a hash of the canonical solution picks one): ``heldout``
(one in five), ``warmup`` (one in five: whole programs a start model may be fine-tuned on, never
trained on with RL nor evaluated) and ``train`` (the rest). ``synthetic-long:train`` (1000 problems),
``synthetic-long:warmup`` (4000) and ``synthetic-long:heldout`` (1600) are fixed;
``synthetic-long:heldout:SEED`` draws 1600 other held-out problems. Expected outputs are computed from
the rules (``LongSpec.answer``), never by running the canonical solution.
"""
from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

from stepcoder.data.problem import DataError, Problem
from stepcoder.data.synthetic import (FUNCTION_NAMES, Condition, Term, distinct_problems, draw_inputs, given_sentence,
                                      make_problem, opening_line)

SIZES = {"train": 1000, "warmup": 4000, "heldout": 1600}
FIXED_SEEDS = {"train": 0, "warmup": 0, "heldout": 1}
SPACE_SHARE = 5  # a fifth of the space is held out, a fifth is for warm-ups
MIN_BLOCKS, MAX_BLOCKS = 3, 5
TESTS = 3
ACCUMULATORS = ("s", "t", "r", "v", "w")


@dataclass(frozen=True)
class Block:
    """``if c0: acc = u0`` [``elif c1: acc = u1`` ...] [``else: acc = otherwise``]."""

    branches: tuple[tuple[Condition, Term], ...]
    otherwise: Term | None

    def apply(self, env: dict[str, int], acc: str) -> None:
        for condition, update in self.branches:
            if condition.holds(env):
                env[acc] = update.value(env)
                return
        if self.otherwise is not None:
            env[acc] = self.otherwise.value(env)


@dataclass(frozen=True)
class LongSpec:
    kind: str            # "stdin" or "function"
    inputs: tuple[str, ...]
    name: str | None     # the function's name (kind "function")
    acc: str
    start: Term
    blocks: tuple[Block, ...]

    def answer(self, values: tuple[int, ...]) -> int:
        env = dict(zip(self.inputs, values))
        env[self.acc] = self.start.value(env)
        for block in self.blocks:
            block.apply(env, self.acc)
        return env[self.acc]

    def solution(self) -> str:
        indent = "    " if self.kind == "function" else ""
        lines = [opening_line(self.kind, self.name, self.inputs), f"{indent}{self.acc} = {self.start.code()}"]
        for block in self.blocks:
            for index, (condition, update) in enumerate(block.branches):
                lines.append(f"{indent}{'if' if index == 0 else 'elif'} {condition.code()}:")
                lines.append(f"{indent}    {self.acc} = {update.code()}")
            if block.otherwise is not None:
                lines.append(f"{indent}else:")
                lines.append(f"{indent}    {self.acc} = {block.otherwise.code()}")
        lines.append(f"{indent}return {self.acc}" if self.kind == "function" else f"print({self.acc})")
        return "\n".join(lines) + "\n"

    def question(self) -> str:
        sentences = [given_sentence(self.kind, self.name, self.inputs), f"Let {self.acc} be {self.start.words()}."]
        for number, block in enumerate(self.blocks):
            parts = []
            for index, (condition, update) in enumerate(block.branches):
                lead = ("If" if number == 0 else "Then, if") if index == 0 else "otherwise, if"
                parts.append(f"{lead} {condition.words()}, set {self.acc} to {update.words()}")
            if block.otherwise is not None:
                parts.append(f"otherwise, set {self.acc} to {block.otherwise.words()}")
            sentences.append("; ".join(parts) + ".")
        sentences.append(f"Finally, {'return' if self.kind == 'function' else 'print'} {self.acc}.")
        return " ".join(sentences)


def _condition(rng: random.Random, variables: tuple[str, ...]) -> Condition:
    var = rng.choice(variables)
    test = rng.choices(("gt", "lt", "eq", "div", "even", "odd", "cmp"), weights=(5, 5, 1, 3, 1, 1, 2))[0]
    if test == "cmp":
        return Condition(rng.choice(("gt", "lt")), var, rng.choice([v for v in variables if v != var]))
    if test in ("gt", "lt", "eq"):
        return Condition(test, var, rng.randint(0, 99))
    if test == "div":
        return Condition("div", var, rng.randint(2, 9))
    return Condition(test, var)


def _update(rng: random.Random, acc: str, inputs: tuple[str, ...]) -> Term:
    op = rng.choice(("+", "-", "*", "//", "%"))
    if op in "+-" and rng.random() < 0.25:
        return Term(acc, op, rng.choice(inputs))
    return Term(acc, op, rng.randint(2, 9) if op in ("*", "//", "%") else rng.randint(1, 50))


def _draw_spec(rng: random.Random) -> LongSpec:
    kind, two, inputs = draw_inputs(rng)
    acc = rng.choice(ACCUMULATORS)
    op = rng.choice(("+", "-", "*"))
    if two and rng.random() < 0.5:
        start = Term(inputs[0], op, inputs[1])
    else:
        start = Term(rng.choice(inputs), op, rng.randint(2, 9) if op == "*" else rng.randint(1, 50))
    variables = (*inputs, acc)
    blocks = []
    for _ in range(rng.randint(MIN_BLOCKS, MAX_BLOCKS)):
        branches = [(_condition(rng, variables), _update(rng, acc, inputs))]
        if rng.random() < 0.3:
            branches.append((_condition(rng, variables), _update(rng, acc, inputs)))
        otherwise = _update(rng, acc, inputs) if rng.random() < 0.3 else None
        blocks.append(Block(tuple(branches), otherwise))
    return LongSpec(kind, inputs, rng.choice(FUNCTION_NAMES) if kind == "function" else None, acc, start,
                    tuple(blocks))


def space(solution: str) -> str:
    """The space a problem with this canonical solution belongs to: heldout, warmup or train."""
    bucket = hashlib.sha256(f"synthetic-long:{solution}".encode()).digest()[0] % SPACE_SHARE
    return {0: "heldout", 1: "warmup"}.get(bucket, "train")


def generate(split: str, seed: int, size: int) -> list[Problem]:
    """`size` distinct problems of one space, deterministic in (split, seed)."""
    if split not in SIZES:
        raise DataError(f"synthetic-long:{split}: unknown split; expected synthetic-long:train, "
                        "synthetic-long:warmup, synthetic-long:heldout or synthetic-long:heldout:SEED")
    rng = random.Random(f"stepcoder-synthetic-long-{split}-{seed}")
    return distinct_problems(rng, _draw_spec, lambda solution: space(solution) == split, size,
                             lambda spec, index: make_problem(spec, rng, f"synthetic-long/{split}-{seed}/{index:04d}",
                                                              TESTS, "interview"))


def load_synthetic_long(spec: str) -> list[Problem]:
    """``train``, ``warmup``, ``heldout`` or ``heldout:SEED`` (the part of ``synthetic-long:...`` after the colon)."""
    split, _, seed = spec.partition(":")
    if seed and split != "heldout":
        raise DataError(f"synthetic-long:{spec}: the {split} split is fixed; only the held-out split takes a seed")
    if seed and not seed.isdigit():
        raise DataError(f"synthetic-long:{spec}: the seed must be a non-negative integer, got {seed!r}")
    if split not in SIZES:
        generate(split, 0, 0)  # raises, naming the splits
    return generate(split, int(seed) if seed else FIXED_SEEDS[split], SIZES[split])
