"""Which problems a run trains, warms up and evaluates on, at which CCCS stages, and in which order:
the data flags (--data, --limit, --difficulty, --eval_data, --sft_data) made into problem lists, each
problem's prefixes, the curriculum over them, and each step's share of problems per rank."""
from __future__ import annotations

import dataclasses
import sys

import numpy as np

from stepcoder.cccs import Curriculum, problem_stages, reach_warning
from stepcoder.config import TrainConfig
from stepcoder.data import DataError, Problem, load_problems
from stepcoder.distributed import world


def select_problems(config: TrainConfig) -> list[Problem]:
    problems = load_problems(config.data).problems
    problems = [p for p in problems if config.difficulty is None or p.difficulty == config.difficulty]
    problems = problems[:config.limit] if config.limit else problems
    if not problems:
        raise DataError(f"no problems to train on in {config.data}")
    return problems


def select_eval_problems(config: TrainConfig) -> list[Problem]:
    """The held-out problems (--eval_data, first --eval_limit), or none; a warning when they are the
    training problems themselves."""
    if config.eval_data is None:
        return []
    problems = load_problems(config.eval_data).problems
    problems = problems[:config.eval_limit] if config.eval_limit else problems
    if not problems:
        raise DataError(f"no problems to evaluate on in {config.eval_data}")
    if config.eval_data == config.data and world()[0] == 0:
        print(f"warning: --eval_data {config.eval_data} is the training data: the evaluation does not measure "
              "generalisation", file=sys.stderr)
    return problems


def select_warmup(config: TrainConfig, problems: list[Problem]) -> tuple[list[Problem], dict[str, list[str]]]:
    """The supervised warm-up's problems (--sft_data, else the training problems) and the prefixes each is
    continued from: every CCCS stage, or with --sft_whole_programs the whole program only. None without a
    warm-up (--sft_steps 0)."""
    if config.sft_steps == 0:
        return [], {}
    if config.sft_data is not None:
        problems = load_problems(config.sft_data).problems
        if not problems:
            raise DataError(f"no problems to warm up on in {config.sft_data}")
        if config.sft_data == config.eval_data and world()[0] == 0:
            print(f"warning: --sft_data {config.sft_data} is the held-out data: the evaluation does not measure "
                  "generalisation", file=sys.stderr)
    return problems, cccs_stages(problems, dataclasses.replace(config, no_cccs=config.sft_whole_programs))


def cccs_stages(problems: list[Problem], config: TrainConfig) -> dict[str, list[str]]:
    """Each problem's CCCS prefixes (longest first, ending with "" for full generation); with --no_cccs,
    or for a problem without a canonical solution that parses, full generation only (with a warning
    naming the problem: an APPS solution in Python 2, say)."""
    if config.no_cccs:
        return {problem.id: [""] for problem in problems}
    stages, unparsed = problem_stages(problems, config.cccs_loops)
    for problem, error in unparsed.items():
        if world()[0] == 0:
            print(f"warning: {problem}: the canonical solution does not parse ({error}); this problem is "
                  "trained at full generation only", file=sys.stderr)
    return stages


def make_curriculum(stages: dict[str, list[str]], config: TrainConfig) -> Curriculum:
    """The CCCS curriculum; --cccs_window defaults to one draw's rollouts (per problem: the rollouts of
    one prompt; global: one step's). Warns, naming the numbers, when it cannot move in this run."""
    rollouts_per_step = config.problems_per_step * world()[1] * config.rollouts_per_prompt
    window = config.cccs_window or (rollouts_per_step if config.cccs_mode == "global" else config.rollouts_per_prompt)
    warning = reach_warning(config.cccs_mode, window, [len(prefixes) for prefixes in stages.values()],
                            config.total_steps, rollouts_per_step, config.rollouts_per_prompt)
    if warning and world()[0] == 0:
        print(f"warning: {warning}", file=sys.stderr)
    return Curriculum(stages, threshold=config.cccs_threshold, window=window, mode=config.cccs_mode)


def problem_batch(problems: list[Problem], position: int, config: TrainConfig, seed: int) -> list[Problem]:
    """This rank's problems for the step at `position` in an epoch-wise shuffled order (same on every rank)."""
    rank, world_size = world()
    chosen, orders = [], {}
    for offset in range(config.problems_per_step * world_size):
        epoch, within = divmod(position + offset, len(problems))
        if epoch not in orders:
            orders[epoch] = np.random.default_rng(seed + epoch).permutation(len(problems))
        chosen.append(problems[orders[epoch][within]])
    return chosen[rank * config.problems_per_step:(rank + 1) * config.problems_per_step]
