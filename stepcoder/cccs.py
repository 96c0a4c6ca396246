"""CCCS: the curriculum of code-completion subtasks (StepCoder §3.1).

Each canonical solution is split at its conditional statements. Training starts with the longest
canonical prefix given, so the model only completes the end of the program; as a problem's pass rate
reaches a threshold, its start point moves back, until the model writes the whole program.

    split_points(source)   1-based lines where `if`/`elif` begin (optionally loops too)
    prefixes(source)       the canonical prefixes in curriculum order, ending with "" (full generation)
    Curriculum             per-problem (or global) stage keeping, serializable for checkpoints
"""
from __future__ import annotations

import ast
import math
from collections import Counter, deque
from dataclasses import dataclass, field

MODES = ("per_problem", "global")


def split_points(source: str, loops: bool = False) -> list[int]:
    """The 1-based line numbers where conditional statements begin: every `if` and `elif` (an `elif`
    is an `ast.If` of its own), plus `for`/`while` with `loops=True`; ascending, without repeats.
    On APPS+ these are the start lines of the `If Statement Body` entries of the `scope` field."""
    kinds = (ast.If, ast.For, ast.AsyncFor, ast.While) if loops else (ast.If,)
    return sorted({node.lineno for node in ast.walk(ast.parse(source)) if isinstance(node, kinds)})


def prefixes(source: str, loops: bool = False) -> list[str]:
    """The canonical prefixes in curriculum order.

    With E split points p_0 < ... < p_{E-1}, S = ceil(sqrt(E)) stages and stride k = ceil(E / S),
    stage s = 0 .. S-1 starts at p_{max(0, E-1-s*k)}: its prefix is the source up to, not including,
    that line. The list ends with "" (full generation); stage 0 is the longest prefix and each next one
    is strictly shorter (a prefix that would repeat one, or be empty, is dropped). A solution without
    conditionals gives [""].
    """
    points = split_points(source, loops)
    lines = source.splitlines(keepends=True)
    count = len(points)
    result: list[str] = []
    if count:
        stages = math.ceil(math.sqrt(count))
        stride = math.ceil(count / stages)
        for stage in range(stages):
            prefix = "".join(lines[: points[max(0, count - 1 - stage * stride)] - 1])
            if prefix and (not result or len(prefix) < len(result[-1])):
                result.append(prefix)
    return result + [""]


def problem_stages(problems, loops: bool = False) -> tuple[dict[str, list[str]], dict[str, str]]:
    """Each problem's CCCS prefixes (longest first, ending with "" for full generation), and the
    problems whose canonical solution does not parse (id -> error), which get full generation only."""
    stages, unparsed = {}, {}
    for problem in problems:
        stages[problem.id] = [""]
        if not problem.solutions:
            continue
        try:
            stages[problem.id] = prefixes(problem.solutions[0], loops)
        except (SyntaxError, ValueError) as error:
            unparsed[problem.id] = str(error)
    return stages, unparsed


