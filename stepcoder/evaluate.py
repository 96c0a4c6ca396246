"""``python -m stepcoder.evaluate``: judge programs on APPS+, APPS, HumanEval, MBPP or the built-in set.

What is judged: the dataset's own solutions (``--canonical``, a health check), completions from a
jsonl file (``--samples``, lines of ``{"task_id", "completion"}``), or samples from a local model
(``--model``). Reports pass@k (unbiased estimator; k = 1, 5, 10 where n allows) overall and by
difficulty, and how failures split into compile errors, runtime errors, wrong answers and timeouts
(the StepCoder paper's error table). ``--output DIR`` writes ``report.json``, ``verdicts.jsonl`` and
``outcomes.png``. Several ``--model`` paths are judged on the same problems with the same seed and
printed side by side (e.g. a checkpoint's ``reference/`` and ``policy/``: before vs after training).

    python -m stepcoder.evaluate --canonical --data apps_plus:../shared/data/apps_plus/valid_all.json
    python -m stepcoder.evaluate --model ./my-model --n 10 --temperature 0.8 --data humaneval --output out/
    python -m stepcoder.evaluate --model run/checkpoint-80/reference run/checkpoint-80/policy --n 4
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
from stepcoder.generation import ENGINES
from stepcoder.metrics import KS, pass_at_k
from stepcoder.output import new_figure, save_figure, write_atomically
from stepcoder.remote import check_urls, open_sandbox
from stepcoder.sandbox import VERDICTS, Sandbox, SandboxError

FAILURES = ("compile_error", "runtime_error", "wrong_answer", "timeout", "memory_limit", "output_limit", "violation")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m stepcoder.evaluate", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    data = parser.add_argument_group("problems")
    data.add_argument("--data", default="builtin",
                      help="apps_plus:PATH, apps:DIR, humaneval, mbpp:PATH, builtin, synthetic:train, "
                           "synthetic:heldout or synthetic:heldout:SEED")
    data.add_argument("--difficulty", choices=DIFFICULTIES, help="only problems of this difficulty")
    data.add_argument("--limit", type=int, help="only the first LIMIT problems (after --difficulty)")
    data.add_argument("--skip-bad", action="store_true", help="skip (and count) malformed problems instead of failing")
    what = parser.add_argument_group("what is judged (one of)").add_mutually_exclusive_group(required=True)
    what.add_argument("--canonical", action="store_true", help="the dataset's own solutions")
    what.add_argument("--samples", metavar="FILE.jsonl",
                      help='completions: lines of {"task_id": ..., "completion": ...}')
    what.add_argument("--model", metavar="PATH", nargs="+", action="extend",
                      help="local transformers models, each generating --n samples per problem; several are "
                           "compared side by side")
    gen = parser.add_argument_group("generation (--model)")
    gen.add_argument("--n", type=int, default=1, help="samples per problem (with --canonical: solutions per problem)")
    gen.add_argument("--temperature", type=float, default=0.2)
    gen.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling; 1 = off, as the trainer samples")
    gen.add_argument("--top_k", type=int, default=0,
                     help="top-k sampling; 0 = off, as the trainer samples (a checkpoint's generation_config "
                          "never applies)")
    gen.add_argument("--max_new_tokens", type=int, default=None,
                     help="default: 1.5 x the 95th percentile of the problems' canonical solutions in tokens "
                          "(64 to 2048; 512 without solutions)")
    gen.add_argument("--batch_size", type=int, default=16, help="sequences per generate() call")
    gen.add_argument("--engine", choices=ENGINES, default="hf",
                     help="hf: transformers' generate; vllm: vLLM in this process (pip install -e \".[vllm]\")")
    gen.add_argument("--chat", choices=("auto", "on", "off"), default="auto",
                     help="chat-template prompts: when the tokenizer has a template (auto), always, never")
    gen.add_argument("--seed", type=int, default=0)
    run = parser.add_argument_group("sandbox and output")
    run.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="sandbox worker processes")
    run.add_argument("--timeout", type=float, default=4.0,
                     help="CPU seconds per test (all threads): the limit programs are judged by")
    run.add_argument("--wall_timeout", type=float, default=None,
                     help="wall-clock backstop per test for programs that sleep or block (default: 4 x --timeout + 1)")
    run.add_argument("--memory_mb", type=int, default=1024, help="address-space limit per test")
    run.add_argument("--sandbox_url", metavar="URL[,URL...]", default=None,
                     help="judge on python -m stepcoder.serve servers (http://host:port/t/TOKEN) instead of "
                          "--workers local processes")
    run.add_argument("--output", metavar="DIR", help="write report.json, verdicts.jsonl and outcomes.png here")
    args = parser.parse_args(argv)
    for name, low in (("n", 1), ("limit", 1), ("max_new_tokens", 1), ("batch_size", 1), ("workers", 1),
                      ("top_k", 0)):
        value = getattr(args, name)
        if value is not None and value < low:
            parser.error(f"--{name} must be >= {low}, got {value}")
    if not args.temperature >= 0 or not 0 < args.top_p <= 1 or not args.timeout > 0:
        parser.error("--temperature must be >= 0, --top_p in (0, 1], --timeout > 0")
    if args.wall_timeout is not None and not args.wall_timeout >= args.timeout:
        parser.error(f"--wall_timeout must be >= --timeout ({args.timeout}), got {args.wall_timeout}")
    if args.sandbox_url is not None:
        try:
            check_urls(args.sandbox_url)
        except ValueError as error:
            parser.error(str(error).replace("sandbox_url:", "--sandbox_url:"))
    if args.samples and not Path(args.samples).is_file():
        parser.error(f"--samples {args.samples}: no such file")
    if args.model:
        twice = [path for path, count in Counter(str(Path(p).resolve()) for p in args.model).items() if count > 1]
        if twice:
            parser.error(f"--model {twice[0]} is given more than once")
    return args


@dataclass
class ProblemScore:
    problem: Problem
    verdicts: list[str] = field(default_factory=list)
    details: list[str | None] = field(default_factory=list)
    warnings: list[list[str]] = field(default_factory=list)  # each program's compiler warnings
    wall_timeouts: int = 0  # timeouts decided by the sandbox's wall-clock backstop, not by CPU time

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


def candidates(args: argparse.Namespace, problems: list[Problem],
               model_path: str | None = None) -> Iterator[tuple[Problem, list[str]]]:
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
    from transformers import set_seed

    from stepcoder.engines import Sampling, completions, evaluation_engine, prompt_ids
    from stepcoder.generation import load_model, load_tokenizer, suited_max_new_tokens
    from stepcoder.prompts import build_prompt, chat_option

    set_seed(args.seed)  # the same for every model, so compared models sample under the same seed
    model, tokenizer = load_model(model_path) if args.engine == "hf" else (None, load_tokenizer(model_path))
    chat = chat_option(args.chat)
    prompts = [build_prompt(problem, tokenizer=tokenizer, chat=chat) for problem in problems]
    budget = args.max_new_tokens or suited_max_new_tokens(tokenizer, [p.solutions[0] for p in problems if p.solutions])
    longest = max(len(ids) for ids in prompt_ids(tokenizer, prompts))
    engine = evaluation_engine(args.engine, model_path, tokenizer, model, longest + budget, args.seed)
    try:
        for problem, texts in zip(problems, completions(engine, tokenizer, prompts, args.n,
                                                        Sampling(budget, args.temperature, args.top_p, args.top_k),
                                                        args.batch_size)):
            yield problem, [problem.program(text) for text in texts]
    finally:
        engine.close()


def judge(sandbox: Sandbox, work: Iterable[tuple[Problem, list[str]]], total: int,
          label: str = "problems") -> list[ProblemScore]:
    """Submits each problem's programs as soon as they exist; a progress bar counts judged problems."""
    from tqdm.auto import tqdm

    pending: list[tuple[ProblemScore, list[Future]]] = []
    lock = threading.Lock()
    with tqdm(total=total, desc=label, unit="problem") as bar:

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
                score.warnings.append(result.warnings)
                score.wall_timeouts += result.wall_timeout
            scores.append(score)
    return scores


