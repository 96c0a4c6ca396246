"""``python -m stepcoder.evaluate``: judge programs on APPS+, APPS, HumanEval, MBPP or the built-in set.

What is judged: the dataset's own solutions (``--canonical``, a health check), completions from a
jsonl file (``--samples``, lines of ``{"task_id", "completion"}``), or samples from a local model
(``--model``). Reports pass@k (unbiased estimator; k = 1, 5, 10 where n allows) overall and by
difficulty, and how failures split into compile errors, runtime errors, wrong answers and timeouts
(the StepCoder paper's error table). ``--output DIR`` writes ``report.json``, ``verdicts.jsonl`` and
``outcomes.png``.

    python -m stepcoder.evaluate --canonical --data apps_plus:../shared/data/apps_plus/valid_all.json
    python -m stepcoder.evaluate --model ./my-model --n 10 --temperature 0.8 --data humaneval --output out/
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
import warnings
from collections import Counter, defaultdict
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from stepcoder.data import DIFFICULTIES, DataError, Problem, load_problems
from stepcoder.metrics import pass_at_k
from stepcoder.sandbox import VERDICTS, Sandbox

KS = (1, 5, 10)
FAILURES = ("compile_error", "runtime_error", "wrong_answer", "timeout", "memory_limit", "output_limit", "violation")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m stepcoder.evaluate", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    data = parser.add_argument_group("problems")
    data.add_argument("--data", default="builtin",
                      help="apps_plus:PATH, apps:DIR, humaneval, mbpp:PATH or builtin")
    data.add_argument("--difficulty", choices=DIFFICULTIES, help="only problems of this difficulty")
    data.add_argument("--limit", type=int, help="only the first LIMIT problems (after --difficulty)")
    data.add_argument("--skip-bad", action="store_true", help="skip (and count) malformed problems instead of failing")
    what = parser.add_argument_group("what is judged (one of)").add_mutually_exclusive_group(required=True)
    what.add_argument("--canonical", action="store_true", help="the dataset's own solutions")
    what.add_argument("--samples", metavar="FILE.jsonl",
                      help='completions: lines of {"task_id": ..., "completion": ...}')
    what.add_argument("--model", metavar="PATH", help="a local transformers model that generates --n samples each")
    gen = parser.add_argument_group("generation (--model)")
    gen.add_argument("--n", type=int, default=1, help="samples per problem (with --canonical: solutions per problem)")
    gen.add_argument("--temperature", type=float, default=0.2)
    gen.add_argument("--top_p", type=float, default=0.95)
    gen.add_argument("--max_new_tokens", type=int, default=512)
    gen.add_argument("--batch_size", type=int, default=16, help="sequences per generate() call")
    gen.add_argument("--chat", choices=("auto", "on", "off"), default="auto",
                     help="chat-template prompts: when the tokenizer has a template (auto), always, never")
    gen.add_argument("--seed", type=int, default=0)
    run = parser.add_argument_group("sandbox and output")
    run.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="sandbox worker processes")
    run.add_argument("--timeout", type=float, default=4.0, help="seconds per test")
    run.add_argument("--memory_mb", type=int, default=1024, help="address-space limit per test")
    run.add_argument("--output", metavar="DIR", help="write report.json, verdicts.jsonl and outcomes.png here")
    args = parser.parse_args(argv)
    for name, low in (("n", 1), ("limit", 1), ("max_new_tokens", 1), ("batch_size", 1), ("workers", 1)):
        value = getattr(args, name)
        if value is not None and value < low:
            parser.error(f"--{name} must be >= {low}, got {value}")
    if not args.temperature >= 0 or not 0 < args.top_p <= 1 or not args.timeout > 0:
        parser.error("--temperature must be >= 0, --top_p in (0, 1], --timeout > 0")
    if args.samples and not Path(args.samples).is_file():
        parser.error(f"--samples {args.samples}: no such file")
    return args


@dataclass
class ProblemScore:
    problem: Problem
    verdicts: list[str] = field(default_factory=list)
    details: list[str | None] = field(default_factory=list)

    @property
    def passed(self) -> int:
        return self.verdicts.count("pass")


def read_samples(path: str, problems: list[Problem], skip_bad: bool) -> dict[str, list[str]]:
    """Completions per task id, in file order; unknown task ids are an error (warned with --skip-bad)."""
    known = {p.id for p in problems}
    samples: dict[str, list[str]] = defaultdict(list)
    unknown = Counter()
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"{path}: line {number} is not valid JSON: {error}") from None
            if not isinstance(record, dict) or not isinstance(record.get("task_id"), (str, int)) \
                    or not isinstance(record.get("completion"), str):
                raise DataError(f"{path}: line {number} needs a task_id and a string completion")
            task = str(record["task_id"])
            if task in known:
                samples[task].append(record["completion"])
            else:
                unknown[task] += 1
    if unknown:
        message = f"{path}: {len(unknown)} task ids match no loaded problem (e.g. {next(iter(unknown))!r})"
        if not skip_bad:
            raise DataError(message + "; check --data, or pass --skip-bad to ignore them")
        warnings.warn(message, stacklevel=2)
    return samples


def candidates(args: argparse.Namespace, problems: list[Problem]) -> Iterator[tuple[Problem, list[str]]]:
    """(problem, programs to judge) for each problem, lazily (a model generates batch by batch)."""
    if args.canonical:
        for problem in problems:
            if not problem.solutions:
                warnings.warn(f"{problem.id} has no canonical solution; it is not scored", stacklevel=2)
                continue
            yield problem, problem.solutions[:args.n]
        return
    if args.samples:
        samples = read_samples(args.samples, problems, args.skip_bad)
        missing = [p.id for p in problems if p.id not in samples]
        if missing:
            warnings.warn(f"{len(missing)} problems have no samples and are not scored (e.g. {missing[0]})",
                          stacklevel=2)
        for problem in problems:
            if problem.id in samples:
                yield problem, [problem.program(c) for c in samples[problem.id]]
        return
    import torch
    from transformers import set_seed

    from stepcoder.generation import load_model, sample
    from stepcoder.prompts import build_prompt

    set_seed(args.seed)
    model, tokenizer = load_model(args.model)
    chat = {"auto": None, "on": True, "off": False}[args.chat]
    prompts = [build_prompt(problem, tokenizer=tokenizer, chat=chat) for problem in problems]
    with torch.inference_mode():
        completions = sample(model, tokenizer, prompts, args.n, args.temperature, args.top_p, args.max_new_tokens,
                             args.batch_size)
        for problem, texts in zip(problems, completions):
            yield problem, [problem.program(text) for text in texts]


def judge(sandbox: Sandbox, work: Iterable[tuple[Problem, list[str]]], total: int) -> list[ProblemScore]:
    """Submits each problem's programs as soon as they exist; a progress bar counts judged problems."""
    from tqdm.auto import tqdm

    pending: list[tuple[ProblemScore, list[Future]]] = []
    lock = threading.Lock()
    with tqdm(total=total, desc="problems", unit="problem") as bar:

        def count_down(remaining: list[int]) -> None:
            with lock:
                remaining[0] -= 1
                if remaining[0] == 0:
                    bar.update(1)

        for problem, programs in work:
            remaining = [len(programs)]
            futures = [sandbox.submit(*problem.job(program)) for program in programs]
            for future in futures:
                future.add_done_callback(lambda _, remaining=remaining: count_down(remaining))
            pending.append((ProblemScore(problem), futures))
        bar.total = len(pending)
        bar.refresh()
        scores = []
        for score, futures in pending:
            for future in futures:
                result = future.result()
                score.verdicts.append(result.verdict)
                score.details.append(result.detail)
            scores.append(score)
    return scores


