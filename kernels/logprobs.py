"""Log-probabilities and entropy from logits: Triton kernels, launcher, autograd Function.

Forward: one program per token row makes one online pass over the vocabulary (running max, sum of
exp, sum of exp * z) in fp32, with z = logits / T in fp32; columns past V are -inf and never enter a
sum; entropy is lse - E_p[z], so no 0 * (-inf). It saves lse and E_p[z] (8 bytes per token).
Backward: a 2-D grid (rows x vocabulary blocks) recomputes p from the saved statistics:
d/dz_j = g_logp * (1[j = y] - p_j) - g_H * p_j * (z_j - E_p[z]), times 1/T.

Rows are addressed as (batch, position) with the tensor's own strides, so ``logits[:, :-1]`` is
read in place, never copied; offsets are int64.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from stepcoder.kernels import reference
from stepcoder.kernels.dispatch import use_triton

BLOCK_V = 4096
NUM_WARPS = 16  # one value for every row kernel: reductions then sum in the same order (bitwise logp)


@triton.jit
def row_statistics(row_ptr, label, V, temperature, BLOCK_V: tl.constexpr):
    """One online pass over a row of logits: (log-sum-exp, E_p[z], z at the label), all fp32."""
    columns = tl.arange(0, BLOCK_V)
    running_max = tl.full([], float("-inf"), tl.float32)
    sum_exp = tl.zeros([], tl.float32)
    sum_exp_z = tl.zeros([], tl.float32)
    for start in range(0, V, BLOCK_V):
        index = start + columns
        z = tl.load(row_ptr + index, mask=index < V, other=float("-inf")).to(tl.float32) / temperature
        new_max = tl.maximum(running_max, tl.max(z, axis=0))
        scale = tl.exp(running_max - new_max)
        e = tl.exp(z - new_max)
        sum_exp = sum_exp * scale + tl.sum(e, axis=0)
        sum_exp_z = sum_exp_z * scale + tl.sum(e * tl.where(e > 0, z, 0.0), axis=0)  # no 0 * (-inf)
        running_max = new_max
    z_label = tl.load(row_ptr + label).to(tl.float32) / temperature
    return running_max + tl.log(sum_exp), sum_exp_z / sum_exp, z_label


@triton.jit
def row_pointer(base_ptr, row, rows_per_batch, stride_batch, stride_row):
    """Address of token row `row` (int64) in a [batch, position, V] view with the given strides."""
    return base_ptr + (row // rows_per_batch) * stride_batch + (row % rows_per_batch) * stride_row


@triton.jit
def _forward_kernel(logits_ptr, labels_ptr, logp_ptr, entropy_ptr, lse_ptr, expected_z_ptr, rows_per_batch,
                    stride_batch, stride_row, V, temperature, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    label = tl.load(labels_ptr + row).to(tl.int64)
    lse, expected_z, z_label = row_statistics(row_pointer(logits_ptr, row, rows_per_batch, stride_batch, stride_row),
                                              label, V, temperature, BLOCK_V)
    tl.store(logp_ptr + row, z_label - lse)
    tl.store(entropy_ptr + row, lse - expected_z)
    tl.store(lse_ptr + row, lse)
    tl.store(expected_z_ptr + row, expected_z)


@triton.jit
def _backward_kernel(logits_ptr, labels_ptr, lse_ptr, expected_z_ptr, grad_logp_ptr, grad_entropy_ptr, grad_ptr,
                     rows_per_batch, stride_batch, stride_row, grad_stride_batch, grad_stride_row, V, temperature,
                     BLOCK_V: tl.constexpr, WITH_ENTROPY: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    index = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    inside = index < V
    z = tl.load(row_pointer(logits_ptr, row, rows_per_batch, stride_batch, stride_row) + index, mask=inside,
                other=float("-inf")).to(tl.float32) / temperature
    p = tl.exp(z - tl.load(lse_ptr + row))
    label = tl.load(labels_ptr + row).to(tl.int64)
    gradient = tl.load(grad_logp_ptr + row) * (tl.where(index == label, 1.0, 0.0) - p)
    if WITH_ENTROPY:
        spread = p * tl.where(p > 0, z - tl.load(expected_z_ptr + row), 0.0)
        gradient -= tl.load(grad_entropy_ptr + row) * spread
    grad_row = row_pointer(grad_ptr, row, rows_per_batch, grad_stride_batch, grad_stride_row)
    tl.store(grad_row + index, (gradient / temperature).to(grad_ptr.dtype.element_ty), mask=inside)


@dataclass(frozen=True)
class Rows:
    """Which token rows a logits-shaped tensor holds: row i is (i // per_batch, i % per_batch)."""

    count: int
    per_batch: int
    extra_position: bool  # [B, T + 1, V] logits for [B, T] labels: the last position is not a row


def strides(tensor: torch.Tensor) -> tuple[int, int]:
    """(batch stride, row stride) of a [B, T, V] or [N, V] tensor."""
    return (tensor.stride(0), tensor.stride(1)) if tensor.dim() == 3 else (0, tensor.stride(0))


def prepare(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, Rows]:
    """Checks shapes and finds the rows without copying: [N, V] and [B, T, V] views are read through
    their strides, and [B, T + 1, V] (a causal LM's output as is) with [B, T] labels drops the last
    position in place. Only a non-unit vocabulary stride forces a copy."""
    if logits.dim() not in (2, 3):
        raise ValueError(f"logits must be [N, V] or [B, T, V], got shape {tuple(logits.shape)}")
    if labels.dtype.is_floating_point:
        raise ValueError(f"labels must be integers, got {labels.dtype}")
    extra = logits.dim() == 3 and labels.dim() == 2 and labels.shape[0] == logits.shape[0] \
        and logits.shape[1] == labels.shape[1] + 1
    if labels.shape != logits.shape[:-1] and not extra:
        raise ValueError(f"labels must have shape {tuple(logits.shape[:-1])} (logits without the vocabulary, or "
                         f"one position fewer), got {tuple(labels.shape)}")
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    return logits, layout_of(logits, labels.shape, extra)


def layout_of(tensor: torch.Tensor, labels_shape: torch.Size, extra: bool) -> Rows:
    count = labels_shape.numel()
    per_batch = labels_shape[1] if tensor.dim() == 3 else count
    return Rows(count, max(per_batch, 1), extra)


def for_reference(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The logits the reference takes (it slices; it copies anyway)."""
    return logits[:, :-1] if logits.dim() == 3 and labels.dim() == 2 and logits.shape[1] == labels.shape[1] + 1 \
        else logits


class LogprobsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, temperature):
        ctx.set_materialize_grads(False)  # an unused entropy output then costs nothing in backward
        view, rows = prepare(logits, labels)
        flat_labels = labels.reshape(-1)
        logp, entropy, lse, expected_z = (torch.empty(rows.count, dtype=torch.float32, device=logits.device)
                                          for _ in range(4))
        if rows.count:
            _forward_kernel[(rows.count,)](view, flat_labels, logp, entropy, lse, expected_z, rows.per_batch,
                                           *strides(view), view.shape[-1], float(temperature),
                                           BLOCK_V=block_for(view.shape[-1]), num_warps=NUM_WARPS)
        ctx.save_for_backward(view, flat_labels, lse, expected_z)
        ctx.rows, ctx.temperature = rows, float(temperature)
        return logp.view(labels.shape), entropy.view(labels.shape)

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        view, labels, lse, expected_z = ctx.saved_tensors
        rows, vocab = ctx.rows, view.shape[-1]
        grad = torch.empty(view.shape, dtype=view.dtype, device=view.device)
        with_entropy = grad_entropy is not None
        grad_logp = (grad_logp if grad_logp is not None else torch.zeros_like(lse)).reshape(-1).float().contiguous()
        grad_entropy = grad_entropy.reshape(-1).float().contiguous() if with_entropy else grad_logp
        block = block_for(vocab)
        if rows.count:
            _backward_kernel[(rows.count, triton.cdiv(vocab, block))](
                view, labels, lse, expected_z, grad_logp, grad_entropy, grad, rows.per_batch, *strides(view),
                *strides(grad), vocab, ctx.temperature, BLOCK_V=block, WITH_ENTROPY=with_entropy, num_warps=8)
        if rows.extra_position:
            grad[:, -1].zero_()
        return grad, None, None


def block_for(vocab: int) -> int:
    """The vocabulary tile: every row kernel uses the same one, so their sums agree bit for bit."""
    return min(BLOCK_V, triton.next_power_of_2(max(vocab, 16)))


def logprobs_from_logits(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0,
                         return_entropy: bool = False):
    """log softmax(logits / T)[labels] (fp32, shape of labels) and, with return_entropy, the entropy of
    softmax(logits / T). logits: [B, T, V] or [N, V], fp32/bf16/fp16, possibly strided; or [B, T + 1, V]
    for [B, T] labels (a causal LM's output as is: the last position is dropped without a copy)."""
    prepare(logits, labels)
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if not use_triton(logits):
        return reference.logprobs_from_logits(for_reference(logits, labels), labels, temperature, return_entropy)
    logp, entropy = LogprobsFunction.apply(logits, labels, temperature)
    return (logp, entropy) if return_entropy else logp
