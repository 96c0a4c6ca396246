"""CCCS: split points, the prefix rule (on fixtures and on every APPS+ problem), the scheduler."""
from __future__ import annotations

import json
import math
import random
import textwrap
from pathlib import Path

import pytest

from stepcoder.cccs import Curriculum, prefixes, reach, reach_warning, split_points

APPS_PLUS = Path(__file__).resolve().parents[2] / "shared" / "data" / "apps_plus" / "valid_all.json"

SOURCE = textwrap.dedent("""\
    import sys
    def solve(n):
        total = 0
        for i in range(n):
            if i % 2:
                total += i
            elif i % 3 == 0:
                total -= 1
            else:
                total += 2 if i > 4 else 1
        while total > 100:
            total //= 2
        if total < 0:
            return 0
        return total
""")


def test_split_points_are_if_and_elif_lines():
    assert split_points(SOURCE) == [5, 7, 13]                  # the conditional expression is no statement
    assert split_points(SOURCE, loops=True) == [4, 5, 7, 11, 13]
    assert split_points("print(1)\n") == []


def expected_prefixes(source: str, points: list[int]) -> list[str]:
    """The issue's rule, written out independently of stepcoder.cccs."""
    lines = source.splitlines(keepends=True)
    count = len(points)
    if count == 0:
        return [""]
    stages = math.ceil(math.sqrt(count))
    stride = math.ceil(count / stages)
    starts = [points[max(0, count - 1 - s * stride)] for s in range(stages)]
    out = []
    for start in starts:
        text = "".join(lines[: start - 1])
        if text and (not out or len(text) < len(out[-1])):
            out.append(text)
    return out + [""]


def test_prefixes_follow_the_rule_on_fixtures():
    assert prefixes(SOURCE) == ["".join(SOURCE.splitlines(keepends=True)[:12]),
                                "".join(SOURCE.splitlines(keepends=True)[:4]), ""]
    assert prefixes("print(1)\n") == [""]
    assert prefixes("if x:\n    pass\n") == [""]  # a prefix that would be empty is full generation
    rng = random.Random()
    for count in range(1, 30):
        body = "".join(f"    if x == {i}:\n        y = {i}\n" for i in range(count))
        source = "def f(x):\n    y = 0\n" + body + "    return y\n"
        result = prefixes(source)
        assert result == expected_prefixes(source, split_points(source))
        assert len(result) == math.ceil(math.sqrt(count)) + 1
        assert all(len(a) > len(b) for a, b in zip(result, result[1:]))
        assert source.startswith(result[rng.randrange(len(result))])


@pytest.mark.skipif(not APPS_PLUS.exists(), reason="the team's APPS+ copy (../shared/data/apps_plus) is absent")
def test_split_points_and_prefixes_on_every_apps_plus_problem():
    problems = json.loads(APPS_PLUS.read_text())
    assert len(problems) == 500
    for index, problem in enumerate(problems):
        source = problem["canonical_solution"]
        scope = problem["scope"]
        starts = sorted({start for kind, start, _ in scope if kind == "If Statement Body"})
        assert split_points(source) == starts, index
        assert prefixes(source) == expected_prefixes(source, starts), index


def test_curriculum_advances_and_holds():
    curriculum = Curriculum({"a": ["long", "short", ""], "b": ["x", ""]}, threshold=0.5, window=4)
    assert curriculum.prefix("a") == "long" and curriculum.histogram() == {0: 2}
    for passed in (True, False, False, False):  # 1 of 4 < 0.5: holds
        assert not curriculum.record("a", passed)
    assert curriculum.stage("a") == 0
    advanced = [curriculum.record("a", passed) for passed in (True, True, False)]
    assert advanced == [False, True, False]  # window [F, F, T, T]: 0.5 >= 0.5 advances; the window restarts
    assert curriculum.prefix("a") == "short" and curriculum.stage("b") == 0
    for _ in range(8):
        curriculum.record("a", True)
    assert curriculum.prefix("a") == "" and curriculum.finished("a")  # never past full generation
    assert curriculum.histogram() == {0: 1, 2: 1} and curriculum.mean_stage() == 1.0


@pytest.mark.parametrize("mode", ["per_problem", "global"])
def test_a_batch_larger_than_the_window_advances_once(mode):
    """16 rollouts generated at stage 0 with a pass rate >= rho, window 4: exactly one advance, to
    stage 1; the rest of the batch (and any rollout tagged with another stage) is ignored."""
    curriculum = Curriculum({"a": ["3", "2", "1", ""], "b": ["y", "x", ""]}, threshold=0.5, window=4, mode=mode)
    rng = random.Random()
    batch = [("a" if mode == "per_problem" else rng.choice("ab"), passed)
             for passed in [True, False] * 8]  # 50 %: every window of 4 reaches rho
    advances = [curriculum.record(problem, passed, stage=0) for problem, passed in batch]
    assert advances.count(True) == 1 and curriculum.stage("a") == 1
    assert curriculum.stage("b") == (1 if mode == "global" else 0)
    for _ in range(8):
        assert not curriculum.record("a", True, stage=0)  # stale: generated before the advance
    assert curriculum.stage("a") == 1
    assert [curriculum.record("a", True, stage=1) for _ in range(4)] == [False, False, False, True]
    assert curriculum.stage("a") == 2  # fresh rollouts of the new stage do advance it


def test_global_mode_moves_every_problem_together():
    curriculum = Curriculum({"a": ["1", "2", ""], "b": ["x", ""]}, threshold=1.0, window=3, mode="global")
    for problem in ("a", "b", "a"):
        curriculum.record(problem, True)
    assert (curriculum.stage("a"), curriculum.stage("b")) == (1, 1)
    for problem in ("b", "b", "a"):
        curriculum.record(problem, True)
    assert (curriculum.stage("a"), curriculum.stage("b")) == (2, 1)  # b stays at its last stage