def summarize(scores: list[ProblemScore]) -> dict:
    """pass@k (mean over problems with n >= k, for k every problem allows) and verdict counts."""
    scored = [s for s in scores if s.verdicts]
    if not scored:
        return {"num_problems": 0, "num_programs": 0, "pass@1": None, "pass@k": {}, "outcomes": {},
                "wall_timeouts": 0}
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
        "wall_timeouts": sum(s.wall_timeouts for s in scored),  # of outcomes["timeout"]
    }


def report(scores: list[ProblemScore], skipped: list[str], args: argparse.Namespace, seconds: float,
           model_path: str | None = None) -> dict:
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
    if model_path is not None:
        summary["config"]["model"] = model_path
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


def print_comparison(summaries: dict[str, dict]) -> None:
    """Several models' reports as one table: a column per model, a row per figure."""
    names = list(summaries)
    first = summaries[names[0]]
    print(f"\n{first['num_problems']} problems, " + ", ".join(
        f"{name}: {part['num_programs']} programs in {part['seconds']} s" for name, part in summaries.items()))
    width = max(12, *(len(name) + 2 for name in names))
    rows: list[tuple[str, list[float | None]]] = []
    for k in first["pass@k"]:
        rows.append((f"pass@{k}", [part["pass@k"].get(k) for part in summaries.values()]))
    groups = list(first["by_difficulty"])
    if groups != ["unknown"]:
        for group in groups:
            rows.append((f"  {group} pass@1", [part["by_difficulty"].get(group, {}).get("pass@1")
                                               for part in summaries.values()]))
    for verdict in VERDICTS:
        if verdict != "pass" and any(part["outcomes"].get(verdict) for part in summaries.values()):
            rows.append((f"  {verdict}", [part["outcomes"][verdict] / max(part["num_programs"], 1)
                                          for part in summaries.values()]))
    label_width = max(len(label) for label, _ in rows) + 2
    print(" " * label_width + "".join(f"{name:>{width}s}" for name in names))
    for label, values in rows:
        cells = "".join(f"{'-':>{width}s}" if v is None else f"{100 * v:>{width - 1}.1f}%" for v in values)
        print(f"{label:<{label_width}s}{cells}")
    print("(verdict rows: share of all programs)")


