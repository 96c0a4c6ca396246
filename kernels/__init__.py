"""Fused Triton kernels for the masked PPO math, imported as ``stepcoder.kernels``.

    logp = logprobs_from_logits(logits, labels, temperature=1.0)
    logp, entropy = logprobs_from_logits(logits, labels, temperature=1.0, return_entropy=True)
    loss, stats = ppo_policy_loss(logits, labels, old_logp, advantages, mask, clip_low=0.2, ...)
    vloss, vstats = value_loss(values, old_values, returns, mask, clip=0.2)
    advantages, returns = gae(rewards, values, mask, gamma=1.0, lam=0.95)
    whitened = masked_whiten(x, mask, shift_mean=True)
    logp = linear_logprobs(hidden, weight, labels, temperature=1.0)      # from hidden states + LM head
    loss, stats = ppo_policy_loss_from_hidden(hidden, weight, labels, old_logp, advantages, mask, ...)

CUDA tensors run the Triton kernels; CPU tensors run them under the Triton interpreter when
TRITON_INTERPRET=1 (tests) and the PyTorch reference (``stepcoder.kernels.reference``) otherwise.
"""
from stepcoder.kernels.gae import gae
from stepcoder.kernels.linear_logprobs import linear_logprobs, ppo_policy_loss_from_hidden
from stepcoder.kernels.logprobs import logprobs_from_logits
from stepcoder.kernels.ppo_loss import ppo_policy_loss
from stepcoder.kernels.value_loss import value_loss
from stepcoder.kernels.whiten import masked_whiten

__all__ = ["gae", "linear_logprobs", "logprobs_from_logits", "masked_whiten", "ppo_policy_loss",
           "ppo_policy_loss_from_hidden", "value_loss"]