@dataclass
class Curriculum:
    """Which CCCS stage each problem is at, advanced by recent pass rates.

    per_problem mode: a problem moves to its next (shorter) prefix once its last `window` rollouts at
    the current stage pass at a rate >= `threshold` (rho); its window then starts afresh. global mode:
    one stage for all problems (each capped at its own last stage), advanced when the last `window`
    rollouts of all problems together reach rho. ``state_dict``/``load_state_dict`` round-trip exactly.
    """

    stage_prefixes: dict[str, list[str]]
    threshold: float = 0.5
    window: int = 8
    mode: str = "per_problem"
    stages: dict[str, int] = field(default_factory=dict)
    global_stage: int = 0
    _recent: dict[str, deque] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if not 0 < self.threshold <= 1:
            raise ValueError(f"threshold (rho) must be in (0, 1], got {self.threshold}")
        if self.window < 1:
            raise ValueError(f"window must be >= 1, got {self.window}")
        for problem, stage_list in self.stage_prefixes.items():
            if not stage_list or stage_list[-1] != "":
                raise ValueError(f"problem {problem}: the stage prefixes must end with '' (full generation)")
            self.stages.setdefault(problem, 0)
        self._recent = {key: deque(maxlen=self.window) for key in self._keys()}

    @classmethod
    def from_solutions(cls, solutions: dict[str, str], loops: bool = False, **options) -> Curriculum:
        """A curriculum over problems given by id -> canonical solution."""
        return cls({problem: prefixes(source, loops) for problem, source in solutions.items()}, **options)

    def _keys(self) -> list[str]:
        return ["*"] if self.mode == "global" else list(self.stage_prefixes)

    def stage(self, problem: str) -> int:
        last = len(self.stage_prefixes[problem]) - 1
        return min(self.global_stage if self.mode == "global" else self.stages[problem], last)

    def prefix(self, problem: str) -> str:
        """The canonical prefix the model is given for `problem` now ("" once it writes everything)."""
        return self.stage_prefixes[problem][self.stage(problem)]

    def finished(self, problem: str) -> bool:
        return self.stage(problem) == len(self.stage_prefixes[problem]) - 1

    def record(self, problem: str, passed: bool, stage: int | None = None) -> bool:
        """Counts one rollout of `problem`; returns True when a stage advanced.

        `stage` is ``stage(problem)`` when the rollout was generated: a rollout from another stage (the
        rest of a batch generated before an advance) is ignored, so advancing measures the current
        subtask and never skips a stage. None means "generated at the current stage"."""
        if problem not in self.stage_prefixes:
            raise KeyError(f"unknown problem {problem!r}")
        if stage is not None and stage != self.stage(problem):
            return False
        key = "*" if self.mode == "global" else problem
        recent = self._recent[key]
        recent.append(bool(passed))
        if len(recent) < self.window or sum(recent) < self.threshold * len(recent):
            return False
        if self.mode == "global":
            if all(self.finished(p) for p in self.stage_prefixes):
                return False
            self.global_stage += 1
        else:
            if self.finished(problem):
                return False
            self.stages[problem] += 1
        recent.clear()
        return True

    def histogram(self) -> dict[int, int]:
        """How many problems are at each stage (0 = the longest prefix)."""
        return dict(sorted(Counter(self.stage(p) for p in self.stage_prefixes).items()))

    def full_windows(self) -> int:
        """How many windows (problems; 1 in global mode) hold `window` rollouts at their current stage:
        those the threshold is being judged on. Zero step after step means the curriculum cannot move."""
        return sum(len(recent) == self.window for recent in self._recent.values())

    def mean_stage(self) -> float:
        return sum(self.stage(p) for p in self.stage_prefixes) / max(len(self.stage_prefixes), 1)

    def state_dict(self) -> dict:
        """A JSON-able snapshot: stages and the recent-rollout windows."""
        return {"mode": self.mode, "threshold": self.threshold, "window": self.window,
                "stages": dict(self.stages), "global_stage": self.global_stage,
                "recent": {key: list(values) for key, values in self._recent.items()}}

    def load_state_dict(self, state: dict) -> None:
        for name in ("mode", "threshold", "window"):
            if state[name] != getattr(self, name):
                raise ValueError(f"checkpoint curriculum has {name}={state[name]!r}, this run {getattr(self, name)!r}")
        unknown = set(state["stages"]) - set(self.stage_prefixes)
        if unknown:
            raise ValueError(f"checkpoint curriculum has problems this run does not: {sorted(unknown)[:3]}")
        self.stages.update(state["stages"])
        self.global_stage = state["global_stage"]
        for key, values in state["recent"].items():
            self._recent[key] = deque(values, maxlen=self.window)


def _visits(problems: int, steps: int, problems_per_step: int) -> int:
    """The most times a problem is drawn in `steps` steps (every problem once per epoch)."""
    return math.ceil(steps * problems_per_step / max(problems, 1))


def reach(mode: str, window: int, stage_counts: list[int], steps: int, rollouts_per_step: int,
          rollouts_per_prompt: int) -> tuple[int, int]:
    """(the most stages the curriculum can advance in `steps` steps, the stages a typical problem has to
    advance to reach full generation). `stage_counts`: each problem's number of stages, full generation
    included. per_problem: problems are drawn in epochs, so each is visited about steps x problems per
    step / problems times; one visit's rollouts share a stage, so a visit advances a problem at most once,
    and an advance needs ceil(window / rollouts_per_prompt) visits. global: an advance needs the window's
    rollouts, ceil(window / rollouts_per_step) steps. Reached when every rollout passes (exactly when the
    problems are a multiple of the problems per step; ``tests/test_cccs.py``); in global mode, problems
    already at full generation keep counting towards the next stage's window, which can only be faster."""
    if mode == "global":
        return steps // math.ceil(window / rollouts_per_step), max(stage_counts, default=1) - 1
    needed = sorted(count - 1 for count in stage_counts)[len(stage_counts) // 2] if stage_counts else 0
    visits = _visits(len(stage_counts), steps, rollouts_per_step // rollouts_per_prompt)
    return visits // math.ceil(window / rollouts_per_prompt), needed


def reach_warning(mode: str, window: int, stage_counts: list[int], steps: int, rollouts_per_step: int,
                  rollouts_per_prompt: int) -> str | None:
    """Why the curriculum would not move in this run, in words, or None when it can (see ``reach``)."""
    possible, needed = reach(mode, window, stage_counts, steps, rollouts_per_step, rollouts_per_prompt)
    if needed == 0 or possible >= needed:
        return None
    if mode == "global":
        how = (f"one stage needs a window of {window} rollouts, {math.ceil(window / rollouts_per_step)} steps of "
               f"{rollouts_per_step}")
    else:
        visits = _visits(len(stage_counts), steps, rollouts_per_step // rollouts_per_prompt)
        how = (f"each of {len(stage_counts)} problems is drawn about {visits} time(s) in {steps} steps with "
               f"{rollouts_per_prompt} rollouts, and a window of {window} rollouts at one stage moves it")
    what = "cannot advance at all" if possible == 0 else f"can advance at most {possible} stage(s)"
    remedies = "lower --cccs_window" + (", use --cccs_mode global, train on fewer problems" if mode != "global" else "")
    return (f"the CCCS curriculum ({mode}) {what} in this run, while a typical problem needs {needed} to reach "
            f"full generation: {how}. To let it move: {remedies} or train for more steps.")
