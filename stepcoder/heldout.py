"""Held-out evaluation inside a training run (``--eval_data``): pass@1 of full programs on problems the
run does not train on, judged exactly as ``python -m stepcoder.evaluate`` judges them (the prompt with
the starter code, ``Problem.program(completion)``), with a 95 % bootstrap interval over problems.

The trainer evaluates the starting policy before its first update and the trained one after its last
(and every ``--eval_every`` steps): each evaluation is a row in ``metrics.jsonl``, its per-problem pass
counts in ``eval/step-N.json`` (so before/after differences are paired by problem, also across a
resume), the curve in ``eval_curve.png`` and the before/after comparison in ``eval_summary.json``.
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from stepcoder.data import Problem
from stepcoder.detokenize import code_tokens, continuation
from stepcoder.distributed import all_gather, world
from stepcoder.engines import Sampling
from stepcoder.metrics import KS, bootstrap_ci, pass_at_k
from stepcoder.output import new_figure, save_figure, write_atomically
from stepcoder.prompts import build_prompt, chat_option
from stepcoder.sandbox import Sandbox

if TYPE_CHECKING:
    from stepcoder.config import TrainConfig
    from stepcoder.runlog import Logger

Sampler = Callable[[list[str]], list[tuple[list[int], list[int]]]]  # prompts -> (prompt ids, response ids)


@dataclass
class Evaluation:
    """One evaluation: how many of each problem's `samples` programs passed, and every verdict's count."""

    step: int
    samples: int
    passed: dict[str, int]
    outcomes: dict[str, int]
    seconds: float

    def rates(self) -> list[float]:
        """Each problem's pass rate (its pass@1 estimate), in problem-id order."""
        return [self.passed[key] / self.samples for key in sorted(self.passed)]

    def pass_at(self, k: int) -> float:
        return sum(pass_at_k(self.samples, count, k) for count in self.passed.values()) / len(self.passed)

    def row(self, data: str, temperature: float) -> dict:
        """The metrics.jsonl row: pass@1 with its 95 % interval, pass@k where `samples` allows."""
        low, high = bootstrap_ci(self.rates())
        return {"step": self.step, "eval_data": data, "eval_problems": len(self.passed),
                "eval_samples": self.samples, "eval_temperature": temperature, "eval_pass@1": self.pass_at(1),
                "eval_pass@1_ci95": [low, high],
                "eval_pass@k": {str(k): self.pass_at(k) for k in KS if k <= self.samples},
                "eval_outcomes": self.outcomes, "time_eval_s": round(self.seconds, 2)}

    def save(self, output: Path) -> None:
        folder = output / "eval"
        folder.mkdir(parents=True, exist_ok=True)
        write_atomically(folder / f"step-{self.step}.json", json.dumps(dataclasses.asdict(self), indent=1))

    @classmethod
    def read(cls, file: Path, problems: Sequence[str], samples: int) -> Evaluation:
        """A saved step-0 evaluation reused by another run from the same start (no time spent on it here);
        ValueError, naming the file, unless it is over exactly `problems` with `samples` each."""
        try:
            evaluation = cls(**json.loads(file.read_text()))
        except (OSError, ValueError, TypeError) as error:
            raise ValueError(f"{file}: not an evaluation (eval/step-N.json): {error}") from None
        if evaluation.step != 0 or set(evaluation.passed) != set(problems) or evaluation.samples != samples:
            raise ValueError(f"{file}: an evaluation at step {evaluation.step} of {len(evaluation.passed)} problems x "
                             f"{evaluation.samples} samples, not of this run's start on its {len(problems)} held-out "
                             f"problems x {samples} samples")
        return dataclasses.replace(evaluation, seconds=0.0)

    @classmethod
    def load(cls, output: Path, step: int) -> Evaluation | None:
        file = output / "eval" / f"step-{step}.json"
        return cls(**json.loads(file.read_text())) if file.exists() else None


