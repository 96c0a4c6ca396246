"""The one record every data source is loaded into."""
from __future__ import annotations

from dataclasses import dataclass, field

from stepcoder.completions import assemble_program
from stepcoder.sandbox import TestCase

SOURCES = ("apps_plus", "apps", "humaneval", "mbpp", "builtin", "synthetic")
DIFFICULTIES = ("introductory", "interview", "competition")


# LeetCode and Codewars judges run solutions with these names already imported (`List` in signatures).
CALL_SETUP = """\
from typing import *
import bisect, collections, functools, heapq, itertools, math, re, string, sys
from collections import Counter, OrderedDict, defaultdict, deque
from functools import lru_cache, reduce
from heapq import heapify, heappop, heappush
from itertools import accumulate, combinations, permutations, product
"""


class DataError(ValueError):
    """A data file or a problem in it is unusable; the message names the file and the problem."""


@dataclass
class Problem:
    """A programming problem with its canonical solutions and unit tests.

    ``starter_code`` is the code the model continues (a signature, a HumanEval prompt; "" when it
    writes whole programs); ``solutions`` are complete programs; ``kind`` and ``entry`` say how the
    sandbox calls them (see ``stepcoder.sandbox``).
    """

    id: str
    question: str
    starter_code: str
    solutions: list[str]
    tests: list[TestCase]
    kind: str
    entry: str | None
    difficulty: str | None = None
    source: str = "builtin"
    setup: str = ""  # run before the program, untraced: implicit imports of LeetCode-style problems
    metadata: dict = field(default_factory=dict)

    def context(self, prefix: str = "") -> str:
        """The code a prompt ends with, which the completion continues: for full generation the starter
        code; for a CCCS prefix (whole lines of canonical code from the top, so it holds the starter code)
        the prefix without its last newline, which the completion opens. A byte-level BPE spells a newline
        with the next line's indentation as one token ("\n    "), so a prompt ending in "\n" leaves the
        model a token boundary whole programs never have: a model warmed up on whole programs wrote the
        next `elif` unindented (a compile error) in half of the prompts that cut inside a function. A
        prefix holding no more than the starter code is the whole program's prompt, boundary included."""
        if len(prefix) > len(self.starter_code):
            return prefix[:-1] if prefix.endswith("\n") else prefix
        return self.starter_code

    def program(self, completion: str, prefix: str = "") -> str:
        """The program judged for a completion generated after ``context(prefix)``."""
        return assemble_program(self.context(prefix), completion, self.entry)

    def job(self, program: str) -> tuple:
        """The sandbox job (``Sandbox.run_many``/``submit``) that judges `program` on this problem."""
        return program, self.tests, self.kind, self.entry, self.setup