def summarize(scores: list[ProblemScore]) -> dict:
    """pass@k (mean over problems with n >= k, for k every problem allows) and verdict counts."""
    scored = [s for s in scores if s.verdicts]
    if not scored:
        return {"num_problems": 0, "num_programs": 0, "pass@1": None, "pass@k": {}, "outcomes": {}}
    least = min(len(s.verdicts) for s in scored)
    pass_k = {str(k): sum(pass_at_k(len(s.verdicts), s.passed, k) for s in scored) / len(scored)
              for k in KS if k <= least}
    outcomes = Counter(v for s in scored for v in s.verdicts)
    failures = sum(outcomes[v] for v in FAILURES)
    return {
        "num_problems": len(scored),
        "num_programs": sum(len(s.verdicts) for s in scored),
        "pass@1": pass_k.get("1"),
        "pass@k": pass_k,
        "outcomes": {v: outcomes.get(v, 0) for v in VERDICTS},
        "failure_shares": {v: (outcomes.get(v, 0) / failures if failures else 0.0) for v in FAILURES},
    }


def report(scores: list[ProblemScore], skipped: list[str], args: argparse.Namespace, seconds: float) -> dict:
    by_difficulty = defaultdict(list)
    for score in scores:
        by_difficulty[score.problem.difficulty or "unknown"].append(score)
    summary = summarize(scores)
    order = {name: index for index, name in enumerate(DIFFICULTIES)}
    ordered = sorted(by_difficulty, key=lambda d: order.get(d, len(order)))
    summary["by_difficulty"] = {d: summarize(by_difficulty[d]) for d in ordered}
    summary["skipped_problems"] = len(skipped)
    summary["skipped"] = skipped
    summary["seconds"] = round(seconds, 2)
    summary["config"] = {k: v for k, v in vars(args).items() if k != "output"}
    return summary


