"""``python -m stepcoder.ablation``: the StepCoder paper's ablation table (full, without FGO, without
CCCS, vanilla PPO) measured on held-out problems, several seeds per arm, from one shared start.

Every arm and seed starts from the same model (for the small default model: one supervised warm-up
over every CCCS stage of the training problems, saved in ``OUT/start``), trains with the same budget
and evaluates the same held-out problems; only ``--no_fgo``/``--no_cccs`` differ. Each run is
``python -m stepcoder.train`` in ``OUT/ARM/seed-S`` (a finished run is not redone; an interrupted one
resumes from its latest checkpoint). The table (``ablation.md``, ``ablation.json``) gives each arm's
held-out pass@1 after training (mean over seeds, 95 % interval by resampling seeds and problems),
pass@k where the samples allow, its gain over the start, FGO's masked fraction and the final CCCS
stage; ``ablation.png`` plots held-out pass@1 over steps per arm.

    python -m stepcoder.ablation                                  # the synthetic family, 2 CPU cores
    python -m stepcoder.ablation --output_dir abl -- --model_name_or_path ./deepseek-coder-6.7b-instruct \\
        --data apps_plus:train.json --eval_data apps_plus:test.json --launcher "torchrun --nproc_per_node 8"

Options after ``--`` (or any option this command does not know) go to every training run.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from stepcoder.config import SMALL_MODEL_PRESET, ConfigError, build_parser, parse_config
from stepcoder.heldout import Evaluation
from stepcoder.metrics import KS
from stepcoder.output import new_figure, save_figure, write_atomically

ARMS = {"full": [], "no_fgo": ["--no_fgo"], "no_cccs": ["--no_cccs"], "vanilla": ["--no_fgo", "--no_cccs"]}
# For the small default model, on top of its preset (80 PPO steps): evaluations at steps 0, 40 and 80 on the
# first 800 held-out problems, one greedy program each (as many programs as the earlier 200 problems x 4
# samples, each from a different problem, so a narrower interval). 4 arms x 3 seeds took 36 min on 2 cores
# with the earlier preset's 8 x 4 rollouts per step; the 8 x 8 of today's preset take longer (not re-timed).
SMALL_MODEL_DEFAULTS = {"eval_every": 40, "eval_limit": 800}


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(prog="python -m stepcoder.ablation", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                     epilog="Options after -- (and any this command does not know) go to every "
                                            "training run: see python -m stepcoder.train --help.")
    parser.add_argument("--output_dir", default="stepcoder-ablation", help="the start, every run, the table")
    parser.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, of {', '.join(ARMS)}")
    parser.add_argument("--seeds", type=int, default=3, help="training seeds per arm (0 .. SEEDS-1)")
    parser.add_argument("--launcher", default=sys.executable,
                        help='how to start a run, e.g. "torchrun --nproc_per_node 8"')
    parser.add_argument("--jobs", type=int, help="runs at once, each with cores/JOBS torch threads (default: 2 for the "
                                                  "small model on a CPU-only machine, where two one-thread runs finish "
                                                  "sooner than one two-thread run; otherwise 1)")
    args, train_args = parser.parse_known_args(argv)
    train_args = [a for a in train_args if a != "--"]
    arms = [arm.strip() for arm in args.arms.split(",") if arm.strip()]
    unknown = [arm for arm in arms if arm not in ARMS]
    if unknown or not arms:
        parser.error(f"--arms: unknown arm(s) {', '.join(unknown) or '(none given)'}; expected {', '.join(ARMS)}")
    if args.jobs is None:
        small = "--model_name_or_path" not in train_args and not any(
            item.startswith("--model_name_or_path=") for item in train_args)
        args.jobs = min(2, os.cpu_count() or 1) if small and not _has_gpu() else 1
    if args.seeds < 1 or args.jobs < 1:
        parser.error(f"--seeds and --jobs must be >= 1, got {args.seeds} and {args.jobs}")
    args.arms = arms
    for owned in ("output_dir", "seed", "no_fgo", "no_cccs", "resume_from_checkpoint"):
        if any(item == f"--{owned}" or item.startswith(f"--{owned}=") for item in train_args):
            parser.error(f"--{owned} is set by the ablation for each run; leave it out of the training options")
    return args, train_args


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def given_options(train_args: list[str]) -> set[str]:
    """The training options the user set (their names), to know which defaults the ablation may fill in."""
    namespace, _ = build_parser().parse_known_args(train_args)
    return {name for name, value in vars(namespace).items() if value is not None}


def run_options(train_args: list[str], start: Path) -> list[str]:
    """The options every run shares: the user's, the shared start (warmed up already), and for the small
    default model its preset (a run from a saved model would not apply it) and the evaluation schedule."""
    given = given_options(train_args)
    shared = ["--model_name_or_path", str(start), "--sft_steps", "0"]
    if "model_name_or_path" not in given:
        defaults = {**SMALL_MODEL_PRESET, **SMALL_MODEL_DEFAULTS}
        shared += [item for name, value in defaults.items()
                   if name not in given and not name.startswith("sft_") for item in (f"--{name}", str(value))]
    filtered, skip = [], False
    for item in train_args:  # --model_name_or_path and --sft_steps went into the start
        if skip:
            skip = False
        elif item in ("--model_name_or_path", "--sft_steps"):
            skip = True
        elif not item.startswith(("--model_name_or_path=", "--sft_steps=")):
            filtered.append(item)
    return shared + filtered


def build_start(train_args: list[str], output: Path) -> Path:
    """The shared start: the user's model, or (with --sft_steps, or for the small default model) a
    warm-up over every CCCS stage of the training problems, saved once in OUT/start."""
    from stepcoder import train
    from stepcoder.models import quiet_transformers
    from stepcoder.warmup import sized_warmup

    config = parse_config([*train_args, "--output_dir", str(output / "start")])
    if config.model_name_or_path is not None and config.sft_steps == 0:
        return Path(config.model_name_or_path)
    start = output / "start"
    if (start / "config.json").exists() and (start / "DONE").exists():
        return start
    import torch

    torch.manual_seed(config.seed)
    problems = train.select_problems(config)
    stages = train.cccs_stages(problems, config)  # every arm's warm-up sees every stage: the same start
    config = sized_warmup(config, problems, stages)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    policy, _, tokenizer, _, _ = train.build_models(config, problems, stages, None, device)
    with quiet_transformers():
        policy.save_pretrained(start)
    tokenizer.save_pretrained(start)
    (start / "DONE").write_text("")
    return start


def say(message: str) -> None:
    """One whole line, also when several runs report at once."""
    sys.stdout.write(f"[ablation] {message}\n")
    sys.stdout.flush()


def run_arm(arm: str, seed: int, shared: list[str], output: Path, launcher: str, threads: int | None) -> Path:
    """One training run (skipped when finished, resumed when interrupted); returns its folder."""
    folder = output / arm / f"seed-{seed}"
    if (folder / "eval_summary.json").exists():
        return folder
    # the folder is this arm's own: continue from its newest intact checkpoint, or start over in it
    argv = [*shlex.split(launcher), "-m", "stepcoder.train", *shared, *ARMS[arm], "--seed", str(seed),
            "--output_dir", str(folder), "--resume_from_checkpoint", "latest"]
    say(f"{arm} seed {seed}: {shlex.join(argv)}")
    folder.mkdir(parents=True, exist_ok=True)
    env, began = dict(os.environ), time.perf_counter()
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    with open(folder / "train.log", "a") as log:
        done = subprocess.run(argv, check=False, stdout=log, stderr=subprocess.STDOUT, env=env)
    if done.returncode != 0 or not (folder / "eval_summary.json").exists():
        raise SystemExit(f"error: {arm} seed {seed} failed (exit {done.returncode}); see {folder / 'train.log'}")
    say(f"{arm} seed {seed}: done in {(time.perf_counter() - began) / 60:.1f} min")
    return folder


def read_run(folder: Path) -> dict:
    """A finished run's evaluations and training figures."""
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [row for row in rows if "pass_rate" in row]
    evals = sorted((row for row in rows if "eval_pass@1" in row), key=lambda row: row["step"])
    summary = json.loads((folder / "eval_summary.json").read_text())
    return {"summary": summary, "curve": [(row["step"], row["eval_pass@1"]) for row in evals],
            "after": Evaluation.load(folder, summary["after"]["step"]),
            "before": Evaluation.load(folder, summary["before"]["step"]),
            "fgo_masked_frac": float(np.mean([row["fgo_masked_frac"] for row in steps])),
            "cccs_stage_final": steps[-1]["cccs_stage_mean"]}


