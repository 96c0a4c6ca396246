"""LM head + log-prob, forward + backward, side by side in one run: stepcoder's ``linear_logprobs``
(no [N x V] logits) vs eager PyTorch (materialized logits), Liger's fused linear cross-entropy and
cut-cross-entropy (when installed), at N=8192, H=4096, V=32256 and 151936, bf16, with peak extra
memory. Skipped without CUDA.

    python -m pytest benchmarks/test_linear_bench.py -s --benchmark-columns=median,iqr,rounds

Targets on one H100 (issue 7): <= 48 ms at V=151936 and <= 10.5 ms at V=32256, peak <= 1.3 GB.
"""
from __future__ import annotations

import pytest
import torch
from conftest import measure_cuda

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU benchmarks need CUDA")

TOKENS, HIDDEN = 8192, 4096


def inputs(vocab: int):
    torch.manual_seed(0)
    hidden = (torch.randn(TOKENS, HIDDEN, device="cuda") * 0.5).to(torch.bfloat16)
    weight = (torch.randn(vocab, HIDDEN, device="cuda") * 0.02).to(torch.bfloat16)
    labels = torch.randint(0, vocab, (TOKENS,), device="cuda")
    return hidden, weight, labels


def run_stepcoder(hidden, weight, labels):
    from stepcoder.kernels import linear_logprobs

    h, w = hidden.detach().requires_grad_(True), weight.detach().requires_grad_(True)
    linear_logprobs(h, w, labels).sum().backward()


def run_eager(hidden, weight, labels):
    h, w = hidden.detach().requires_grad_(True), weight.detach().requires_grad_(True)
    logits = (h @ w.t()).float()
    torch.log_softmax(logits, -1).gather(-1, labels[:, None]).sum().backward()


def run_liger(hidden, weight, labels):
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    h, w = hidden.detach().requires_grad_(True), weight.detach().requires_grad_(True)
    liger_fused_linear_cross_entropy(h, w, labels, reduction="none").sum().backward()


def run_cce(hidden, weight, labels):
    from cut_cross_entropy import linear_cross_entropy

    h, w = hidden.detach().requires_grad_(True), weight.detach().requires_grad_(True)
    linear_cross_entropy(h, w, labels, reduction="none").sum().backward()


IMPLEMENTATIONS = {"stepcoder": run_stepcoder, "eager": run_eager, "liger": run_liger, "cut-cross-entropy": run_cce}
PEERS = {"liger": "liger_kernel", "cut-cross-entropy": "cut_cross_entropy"}


@pytest.mark.parametrize("vocab", [32256, 151936])
@pytest.mark.parametrize("name", list(IMPLEMENTATIONS))
def test_lm_head_logprob_forward_backward(benchmark, name, vocab):
    if name in PEERS:
        pytest.importorskip(PEERS[name])
    args = inputs(vocab)
    measure_cuda(benchmark, IMPLEMENTATIONS[name], args, rounds=5, warmup=2)
    benchmark.group = f"lm head + logprob fwd+bwd N={TOKENS} H={HIDDEN} V={vocab} bf16"


def test_matches_eager_on_gpu():
    from stepcoder.kernels import linear_logprobs, reference

    hidden, weight, labels = inputs(32256)
    h, w = hidden[:1024].detach().requires_grad_(True), weight.detach().requires_grad_(True)
    logp = linear_logprobs(h, w, labels[:1024])
    logp.sum().backward()
    exact_h, exact_w = h.detach().float().requires_grad_(True), w.detach().float().requires_grad_(True)
    expected = reference.logprobs_from_logits(exact_h @ exact_w.t(), labels[:1024])
    expected.sum().backward()
    assert (logp - expected).abs().max().item() < 1e-3
    assert ((h.grad.float() - exact_h.grad).norm() / exact_h.grad.norm()).item() < 2e-2
    assert ((w.grad.float() - exact_w.grad).norm() / exact_w.grad.norm()).item() < 2e-2
