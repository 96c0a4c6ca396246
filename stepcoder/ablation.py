"""``python -m stepcoder.ablation``: the StepCoder paper's ablation (full, without FGO, without CCCS,
vanilla PPO) measured on held-out problems, several seeds per arm, from one shared start.

Every arm and seed starts from the same model, trains with the same budget and evaluates the same
held-out problems; only ``--no_fgo``/``--no_cccs`` differ. Each run is ``python -m stepcoder.train`` in
``OUT/ARM/seed-S`` (a finished run is not redone; an interrupted one resumes from its latest checkpoint).
The report (``ablation.md``, ``ablation.json``) gives each arm's held-out pass@1 after training (mean
over seeds, 95 % interval by resampling seeds and problems), its gain over the start, the paired
differences full - no_cccs, full - no_fgo and full - vanilla, and the mechanism each part acts through:
the share of rollouts that pass (reward density) at the first step and over training, the share of
rollouts writing whole programs (the curriculum's progress), and the generated tokens on lines no test
ran with the share of the policy gradient they receive (what FGO removes). ``ablation.png`` plots
held-out pass@1 over steps per arm with 95 % bands, ``ablation_mechanism.png`` the mechanism figures.

With the small default model two regimes are built in (``--preset``): ``synthetic`` (short programs of
1-4 rules, the default run's setting) and ``synthetic-long`` (long programs, where a whole passing
program is rare for the start model: the regime the paper's CCCS is for; see docs/ablation.md).

    python -m stepcoder.ablation --preset synthetic-long --jobs 2        # about 90 minutes on 2 CPU cores
    python -m stepcoder.ablation --preset synthetic-long --seed_offset 1000 --seeds 4   # fresh seeds
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
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from stepcoder.config import SMALL_MODEL_PRESET, ConfigError, TrainConfig, build_parser, parse_config
from stepcoder.heldout import Evaluation
from stepcoder.metrics import KS
from stepcoder.output import new_figure, save_figure, write_atomically

ARMS = {"full": [], "no_fgo": ["--no_fgo"], "no_cccs": ["--no_cccs"], "vanilla": ["--no_fgo", "--no_cccs"]}
DIFFERENCES = ("no_cccs", "no_fgo", "vanilla")  # full - each


@dataclass(frozen=True)
class Preset:
    """A regime for the small default model: training options on top of its own preset (the user's flags
    win), the start they build (options named sft_*), and the seeds run by default."""

    train: dict
    seeds: int


PRESETS = {
    # The default run's setting: evaluations at steps 0, 40 and 80 on the first 800 held-out problems, one
    # greedy program each.
    "synthetic": Preset({"eval_every": 40, "eval_limit": 800}, seeds=3),
    # Long programs (stepcoder.data.synthetic_long), fixed on pilot seeds >= 100 before the final seeds ran
    # (benchmarks/RESULTS.md: the pilot's log). The start: 2000 steps on whole programs of the warm-up split
    # (disjoint from train and held-out), where the model has begun to copy rules from the question; 32 PPO
    # steps of one epoch (two mini-batches) keep 40 runs near 90 minutes on 2 cores; the curriculum's window
    # is three steps' rollouts (one step's 64 advanced it on a lucky batch).
    "synthetic-long": Preset({"data": "synthetic-long:train", "eval_data": "synthetic-long:heldout",
                              "sft_data": "synthetic-long:warmup", "sft_whole_programs": True, "sft_steps": 2000,
                              "sft_learning_rate": 3e-3, "max_new_tokens": 176, "total_steps": 32,
                              "eval_every": 16, "eval_limit": 800, "ppo_epochs": 1, "num_mini_batches": 2,
                              "learning_rate": 2e-4, "cccs_window": 192}, seeds=10),
}


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(prog="python -m stepcoder.ablation", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                     epilog="Options after -- (and any this command does not know) go to every "
                                            "training run: see python -m stepcoder.train --help.")
    parser.add_argument("--output_dir", default="stepcoder-ablation", help="the start, every run, the report")
    parser.add_argument("--preset", choices=tuple(PRESETS), default="synthetic",
                        help="the regime for the small default model (ignored with --model_name_or_path)")
    parser.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, of {', '.join(ARMS)}")
    parser.add_argument("--seeds", type=int, help="training seeds per arm; None: the preset's (synthetic 3, synthetic-long 10)")
    parser.add_argument("--seed_offset", type=int, default=0,
                        help="the first seed: runs use seeds OFFSET .. OFFSET+SEEDS-1 (fresh seeds: a new offset)")
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
    small = "model_name_or_path" not in given_options(train_args)
    if args.jobs is None:
        args.jobs = min(2, os.cpu_count() or 1) if small and not _has_gpu() else 1
    if args.seeds is None:
        args.seeds = PRESETS[args.preset].seeds
    if args.seeds < 1 or args.jobs < 1 or args.seed_offset < 0:
        parser.error(f"--seeds and --jobs must be >= 1 and --seed_offset >= 0, got {args.seeds}, {args.jobs} and "
                     f"{args.seed_offset}")
    args.arms = arms
    for owned in ("output_dir", "seed", "no_fgo", "no_cccs", "resume_from_checkpoint", "start_evaluation"):
        if any(item == f"--{owned}" or item.startswith(f"--{owned}=") for item in train_args):
            parser.error(f"--{owned} is set by the ablation for each run; leave it out of the training options")
    if small:  # the preset's options, unless the user gave them
        given = given_options(train_args)
        train_args = [item for name, value in PRESETS[args.preset].train.items() if name not in given
                      for item in _flag(name, value)] + train_args
    return args, train_args


def _flag(name: str, value) -> list[str]:
    if isinstance(value, bool):
        return [f"--{name}"] if value else []
    return [f"--{name}", str(value)]


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def given_options(train_args: list[str]) -> set[str]:
    """The training options the user set (their names), to know which defaults the ablation may fill in."""
    namespace, _ = build_parser().parse_known_args(train_args)
    return {name for name, value in vars(namespace).items() if value is not None}


def run_options(train_args: list[str], start: Path, start_evaluation: Path | None) -> list[str]:
    """The options every run shares: the user's and the preset's, the shared start (warmed up already; its
    held-out evaluation when the ablation made it), and for the small default model its preset (a run
    from a saved model would not apply it). The warm-up's own options (sft_*) went into the start."""
    given = given_options(train_args)
    shared = ["--model_name_or_path", str(start), "--sft_steps", "0"]
    if start_evaluation is not None:
        shared += ["--start_evaluation", str(start_evaluation)]
    if "model_name_or_path" not in given:
        shared += [item for name, value in SMALL_MODEL_PRESET.items()
                   if name not in given and not name.startswith("sft_") for item in _flag(name, value)]
    filtered, skip = [], False
    for item in train_args:
        if skip:
            skip = False
        elif item.startswith("--sft_") or item == "--model_name_or_path":
            name = item[2:].split("=")[0]
            skip = "=" not in item and _takes_value(name)
        elif not item.startswith("--model_name_or_path="):
            filtered.append(item)
    return shared + filtered


