"""python -m stepcoder.ablation, test-sized: one shared start for every arm, the arms' flags, the
table recomputed from the runs' own files, and a second call that reruns nothing."""
from __future__ import annotations

import json

import numpy as np
import pytest

from stepcoder import ablation
from stepcoder.heldout import Evaluation

TRAIN = ["--total_steps", "2", "--sft_steps", "20", "--eval_limit", "8", "--eval_samples", "2", "--eval_every", "1",
         "--problems_per_step", "2", "--rollouts_per_prompt", "2", "--max_new_tokens", "32", "--sandbox_workers", "1",
         "--generation_batch_size", "8"]


@pytest.fixture(autouse=True)
def reference_kernels(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


@pytest.mark.slow
def test_ablation_runs_every_arm_from_one_start_and_resumes(tmp_path):
    out = tmp_path / "ablation"
    argv = ["--output_dir", str(out), "--seeds", "2", "--seed_offset", "5", "--arms", "full,vanilla", "--", *TRAIN]
    report = ablation.main(argv)
    assert list(report["arms"]) == ["full", "vanilla"] and report["seeds"] == [5, 6]
    folders = {arm: [out / arm / f"seed-{seed}" for seed in (5, 6)] for arm in ("full", "vanilla")}
    configs = {arm: json.loads((folders[arm][0] / "config.json").read_text()) for arm in ("full", "vanilla")}
    assert configs["full"]["model_name_or_path"] == configs["vanilla"]["model_name_or_path"] == str(out / "start")
    assert (configs["full"]["no_fgo"], configs["full"]["no_cccs"]) == (False, False)
    assert (configs["vanilla"]["no_fgo"], configs["vanilla"]["no_cccs"]) == (True, True)
    assert [json.loads((f / "config.json").read_text())["seed"] for f in folders["full"]] == [5, 6]
    for config in configs.values():  # the small model's preset reaches runs that start from a saved model
        assert (config["sft_steps"], config["learning_rate"], config["max_new_tokens"]) == (0, 1e-4, 32)
        assert config["start_evaluation"] == str(out / "start" / "eval" / "step-0.json")
    # the start is evaluated once, by the ablation, and every run reports that evaluation as its step 0
    shared = Evaluation.load(out / "start", 0)
    for folder in folders["full"] + folders["vanilla"]:
        assert Evaluation.load(folder, 0).passed == shared.passed
        first = json.loads((folder / "metrics.jsonl").read_text().splitlines()[0])
        assert first["step"] == 0 and first["time_eval_s"] == 0.0

    after = {arm: np.array([Evaluation.load(f, 2).rates() for f in folders[arm]]) for arm in folders}
    for arm, row in report["arms"].items():
        assert row["pass@1"] == pytest.approx(after[arm].mean())
        assert row["pass@1_per_seed"] == pytest.approx(after[arm].mean(1).tolist())
        assert row["pass@1_ci95"][0] <= row["pass@1"] <= row["pass@1_ci95"][1]
        assert row["gain"] == pytest.approx(after[arm].mean() - np.mean(shared.rates()))
        assert [step for step, _, _ in row["curve"]] == [0, 1, 2]
        assert all(low <= mean <= high for _, mean, (low, high) in row["curve"])
        assert (row["problems"], row["samples"], row["seeds"]) == (8, 2, 2)
        first_steps = [json.loads((f / "metrics.jsonl").read_text().splitlines()[1]) for f in folders[arm]]
        assert row["reward_density_first_step"] == pytest.approx(np.mean([r["pass_rate"] for r in first_steps]))
    paired = report["differences"]["full - vanilla"]  # paired by seed and problem
    difference = after["full"] - after["vanilla"]
    assert paired["difference"] == pytest.approx(difference.mean())
    assert paired["per_seed"] == pytest.approx(dict(zip(("5", "6"), difference.mean(1).tolist())))
    assert paired["ci95"][0] <= paired["difference"] <= paired["ci95"][1]
    vanilla = report["arms"]["vanilla"]
    assert vanilla["fgo_masked_frac"] == 0 and vanilla["cccs_stage_final"] == 0
    assert vanilla["full_generation_frac_mean"] == 1 and report["arms"]["full"]["unexecuted_grad_share"] == 0
    assert json.loads((out / "ablation.json").read_text())["arms"]["full"]["pass@1"] == report["arms"]["full"]["pass@1"]
    assert "| vanilla |" in (out / "ablation.md").read_text() and "| full - vanilla |" in (out / "ablation.md").read_text()
    assert (out / "ablation.png").stat().st_size > 0 and (out / "ablation_mechanism.png").stat().st_size > 0

    logs = {f: f.joinpath("train.log").stat().st_mtime_ns for arm in folders for f in folders[arm]}
    again = ablation.main(argv)
    assert {f: f.joinpath("train.log").stat().st_mtime_ns for f in logs} == logs  # nothing rerun
    assert again["arms"]["full"]["pass@1"] == report["arms"]["full"]["pass@1"]


def test_interval_of_a_paired_difference_holds_the_seed_spread():
    """The two-level bootstrap widens with the seeds' spread, which a bootstrap over problems alone ignores."""
    from stepcoder.metrics import bootstrap_ci

    rng = np.random.default_rng(0)
    spread = rng.integers(0, 2, (10, 800)) + rng.normal(0, 0.1, (10, 1))  # each seed shifted as a whole
    two_level, problems_only = ablation.interval(spread), bootstrap_ci(spread.mean(0).tolist())
    assert two_level[1] - two_level[0] > 3 * (problems_only[1] - problems_only[0])
    assert two_level[0] < spread.mean() < two_level[1]


def test_the_long_preset_builds_its_start_on_another_split_and_runs_leave_the_warm_up_options(tmp_path):
    args, train_args = ablation.parse_args(["--preset", "synthetic-long", "--output_dir", str(tmp_path), "--",
                                            "--total_steps", "3"])
    assert args.seeds == 10
    config = ablation.parse_config([*train_args, "--output_dir", str(tmp_path)])
    preset = ablation.PRESETS["synthetic-long"].train
    assert (config.data, config.eval_data, config.sft_data) == ("synthetic-long:train", "synthetic-long:heldout",
                                                                 "synthetic-long:warmup")
    assert config.total_steps == 3 and config.sft_steps == preset["sft_steps"]  # the user's flag wins
    shared = ablation.run_options(train_args, tmp_path / "start", tmp_path / "start.json")
    assert not any(item.startswith("--sft_") and item != "--sft_steps" for item in shared)
    assert shared[shared.index("--sft_steps") + 1] == "0" and "synthetic-long:train" in shared


def test_ablation_refuses_options_it_owns(tmp_path):
    for option in ("--seed", "--no_fgo", "--output_dir"):
        with pytest.raises(SystemExit):
            ablation.main(["--output_dir", str(tmp_path), "--", option, "1"] if option != "--no_fgo"
                          else ["--output_dir", str(tmp_path), "--", option])
    with pytest.raises(SystemExit):
        ablation.main(["--output_dir", str(tmp_path), "--arms", "full,nonsense"])
