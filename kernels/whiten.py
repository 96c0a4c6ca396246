"""Masked whitening: Triton kernels for the two masked reductions and the normalization.

Statistics run over the mask only, in fp32, in two passes (mean, then the centered sum of squares,
which is exact where a one-pass sum of squares would cancel); each pass's partial sums are
all-reduced when torch.distributed is initialized. Variance convention (``reference.masked_whiten``):
unbiased, n - 1 floored at 1; masked positions come out 0.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from stepcoder.kernels import reference
from stepcoder.kernels.dispatch import use_triton

BLOCK = 1024


@triton.jit
def _partial_sums_kernel(x_ptr, mask_ptr, mean_ptr, out_ptr, n, CENTERED: tl.constexpr, BLOCK: tl.constexpr):
    """Per block: (sum of mask, sum of x * mask), or with CENTERED the sum of (x - mean)^2 * mask."""
    block = tl.program_id(0)
    index = block.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = index < n
    kept = (tl.load(mask_ptr + index, mask=inside, other=0) != 0) & inside
    x = tl.where(kept, tl.load(x_ptr + index, mask=inside, other=0.0).to(tl.float32), 0.0)
    if CENTERED:
        centered = tl.where(kept, x - tl.load(mean_ptr), 0.0)
        tl.store(out_ptr + block, tl.sum(centered * centered, axis=0))
    else:
        tl.store(out_ptr + 2 * block, tl.sum(kept.to(tl.float32), axis=0))
        tl.store(out_ptr + 2 * block + 1, tl.sum(x, axis=0))


@triton.jit
def _normalize_kernel(x_ptr, mask_ptr, mean_ptr, scale_ptr, out_ptr, n, SHIFT_MEAN: tl.constexpr,
                      BLOCK: tl.constexpr):
    index = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = index < n
    kept = (tl.load(mask_ptr + index, mask=inside, other=0) != 0) & inside
    mean = tl.load(mean_ptr)
    y = (tl.load(x_ptr + index, mask=inside, other=0.0).to(tl.float32) - mean) * tl.load(scale_ptr)
    if not SHIFT_MEAN:
        y += mean
    tl.store(out_ptr + index, tl.where(kept, y, 0.0), mask=inside)


@torch.no_grad()
def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(x - mean) / sqrt(var + 1e-8) over the tokens of `mask` (fp32; masked positions 0).
    shift_mean=False adds the mean back. Statistics are global across ranks under torch.distributed."""
    if mask.shape != x.shape:
        raise ValueError(f"mask must have the shape of x {tuple(x.shape)}, got {tuple(mask.shape)}")
    if not use_triton(x):
        return reference.masked_whiten(x, mask, shift_mean)
    values = x.reshape(-1).contiguous()
    kept = (mask.reshape(-1) > 0).to(torch.int8)
    n = values.numel()
    blocks = max(triton.cdiv(n, BLOCK), 1)
    partial = torch.zeros(2 * blocks, dtype=torch.float32, device=x.device)
    _partial_sums_kernel[(blocks,)](values, kept, partial, partial, n, CENTERED=False, BLOCK=BLOCK)
    sums = partial.view(blocks, 2).sum(0)
    reference._all_reduce(sums)
    count, mean = sums[0], (sums[1] / sums[0].clamp(min=1)).reshape(1)
    squares = torch.zeros(blocks, dtype=torch.float32, device=x.device)
    _partial_sums_kernel[(blocks,)](values, kept, mean, squares, n, CENTERED=True, BLOCK=BLOCK)
    square = squares.sum()
    reference._all_reduce(square)
    scale = torch.rsqrt(square / (count - 1).clamp(min=1) + reference.WHITEN_EPS).reshape(1)
    out = torch.empty(n, dtype=torch.float32, device=x.device)
    _normalize_kernel[(blocks,)](values, kept, mean, scale, out, n, SHIFT_MEAN=shift_mean, BLOCK=BLOCK)
    return out.view(x.shape)
