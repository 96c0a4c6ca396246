"""Generalized advantage estimation as one Triton kernel: a reverse scan per sequence.

The recursion runs backwards in time and skips masked positions, carrying the next unmasked value
and advantage through them (``reference.gae``). Both carries are affine maps x_t = a_t * x_{t+1} + b_t,
so each chunk of a sequence is one ``tl.associative_scan`` over time reversed, composed with the carry
from the chunk after it: no per-step kernel launches and no per-step Python.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from stepcoder.kernels import reference
from stepcoder.kernels.dispatch import use_triton

MAX_BLOCK_T = 1024


@triton.jit
def _compose(a_earlier, b_earlier, a_later, b_later):
    """Apply the earlier-scanned affine map, then the later one: x -> a_l * (a_e * x + b_e) + b_l."""
    return a_later * a_earlier, a_later * b_earlier + b_later


@triton.jit
def _gae_kernel(rewards_ptr, values_ptr, mask_ptr, advantages_ptr, returns_ptr, steps, stride_r, stride_v, stride_m,
                gamma, lam, BLOCK_T: tl.constexpr):
    sequence = tl.program_id(0).to(tl.int64)
    offsets = tl.arange(0, BLOCK_T)
    next_value = tl.zeros([], tl.float32)      # value at the next unmasked position (0 past the end)
    next_advantage = tl.zeros([], tl.float32)  # advantage at the next unmasked position
    for chunk_end in range(steps, 0, -BLOCK_T):
        t = chunk_end - 1 - offsets  # scan index k = 0, 1, ... walks time backwards
        inside = t >= 0
        r = tl.load(rewards_ptr + sequence * stride_r + t, mask=inside, other=0.0).to(tl.float32)
        v = tl.load(values_ptr + sequence * stride_v + t, mask=inside, other=0.0).to(tl.float32)
        m = (tl.load(mask_ptr + sequence * stride_m + t, mask=inside, other=0) != 0).to(tl.float32)
        # The value seen from t is carried over t + 1, t + 2, ...: scan the maps of position t + 1
        # (the identity at k = 0, whose t + 1 belongs to the chunk after, already in next_value).
        after = (offsets >= 1) & inside
        m_after = (tl.load(mask_ptr + sequence * stride_m + t + 1, mask=after, other=0) != 0).to(tl.float32)
        v_after = tl.load(values_ptr + sequence * stride_v + t + 1, mask=after, other=0.0).to(tl.float32)
        a_v, b_v = tl.associative_scan((1.0 - m_after, m_after * v_after), 0, _compose)
        value_after = a_v * next_value + b_v
        delta = r + gamma * value_after - v
        a_a, b_a = tl.associative_scan((1.0 - m + m * gamma * lam, m * delta), 0, _compose)
        advantage = a_a * next_advantage + b_a
        tl.store(advantages_ptr + sequence * steps + t, advantage, mask=inside)
        tl.store(returns_ptr + sequence * steps + t, advantage + v, mask=inside)
        last = offsets == BLOCK_T - 1
        next_value = tl.sum(tl.where(last, m * v + (1.0 - m) * value_after, 0.0), axis=0)
        next_advantage = tl.sum(tl.where(last, advantage, 0.0), axis=0)


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95):
    """(advantages, returns) over [B, T], skipping masked positions (``reference.gae``), in fp32."""
    if rewards.dim() != 2 or values.shape != rewards.shape or mask.shape != rewards.shape:
        raise ValueError(f"rewards, values and mask must share one [B, T] shape, got {tuple(rewards.shape)}, "
                         f"{tuple(values.shape)}, {tuple(mask.shape)}")
    if not use_triton(rewards):
        return reference.gae(rewards, values, mask, gamma, lam)
    batch, steps = rewards.shape
    advantages = torch.empty((batch, steps), dtype=torch.float32, device=rewards.device)
    returns = torch.empty_like(advantages)
    mask = mask if mask.dtype != torch.bool else mask.to(torch.int8)
    rewards, values, mask = (t if t.stride(-1) == 1 else t.contiguous() for t in (rewards, values, mask))
    if batch and steps:
        _gae_kernel[(batch,)](rewards, values, mask, advantages, returns, steps, rewards.stride(0), values.stride(0),
                              mask.stride(0), float(gamma), float(lam),
                              BLOCK_T=min(MAX_BLOCK_T, triton.next_power_of_2(steps)))
    return advantages, returns