def evaluate_policy(sample: Sampler, tokenizer, problems: list[Problem], samples: int, sandbox: Sandbox,
                    chat: bool | None, step: int, batch_size: int,
                    prefixes: dict[str, str] | None = None) -> Evaluation:
    """`samples` full programs per problem from `sample`, judged in `sandbox`; with `prefixes` (problem id ->
    a canonical prefix, a CCCS stage) each program continues its problem's prefix. Under torchrun each rank
    takes an equal share (padded with repeats whose verdicts are dropped), so every rank makes the same
    number of generate calls, as sharded generation requires; the counts are gathered on every rank."""
    from tqdm.auto import tqdm

    start = time.perf_counter()
    rank, world_size = world()
    share = math.ceil(len(problems) / world_size)
    mine = problems[rank * share:(rank + 1) * share]
    work = [(problem, True) for problem in mine] + [(problems[0], False)] * (share - len(mine))
    work = [item for item in work for _ in range(samples)]
    futures = []
    for begin in tqdm(range(0, len(work), batch_size), desc=f"held-out eval (step {step})", unit="batch",
                      disable=rank != 0, leave=False):
        chunk = work[begin:begin + batch_size]
        given = [(prefixes or {}).get(problem.id, "") for problem, _ in chunk]
        prompts = [build_prompt(problem, prefix, tokenizer, chat) for (problem, _), prefix in zip(chunk, given)]
        for (problem, counted), prefix, (prompt_ids, response_ids) in zip(chunk, given, sample(prompts)):
            if counted:
                text = continuation(tokenizer, prompt_ids, code_tokens(tokenizer, response_ids))[0]
                futures.append((problem.id, sandbox.submit(*problem.job(problem.program(text, prefix)))))
    passed: Counter = Counter({problem.id: 0 for problem in mine})
    outcomes: Counter = Counter()
    for problem_id, future in futures:
        verdict = future.result().verdict
        passed[problem_id] += verdict == "pass"
        outcomes[verdict] += 1
    total_passed, total_outcomes = {}, Counter()
    for part_passed, part_outcomes in all_gather((dict(passed), dict(outcomes))):
        total_passed.update(part_passed)
        total_outcomes.update(part_outcomes)
    return Evaluation(step, samples, total_passed, dict(total_outcomes), time.perf_counter() - start)


def compare(before: Evaluation, after: Evaluation) -> dict:
    """Before vs after on the same problems: each pass@1 with its interval, and the paired difference's
    95 % bootstrap interval (problems resampled, each keeping its own before and after)."""
    if set(before.passed) != set(after.passed):
        raise ValueError("the two evaluations are not over the same problems")
    differences = [a - b for a, b in zip(after.rates(), before.rates())]
    low, high = bootstrap_ci(differences)
    return {"before": {"step": before.step, "pass@1": before.pass_at(1), "ci95": list(bootstrap_ci(before.rates()))},
            "after": {"step": after.step, "pass@1": after.pass_at(1), "ci95": list(bootstrap_ci(after.rates()))},
            "difference": after.pass_at(1) - before.pass_at(1), "difference_ci95": [low, high],
            "problems": len(before.passed), "samples": before.samples}


def describe(comparison: dict, data: str, temperature: float) -> str:
    """The comparison in two lines, percentages with their intervals."""
    def pct(value: float) -> str:
        return f"{100 * value:.1f}%"

    before, after = comparison["before"], comparison["after"]
    low, high = comparison["difference_ci95"]
    verdict = "excludes 0" if low > 0 or high < 0 else "includes 0"
    lines = (f"held-out pass@1 on {data} ({comparison['problems']} problems x {comparison['samples']} samples, "
             f"T={temperature}):\n"
             f"  step {before['step']} {pct(before['pass@1'])} [{pct(before['ci95'][0])}, {pct(before['ci95'][1])}]"
             f" -> step {after['step']} {pct(after['pass@1'])} [{pct(after['ci95'][0])}, {pct(after['ci95'][1])}];"
             f" difference {100 * comparison['difference']:+.1f} points [{100 * low:+.1f}, {100 * high:+.1f}]"
             f" (95% CI, {verdict})")
    if verdict == "includes 0":
        lines += ("\n  The interval includes 0: this evaluation cannot tell the change from chance; train longer "
                  "(--total_steps) or evaluate more problems (--eval_limit, --eval_data) to narrow it.")
    return lines


