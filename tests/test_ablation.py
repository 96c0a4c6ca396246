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


def test_ablation_runs_every_arm_from_one_start_and_resumes(tmp_path):
    out = tmp_path / "ablation"
    report = ablation.main(["--output_dir", str(out), "--seeds", "1", "--arms", "full,vanilla", "--", *TRAIN])
    assert list(report["arms"]) == ["full", "vanilla"]
    configs = {arm: json.loads((out / arm / "seed-0" / "config.json").read_text()) for arm in ("full", "vanilla")}
    assert configs["full"]["model_name_or_path"] == configs["vanilla"]["model_name_or_path"] == str(out / "start")
    assert (configs["full"]["no_fgo"], configs["full"]["no_cccs"]) == (False, False)
    assert (configs["vanilla"]["no_fgo"], configs["vanilla"]["no_cccs"]) == (True, True)
    for config in configs.values():  # the small model's preset reaches runs that start from a saved model
        assert (config["sft_steps"], config["learning_rate"], config["max_new_tokens"]) == (0, 1e-4, 32)
    starts = [Evaluation.load(out / arm / "seed-0", 0) for arm in ("full", "vanilla")]
    assert starts[0].passed == starts[1].passed and starts[0].outcomes == starts[1].outcomes  # one start

    for arm, row in report["arms"].items():
        folder = out / arm / "seed-0"
        after = Evaluation.load(folder, 2)
        assert row["pass@1"] == pytest.approx(np.mean(after.rates()))
        assert row["pass@1_ci95"][0] <= row["pass@1"] <= row["pass@1_ci95"][1]
        assert row["gain"] == pytest.approx(np.mean(after.rates()) - np.mean(starts[0].rates()))
        assert [step for step, _ in row["curve"]] == [0, 1, 2]
        assert (row["problems"], row["samples"], row["seeds"]) == (8, 2, 1)
    assert report["arms"]["vanilla"]["fgo_masked_frac"] == 0 and report["arms"]["vanilla"]["cccs_stage_final"] == 0
    assert json.loads((out / "ablation.json").read_text())["arms"]["full"]["pass@1"] == report["arms"]["full"]["pass@1"]
    assert "| vanilla |" in (out / "ablation.md").read_text() and (out / "ablation.png").stat().st_size > 0

    logs = {arm: (out / arm / "seed-0" / "train.log").stat().st_mtime_ns for arm in ("full", "vanilla")}
    again = ablation.main(["--output_dir", str(out), "--seeds", "1", "--arms", "full,vanilla", "--", *TRAIN])
    assert {arm: (out / arm / "seed-0" / "train.log").stat().st_mtime_ns for arm in logs} == logs  # nothing rerun
    assert again["arms"]["full"]["pass@1"] == report["arms"]["full"]["pass@1"]


def test_ablation_refuses_options_it_owns(tmp_path):
    for option in ("--seed", "--no_fgo", "--output_dir"):
        with pytest.raises(SystemExit):
            ablation.main(["--output_dir", str(tmp_path), "--", option, "1"] if option != "--no_fgo"
                          else ["--output_dir", str(tmp_path), "--", option])
    with pytest.raises(SystemExit):
        ablation.main(["--output_dir", str(tmp_path), "--arms", "full,nonsense"])
