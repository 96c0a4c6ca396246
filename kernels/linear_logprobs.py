"""Log-probabilities and entropy from hidden states and the LM head, without the [tokens x vocabulary]
logits: a token-chunked launcher around the row kernels of ``logprobs.py``, and its autograd Function.

Forward, per chunk of tokens: logits = hidden @ weight^T in fp32 (a GEMM with fp32 output), then the
row kernel's online log-sum-exp with z = logits / T in fp32. Only the chunk's logits exist at a time;
the chunk is sized by a memory budget. Backward goes over vocabulary slabs: it recomputes the slab's
logits for all tokens, turns them into d loss / d z in place (fp32, the label column included before
any rounding), writes d weight for the slab from one GEMM over all tokens (fp32 accumulation inside;
skipped for a frozen head) and accumulates d hidden in fp32. Forward is deterministic: the same rows in
the same chunks give bit-identical log-probs. Masked rows are dropped before any of this
(``ppo_policy_loss_from_hidden``).
"""
from __future__ import annotations

import torch
import triton

from stepcoder.kernels import reference
from stepcoder.kernels.dispatch import use_triton
from stepcoder.kernels.logprobs import NUM_WARPS, _backward_kernel, _forward_kernel, block_for
from stepcoder.kernels.ppo_loss import _check_options

CHUNK_BYTES = 128 << 20  # fp32 logits of one token chunk (forward)
SLAB_BYTES = 128 << 20   # fp32 logits of one vocabulary slab for all tokens (backward)


