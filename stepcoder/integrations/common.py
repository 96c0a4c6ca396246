"""What the plug-ins share: a problem at one CCCS stage as a self-contained task (the JSON that veRL's
ground truth and OpenRLHF's label carry), judging completions of tasks, and the paper's rewards.

A completion is turned into the judged program exactly as ``python -m stepcoder.train`` does it
(``Problem.program``: the starter code or CCCS prefix, then the completion's code, an entry function it
restates replacing the context's), and judged in the sandbox: a local pool shared by the process, or
``python -m stepcoder.serve`` servers (``url``, or ``$STEPCODER_SANDBOX_URL``).
"""
from __future__ import annotations

import argparse
import atexit
import json
import os
import sys
import threading
from dataclasses import dataclass, field, fields
from typing import Iterator

from stepcoder.cccs import problem_stages
from stepcoder.completions import assemble_program
from stepcoder.config import TrainConfig
from stepcoder.data import DataError, load_problems
from stepcoder.data.problem import Problem
from stepcoder.wire import decode_job, encode_job

URL_ENV = "STEPCODER_SANDBOX_URL"
REWARD_FIELDS = {"pass": "reward_pass", "wrong_answer": "reward_wrong_answer",
                 "runtime_error": "reward_runtime_error", "compile_error": "reward_compile_error"}
# The paper's rewards, as the trainer's defaults: pass 1, wrong answer -0.3, runtime error -0.6 (also
# timeouts, memory and output limits, violations), compile error -1.
DEFAULT_REWARDS = {verdict: next(f.default for f in fields(TrainConfig) if f.name == name)
                   for verdict, name in REWARD_FIELDS.items()}


def reward_of(verdict: str, rewards: dict[str, float] | None = None) -> float:
    table = DEFAULT_REWARDS if rewards is None else {**DEFAULT_REWARDS, **rewards}
    return table.get(verdict, table["runtime_error"])


@dataclass(frozen=True)
class Task:
    """One problem at one CCCS stage: what a completion continues (``context``) and how it is judged."""

    id: str
    stage: int
    context: str
    entry: str | None
    job: dict = field(repr=False)  # stepcoder.wire's job: tests, kind, entry, setup (program left empty)

    @classmethod
    def of(cls, problem: Problem, stage: int = 0, prefix: str = "") -> Task:
        return cls(problem.id, stage, problem.context(prefix), problem.entry,
                   encode_job("", problem.tests, problem.kind, problem.entry, problem.setup))

    def to_json(self) -> str:
        return json.dumps({"id": self.id, "stage": self.stage, "context": self.context, "entry": self.entry,
                           "job": self.job})

    @classmethod
    def from_json(cls, text: str | dict) -> Task:
        data = json.loads(text) if isinstance(text, str) else text
        try:
            return cls(data["id"], int(data["stage"]), data["context"], data["entry"], data["job"])
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"not a stepcoder task ({type(error).__name__}: {error}); make the data with "
                             "stepcoder.integrations' prepare commands") from None

    def program(self, completion: str) -> str:
        """The judged program, as the trainer assembles it (``Problem.program``)."""
        return assemble_program(self.context, completion, self.entry)

    def sandbox_job(self, completion: str) -> tuple:
        (_, tests, kind, entry, setup), _ = decode_job(self.job, f"task {self.id}")
        return self.program(completion), tests, kind, entry, setup


@dataclass
class Judgement:
    reward: float
    verdict: str
    program: str
    executed_lines: list[int]
    tests_ran: bool
    detail: str | None


def judge(tasks: list[Task], completions: list[str], sandbox=None, rewards: dict | None = None,
          trace: bool = False) -> list[Judgement]:
    """Each completion of its task judged (in parallel), with its reward."""
    pool = sandbox if sandbox is not None and not isinstance(sandbox, str) else shared_sandbox(sandbox)
    futures = [pool.submit(*task.sandbox_job(completion), trace=trace) for task, completion in zip(tasks, completions)]
    judged = []
    for task, completion, future in zip(tasks, completions, futures):
        result = future.result()
        judged.append(Judgement(reward_of(result.verdict, rewards), result.verdict, task.program(completion),
                                result.executed_lines, bool(result.tests), result.detail))
    return judged


def staged(problems: list[Problem], cccs: bool) -> Iterator[tuple[Problem, int, str]]:
    """(problem, stage, prefix) for every CCCS stage of every problem, longest prefix first; with
    `cccs` off, full generation only."""
    stages = problem_stages(problems)[0] if cccs else {problem.id: [""] for problem in problems}
    for problem in problems:
        for stage, prefix in enumerate(stages[problem.id]):
            yield problem, stage, prefix


def prepare_arguments(prog: str, description: str | None, output: str,
                      argv: list[str] | None) -> tuple[argparse.Namespace, list[Problem]]:
    """The data commands' flags (--data, --output, --cccs) and the problems they name."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--data", required=True, help="problems, as python -m stepcoder.train's --data")
    parser.add_argument("--output", required=True, help=output)
    parser.add_argument("--cccs", action="store_true", help="a row per CCCS stage (default: full generation)")
    args = parser.parse_args(argv)
    try:
        return args, load_problems(args.data).problems
    except (DataError, OSError) as error:
        sys.exit(f"error: {error}")


_pools: dict[str | None, object] = {}
_pools_lock = threading.Lock()


def shared_sandbox(url: str | None = None):
    """The process's sandbox for `url` (or $STEPCODER_SANDBOX_URL, else a local pool of a worker per CPU),
    started on first use and closed at exit: reward functions are called thousands of times."""
    url = url or os.environ.get(URL_ENV) or None
    with _pools_lock:
        if url not in _pools:
            from stepcoder.remote import open_sandbox

            _pools[url] = open_sandbox(url, workers=len(os.sched_getaffinity(0)))
            if len(_pools) == 1:
                atexit.register(close_shared_sandboxes)
        return _pools[url]


def close_shared_sandboxes() -> None:
    """Stops the pools ``shared_sandbox`` started (at exit, or earlier to free their processes)."""
    with _pools_lock:
        while _pools:
            _pools.popitem()[1].close()


__all__ = ["DEFAULT_REWARDS", "Judgement", "Task", "close_shared_sandboxes", "judge", "prepare_arguments",
           "reward_of", "shared_sandbox", "staged"]
