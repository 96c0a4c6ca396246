"""Scoring a step's rollouts and the clipped PPO update (CleanRL's ``ppo.py`` is the model).

``score_rollouts``: old log-probs, reference log-probs and values in one no-grad pass each, then the
advantages: GAE over KL-shaped rewards, or each rollout against the other rollouts of its prompt (grpo,
rloo), and the importance weights against the sampling engine's log-probs. ``ppo_update``: ppo_epochs x
mini-batches x micro-batches of the clipped policy loss (action mask x FGO mask x importance weight) and
the clipped value loss, each normalised by the global count of its tokens, so every rank computes a
share of one token mean.
"""
from __future__ import annotations

import torch

from stepcoder import kernels
from stepcoder.advantages import gae_advantages, group_advantages
from stepcoder.batching import (
    Batch,
    learner_temperature,
    lm_head_weight,
    reference_logprobs,
    response_hidden,
    response_logits,
    response_logprobs,
    response_values,
)
from stepcoder.config import TrainConfig
from stepcoder.distributed import all_gather, all_sum, compute, no_sync, world
from stepcoder.kernels.reference import kl_penalty
from stepcoder.rollouts import importance_weights


@torch.no_grad()
def score_rollouts(policy, reference, critic, batch: Batch, config: TrainConfig) -> dict:
    """Old and reference log-probs and values (no-grad forwards in chunks of forward_batch_size
    rollouts; no reference when kl_coef is 0, no values without a critic), then advantages: GAE over
    KL-shaped rewards, or a group baseline (grpo, rloo) on the score less kl_coef x the response's KL,
    unless the KL goes into the loss (kl_in_loss)."""
    chunks = [slice(start, start + config.forward_batch_size)
              for start in range(0, batch.responses.shape[0], config.forward_batch_size)]
    with compute(config, batch.input_ids.device):
        old_logp = torch.cat([response_logprobs(policy, batch, rows, config) for rows in chunks])
        ref_logp = None if reference is None else \
            torch.cat([reference_logprobs(reference, batch, rows, config) for rows in chunks])
        values = None if critic is None else \
            torch.cat([response_values(critic, batch, rows) for rows in chunks]) * batch.action_mask
    kl = torch.zeros_like(old_logp) if ref_logp is None else \
        kl_penalty(old_logp, ref_logp, config.kl_estimator) * batch.action_mask
    kl_in_reward = 0.0 if config.kl_in_loss else config.kl_coef
    experience = {"old_logp": old_logp, "ref_logp": ref_logp, "values": values, "kl": kl}
    if config.advantage == "gae":
        experience["advantages"], experience["returns"], experience["rewards"] = gae_advantages(
            batch.scores, values, kl, batch.action_mask, batch.policy_mask, kl_in_reward, config.gamma, config.lam)
    else:
        scores = batch.scores - kl_in_reward * kl.sum(-1)
        advantages = group_advantages(scores, batch.prompts, config.rollouts_per_prompt, config.advantage,
                                      scale=not config.grpo_no_std)
        experience["advantages"] = advantages[:, None] * batch.action_mask
    experience["is_weights"] = torch.ones_like(old_logp) if batch.engine_logp is None else importance_weights(
        old_logp, batch.engine_logp, batch.policy_mask, config.rollout_is, config.rollout_is_cap)
    return experience


def rollout_mismatch(batch: Batch, experience: dict) -> dict:
    """How far the engine's log-probs of the sampled tokens are from the learner's (before the update)
    over the policy-loss tokens, and the mean importance weight there; all ranks together. The HF
    engine samples from the learner itself: its weights are 1, nothing to compare."""
    mask = (batch.policy_mask > 0).to(experience["old_logp"].dtype)
    if batch.engine_logp is None:  # the same on every rank: all skip the collectives together
        return {"rollout_is_ratio_mean": 1.0}
    gap = (experience["old_logp"] - batch.engine_logp).abs() * mask
    sums = all_sum(torch.stack([gap.sum(), (experience["is_weights"] * mask).sum(), mask.sum()]).double())
    largest = max(all_gather(float(gap.max()) if gap.numel() else 0.0))
    tokens = max(float(sums[2]), 1.0)
    return {"rollout_is_ratio_mean": float(sums[1]) / tokens if float(sums[2]) else 1.0,
            "rollout_logprob_abs_diff_max": largest, "rollout_logprob_abs_diff_mean": float(sums[0]) / tokens}