@pytest.mark.parametrize("mode", ["per_problem", "global"])
def test_curriculum_restores_exactly_from_its_serialized_state(mode):
    rng = random.Random()
    stage_lists = {f"p{i}": [f"prefix {j}" for j in range(rng.randint(0, 4))] + [""] for i in range(6)}
    make = lambda: Curriculum(stage_lists, threshold=0.6, window=5, mode=mode)  # noqa: E731
    continuous, restored = make(), None
    events = [(f"p{rng.randrange(6)}", rng.random() < 0.7) for _ in range(400)]
    for step, (problem, passed) in enumerate(events):
        if step == 150:
            restored = make()
            restored.load_state_dict(json.loads(json.dumps(continuous.state_dict())))
        advanced = continuous.record(problem, passed)
        if restored is not None:
            assert restored.record(problem, passed) == advanced
            assert restored.state_dict() == continuous.state_dict()
    assert restored.histogram() == continuous.histogram()
    assert continuous.mean_stage() > 0  # the run did move


def test_bad_curriculum_arguments():
    with pytest.raises(ValueError, match="end with ''"):
        Curriculum({"a": ["x"]})
    with pytest.raises(ValueError, match="threshold"):
        Curriculum({"a": [""]}, threshold=0)
    with pytest.raises(ValueError, match="mode"):
        Curriculum({"a": [""]}, mode="sometimes")
    with pytest.raises(ValueError, match="window=5"):
        Curriculum({"a": [""]}, window=4).load_state_dict(Curriculum({"a": [""]}, window=5).state_dict())


def simulate(mode: str, window: int, stage_counts: list[int], steps: int, problems_per_step: int,
             rollouts_per_prompt: int) -> int:
    """The trainer's own draw order (selection.problem_batch) with every rollout passing: the most stages
    any problem moves in `steps` steps -- the brute-force reference for ``reach``."""
    from stepcoder import data, selection
    from stepcoder.config import parse_config

    config = parse_config(["--output_dir", "unused", "--problems_per_step", str(problems_per_step)])
    problems = [data.Problem(id=str(i), question="", starter_code="", solutions=[], tests=[], kind="stdin",
                              entry=None) for i in range(len(stage_counts))]
    stages = {str(i): [f"p{j}" for j in range(count - 1)] + [""] for i, count in enumerate(stage_counts)}
    curriculum = Curriculum(stages, threshold=1.0, window=window, mode=mode)
    for step in range(steps):
        chosen = selection.problem_batch(problems, step * problems_per_step, config, seed=0)
        drawn = [(p.id, curriculum.stage(p.id)) for p in chosen for _ in range(rollouts_per_prompt)]
        for problem, stage in drawn:  # a step's rollouts are generated before any is recorded
            curriculum.record(problem, True, stage)
    return max(curriculum.stage(p) for p in stages)


def test_reach_equals_the_brute_force_curriculum_and_warns_when_it_cannot_move():
    rng = random.Random()
    for _ in range(60):
        mode = rng.choice(["per_problem", "global"])
        per_step, rollouts = rng.randint(1, 6), rng.randint(1, 6)
        problems, window, steps = rng.randint(per_step, 40), rng.randint(1, 16), rng.randint(1, 30)
        counts = [rng.randint(1, 8) for _ in range(problems)]
        if mode == "global" or rng.random() < 0.5:  # global: a problem past its last stage keeps counting
            counts = [max(counts)] * problems  # towards the window, a speed-up ``reach`` leaves out
        possible, _ = reach(mode, window, counts, steps, per_step * rollouts, rollouts)
        moved = simulate(mode, window, counts, steps, per_step, rollouts)
        case = (mode, problems, per_step, rollouts, window, steps, counts)
        # exact when epochs end with steps and every problem has as many stages (otherwise the problems
        # drawn once more than the rest may be ones with few stages: seen with 8 problems, 2 per step,
        # 29 steps); and a problem drawn at the end of one epoch and the start of the next within one
        # step gets two draws at one stage, which can advance it only once
        exact = problems % per_step == 0 and len(set(counts)) == 1
        assert moved == min(possible, max(counts) - 1) if exact else moved <= possible, case
    # the setting: 1000 problems, 8 per step, 4 rollouts, window 8, 80 steps: nothing moves
    stuck = reach_warning("per_problem", 8, [3] * 1000, 80, 32, 4)
    assert stuck is not None and "cannot advance at all" in stuck and "1000 problems" in stuck
    assert reach_warning("per_problem", 8, [3] * 48, 40, 32, 4) is None  # the built-in set comes back often
    assert reach_warning("global", 32, [3] * 1000, 60, 32, 4) is None
    assert "at most 1 stage" in reach_warning("global", 64, [5] * 10, 2, 32, 4)


def test_the_trainer_warns_at_start_when_the_curriculum_cannot_move(capsys):
    from stepcoder import selection
    from stepcoder.config import parse_config

    stages = {str(i): ["a", "b", ""] for i in range(1000)}
    stuck = parse_config(["--output_dir", "unused", "--total_steps", "80", "--cccs_mode", "per_problem",
                          "--cccs_window", "8", "--problems_per_step", "8", "--rollouts_per_prompt", "4"])
    assert selection.make_curriculum(stages, stuck).window == 8
    assert "cannot advance at all" in capsys.readouterr().err
    moving = parse_config(["--output_dir", "unused"])  # the small model's global curriculum, default window
    assert selection.make_curriculum(stages, moving).window == 64  # one step: 8 problems x 8 rollouts
    assert "warning" not in capsys.readouterr().err