def model_labels(paths: list[str]) -> list[str]:
    """Short names that tell the models apart: the fewest trailing path parts that are unique
    (checkpoint-80/policy and checkpoint-80/reference become policy and reference)."""
    parts = [Path(path).resolve().parts for path in paths]
    for depth in range(1, max(len(p) for p in parts) + 1):
        labels = ["/".join(p[-depth:]) for p in parts]
        if len(set(labels)) == len(labels):
            return labels
    return [str(Path(path).resolve()) for path in paths]


def write_outputs(directory: str | Path, summary: dict, scores: list[ProblemScore]) -> None:
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    write_atomically(out / "report.json", json.dumps(summary, indent=2) + "\n")
    lines = [json.dumps({"task_id": s.problem.id, "sample": i, "difficulty": s.problem.difficulty, "verdict": v,
                         "detail": d, **({"warnings": w} if w else {})})
             for s in scores for i, (v, d, w) in enumerate(zip(s.verdicts, s.details, s.warnings))]
    write_atomically(out / "verdicts.jsonl", "".join(line + "\n" for line in lines))
    plot_outcomes(summary, out / "outcomes.png")


def plot_outcomes(summary: dict, path: Path) -> None:
    """Bars: the share of each verdict among all programs, per difficulty and overall."""
    groups = list(summary["by_difficulty"].items()) + [("all", summary)]
    shown = [v for v in VERDICTS if any(part["outcomes"].get(v, 0) for _, part in groups)] or ["pass"]
    width = 0.8 / len(shown)
    figure, axes = new_figure((max(6, 1.8 * len(groups)), 4))
    for index, verdict in enumerate(shown):
        heights = [part["outcomes"].get(verdict, 0) / max(part["num_programs"], 1) for _, part in groups]
        axes.bar([g + index * width for g in range(len(groups))], heights, width, label=verdict)
    axes.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))], [name for name, _ in groups])
    axes.set_ylabel("share of programs")
    axes.set_ylim(0, 1)
    axes.set_title("Outcomes by difficulty")
    axes.legend(fontsize="small", ncol=2)
    save_figure(figure, path)


def main(argv: list[str] | None = None) -> dict:
    """Returns the report; with several --model paths, {"models": {label: report}}."""
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
    models = args.model or [None]
    if args.model:
        from stepcoder.config import not_installed
        from stepcoder.generation import check_model_dir

        if not_installed("--engine", args.engine):
            sys.exit(f"error: {not_installed('--engine', args.engine)}")
        try:
            for path in args.model:  # every path, before any model is loaded or judged
                check_model_dir(path)
        except ValueError as error:
            sys.exit(f"error: {error}")
    labels = model_labels(args.model) if args.model else ["problems"]
    results: dict[str, tuple[dict, list[ProblemScore]]] = {}
    try:
        sandbox = open_sandbox(args.sandbox_url, workers=args.workers, timeout=args.timeout,
                               wall_timeout=args.wall_timeout, memory_mb=args.memory_mb, trace=False)
    except SandboxError as error:  # no server answered, or one refused the token
        sys.exit(f"error: --sandbox_url: {error}")
    with sandbox:
        for label, path in zip(labels, models):
            try:
                scores = judge(sandbox, candidates(args, problems, path), len(problems), label)
            except (DataError, ValueError) as error:
                sys.exit(f"error: {error}")
            results[label] = (report(scores, loaded.skipped, args, time.monotonic() - start, path), scores)
            start = time.monotonic()
    if len(results) == 1:
        ((summary, scores),) = results.values()
        print_summary(summary)
        if args.output:
            write_outputs(args.output, summary, scores)
            print(f"wrote {args.output}/report.json, verdicts.jsonl, outcomes.png")
        return summary
    summaries = {label: summary for label, (summary, _) in results.items()}
    print_comparison(summaries)
    if args.output:
        out = Path(args.output)
        for index, (label, (summary, scores)) in enumerate(results.items()):
            write_outputs(out / f"model-{index}", summary, scores)
        comparison = {"models": {label: {"path": path, "directory": f"model-{index}", "pass@k": summary["pass@k"],
                                         "outcomes": summary["outcomes"]}
                                 for index, (label, path) in enumerate(zip(labels, models))}}
        write_atomically(out / "comparison.json", json.dumps(comparison, indent=2) + "\n")
        folders = ", ".join(f"model-{index}/ = {label}" for index, label in enumerate(labels))
        print(f"wrote {args.output}/comparison.json; report.json, verdicts.jsonl, outcomes.png in {folders}")
    return {"models": summaries}


if __name__ == "__main__":
    main()
