"""The rollout importance weights against a float64 reference written from their definitions, and the
trainer's use of them: a token's weight scales its policy loss, and the HF engine's rollouts get none."""
from __future__ import annotations

import math
import random

import pytest
import torch

from stepcoder import batching, ppo, rollouts, runlog
from stepcoder.rollouts import importance_weights


def reference_weights(old, engine, mask, mode, cap):
    """Element by element, in Python floats (float64): min(exp(old - engine), cap) per token; for a
    sequence, min(exp(sum of old - engine over its masked tokens), cap) on every token; 1 for none."""
    rows, columns = len(old), len(old[0])
    out = [[1.0] * columns for _ in range(rows)]
    for i in range(rows):
        if mode == "sequence":
            total = sum(old[i][j] - engine[i][j] for j in range(columns) if mask[i][j] > 0)
            out[i] = [min(math.exp(total), cap)] * columns
        elif mode == "token":
            out[i] = [min(math.exp(old[i][j] - engine[i][j]), cap) if mask[i][j] > 0 else 1.0 for j in range(columns)]
    return out


@pytest.mark.parametrize("mode", ["none", "token", "sequence"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_importance_weights_match_the_definitions(mode, dtype):
    rng = random.Random()
    for _ in range(20):
        rows, columns = rng.randint(1, 6), rng.randint(1, 12)
        cap = rng.choice([1.0, 1.5, 2.0, 5.0])
        engine = -torch.rand(rows, columns, dtype=torch.float64) * 6
        scale = rng.choice([1e-6, 0.05, 0.5, 3.0])  # from near-identical engines to far-off ones
        old = engine + scale * torch.randn(rows, columns, dtype=torch.float64)
        mask = (torch.rand(rows, columns) > 0.3).double() * torch.rand(rows, columns, dtype=torch.float64).add(0.5)
        got = importance_weights(old.to(dtype), engine.to(dtype), mask, mode, cap)
        expected = torch.tensor(reference_weights(old.to(dtype).double().tolist(), engine.to(dtype).double().tolist(),
                                                  mask.tolist(), mode, cap), dtype=torch.float64)
        assert got.dtype == dtype
        torch.testing.assert_close(got.double(), expected, rtol=1e-6 if dtype == torch.float32 else 1e-12, atol=0)
        assert float(got.max()) <= cap * (1 + 1e-6)


def test_importance_weights_do_not_overflow_and_refuse_unknown_modes():
    old = torch.tensor([[500.0, 0.0]])
    engine = torch.tensor([[-500.0, 0.0]])
    mask = torch.ones(1, 2)
    assert importance_weights(old, engine, mask, "sequence", 2.0).tolist() == [[2.0, 2.0]]
    assert importance_weights(old, engine, mask, "token", 2.0).tolist() == [[2.0, 1.0]]
    with pytest.raises(ValueError, match="rollout_is"):
        importance_weights(old, engine, mask, "tokens", 2.0)


def test_the_weight_scales_each_tokens_policy_loss_and_hf_rollouts_get_none():
    """score_rollouts puts the weights in the experience; ppo_update's mask x weight is the per-token
    loss weight: the loss with weights w equals the sum of w x each token's own loss."""
    from stepcoder.config import parse_config
    from stepcoder.data import load_builtin
    from stepcoder.models import build_default_model, build_default_tokenizer

    problems = load_builtin().problems[:2]
    tokenizer = build_default_tokenizer([p.question + "\n" + s for p in problems for s in p.solutions])
    model = build_default_model(tokenizer, seed=3)
    config = parse_config(["--output_dir", "unused", "--advantage", "grpo", "--rollouts_per_prompt", "2",
                           "--kl_coef", "0", "--rollout_is", "token"])
    samples = []
    for problem in problems:
        for length in (3, 5):
            response = torch.randint(5, 100, (length,)).tolist()
            samples.append(rollouts.Sample(problem, 0, "", tokenizer(problem.question[:40])["input_ids"], response, "",
                                        verdict=random.choice(["pass", "wrong_answer"]), fgo=[1] * length))
    batch = batching.pad_batch(samples, tokenizer, config, "cpu")
    assert batch.engine_logp is None  # the HF engine records nothing: weights 1, nothing to compare
    experience = ppo.score_rollouts(model, None, None, batch, config)
    assert torch.equal(experience["is_weights"], torch.ones_like(experience["old_logp"]))
    assert ppo.rollout_mismatch(batch, experience) == {"rollout_is_ratio_mean": 1.0}
    for sample in samples:  # now as a vLLM engine reports them: near the learner's, not equal
        sample.engine_logprobs = (torch.randn(len(sample.response_ids)) * 0.3 - 2).tolist()
    batch = batching.pad_batch(samples, tokenizer, config, "cpu")
    experience = ppo.score_rollouts(model, None, None, batch, config)
    expected = importance_weights(experience["old_logp"], batch.engine_logp, batch.policy_mask, "token", 2.0)
    torch.testing.assert_close(experience["is_weights"], expected)
    metrics = ppo.rollout_mismatch(batch, experience)
    gap = (experience["old_logp"] - batch.engine_logp).abs()[batch.policy_mask > 0]
    assert metrics["rollout_logprob_abs_diff_max"] == pytest.approx(float(gap.max()))
    assert metrics["rollout_logprob_abs_diff_mean"] == pytest.approx(float(gap.mean()), rel=1e-5)
    # the policy loss ppo_update computes with mask x weight, against each token's own loss times its weight
    from stepcoder import kernels
    from stepcoder.kernels.reference import logprobs_from_logits, ppo_token_losses

    logits = torch.randn(*batch.responses.shape, 50, dtype=torch.float64)
    labels = batch.responses.clamp(max=49)
    old = experience["old_logp"].double() + 0.1 * torch.randn_like(experience["old_logp"].double())
    advantages = torch.randn_like(old)
    weights = experience["is_weights"].double()
    tokens = float((batch.policy_mask > 0).sum())
    loss, _ = kernels.ppo_policy_loss(logits, labels, old, advantages, batch.policy_mask.double() * weights,
                                      normalizer=tokens)
    logp, entropy = logprobs_from_logits(logits, labels, return_entropy=True)
    each = ppo_token_losses(logp, entropy, old, advantages)["per_token"]
    expected = (each * weights * batch.policy_mask.double()).sum() / tokens
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("no_fgo", [False, True])
def test_never_run_tokens_and_their_gradient_share_are_measured_in_every_arm(no_fgo):
    """step_metrics' FGO figures against a count by hand: the share of generated tokens on lines no test ran
    (the same with and without FGO), and the share of the policy gradient's weight, |advantage| x loss mask,
    that lands on them: none with FGO, their |advantage|-weighted share without it."""
    from stepcoder.config import parse_config
    from stepcoder.data import load_builtin
    from stepcoder.models import build_default_tokenizer

    problems = load_builtin().problems[:2]
    tokenizer = build_default_tokenizer([p.question + "\n" + s for p in problems for s in p.solutions])
    config = parse_config(["--output_dir", "unused", "--advantage", "grpo", "--rollouts_per_prompt", "2",
                           "--kl_coef", "0"] + (["--no_fgo"] if no_fgo else []))
    generator = torch.Generator().manual_seed(7)
    samples = []
    for index, problem in enumerate(problems * 2):
        length = 4 + index
        executed = (torch.rand(length, generator=generator) > 0.4).long().tolist()
        samples.append(rollouts.Sample(problem, 0, "prefix\n" if index == 1 else "", [5, 6], [9] * length, "",
                                    verdict=("pass", "wrong_answer")[index % 2], executed=executed,
                                    fgo=[1] * length if no_fgo else executed))
    batch = batching.pad_batch(samples, tokenizer, config, "cpu")
    advantages = torch.randn(batch.responses.shape, generator=generator) * batch.action_mask
    experience = {"advantages": advantages, "kl": torch.zeros_like(advantages), "ref_logp": None,
                  "old_logp": torch.zeros_like(advantages), "is_weights": torch.ones_like(advantages)}
    metrics = runlog.step_metrics(1, samples, batch, experience, {}, None, {})
    never = [(abs(float(a)), e == 0) for s, row in zip(samples, advantages) for e, a in zip(s.executed, row)]
    assert metrics["unexecuted_frac"] == pytest.approx(sum(n for _, n in never) / len(never))
    expected = 0.0 if not no_fgo else sum(w for w, n in never if n) / sum(w for w, _ in never)
    assert metrics["unexecuted_grad_share"] == pytest.approx(expected)
    assert 0 < sum(n for _, n in never) < len(never) and (expected > 0) is no_fgo
    assert metrics["full_generation_frac"] == 0.75  # one rollout of four continued a prefix


def test_ppo_update_scales_each_tokens_gradient_by_its_importance_weight():
    """``ppo_update`` itself, one SGD step from the rollout policy (ratio 1, so no clip binds and each token's
    loss is -advantage x ratio): with importance weights w the step is the step of advantages A x w and no
    weights, and not the step of A alone; the logged policy loss is -sum(A x w x mask) / tokens."""
    import copy

    from stepcoder.config import parse_config
    from stepcoder.data import load_builtin
    from stepcoder.models import build_default_model, build_default_tokenizer

    torch.manual_seed(0)
    problems = load_builtin().problems[:2]
    tokenizer = build_default_tokenizer([p.question + "\n" + s for p in problems for s in p.solutions])
    model = build_default_model(tokenizer, seed=3)
    config = parse_config(["--output_dir", "unused", "--advantage", "grpo", "--rollouts_per_prompt", "2",
                           "--kl_coef", "0", "--entropy_coef", "0", "--ppo_epochs", "1", "--num_mini_batches", "1",
                           "--max_grad_norm", "1e9"])
    samples = [rollouts.Sample(problem, 0, "", tokenizer(problem.question[:40])["input_ids"],
                            torch.randint(5, 100, (length,)).tolist(), "", verdict="pass", fgo=[1] * length)
               for problem in problems for length in (3, 6)]
    batch = batching.pad_batch(samples, tokenizer, config, "cpu")
    experience = ppo.score_rollouts(model, None, None, batch, config)
    mask = batch.policy_mask
    advantages = torch.randn(mask.shape) * mask
    weights = (0.1 + 2 * torch.rand(mask.shape)) * mask + (1 - mask)  # far from 1 on every response token

    def step(advantages, weights):
        policy = copy.deepcopy(model)
        before = [p.detach().clone() for p in policy.parameters()]
        optimizer = torch.optim.SGD(policy.parameters(), lr=1.0)
        stats = ppo.ppo_update(policy, None, [optimizer], batch,
                                 dict(experience, advantages=advantages, is_weights=weights), config,
                                 torch.Generator().manual_seed(0))
        return torch.cat([(p.detach() - b).flatten() for p, b in zip(policy.parameters(), before)]), stats

    weighted, stats = step(advantages, weights)
    as_advantages, _ = step(advantages * weights, torch.ones_like(weights))
    unweighted, _ = step(advantages, torch.ones_like(weights))
    scale = float(as_advantages.abs().max())
    assert scale > 0
    torch.testing.assert_close(weighted, as_advantages, rtol=1e-4, atol=1e-5 * scale)
    assert float((weighted - unweighted).abs().max()) > 0.1 * scale  # the weights moved the step
    expected = -float((advantages * weights * mask).sum() / mask.sum())
    assert stats["policy_loss"] == pytest.approx(expected, rel=1e-4, abs=1e-6)