def _takes_value(name: str) -> bool:
    return TrainConfig.__dataclass_fields__[name].type not in ("bool", bool)


def build_start(train_args: list[str], output: Path) -> tuple[Path, Path | None]:
    """(the shared start, its held-out evaluation or None). The start is the user's model, or (with
    --sft_steps, or for the small default model) a warm-up saved once in OUT/start; the small model's
    start is also evaluated once there (OUT/start/eval/step-0.json), greedy evaluation being the same in
    every run."""
    from stepcoder import learners, selection
    from stepcoder.models import quiet_transformers

    config = parse_config([*train_args, "--output_dir", str(output / "start")])
    if config.model_name_or_path is not None and config.sft_steps == 0:
        return Path(config.model_name_or_path), None
    start = output / "start"
    evaluation = start / "eval" / "step-0.json"
    shared = evaluation if config.model_name_or_path is None and config.eval_data is not None else None
    if (start / "config.json").exists() and (start / "DONE").exists():
        return start, shared
    import torch

    from stepcoder.warmup import sized_warmup

    torch.manual_seed(config.seed)
    problems = selection.select_problems(config)
    stages = selection.cccs_stages(problems, config)  # every prompt a run gives must fit the model's context
    sft = selection.select_warmup(config, problems)
    config = sized_warmup(config, *sft)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    eval_problems = selection.select_eval_problems(config)
    say(f"building the start: {config.sft_steps} warm-up steps on {config.sft_data or config.data}")
    policy, _, tokenizer, _, _ = learners.build_models(config, problems, stages, None, device, eval_problems, sft)
    if shared is not None:
        evaluate_start(policy, tokenizer, eval_problems, config, start, device)
    with quiet_transformers():
        policy.save_pretrained(start)
    tokenizer.save_pretrained(start)
    (start / "DONE").write_text("")
    return start, shared