def interval(matrix: np.ndarray, resamples: int = 4000, seed: int = 0) -> tuple[float, float]:
    """95 % interval of the grand mean of a [seeds, problems] matrix, resampling seeds and problems (a
    two-level bootstrap: it holds both the training seed's spread and the problems' sampling)."""
    rng = np.random.default_rng(seed)
    seeds, problems = matrix.shape
    means = np.empty(resamples)
    for index in range(resamples):
        rows = rng.integers(0, seeds, seeds)
        columns = rng.integers(0, problems, problems)
        means[index] = matrix[np.ix_(rows, columns)].mean()
    low, high = np.quantile(means, [0.025, 0.975])
    return float(low), float(high)


def table(runs: dict[str, list[dict]]) -> dict:
    """Per arm: held-out pass@1 after training (mean over seeds, its interval, each seed's), pass@k, the
    gain over the start with its interval, FGO's masked fraction and the final CCCS stage."""
    result = {}
    for arm, seeds in runs.items():
        after = np.array([run["after"].rates() for run in seeds])
        gain = after - np.array([run["before"].rates() for run in seeds])
        samples = seeds[0]["after"].samples
        result[arm] = {
            "pass@1": float(after.mean()), "pass@1_ci95": interval(after),
            "pass@1_per_seed": [float(row.mean()) for row in after],
            "pass@k": {str(k): float(np.mean([run["after"].pass_at(k) for run in seeds])) for k in KS if k <= samples},
            "gain": float(gain.mean()), "gain_ci95": interval(gain),
            "start_pass@1": float(np.mean([run["before"].pass_at(1) for run in seeds])),
            "fgo_masked_frac": float(np.mean([run["fgo_masked_frac"] for run in seeds])),
            "cccs_stage_final": float(np.mean([run["cccs_stage_final"] for run in seeds])),
            "seeds": len(seeds), "problems": after.shape[1], "samples": samples,
            "curve": mean_curve([run["curve"] for run in seeds])}
    return result