def ppo_update(policy, critic, optimizers, batch: Batch, experience: dict, config: TrainConfig,
               generator: torch.Generator) -> dict:
    """ppo_epochs x mini-batches (one optimizer step each) x micro-batches (gradient accumulation).
    The statistics are those of all ranks together: losses summed (each is a share of the global token
    mean), the per-token ones weighted by their tokens."""
    policy.train()
    if critic is not None:
        critic.train()
    _, world_size = world()
    kl_in_loss = config.kl_in_loss and experience["ref_logp"] is not None
    names = ("clipfrac", "approx_kl", "entropy", "ratio")
    totals = torch.zeros(3 + len(names), dtype=torch.float64)  # policy loss, value loss, tokens, token-weighted
    updates = 0
    count = batch.responses.shape[0]
    head = lm_head_weight(policy, config)
    for _ in range(config.ppo_epochs):
        order = torch.randperm(count, generator=generator).to(batch.responses.device)
        for mini in order.chunk(config.num_mini_batches):
            # Global token counts, so the loss is a token mean over the whole mini-batch on every rank.
            policy_tokens = all_sum(batch.policy_mask[mini].sum().detach().clone()).clamp(min=1) / world_size
            value_tokens = all_sum(batch.action_mask[mini].sum().detach().clone()).clamp(min=1) / world_size
            micro_batches = mini.chunk(config.gradient_accumulation_steps)
            for index, micro in enumerate(micro_batches):
                last = index == len(micro_batches) - 1
                with no_sync(policy, last), no_sync(critic, last), compute(config, batch.input_ids.device):
                    options = dict(clip_low=config.cliprange, clip_high=config.cliprange_high or config.cliprange,
                                   dual_clip=config.dual_clip, temperature=learner_temperature(config),
                                   entropy_coef=config.entropy_coef, normalizer=policy_tokens)
                    if kl_in_loss:
                        options.update(ref_logp=experience["ref_logp"][micro], kl_coef=config.kl_coef,
                                       kl_estimator=config.kl_estimator)
                    # the rollout importance weights scale each token's loss (the mask is its weight)
                    policy_mask = batch.policy_mask[micro] * experience["is_weights"][micro]
                    per_token = (batch.responses[micro], experience["old_logp"][micro],
                                 experience["advantages"][micro], policy_mask)
                    if head is not None:
                        loss, stats = kernels.ppo_policy_loss_from_hidden(response_hidden(policy, batch, micro), head,
                                                                          *per_token, weight_grad=head.requires_grad,
                                                                          **options)
                    else:
                        loss, stats = kernels.ppo_policy_loss(response_logits(policy, batch, micro), *per_token,
                                                              **options)
                    loss.backward()
                    value_loss = torch.zeros(())
                    if critic is not None:
                        values = response_values(critic, batch, micro)
                        value_loss, _ = kernels.value_loss(values, experience["values"][micro],
                                                           experience["returns"][micro], batch.action_mask[micro],
                                                           clip=config.cliprange_value or None,
                                                           normalizer=value_tokens)
                        value_loss.backward()
                tokens = float((batch.policy_mask[micro] > 0).sum())
                totals += torch.tensor([loss.item() / world_size, value_loss.item() / world_size, tokens]
                                       + [float(stats[name]) * tokens for name in names], dtype=torch.float64)
            for model, optimizer in zip((policy, critic), optimizers):  # no critic: one optimizer
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            updates += 1
    totals = all_sum(totals.to(batch.responses.device)).cpu()
    result = {"policy_loss": float(totals[0]) / updates}
    if critic is not None:
        result["value_loss"] = float(totals[1]) / updates
    result.update({name: float(totals[3 + i] / totals[2].clamp(min=1)) for i, name in enumerate(names)})
    return result