def evaluate_start(policy, tokenizer, problems, config: TrainConfig, start: Path, device) -> None:
    """The start's held-out evaluation, as each run would make it at step 0, saved for all of them."""
    from stepcoder.engines import HFEngine, Sampling
    from stepcoder.heldout import evaluate_policy
    from stepcoder.prompts import chat_option
    from stepcoder.sandbox import Sandbox

    engine = HFEngine(policy, tokenizer, device)
    settings = Sampling(config.max_new_tokens, config.eval_temperature)

    def sample(prompts: list[str]) -> list[tuple[list[int], list[int]]]:
        return [(g.prompt_ids, g.response_ids) for g in engine.generate(prompts, settings)]

    with Sandbox(workers=os.cpu_count() or 1, timeout=config.sandbox_timeout, memory_mb=config.sandbox_memory_mb,
                 trace=False) as sandbox:
        evaluation = evaluate_policy(sample, tokenizer, problems, config.eval_samples, sandbox,
                                     chat_option(config.chat), 0, config.eval_batch_size)
    evaluation.save(start)
    say(f"the start: held-out pass@1 {100 * evaluation.pass_at(1):.1f}% on {len(problems)} problems")


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


MECHANISM = ("pass_rate", "cccs_stage_mean", "full_generation_frac", "unexecuted_frac", "unexecuted_grad_share")


def read_run(folder: Path) -> dict:
    """A finished run's evaluations (every step's, per problem) and its per-step training figures."""
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = sorted((row for row in rows if "pass_rate" in row), key=lambda row: row["step"])
    evaluated = sorted(row["step"] for row in rows if "eval_pass@1" in row)
    summary = json.loads((folder / "eval_summary.json").read_text())
    return {"evaluations": {step: Evaluation.load(folder, step) for step in evaluated},
            "after": summary["after"]["step"], "before": summary["before"]["step"],
            "series": {name: [row.get(name, 0.0) for row in steps] for name in (*MECHANISM, "fgo_masked_frac")},
            "cccs_stage_final": steps[-1]["cccs_stage_mean"]}


def interval(matrix: np.ndarray, resamples: int = 4000, seed: int = 0) -> tuple[float, float]:
    """95 % interval of the grand mean of a [seeds, problems] matrix, resampling seeds and problems (a
    two-level bootstrap: it holds both the training seed's spread and the problems' sampling). For a
    difference between arms, pass the matrix of differences (paired by seed and problem)."""
    rng = np.random.default_rng(seed)
    seeds, problems = matrix.shape
    means = np.empty(resamples)
    for index in range(resamples):
        rows = rng.integers(0, seeds, seeds)
        columns = rng.integers(0, problems, problems)
        means[index] = matrix[np.ix_(rows, columns)].mean()
    low, high = np.quantile(means, [0.025, 0.975])
    return float(low), float(high)


def rates(runs: list[dict], step: int | str) -> np.ndarray:
    """[seeds, problems]: each problem's pass rate at `step` ("before", "after" or a step number)."""
    return np.array([run["evaluations"][run[step] if isinstance(step, str) else step].rates() for run in runs])


