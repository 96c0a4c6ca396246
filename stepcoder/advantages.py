"""Advantage estimators. ``gae``: the paper's PPO, a critic's values and GAE over KL-shaped per-token
rewards, whitened. ``grpo`` and ``rloo``: no critic; each prompt's ``rollouts_per_prompt`` samples form
a group and each sample is baselined against its group (DeepSeekMath's GRPO, Ahmadian et al.'s RLOO),
one value for every token of the response. FGO then works as with GAE: the value reaches the loss only
on tokens whose lines ran, because the policy loss is taken under the FGO mask."""
from __future__ import annotations

from typing import Sequence

import torch

from stepcoder import kernels

ESTIMATORS = ("gae", "grpo", "rloo")
GROUP_EPS = 1e-6  # GRPO's (r - mean) / (std + eps): an all-equal group gets 0, not NaN


def group_advantages(scores: torch.Tensor, prompts: Sequence, group_size: int, estimator: str,
                     scale: bool = True) -> torch.Tensor:
    """One advantage per sample. Rows ``[i * group_size, (i + 1) * group_size)`` are group i and must all
    come from one prompt (`prompts[k]` identifies sample k's prompt): a group split across generation
    batches or ranks would baseline a sample against another problem's rewards, so it is an error.

    grpo: (r - group mean) / (group std + eps), the std unbiased as in TRL; ``scale=False`` keeps only
    r - mean (Dr. GRPO). rloo: r - the mean of the group's other samples."""
    if estimator not in ("grpo", "rloo"):
        raise ValueError(f"estimator must be grpo or rloo, got {estimator!r}")
    if group_size < 2 or len(scores) % group_size:
        raise ValueError(f"{len(scores)} samples do not form whole groups of {group_size} (at least 2)")
    for start in range(0, len(prompts), group_size):
        members = set(prompts[start:start + group_size])
        if len(members) != 1:
            raise ValueError(f"the group at sample {start} mixes prompts: {sorted(members)}")
    rewards = scores.double().view(-1, group_size)
    total = rewards.sum(dim=1, keepdim=True)
    if estimator == "rloo":
        advantages = rewards - (total - rewards) / (group_size - 1)
    else:
        advantages = rewards - total / group_size
        if scale:
            advantages = advantages / (rewards.std(dim=1, keepdim=True) + GROUP_EPS)
    return advantages.view(-1).to(scores.dtype)


def gae_advantages(scores: torch.Tensor, values: torch.Tensor, kl: torch.Tensor, action_mask: torch.Tensor,
                   policy_mask: torch.Tensor, kl_coef: float, gamma: float, lam: float):
    """(advantages, returns, rewards): the score on the last generated token minus kl_coef x KL on every
    token, GAE, advantages whitened over the policy-loss tokens."""
    rewards = -kl_coef * kl
    last = (action_mask.sum(-1).long() - 1).clamp(min=0)
    rewards[torch.arange(len(last), device=last.device), last] += scores
    advantages, returns = kernels.gae(rewards, values, action_mask, gamma, lam)
    return kernels.masked_whiten(advantages, policy_mask), returns, rewards