def chunk_tokens(vocab: int, budget: int = CHUNK_BYTES) -> int:
    return max(1, budget // (vocab * 4))


def _mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b with fp32 output: on CUDA the GEMM keeps bf16/fp16 inputs and accumulates in fp32."""
    if a.is_cuda and a.dtype != torch.float32 and a.dtype == b.dtype:
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except TypeError:  # torch without mm(out_dtype=): an fp32 GEMM gives the same result, slower
            pass
    return a.float() @ b.float()


class LinearLogprobsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, temperature, weight_grad):
        ctx.set_materialize_grads(False)
        rows, vocab = hidden.shape[0], weight.shape[0]
        logp, entropy, lse, expected_z = (torch.empty(rows, dtype=torch.float32, device=hidden.device)
                                          for _ in range(4))
        step = chunk_tokens(vocab)
        block = block_for(vocab)
        for start in range(0, rows, step):
            stop = min(rows, start + step)
            logits = _mm(hidden[start:stop], weight.t())
            _forward_kernel[(stop - start,)](logits, labels[start:stop], logp[start:stop], entropy[start:stop],
                                             lse[start:stop], expected_z[start:stop], max(stop - start, 1), 0,
                                             logits.stride(0), vocab, float(temperature), BLOCK_V=block,
                                             num_warps=NUM_WARPS)
        ctx.save_for_backward(hidden, weight, labels, lse, expected_z)
        ctx.temperature, ctx.weight_grad = float(temperature), weight_grad
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        """Vocabulary-slab-major: each slab's logits are recomputed for all tokens and turned into dZ in
        place; d weight for the slab is one GEMM over every token (fp32 accumulation inside it, written
        once), and d hidden accumulates over slabs in fp32. No V x H fp32 buffer is ever held."""
        hidden, weight, labels, lse, expected_z = ctx.saved_tensors
        rows, vocab = hidden.shape[0], weight.shape[0]
        with_entropy = grad_entropy is not None
        grad_logp = (grad_logp if grad_logp is not None else torch.zeros_like(lse)).float().contiguous()
        grad_entropy = grad_entropy.float().contiguous() if with_entropy else grad_logp
        grad_hidden = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
        grad_weight = torch.empty_like(weight) if ctx.weight_grad and weight.requires_grad else None
        slab = max(1, SLAB_BYTES // (max(rows, 1) * 4))
        for start in range(0, vocab, slab):
            stop = min(vocab, start + slab)
            width, part = stop - start, weight[start:stop]
            grad_z = _mm(hidden, part.t())  # the slab's logits, fp32, for every token
            block = block_for(width)
            if rows:
                _backward_kernel[(rows, triton.cdiv(width, block))](
                    grad_z, labels - start, lse, expected_z, grad_logp, grad_entropy, grad_z, rows, 0,
                    grad_z.stride(0), 0, grad_z.stride(0), width, ctx.temperature, BLOCK_V=block,
                    WITH_ENTROPY=with_entropy, num_warps=8)
            grad_z = grad_z.to(hidden.dtype) if hidden.is_cuda else grad_z  # GEMM inputs in the model's dtype
            grad_hidden += _mm(grad_z, part)
            if grad_weight is not None:
                grad_weight[start:stop] = _mm(grad_z.t(), hidden).to(weight.dtype)
        return grad_hidden.to(hidden.dtype), grad_weight, None, None, None


def _check(hidden, weight, labels, temperature) -> None:
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden must be [N, H] and weight [V, H], got {tuple(hidden.shape)} and "
                         f"{tuple(weight.shape)}")
    if labels.shape != hidden.shape[:1] or labels.dtype.is_floating_point:
        raise ValueError(f"labels must be {hidden.shape[0]} integers, got {tuple(labels.shape)} {labels.dtype}")
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")


def _reference(hidden, weight, labels, temperature, return_entropy):
    logits = hidden.to(torch.promote_types(hidden.dtype, torch.float32)) @ \
        weight.to(torch.promote_types(weight.dtype, torch.float32)).t()
    return reference.logprobs_from_logits(logits, labels, temperature, return_entropy)


def linear_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0,
                    return_entropy: bool = False, weight_grad: bool = True):
    """log softmax(hidden @ weight^T / T)[labels] (fp32 [N]) and, with return_entropy, the entropy,
    without materializing the logits. hidden [N, H], weight [V, H] (the LM head), fp32/bf16/fp16.
    weight_grad=False skips the weight gradient (a frozen LM head)."""
    _check(hidden, weight, labels, temperature)
    if not use_triton(hidden):
        logp, entropy = _reference(hidden, weight if weight_grad else weight.detach(), labels, temperature, True)
    else:
        logp, entropy = LinearLogprobsFunction.apply(hidden.contiguous(), weight.contiguous(), labels.contiguous(),
                                                     temperature, weight_grad)
    return (logp, entropy) if return_entropy else logp


def ppo_policy_loss_from_hidden(hidden, weight, labels, old_logp, advantages, mask, *, clip_low=0.2, clip_high=0.2,
                                dual_clip=None, temperature=1.0, entropy_coef=0.0, ref_logp=None, kl_coef=0.0,
                                kl_estimator="k3", aggregation="token-mean", normalizer=None, weight_grad=True):
    """``ppo_policy_loss`` from the last hidden states and the LM head weight: the same options and
    stats, the logits never materialized. hidden [B, T, H] or [N, H]; labels and the per-token tensors
    [B, T] or [N]. Only the rows of `mask` are computed at all."""
    _check_options(clip_low, clip_high, dual_clip, temperature, kl_estimator, aggregation)
    shape = labels.shape
    for name, value in (("old_logp", old_logp), ("advantages", advantages), ("mask", mask)):
        if value.shape != shape:
            raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(value.shape)}")
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    valid = mask.reshape(-1) > 0
    rows = valid.nonzero().squeeze(-1)
    weights = reference.aggregation_weights(mask, aggregation, normalizer).reshape(-1)[rows]
    logp, entropy = linear_logprobs(flat_hidden.index_select(0, rows), weight, labels.reshape(-1)[rows], temperature,
                                    return_entropy=True, weight_grad=weight_grad)
    terms = reference.ppo_token_losses(
        logp, entropy, old_logp.reshape(-1)[rows].float(), advantages.reshape(-1)[rows].float(),
        None if ref_logp is None else ref_logp.reshape(-1)[rows].float(), clip_low=clip_low, clip_high=clip_high,
        dual_clip=dual_clip, entropy_coef=entropy_coef, kl_coef=kl_coef, kl_estimator=kl_estimator)
    loss = (terms["per_token"] * weights.to(logp.dtype)).sum()
    return loss, reference.ppo_stats(terms, entropy, torch.ones_like(logp, dtype=torch.bool))