def table(runs: dict[str, list[dict]]) -> dict:
    """Per arm: held-out pass@1 after training (mean over seeds, its interval, each seed's), the gain over
    the start with its interval, the curve over steps with bands, and the mechanism: reward density at the
    first step and over training, the share of whole-program rollouts, never-run tokens and their share
    of the policy gradient, the final CCCS stage."""
    result = {}
    for arm, seeds in runs.items():
        after = rates(seeds, "after")
        gain = after - rates(seeds, "before")
        shared_steps = sorted(set.intersection(*(set(run["evaluations"]) for run in seeds)))
        series = {name: np.array([run["series"][name] for run in seeds]) for name in (*MECHANISM, "fgo_masked_frac")}
        result[arm] = {
            "pass@1": float(after.mean()), "pass@1_ci95": interval(after),
            "pass@1_per_seed": [float(row.mean()) for row in after],
            "pass@k": {str(k): float(np.mean([run["evaluations"][run["after"]].pass_at(k) for run in seeds]))
                       for k in KS if k <= seeds[0]["evaluations"][seeds[0]["after"]].samples},
            "gain": float(gain.mean()), "gain_ci95": interval(gain),
            "start_pass@1": float(rates(seeds, "before").mean()),
            "curve": [(step, float(rates(seeds, step).mean()), interval(rates(seeds, step))) for step in shared_steps],
            "reward_density_first_step": float(series["pass_rate"][:, 0].mean()),
            "reward_density_mean": float(series["pass_rate"].mean()),
            "full_generation_frac_mean": float(series["full_generation_frac"].mean()),
            "unexecuted_frac": float(series["unexecuted_frac"].mean()),
            "unexecuted_grad_share": float(series["unexecuted_grad_share"].mean()),
            "fgo_masked_frac": float(series["fgo_masked_frac"].mean()),
            "cccs_stage_final": float(np.mean([run["cccs_stage_final"] for run in seeds])),
            "series": {name: values.mean(0).tolist() for name, values in series.items()},
            "seeds": len(seeds), "problems": after.shape[1], "samples": seeds[0]["evaluations"][0].samples}
    return result


def differences(runs: dict[str, list[dict]], seeds: list[int]) -> dict:
    """full - each other arm after training: the mean, its 95 % interval (paired by seed and problem,
    seeds and problems resampled), each seed's difference and how many are above 0."""
    if "full" not in runs:
        return {}
    full = rates(runs["full"], "after")
    result = {}
    for arm in DIFFERENCES:
        if arm not in runs:
            continue
        paired = full - rates(runs[arm], "after")
        per_seed = paired.mean(1)
        result[f"full - {arm}"] = {"difference": float(paired.mean()), "ci95": interval(paired),
                                   "per_seed": dict(zip(map(str, seeds), map(float, per_seed))),
                                   "seeds_above_0": int((per_seed > 0).sum()), "seeds": len(per_seed)}
    return result


def markdown(rows: dict, paired: dict, title: str) -> str:
    def pct(value: float) -> str:
        return f"{100 * value:.1f}"

    def points(low_high) -> str:
        return f"{100 * low_high[0]:+.1f} to {100 * low_high[1]:+.1f}"

    ks = [k for k in next(iter(rows.values()))["pass@k"] if k != "1"]
    head = ("| arm | held-out pass@1 (%) | 95% CI | per seed | " + "".join(f"pass@{k} | " for k in ks)
            + "gain over start (points) | 95% CI | rollouts passing: first step / mean (%) | whole-program "
            "rollouts (%) | never-run tokens (%) | their gradient share (%) |")
    lines = [f"### {title}", "", head, "|" + "---|" * (head.count("|") - 1)]
    for arm, row in rows.items():
        lines.append(f"| {arm} | {pct(row['pass@1'])} | {pct(row['pass@1_ci95'][0])}–{pct(row['pass@1_ci95'][1])} | "
                     + ", ".join(pct(v) for v in row["pass@1_per_seed"]) + " | "
                     + "".join(f"{pct(row['pass@k'][k])} | " for k in ks)
                     + f"{100 * row['gain']:+.1f} | {points(row['gain_ci95'])} | "
                     + f"{pct(row['reward_density_first_step'])} / {pct(row['reward_density_mean'])} | "
                     + f"{pct(row['full_generation_frac_mean'])} | {pct(row['unexecuted_frac'])} | "
                     + f"{pct(row['unexecuted_grad_share'])} |")
    if paired:
        lines += ["", "| paired difference | points | 95% CI | seeds above 0 |", "|---|---|---|---|"]
        for name, row in paired.items():
            lines.append(f"| {name} | {100 * row['difference']:+.1f} | {points(row['ci95'])} | "
                         f"{row['seeds_above_0']} of {row['seeds']} |")
    return "\n".join(lines) + "\n"