def mean_curve(curves: list[list[tuple[int, float]]]) -> list[tuple[int, float]]:
    steps = sorted(set.intersection(*({step for step, _ in curve} for curve in curves)))
    return [(step, float(np.mean([dict(curve)[step] for curve in curves]))) for step in steps]


def markdown(rows: dict, title: str) -> str:
    def pct(value: float) -> str:
        return f"{100 * value:.1f}"

    ks = [k for k in next(iter(rows.values()))["pass@k"] if k != "1"]
    head = "| arm | held-out pass@1 (%) | 95% CI | per seed | " + "".join(f"pass@{k} | " for k in ks) + \
        "gain over start (points) | 95% CI | FGO masked | final CCCS stage |"
    lines = [f"### {title}", "", head, "|" + "---|" * (head.count("|") - 1)]
    for arm, row in rows.items():
        lines.append(f"| {arm} | {pct(row['pass@1'])} | {pct(row['pass@1_ci95'][0])}–{pct(row['pass@1_ci95'][1])} | "
                     + ", ".join(pct(v) for v in row["pass@1_per_seed"]) + " | "
                     + "".join(f"{pct(row['pass@k'][k])} | " for k in ks)
                     + f"{100 * row['gain']:+.1f} | {100 * row['gain_ci95'][0]:+.1f}–{100 * row['gain_ci95'][1]:+.1f} | "
                     + f"{100 * row['fgo_masked_frac']:.1f}% | {row['cccs_stage_final']:.2f} |")
    return "\n".join(lines) + "\n"


def plot(rows: dict, path: Path) -> None:
    figure, axes = new_figure((6, 4))
    for arm, row in rows.items():
        steps, values = zip(*row["curve"])
        axes.plot(steps, [100 * v for v in values], marker="o", label=arm)
    axes.set_xlabel("PPO step")
    axes.set_ylabel("held-out pass@1 (%), mean over seeds")
    axes.legend()
    save_figure(figure, path)


def main(argv: list[str] | None = None) -> dict:
    args, train_args = parse_args(argv)
    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    try:
        config = parse_config([*train_args, "--output_dir", str(output)])
    except ConfigError as error:
        sys.exit(f"error: {error}")
    if config.eval_data is None:
        sys.exit("error: the ablation compares held-out pass@1: give --eval_data (with --data synthetic:train "
                 "it is synthetic:heldout by default)")
    started = time.perf_counter()
    start = build_start(train_args, output)
    shared = run_options(train_args, start)
    order = [(arm, seed) for seed in range(args.seeds) for arm in args.arms]  # seed-major: early seeds cover all arms
    threads = None if args.jobs == 1 or "OMP_NUM_THREADS" in os.environ else max(1, (os.cpu_count() or 1) // args.jobs)
    with ThreadPoolExecutor(args.jobs) as pool:
        folders = list(pool.map(lambda item: run_arm(*item, shared, output, args.launcher, threads), order))
    runs: dict[str, list[dict]] = {arm: [] for arm in args.arms}
    for (arm, _), folder in zip(order, folders):
        runs[arm].append(read_run(folder))
    rows = table(runs)
    title = (f"{config.eval_data}: {rows[args.arms[0]]['problems']} held-out problems x "
             f"{rows[args.arms[0]]['samples']} samples at T={config.eval_temperature}, {args.seeds} seeds per arm")
    report = {"title": title, "arms": rows, "train_options": shared, "seconds": round(time.perf_counter() - started)}
    write_atomically(output / "ablation.json", json.dumps(report, indent=2) + "\n")
    write_atomically(output / "ablation.md", markdown(rows, title))
    plot(rows, output / "ablation.png")
    print(markdown(rows, title))
    return report


if __name__ == "__main__":
    main()
