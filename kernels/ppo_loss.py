"""The clipped PPO policy loss with the FGO mask, fused with the log-probabilities: Triton kernel,
launcher, autograd Function.

One program per token row: an online pass over the vocabulary gives logp and entropy; the per-token
PPO math (ratio, clipping, dual clip, entropy bonus, KL penalty, aggregation weight) then gives the
loss and its derivatives with respect to logp and entropy; a second pass over the same row (from L2
on a GPU) writes d loss / d logits. The gradient is thus computed in the forward pass: HBM sees the
logits read once and the gradient written once, and when the logits are an autograd intermediate (a
model's output) the gradient overwrites them, so no [tokens x vocabulary] buffer is allocated. Rows outside the mask cost
only zeroing their gradient. Semantics are ``reference.ppo_policy_loss``'s.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from stepcoder.kernels import reference
from stepcoder.kernels.dispatch import use_triton
from stepcoder.kernels.logprobs import (NUM_WARPS, block_for, for_reference, prepare, row_pointer, row_statistics,
                                        strides)

KL_MODES = {None: 0, "k1": 1, "k2": 2, "k3": 3}
L2_BUDGET = 32 << 20  # bytes of logits rows in flight at once, so each row's second pass hits L2
# Registers per thread allowed to the loss kernel. Left to itself, ptxas (CUDA 12.8, Triton 3.6) fits
# sm_90's 512-thread blocks three to an SM at 40 registers and spills 8 bytes in the gradient pass. At
# 56 registers two fit; at Qwen's 151,936 columns ``programs_for`` launches one program per SM anyway,
# so there nothing is lost, and no kernel spills (tests/test_kernels_compile.py). At 32,256 columns
# (four programs per SM) which is faster is for benchmarks/gpu_run.sh to measure.
MAX_REGISTERS = 64


def programs_for(logits: torch.Tensor, rows: int) -> int:
    """How many persistent programs to launch: enough to fill every SM, few enough that the rows they
    hold between their two passes fit in L2 (H100: 50 MB). Under the interpreter a handful, so the
    row loop is exercised."""
    if not logits.is_cuda:
        return min(rows, 3)
    sms = torch.cuda.get_device_properties(logits.device).multi_processor_count
    row_bytes = logits.shape[-1] * logits.element_size()
    return max(1, min(rows, max(sms, min(8 * sms, L2_BUDGET // row_bytes))))


@triton.jit
def _maximum_with_gradient(a, da, b, db):
    """max(a, b) and its derivative, splitting ties in half as torch.maximum does."""
    return tl.maximum(a, b), tl.where(a > b, da, tl.where(b > a, db, 0.5 * (da + db)))


@triton.jit
def _ppo_forward_kernel(logits_ptr, grad_ptr, labels_ptr, old_ptr, advantages_ptr, weights_ptr, valid_ptr, ref_ptr,
                        logp_ptr, entropy_ptr, ratio_ptr, clipped_ptr, kl_ptr, loss_ptr, rows,
                        rows_per_batch, stride_batch, stride_row, grad_stride_batch, grad_stride_row, V,
                        temperature, clip_low, clip_high, dual_clip, entropy_coef, kl_coef,
                        BLOCK_V: tl.constexpr, DUAL_CLIP: tl.constexpr, KL_MODE: tl.constexpr,
                        COMPUTE_GRAD: tl.constexpr):
    # Persistent: each program walks rows, so the rows in flight (whose second pass should hit L2) are
    # as many as the programs launched.
    for position in range(tl.program_id(0), rows, tl.num_programs(0)):
        row = tl.cast(position, tl.int64)
        columns = tl.arange(0, BLOCK_V)
        grad_row = row_pointer(grad_ptr, row, rows_per_batch, grad_stride_batch, grad_stride_row)
        if tl.load(valid_ptr + row) == 0:
            if COMPUTE_GRAD:
                for start in range(0, V, BLOCK_V):
                    index = start + columns
                    tl.store(grad_row + index, tl.zeros([BLOCK_V], grad_ptr.dtype.element_ty), mask=index < V)
            tl.store(logp_ptr + row, 0.0)
            tl.store(entropy_ptr + row, 0.0)
            tl.store(ratio_ptr + row, 0.0)
            tl.store(clipped_ptr + row, 0.0)
            tl.store(kl_ptr + row, 0.0)
            tl.store(loss_ptr + row, 0.0)
        else:
            logits_row = row_pointer(logits_ptr, row, rows_per_batch, stride_batch, stride_row)
            label = tl.load(labels_ptr + row).to(tl.int64)
            lse, expected_z, z_label = row_statistics(logits_row, label, V, temperature, BLOCK_V)
            logp = z_label - lse
            entropy = lse - expected_z
            advantage = tl.load(advantages_ptr + row)
            weight = tl.load(weights_ptr + row)

            log_ratio = logp - tl.load(old_ptr + row)
            ratio = tl.exp(tl.minimum(tl.maximum(log_ratio, -20.0), 20.0))
            d_ratio = tl.where(tl.abs(log_ratio) > 20.0, 0.0, ratio)  # d ratio / d logp
            unclipped = -advantage * ratio
            clipped = -advantage * tl.minimum(tl.maximum(ratio, 1.0 - clip_low), 1.0 + clip_high)
            in_range = (ratio >= 1.0 - clip_low) & (ratio <= 1.0 + clip_high)
            loss, d_logp = _maximum_with_gradient(unclipped, -advantage * d_ratio, clipped,
                                                  tl.where(in_range, -advantage * d_ratio, 0.0))
            if DUAL_CLIP:
                cap = -advantage * dual_clip
                capped = tl.where(cap < loss, 0.0, tl.where(cap == loss, 0.5 * d_logp, d_logp))
                d_logp = tl.where(advantage < 0, capped, d_logp)
                loss = tl.where(advantage < 0, tl.minimum(loss, cap), loss)
            loss -= entropy_coef * entropy
            kl = 0.0
            if KL_MODE == 1:
                kl = logp - tl.load(ref_ptr + row)
                d_logp += kl_coef
            if KL_MODE == 2:
                difference = logp - tl.load(ref_ptr + row)
                kl = 0.5 * difference * difference
                d_logp += kl_coef * difference
            if KL_MODE == 3:
                reverse = tl.load(ref_ptr + row) - logp
                clamped = tl.minimum(tl.maximum(reverse, -20.0), 20.0)
                raw = tl.exp(clamped) - clamped - 1.0
                kl = tl.minimum(tl.maximum(raw, -10.0), 10.0)
                passes = (tl.abs(reverse) <= 20.0) & (tl.abs(raw) <= 10.0)
                d_logp += kl_coef * tl.where(passes, 1.0 - tl.exp(clamped), 0.0)
            loss += kl_coef * kl

            tl.store(logp_ptr + row, logp)
            tl.store(entropy_ptr + row, entropy)
            tl.store(ratio_ptr + row, ratio)
            tl.store(clipped_ptr + row, tl.where(clipped > unclipped, 1.0, 0.0))
            tl.store(kl_ptr + row, kl)
            tl.store(loss_ptr + row, weight * loss)
            if COMPUTE_GRAD:
                g_logp = weight * d_logp
                g_entropy = -weight * entropy_coef
                for start in range(0, V, BLOCK_V):
                    index = start + columns
                    inside = index < V
                    z = tl.load(logits_row + index, mask=inside, other=float("-inf")).to(tl.float32) / temperature
                    p = tl.exp(z - lse)
                    gradient = g_logp * (tl.where(index == label, 1.0, 0.0) - p)
                    gradient -= g_entropy * p * tl.where(p > 0, z - expected_z, 0.0)
                    tl.store(grad_row + index, (gradient / temperature).to(grad_ptr.dtype.element_ty), mask=inside)


def writes_in_place(logits: torch.Tensor, inplace_backward: bool | None) -> bool:
    """Whether the gradient may overwrite `logits`. None (the default) allows it only when their memory
    belongs to autograd: an intermediate such as a model's output, not a leaf the caller created and
    not a view of one (that leaf's values would silently become the gradient)."""
    if inplace_backward is not None:
        return inplace_backward
    owner = logits._base if logits._base is not None else logits
    return owner.grad_fn is not None


class PPOLossFunction(torch.autograd.Function):
    """Returns (loss, logp, entropy, ratio, clipped, kl); only the loss is differentiable, and its
    gradient was formed in forward: backward only scales it by the upstream gradient."""

    @staticmethod
    def forward(ctx, logits, labels, old_logp, advantages, weights, valid, ref_logp, options):
        view, rows = prepare(logits, labels)
        compute_grad = logits.requires_grad
        if compute_grad and writes_in_place(logits, options["inplace_backward"]) and view is logits:
            grad = view
            torch.autograd.graph.increment_version(logits)  # a backward that still needs them fails loudly
        else:
            grad = torch.empty(view.shape, dtype=view.dtype, device=view.device) if compute_grad else view
        per_token = [torch.empty(rows.count, dtype=torch.float32, device=logits.device) for _ in range(6)]
        kl_mode = KL_MODES[options["kl_estimator"]]
        if rows.count:
            _ppo_forward_kernel[(programs_for(view, rows.count),)](
                view, grad, labels.reshape(-1), old_logp, advantages, weights, valid,
                ref_logp if kl_mode else old_logp, *per_token, rows.count, rows.per_batch, *strides(view),
                *strides(grad),
                view.shape[-1],
                options["temperature"], options["clip_low"], options["clip_high"], options["dual_clip"] or 0.0,
                options["entropy_coef"], options["kl_coef"], BLOCK_V=block_for(view.shape[-1]),
                DUAL_CLIP=options["dual_clip"] is not None, KL_MODE=kl_mode, COMPUTE_GRAD=compute_grad,
                num_warps=NUM_WARPS, maxnreg=MAX_REGISTERS)
        if compute_grad and rows.extra_position:
            grad[:, -1].zero_()
        # A detached handle, released in backward: autograd may then take it as a leaf's .grad as is
        # (for the in-place gradient, the logits' own memory) instead of copying it.
        ctx.grad = grad.detach() if compute_grad else None
        logp, entropy, ratio, clipped, kl, weighted = per_token
        ctx.mark_non_differentiable(logp, entropy, ratio, clipped, kl)
        return weighted.sum(), logp, entropy, ratio, clipped, kl

    @staticmethod
    def backward(ctx, grad_loss, *unused):
        grad, ctx.grad = ctx.grad, None
        if grad_loss is not None and not (grad_loss.numel() == 1 and grad_loss.item() == 1.0):
            grad = grad.mul_(grad_loss.to(grad.dtype))
        return grad, None, None, None, None, None, None, None


def ppo_policy_loss(logits, labels, old_logp, advantages, mask, *, clip_low=0.2, clip_high=0.2, dual_clip=None,
                    temperature=1.0, entropy_coef=0.0, ref_logp=None, kl_coef=0.0, kl_estimator="k3",
                    aggregation="token-mean", normalizer=None, inplace_backward=None):
    """The clipped PPO policy loss from logits, masked by `mask` (the action mask x the FGO mask).

    logits [B, T, V] or [N, V] (fp32/bf16/fp16, possibly strided), or [B, T + 1, V] as a causal LM
    returns them (the last position is dropped in place, and its gradient is 0); labels, old_logp,
    advantages (per token, e.g. GAE), mask and ref_logp: one value per token row. Returns (loss, stats)
    with stats clipfrac, approx_kl, entropy, ratio (masked means; kl too when a KL term is on).
    `normalizer` replaces the aggregation's denominator (e.g. the global count of valid tokens).
    The gradient is written during forward, over the logits when ``inplace_backward`` allows it:
    None (default) when they are an autograd intermediate (a model's output: no [tokens x vocab]
    buffer is allocated, and the logits must not be read afterwards — autograd raises if a backward
    still needs them), never over a leaf the caller created or a view of one; True always (a leaf's
    values become its own .grad); False never. Formulas: ``stepcoder.kernels.reference.ppo_policy_loss``.
    """
    prepare(logits, labels)
    _check_options(clip_low, clip_high, dual_clip, temperature, kl_estimator, aggregation)
    for name, value in (("old_logp", old_logp), ("advantages", advantages), ("mask", mask)):
        if value.shape != labels.shape:
            raise ValueError(f"{name} must have shape {tuple(labels.shape)}, got {tuple(value.shape)}")
    use_kl = ref_logp is not None and kl_coef != 0
    if not use_triton(logits):
        return reference.ppo_policy_loss(for_reference(logits, labels), labels, old_logp, advantages, mask,
                                         clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip,
                                         temperature=temperature,
                                         entropy_coef=entropy_coef, ref_logp=ref_logp if use_kl else None,
                                         kl_coef=kl_coef, kl_estimator=kl_estimator, aggregation=aggregation,
                                         normalizer=normalizer)
    flat = lambda t: t.reshape(-1).to(torch.float32).contiguous()  # noqa: E731  (N floats: cheap)
    valid = (mask.reshape(-1) > 0).to(torch.int8)
    weights = flat(reference.aggregation_weights(mask, aggregation, normalizer))
    options = {"clip_low": float(clip_low), "clip_high": float(clip_high), "temperature": float(temperature),
               "dual_clip": None if dual_clip is None else float(dual_clip), "entropy_coef": float(entropy_coef),
               "kl_coef": float(kl_coef) if use_kl else 0.0, "kl_estimator": kl_estimator if use_kl else None,
               "inplace_backward": inplace_backward}
    loss, logp, entropy, ratio, clipped, kl = PPOLossFunction.apply(
        logits, labels, flat(old_logp), flat(advantages), weights, valid,
        flat(ref_logp) if use_kl else None, options)
    with torch.no_grad():
        count = valid.sum().clamp(min=1).float()
        kept = valid.float()
        stats = {"clipfrac": (clipped * kept).sum() / count,
                 "approx_kl": (((ratio - 1) - torch.log(ratio.clamp(min=1e-30))) * kept).sum() / count,
                 "entropy": (entropy * kept).sum() / count, "ratio": (ratio * kept).sum() / count}
        if use_kl:
            stats["kl"] = (kl * kept).sum() / count
    return loss, stats


def _check_options(clip_low, clip_high, dual_clip, temperature, kl_estimator, aggregation) -> None:
    if not (0 <= clip_low < 1 and clip_high >= 0):
        raise ValueError(f"need 0 <= clip_low < 1 and clip_high >= 0, got {clip_low}, {clip_high}")
    if dual_clip is not None and not dual_clip > 1:
        raise ValueError(f"dual_clip must be > 1 (or None), got {dual_clip}")
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if kl_estimator not in reference.KL_ESTIMATORS:
        raise ValueError(f"kl_estimator must be one of {', '.join(reference.KL_ESTIMATORS)}, got {kl_estimator!r}")
    if aggregation not in reference.AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {', '.join(reference.AGGREGATIONS)}, got {aggregation!r}")