def plot(rows: dict, path: Path) -> None:
    """Held-out pass@1 over steps per arm, with the 95 % band over seeds and problems."""
    figure, axes = new_figure((6, 4))
    for arm, row in rows.items():
        steps = [step for step, _, _ in row["curve"]]
        axes.plot(steps, [100 * mean for _, mean, _ in row["curve"]], marker="o", label=arm)
        axes.fill_between(steps, [100 * band[0] for _, _, band in row["curve"]],
                          [100 * band[1] for _, _, band in row["curve"]], alpha=0.15)
    axes.set_xlabel("PPO step")
    axes.set_ylabel("held-out pass@1 (%), mean over seeds")
    axes.legend()
    save_figure(figure, path)


def plot_mechanism(rows: dict, path: Path) -> None:
    """Per arm and step, mean over seeds: rollouts passing (reward density), the curriculum's stage (mean over
    problems) and the rollouts writing whole programs, and the policy gradient's share on never-run tokens
    (what FGO removes)."""
    figure, panels = new_figure((16, 3.6), columns=4)
    titles = {"pass_rate": "rollouts passing (%)", "cccs_stage_mean": "CCCS stage (mean over problems)",
              "full_generation_frac": "rollouts writing whole programs (%)",
              "unexecuted_grad_share": "gradient share on never-run tokens (%)"}
    for axes, (name, title) in zip(panels, titles.items()):
        scale = 1 if name == "cccs_stage_mean" else 100
        for arm, row in rows.items():
            values = scale * np.asarray(row["series"][name])
            window = min(5, len(values))  # a 5-step moving average: one step's 64 rollouts are noisy
            smooth = np.convolve(values, np.ones(window) / window, mode="valid")
            axes.plot(np.arange(window, len(values) + 1), smooth, label=arm)
        axes.set_title(title, fontsize=10)
        axes.set_xlabel("PPO step")
    panels[0].legend()
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
    start, start_evaluation = build_start(train_args, output)
    shared = run_options(train_args, start, start_evaluation)
    seeds = list(range(args.seed_offset, args.seed_offset + args.seeds))
    order = [(arm, seed) for seed in seeds for arm in args.arms]  # seed-major: early seeds cover all arms
    threads = None if args.jobs == 1 or "OMP_NUM_THREADS" in os.environ else max(1, (os.cpu_count() or 1) // args.jobs)
    with ThreadPoolExecutor(args.jobs) as pool:
        folders = list(pool.map(lambda item: run_arm(*item, shared, output, args.launcher, threads), order))
    runs: dict[str, list[dict]] = {arm: [] for arm in args.arms}
    for (arm, _), folder in zip(order, folders):
        runs[arm].append(read_run(folder))
    rows = table(runs)
    paired = differences(runs, seeds)
    first = rows[args.arms[0]]
    title = (f"{config.eval_data}: {first['problems']} held-out problems x {first['samples']} samples at "
             f"T={config.eval_temperature}, seeds {seeds[0]}-{seeds[-1]} ({len(seeds)} per arm)")
    report = {"title": title, "arms": rows, "differences": paired, "seeds": seeds, "train_options": shared,
              "seconds": round(time.perf_counter() - started)}
    write_atomically(output / "ablation.json", json.dumps(report, indent=2) + "\n")
    write_atomically(output / "ablation.md", markdown(rows, paired, title))
    plot(rows, output / "ablation.png")
    plot_mechanism(rows, output / "ablation_mechanism.png")
    print(markdown(rows, paired, title))
    return report


if __name__ == "__main__":
    main()