def plot_curve(rows: Sequence[dict], path: Path, title: str = "held-out pass@1") -> None:
    """Held-out pass@1 over steps with its 95 % interval as a band."""
    rows = sorted(rows, key=lambda row: row["step"])
    steps = [row["step"] for row in rows]
    figure, axes = new_figure((6, 4))
    axes.plot(steps, [100 * row["eval_pass@1"] for row in rows], marker="o")
    axes.fill_between(steps, [100 * row["eval_pass@1_ci95"][0] for row in rows],
                      [100 * row["eval_pass@1_ci95"][1] for row in rows], alpha=0.25)
    axes.set_xlabel("PPO step")
    axes.set_ylabel("pass@1 (%)")
    axes.set_title(f"{title} ({rows[0]['eval_data']}, T={rows[0]['eval_temperature']})")
    save_figure(figure, path)


def held_out_evaluation(engine, tokenizer, problems: list[Problem], sandbox: Sandbox, config: TrainConfig,
                        step: int, logger: Logger) -> None:
    """Full programs sampled by the run's engine at eval_temperature (top_p 1), judged as `evaluate`
    judges them; the row goes to metrics.jsonl and the per-problem counts to eval/step-N.json. Step 0 is
    read from --start_evaluation when given (raises ValueError when it is not over these problems)."""
    if step == 0 and config.start_evaluation is not None:
        evaluation = Evaluation.read(Path(config.start_evaluation), [p.id for p in problems], config.eval_samples)
        if logger.enabled:
            evaluation.save(logger.output)
            logger.evaluation(evaluation.row(config.eval_data, config.eval_temperature))
        return
    settings = Sampling(config.max_new_tokens, config.eval_temperature)

    def sample(prompts: list[str]) -> list[tuple[list[int], list[int]]]:
        return [(g.prompt_ids, g.response_ids) for g in engine.generate(prompts, settings)]

    chat = chat_option(config.chat)
    evaluation = evaluate_policy(sample, tokenizer, problems, config.eval_samples, sandbox, chat, step,
                                 config.eval_batch_size)
    if logger.enabled:
        evaluation.save(logger.output)
        logger.evaluation(evaluation.row(config.eval_data, config.eval_temperature))


def report_evaluations(logger: Logger, config: TrainConfig) -> None:
    """eval_curve.png; and, when the run has evaluated its start and its end, eval_summary.json and the
    before/after lines with their confidence intervals."""
    if not logger.enabled or not logger.evals:
        return
    plot_curve(logger.evals, logger.output / "eval_curve.png")
    before, after = Evaluation.load(logger.output, 0), Evaluation.load(logger.output, config.total_steps)
    if before is None or after is None:
        return
    if config.total_steps == 0:  # a warm-up-only run: the start, nothing to compare it with
        low, high = bootstrap_ci(before.rates())
        print(f"held-out pass@1 on {config.eval_data} ({len(before.passed)} problems x {before.samples} samples, "
              f"T={config.eval_temperature}): {100 * before.pass_at(1):.1f}% [{100 * low:.1f}%, {100 * high:.1f}%]")
        return
    comparison = compare(before, after)
    # written last and atomically: its presence marks a finished run (python -m stepcoder.ablation)
    write_atomically(logger.output / "eval_summary.json", json.dumps(
        {"eval_data": config.eval_data, "temperature": config.eval_temperature, **comparison}, indent=2) + "\n")
    print(describe(comparison, config.eval_data, config.eval_temperature))