def print_summary(summary: dict) -> None:
    print(f"\n{summary['num_problems']} problems, {summary['num_programs']} programs, {summary['seconds']} s"
          + (f", {summary['skipped_problems']} bad problems skipped" if summary["skipped_problems"] else ""))
    groups = summary["by_difficulty"]
    rows = [("all", summary)] + ([] if list(groups) == ["unknown"] else list(groups.items()))
    ks = list(summary["pass@k"])
    print(f"{'':14s}{'problems':>9s}" + "".join(f"{'pass@' + k:>10s}" for k in ks))
    for name, part in rows:
        print(f"{name:14s}{part['num_problems']:>9d}" + "".join(f"{100 * part['pass@k'].get(k, 0):>9.1f}%" for k in ks))
    shares = summary.get("failure_shares", {})
    if any(shares.values()):
        print("failures: " + ", ".join(f"{v} {100 * share:.1f}%" for v, share in shares.items() if share))


def write_outputs(directory: str, summary: dict, scores: list[ProblemScore]) -> None:
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    _atomic_write(out / "report.json", json.dumps(summary, indent=2) + "\n")
    lines = [json.dumps({"task_id": s.problem.id, "sample": i, "difficulty": s.problem.difficulty, "verdict": v,
                         "detail": d}) for s in scores for i, (v, d) in enumerate(zip(s.verdicts, s.details))]
    _atomic_write(out / "verdicts.jsonl", "".join(line + "\n" for line in lines))
    plot_outcomes(summary, out / "outcomes.png")


def plot_outcomes(summary: dict, path: Path) -> None:
    """Bars: the share of each verdict among all programs, per difficulty and overall."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(summary["by_difficulty"].items()) + [("all", summary)]
    shown = [v for v in VERDICTS if any(part["outcomes"].get(v, 0) for _, part in groups)] or ["pass"]
    width = 0.8 / len(shown)
    figure, axes = plt.subplots(figsize=(max(6, 1.8 * len(groups)), 4))
    for index, verdict in enumerate(shown):
        heights = [part["outcomes"].get(verdict, 0) / max(part["num_programs"], 1) for _, part in groups]
        axes.bar([g + index * width for g in range(len(groups))], heights, width, label=verdict)
    axes.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))], [name for name, _ in groups])
    axes.set_ylabel("share of programs")
    axes.set_ylim(0, 1)
    axes.set_title("Outcomes by difficulty")
    axes.legend(fontsize="small", ncol=2)
    figure.tight_layout()
    temporary = path.with_suffix(".tmp.png")
    figure.savefig(temporary, dpi=120)
    plt.close(figure)
    os.replace(temporary, path)


def _atomic_write(path: Path, text: str) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    start = time.monotonic()
    try:
        loaded = load_problems(args.data, skip_bad=args.skip_bad)
    except DataError as error:
        sys.exit(f"error: {error}")
    problems = [p for p in loaded.problems if args.difficulty is None or p.difficulty == args.difficulty]
    problems = problems[:args.limit] if args.limit else problems
    if not problems:
        sys.exit(f"error: no problems to evaluate in {args.data}" + (f" at difficulty {args.difficulty}"
                                                                     if args.difficulty else ""))
    with Sandbox(workers=args.workers, timeout=args.timeout, memory_mb=args.memory_mb, trace=False) as sandbox:
        try:
            scores = judge(sandbox, candidates(args, problems), len(problems))
        except DataError as error:
            sys.exit(f"error: {error}")
    summary = report(scores, loaded.skipped, args, time.monotonic() - start)
    print_summary(summary)
    if args.output:
        write_outputs(args.output, summary, scores)
        print(f"wrote {args.output}/report.json, verdicts.jsonl, outcomes.png")
    return summary


if __name__ == "__main__":
    main()
