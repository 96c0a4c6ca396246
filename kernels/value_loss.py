"""The clipped value loss: a Triton kernel that forms each token's loss and its gradient in one pass,
launcher, autograd Function. Semantics are ``reference.value_loss``'s."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from stepcoder.kernels import reference
from stepcoder.kernels.dispatch import use_triton

BLOCK = 1024


@triton.jit
def _value_loss_kernel(values_ptr, old_ptr, returns_ptr, valid_ptr, loss_ptr, grad_ptr, clipped_ptr, n, clip,
                       scale, CLIP: tl.constexpr, BLOCK: tl.constexpr):
    index = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = index < n
    v = tl.load(values_ptr + index, mask=inside, other=0.0).to(tl.float32)
    target = tl.load(returns_ptr + index, mask=inside, other=0.0).to(tl.float32)
    kept = (tl.load(valid_ptr + index, mask=inside, other=0) != 0) & inside
    error = v - target
    loss = error * error
    grad = error  # d/dv of (v - R)^2 / 2
    more = tl.zeros([BLOCK], tl.float32)
    if CLIP:
        old = tl.load(old_ptr + index, mask=inside, other=0.0).to(tl.float32)
        step = v - old
        bounded = tl.minimum(tl.maximum(step, -clip), clip)
        clipped_error = old + bounded - target
        clipped_loss = clipped_error * clipped_error
        clipped_grad = tl.where((step >= -clip) & (step <= clip), clipped_error, 0.0)
        tie = 0.5 * (grad + clipped_grad)  # torch.maximum splits ties
        grad = tl.where(loss > clipped_loss, grad, tl.where(clipped_loss > loss, clipped_grad, tie))
        more = tl.where(clipped_loss > loss, 1.0, 0.0)
        loss = tl.maximum(loss, clipped_loss)
    tl.store(loss_ptr + index, tl.where(kept, 0.5 * loss * scale, 0.0), mask=inside)
    tl.store(grad_ptr + index, tl.where(kept, grad * scale, 0.0), mask=inside)
    tl.store(clipped_ptr + index, tl.where(kept, more, 0.0), mask=inside)


class ValueLossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, values, old_values, returns, valid, clip, scale):
        n = values.numel()
        flat = lambda t: t.reshape(-1).contiguous()  # noqa: E731
        loss, grad, clipped = (torch.empty(n, dtype=torch.float32, device=values.device) for _ in range(3))
        if n:
            _value_loss_kernel[(triton.cdiv(n, BLOCK),)](flat(values), flat(old_values), flat(returns), valid, loss,
                                                         grad, clipped, n, float(clip or 0.0), scale,
                                                         CLIP=clip is not None, BLOCK=BLOCK)
        ctx.save_for_backward(grad)
        ctx.shape, ctx.dtype = values.shape, values.dtype
        ctx.mark_non_differentiable(clipped)
        return loss.sum(), clipped

    @staticmethod
    def backward(ctx, grad_loss, _):
        (grad,) = ctx.saved_tensors
        return (grad * grad_loss).to(ctx.dtype).view(ctx.shape), None, None, None, None, None


def value_loss(values, old_values, returns, mask, clip=0.2, normalizer=None):
    """0.5 * max((v - R)^2, (v_old + clip(v - v_old, +-clip) - R)^2), averaged over the tokens of `mask`
    (the action mask) or divided by `normalizer` (a global token count). clip=None: unclipped.
    Returns (loss, stats) with stats clipfrac (tokens where the clipped term is larger) and values."""
    for name, value in (("old_values", old_values), ("returns", returns), ("mask", mask)):
        if value.shape != values.shape:
            raise ValueError(f"{name} must have the shape of values {tuple(values.shape)}, got {tuple(value.shape)}")
    if clip is not None and not clip > 0:
        raise ValueError(f"clip must be positive (or None), got {clip}")
    if not use_triton(values):
        return reference.value_loss(values, old_values, returns, mask, clip, normalizer)
    valid = (mask.reshape(-1) > 0).to(torch.int8)
    count = float(normalizer) if normalizer is not None else float(valid.sum().clamp(min=1))
    loss, clipped = ValueLossFunction.apply(values, old_values.detach(), returns.detach(), valid, clip, 1.0 / count)
    with torch.no_grad():
        kept = valid.float()
        tokens = kept.sum().clamp(min=1)
        stats = {"clipfrac": clipped.sum() / tokens, "values": (values.reshape(-1).float() * kept).sum() / tokens}
    return loss, stats
