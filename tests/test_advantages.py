"""Critic-free advantages: GRPO and RLOO against a float64 reference written from their definitions,
groups that stay whole, and runs that build no critic (and, at kl_coef 0, no reference)."""
from __future__ import annotations

import json
import random
import statistics

import pytest
import torch

from stepcoder import learners, train
from stepcoder.advantages import GROUP_EPS, group_advantages

TINY = ["--data", "builtin", "--limit", "8", "--problems_per_step", "4", "--max_new_tokens", "32", "--sft_steps", "10",
        "--num_mini_batches", "2", "--sandbox_workers", "1", "--save_steps", "100", "--sample_every", "1",
        "--eval_data", "none"]


@pytest.fixture(autouse=True)
def reference_kernels(monkeypatch):
    """The trainer on the CPU uses the PyTorch references (the Triton interpreter, switched on for the
    kernel tests, would be far too slow here)."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


def reference(rewards: list[float], estimator: str, scale: bool) -> list[float]:
    """One group, by the definitions, in Python floats (float64)."""
    if estimator == "rloo":
        return [r - (sum(rewards) - r) / (len(rewards) - 1) for r in rewards]
    mean = statistics.fmean(rewards)
    if not scale:
        return [r - mean for r in rewards]
    spread = statistics.stdev(rewards)  # n - 1 in the denominator
    return [(r - mean) / (spread + GROUP_EPS) for r in rewards]


@pytest.mark.parametrize("estimator, scale", [("grpo", True), ("grpo", False), ("rloo", True)])
def test_group_advantages_match_the_definitions(estimator, scale):
    rng = random.Random()
    levels = [1.0, -0.3, -0.6, -1.0]  # the verdicts' rewards: ties are the rule
    for _ in range(50):
        size = rng.randint(2, 8)
        groups = []
        for _ in range(rng.randint(1, 5)):
            kind = rng.choice(["tied", "equal", "mixed"])
            if kind == "equal":
                groups.append([rng.choice(levels)] * size)
            elif kind == "tied":
                groups.append([rng.choice(levels[:2]) for _ in range(size)])
            else:
                groups.append([rng.uniform(-1.5, 1.0) for _ in range(size)])
        scores = torch.tensor([r for group in groups for r in group], dtype=torch.float32)
        prompts = [f"p{index}" for index, group in enumerate(groups) for _ in group]
        got = group_advantages(scores, prompts, size, estimator, scale)
        want = torch.tensor([a for group in groups for a in reference(group, estimator, scale)], dtype=torch.float64)
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
        for index, group in enumerate(groups):
            if len(set(group)) == 1:  # all equal: no signal, exactly 0
                assert got[index * size:(index + 1) * size].abs().max() == 0


def test_groups_that_mix_prompts_or_do_not_divide_are_refused():
    with pytest.raises(ValueError, match="mixes prompts"):
        group_advantages(torch.zeros(4), ["a", "a", "a", "b"], 2, "grpo")
    with pytest.raises(ValueError, match="whole groups"):
        group_advantages(torch.zeros(5), ["a"] * 5, 2, "rloo")


@pytest.mark.parametrize("estimator", ["grpo", "rloo"])
def test_a_critic_free_run_builds_no_value_model(tmp_path, monkeypatch, wrapped, estimator):
    """3 rollouts per prompt in generation batches of 4: groups straddle batches, and the run's own group
    check (which raises on a mixed group) passes every step. No critic is built or saved; at kl_coef 0 no
    reference either: one model in memory."""
    built = wrapped
    monkeypatch.setattr(learners, "make_critic", lambda *args: pytest.fail("a critic was built"))
    history = train.main([*TINY, "--output_dir", str(tmp_path / "run"), "--advantage", estimator,
                          "--rollouts_per_prompt", "3", "--generation_batch_size", "4", "--total_steps", "2",
                          "--kl_coef", "0"])
    assert built["critic"] is None and built["reference"] is None and built["live_models"] == 1
    assert len(history) == 2 and "value_loss" not in history[0]
    saved = tmp_path / "run" / "checkpoint-2"
    assert (saved / "policy").is_dir() and not (saved / "critic").exists() and not (saved / "reference").exists()
    samples = [json.loads(line) for line in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    for step in (1, 2):
        ids = [s["task_id"] for s in samples if s["step"] == step]
        assert len(ids) == 12 and all(len(set(ids[i:i + 3])) == 1 for i in range(0, 12, 3))


def test_kl_in_the_loss_keeps_a_reference_and_no_critic(tmp_path, wrapped):
    built = wrapped
    history = train.main([*TINY, "--output_dir", str(tmp_path / "run"), "--advantage", "grpo", "--kl_in_loss",
                          "--kl_coef", "0.1", "--rollouts_per_prompt", "2", "--total_steps", "1"])
    assert built["critic"] is None and built["reference"] is not None
    assert built["config"].kl_estimator == "k3"  # GRPO's estimator unless asked otherwise
    assert history[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # the first step samples from the reference itself


def test_the_planner_counts_only_the_models_a_run_builds():
    from stepcoder import plan
    from stepcoder.config import parse_config

    def components(*flags):
        config = parse_config(["--output_dir", "unused", *flags])
        return {line.component: line.bytes for line in plan.plan(config, 8, 128, on_gpu=False)}

    gae = components("--advantage", "gae", "--kl_coef", "0.01")
    grpo = components("--advantage", "grpo", "--kl_coef", "0.01")
    bare = components("--advantage", "grpo", "--kl_coef", "0")
    critic = {name for name in gae if name.startswith("critic")}
    assert len(critic) == 3 and not critic & set(grpo)
    assert {name: grpo[name] for name in grpo} == {name: gae[name] for name in gae if name not in critic}
    assert "reference weights" in grpo and "reference weights" not in bare
