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
import sys

if __name__ == "kernels":
    # This folder was found as a top-level module: Python started in a clone's root puts the root on
    # sys.path first, so `import kernels` (which transformers runs when Hugging Face's `kernels` package
    # is installed) would land here. Hand the name to the real package, or to nothing.
    import importlib.machinery
    import importlib.util
    import os
    import types

    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _elsewhere = [entry for entry in sys.path if os.path.abspath(entry or os.curdir) != _root]
    _spec = importlib.machinery.PathFinder.find_spec(__name__, _elsewhere)
    if _spec is None:
        # Nothing to shadow. What is left behind reads as an empty namespace package (no __file__, no
        # version), which is how transformers recognises a folder on sys.path that is not an install.
        _module = types.ModuleType(__name__, "not installed (a source folder of stepcoder stood in its place)")
        _module.__path__ = []
        _module.__file__ = None
    else:
        _module = importlib.util.module_from_spec(_spec)
    sys.modules[__name__] = _module  # the import statement returns what sys.modules holds after this runs
    if _spec is not None:
        _spec.loader.exec_module(_module)
else:
    from stepcoder.kernels.gae import gae
    from stepcoder.kernels.linear_logprobs import linear_logprobs, ppo_policy_loss_from_hidden
    from stepcoder.kernels.logprobs import logprobs_from_logits
    from stepcoder.kernels.ppo_loss import ppo_policy_loss
    from stepcoder.kernels.value_loss import value_loss
    from stepcoder.kernels.whiten import masked_whiten

    __all__ = ["gae", "linear_logprobs", "logprobs_from_logits", "masked_whiten", "ppo_policy_loss",
               "ppo_policy_loss_from_hidden", "value_loss"]
