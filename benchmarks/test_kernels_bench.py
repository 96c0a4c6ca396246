"""The fused PPO loss and GAE on a GPU, side by side with eager PyTorch, torch.compile and Liger's
``triton_grpo_loss`` (when installed): N = 8192 tokens (8 x 1024), V = 32256 and 151936, bf16,
forward + backward, with peak extra memory. Skipped without CUDA.

    python -m pytest benchmarks/test_kernels_bench.py -s --benchmark-columns=median,iqr,rounds

Targets on one H100 (issue 4): fused PPO loss at V=151936 <= 2.0 ms with <= 64 MiB extra memory;
GAE for B=64, T=1024 <= 0.2 ms. Figures: benchmarks/RESULTS.md.
"""
from __future__ import annotations

import pytest
import torch
from conftest import measure_cuda

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU benchmarks need CUDA")

BATCH, STEPS = 8, 1024
VOCABS = [32256, 151936]


def eager_ppo(logits, labels, old, advantages, mask, eps=0.2):
    logp_all = torch.log_softmax(logits.float(), dim=-1)
    logp = logp_all.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    ratio = torch.exp(logp - old)
    loss = torch.maximum(-advantages * ratio, -advantages * ratio.clamp(1 - eps, 1 + eps))
    return (loss * mask).sum() / mask.sum().clamp(min=1), entropy


compiled_ppo = torch.compile(eager_ppo) if torch.cuda.is_available() else None


def inputs(vocab: int):
    torch.manual_seed(0)
    logits = torch.randn(BATCH, STEPS + 1, vocab, device="cuda", dtype=torch.bfloat16)
    labels = torch.randint(0, vocab, (BATCH, STEPS), device="cuda")
    old = -torch.rand(BATCH, STEPS, device="cuda") * 5
    sequence_advantage = torch.randn(BATCH, device="cuda")
    advantages = sequence_advantage[:, None].expand(BATCH, STEPS).contiguous()
    mask = (torch.rand(BATCH, STEPS, device="cuda") > 0.3).float()
    return logits, labels, old, sequence_advantage, advantages, mask


def run_stepcoder(logits, labels, old, _, advantages, mask):
    from stepcoder.kernels import ppo_policy_loss

    leaf = logits.detach().requires_grad_(True)  # stands in for a model's output, which is overwritten by default
    loss, _ = ppo_policy_loss(leaf, labels, old, advantages, mask,  # [B, T+1, V]: the shift costs no copy
                              inplace_backward=True)
    loss.backward()


def run_eager(logits, labels, old, _, advantages, mask):
    leaf = logits[:, :-1].detach().requires_grad_(True)
    eager_ppo(leaf, labels, old, advantages, mask)[0].backward()


def run_compiled(logits, labels, old, _, advantages, mask):
    leaf = logits[:, :-1].detach().requires_grad_(True)
    compiled_ppo(leaf, labels, old, advantages, mask)[0].backward()


def run_liger(logits, labels, old, sequence_advantage, _, mask):
    from liger_kernel.transformers.grpo_loss import triton_grpo_loss

    leaf = logits.detach().requires_grad_(True)
    out = triton_grpo_loss(leaf, old, None, labels, sequence_advantage, mask.to(torch.int32), temperature=1.0,
                           beta=0.0, eps_low=0.2, eps_high=0.2, inplace=True, loss_type="grpo", reduce=True)
    (out[0] if isinstance(out, tuple) else out).backward()


IMPLEMENTATIONS = {"stepcoder": run_stepcoder, "eager": run_eager, "torch.compile": run_compiled, "liger": run_liger}


@pytest.mark.parametrize("vocab", VOCABS)
@pytest.mark.parametrize("name", list(IMPLEMENTATIONS))
def test_ppo_loss_forward_backward(benchmark, name, vocab):
    if name == "liger":
        pytest.importorskip("liger_kernel")
    args = inputs(vocab)
    measure_cuda(benchmark, IMPLEMENTATIONS[name], args)
    benchmark.group = f"ppo loss fwd+bwd N={BATCH * STEPS} V={vocab} bf16"


def test_ppo_loss_matches_eager_on_gpu():
    from stepcoder.kernels import ppo_policy_loss, reference

    logits, labels, old, _, advantages, mask = inputs(32256)
    mine = logits.detach().clone().requires_grad_(True)
    loss, _ = ppo_policy_loss(mine, labels, old, advantages, mask)
    loss.backward()
    exact = logits.detach().float().requires_grad_(True)
    ref_loss, _ = reference.ppo_policy_loss(exact[:, :-1], labels, old, advantages, mask)
    ref_loss.backward()
    assert abs(loss.item() - ref_loss.item()) < 1e-4
    error = (mine.grad.float() - exact.grad).norm() / exact.grad.norm()
    assert error < 2e-2


def gae_loop(rewards, values, gamma=1.0, lam=0.95):
    """The per-time-step Python loop of TRL / OpenRLHF."""
    last, advantages = 0, []
    steps = rewards.shape[1]
    for t in reversed(range(steps)):
        next_value = values[:, t + 1] if t < steps - 1 else 0.0
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = delta + gamma * lam * last
        advantages.append(last)
    return torch.stack(advantages[::-1], 1)


@pytest.mark.parametrize("name", ["stepcoder", "python-loop"])
def test_gae(benchmark, name):
    from stepcoder.kernels import gae

    rewards, values = torch.randn(64, 1024, device="cuda"), torch.randn(64, 1024, device="cuda")
    mask = torch.ones(64, 1024, device="cuda", dtype=torch.bool)
    function = (lambda: gae(rewards, values, mask)) if name == "stepcoder" else (lambda: gae_loop(rewards, values))
    if name == "stepcoder":
        torch.testing.assert_close(gae(rewards, values, mask)[0], gae_loop(rewards, values), atol=1e-3, rtol=1e-4)

    def timed():
        function()
        torch.cuda.synchronize()

    benchmark.pedantic(timed, rounds=20 if name == "stepcoder" else 3, warmup_rounds=1)
    benchmark.group = "GAE B=64 T=1024"
