"""Plain PyTorch references for every op in ``stepcoder.kernels``.

They define the semantics the Triton kernels must reproduce, serve as the CPU path (the trainer runs
on CPU with them), and compute in at least fp32 — in float64 when given float64, which the tests use
as ground truth. Formulas follow verl/TRL conventions; see each function.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

AGGREGATIONS = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean")
KL_ESTIMATORS = ("k1", "k2", "k3")
RATIO_CLAMP = 20.0  # |logp - old_logp| is clamped here before exp (verl, OpenRLHF)
KL_CLAMP = 10.0     # k3 values are clamped to [-10, 10] (verl's low_var_kl)
WHITEN_EPS = 1e-8


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def logprobs_from_logits(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0,
                         return_entropy: bool = False):
    """log softmax(logits / T)[label] and the entropy of softmax(logits / T), in fp32 (fp64 for fp64).

    The entropy is lse - E_p[z], which never forms log p, so -inf logits give no 0 * (-inf) NaN.
    """
    z = logits.to(_compute_dtype(logits.dtype)) / temperature
    lse = torch.logsumexp(z, dim=-1)
    logp = z.gather(-1, labels.long().unsqueeze(-1)).squeeze(-1) - lse
    if not return_entropy:
        return logp
    p = torch.softmax(z, dim=-1)
    expected_z = torch.where(p > 0, p * z, torch.zeros_like(z)).sum(-1)
    return logp, lse - expected_z


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str = "k3") -> torch.Tensor:
    """Per-token KL(policy || reference) estimate: k1 = logp - ref; k2 = (logp - ref)^2 / 2;
    k3 = exp(ref - logp) - (ref - logp) - 1, with ref - logp clamped to +-20 and k3 to +-10 (verl)."""
    if estimator == "k1":
        return logp - ref_logp
    if estimator == "k2":
        return 0.5 * (logp - ref_logp) ** 2
    if estimator == "k3":
        log_ratio = (ref_logp - logp).clamp(-RATIO_CLAMP, RATIO_CLAMP)
        return (torch.exp(log_ratio) - log_ratio - 1).clamp(-KL_CLAMP, KL_CLAMP)
    raise ValueError(f"kl_estimator must be one of {', '.join(KL_ESTIMATORS)}, got {estimator!r}")


def aggregation_weights(mask: torch.Tensor, aggregation: str = "token-mean", normalizer=None) -> torch.Tensor:
    """The weight of each token in the loss, from the mask alone ([B, T] or [N]; [N] is one sequence).

    token-mean: m / sum(m) (or / normalizer: a global token count, e.g. over ranks and micro-batches);
    seq-mean-token-sum: m / number of non-empty sequences (or normalizer);
    seq-mean-token-mean: m / tokens in its sequence / number of non-empty sequences (or normalizer).
    """
    m = mask.to(torch.float32) if not mask.is_floating_point() else mask.to(_compute_dtype(mask.dtype))
    if aggregation == "token-mean":
        total = m.sum() if normalizer is None else torch.as_tensor(normalizer, dtype=m.dtype, device=m.device)
        return m / total.clamp(min=1)
    sequences = m if m.dim() > 1 else m.unsqueeze(0)
    per_sequence = sequences.sum(-1, keepdim=True)
    count = (per_sequence > 0).sum() if normalizer is None else torch.as_tensor(normalizer, device=m.device)
    count = count.to(m.dtype).clamp(min=1)
    if aggregation == "seq-mean-token-sum":
        return (sequences / count).reshape(m.shape)
    if aggregation == "seq-mean-token-mean":
        return (sequences / per_sequence.clamp(min=1) / count).reshape(m.shape)
    raise ValueError(f"aggregation must be one of {', '.join(AGGREGATIONS)}, got {aggregation!r}")


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.to(x.dtype)
    return (torch.where(m > 0, x, torch.zeros_like(x)) * m).sum() / m.sum().clamp(min=1)


def ppo_policy_loss(logits, labels, old_logp, advantages, mask, *, clip_low=0.2, clip_high=0.2, dual_clip=None,
                    temperature=1.0, entropy_coef=0.0, ref_logp=None, kl_coef=0.0, kl_estimator="k3",
                    aggregation="token-mean", normalizer=None):
    """The clipped PPO policy loss over the tokens of `mask` (action mask x FGO mask).

    Per token: r = exp(clamp(logp - old_logp, +-20)); l = max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high));
    with dual_clip = c > 1, l = min(l, -A c) where A < 0; then l -= entropy_coef * H and
    l += kl_coef * KL(logp, ref_logp). loss = sum(w * l) with w from ``aggregation_weights``.
    stats: clipfrac, approx_kl (mean of (r - 1) - log r, as CleanRL), entropy, ratio (masked means).
    """
    logp, entropy = logprobs_from_logits(logits, labels, temperature, return_entropy=True)
    dtype = logp.dtype
    valid = mask.reshape(logp.shape) > 0
    terms = ppo_token_losses(logp, entropy, old_logp.to(dtype).reshape(logp.shape),
                             advantages.to(dtype).reshape(logp.shape),
                             None if ref_logp is None else ref_logp.to(dtype).reshape(logp.shape),
                             clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip, entropy_coef=entropy_coef,
                             kl_coef=kl_coef, kl_estimator=kl_estimator)
    weights = aggregation_weights(mask.reshape(logp.shape), aggregation, normalizer).to(dtype)
    per_token = terms["per_token"]
    loss = torch.where(valid, per_token * weights, torch.zeros_like(per_token)).sum()
    return loss, ppo_stats(terms, entropy, valid)


def ppo_token_losses(logp, entropy, old_logp, advantages, ref_logp=None, *, clip_low=0.2, clip_high=0.2,
                     dual_clip=None, entropy_coef=0.0, kl_coef=0.0, kl_estimator="k3") -> dict:
    """The per-token PPO terms (see ``ppo_policy_loss``): per_token loss, ratio, log_ratio, whether the
    clipped branch was larger, and the KL term (None without a reference)."""
    log_ratio = (logp - old_logp).clamp(-RATIO_CLAMP, RATIO_CLAMP)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip_low, 1 + clip_high)
    per_token = torch.maximum(unclipped, clipped)
    if dual_clip is not None:
        per_token = torch.where(advantages < 0, torch.minimum(per_token, -advantages * dual_clip), per_token)
    per_token = per_token - entropy_coef * entropy
    kl = None
    if ref_logp is not None and kl_coef:
        kl = kl_penalty(logp, ref_logp, kl_estimator)
        per_token = per_token + kl_coef * kl
    return {"per_token": per_token, "ratio": ratio, "log_ratio": log_ratio, "clipped_more": clipped > unclipped,
            "kl": kl}


@torch.no_grad()
def ppo_stats(terms: dict, entropy: torch.Tensor, valid: torch.Tensor) -> dict:
    """clipfrac, approx_kl ((r - 1) - log r, as CleanRL), entropy, ratio (and kl): means over `valid`."""
    dtype = terms["ratio"].dtype
    stats = {"clipfrac": _masked_mean(terms["clipped_more"].to(dtype), valid),
             "approx_kl": _masked_mean((terms["ratio"] - 1) - terms["log_ratio"], valid),
             "entropy": _masked_mean(entropy, valid),
             "ratio": _masked_mean(terms["ratio"], valid)}
    if terms["kl"] is not None:
        stats["kl"] = _masked_mean(terms["kl"], valid)
    return stats


def value_loss(values, old_values, returns, mask, clip=0.2, normalizer=None):
    """Clipped value loss, masked mean: 0.5 * max((v - R)^2, (v_old + clip(v - v_old, +-clip) - R)^2).
    clip=None disables clipping. normalizer replaces the token count (a global count)."""
    dtype = _compute_dtype(values.dtype)
    v, old, target = values.to(dtype), old_values.to(dtype), returns.to(dtype)
    unclipped = (v - target) ** 2
    if clip is None:
        per_token = 0.5 * unclipped
        clipped_more = torch.zeros_like(unclipped, dtype=torch.bool)
    else:
        clipped = (old + (v - old).clamp(-clip, clip) - target) ** 2
        per_token = 0.5 * torch.maximum(unclipped, clipped)
        clipped_more = clipped > unclipped
    valid = mask > 0
    count = (valid.sum().to(dtype).clamp(min=1) if normalizer is None else
             torch.as_tensor(normalizer, dtype=dtype, device=v.device))
    loss = torch.where(valid, per_token, torch.zeros_like(per_token)).sum() / count
    with torch.no_grad():
        stats = {"clipfrac": _masked_mean(clipped_more.to(dtype), valid), "values": _masked_mean(v, valid)}
    return loss, stats


@torch.no_grad()
def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95):
    """Generalized advantage estimation over [B, T], skipping masked positions (verl semantics):
    delta_t = r_t + gamma * V_next - V_t, A_t = delta_t + gamma * lam * A_next, where V_next and A_next
    come from the next *unmasked* position (0 past the end). A masked position carries the values of
    the next unmasked one, so trailing padding and masked interior tokens are both right.
    Returns (advantages, returns = advantages + values), in fp32 (fp64 for fp64)."""
    dtype = _compute_dtype(rewards.dtype)
    r, v, m = rewards.to(dtype), values.to(dtype), (mask > 0).to(dtype)
    batch, steps = r.shape
    next_value = torch.zeros(batch, dtype=dtype, device=r.device)
    next_advantage = torch.zeros(batch, dtype=dtype, device=r.device)
    advantages = torch.empty_like(r)
    for t in reversed(range(steps)):
        delta = r[:, t] + gamma * next_value - v[:, t]
        advantage = delta + gamma * lam * next_advantage
        next_advantage = m[:, t] * advantage + (1 - m[:, t]) * next_advantage
        next_value = m[:, t] * v[:, t] + (1 - m[:, t]) * next_value
        advantages[:, t] = next_advantage
    return advantages, advantages + v


@torch.no_grad()
def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(x - mean) / sqrt(var + 1e-8) over the tokens of `mask`; masked positions come out 0.

    Variance convention: unbiased (Bessel's n - 1, as TRL and verl), with n - 1 floored at 1 so a single
    token is not an error. shift_mean=False adds the mean back (for rewards). When torch.distributed is
    initialized the sums are all-reduced, so every rank whitens with the global statistics.
    """
    dtype = _compute_dtype(x.dtype)
    values, m = x.to(dtype), (mask > 0).to(dtype)
    sums = torch.stack([m.sum(), (values * m).sum()])
    _all_reduce(sums)
    count, mean = sums[0], sums[1] / sums[0].clamp(min=1)
    square = ((values - mean) ** 2 * m).sum()
    _all_reduce(square)
    variance = square / (count - 1).clamp(min=1)
    whitened = (values - mean) * torch.rsqrt(variance + WHITEN_EPS)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * m


def _all_reduce(tensor: torch.Tensor) -> None:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor)
