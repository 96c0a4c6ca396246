"""Log-probs from hidden states + LM head (no [N x V] logits) against float64 references: values,
entropy, both gradients, vocabularies that are not a tile multiple, bf16 and fp32, several token
chunks, a frozen head, masked rows, determinism, and the PPO loss built on it."""
from __future__ import annotations

import importlib

import pytest
import torch

from stepcoder import kernels
from stepcoder.kernels import reference

linear_module = importlib.import_module("stepcoder.kernels.linear_logprobs")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def on_device():
    torch.set_default_device(DEVICE)
    yield
    torch.set_default_device(None)


def relative_error(actual, expected) -> float:
    return float((actual.double() - expected).norm() / expected.norm().clamp(min=1e-30))


def inputs(rows, hidden_size, vocab, dtype):
    hidden = (torch.randn(rows, hidden_size) * 2).to(dtype)
    weight = (torch.randn(vocab, hidden_size) * 0.5).to(dtype)
    labels = torch.randint(0, vocab, (rows,))
    labels[0] = vocab - 1
    return hidden, weight, labels


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("vocab, temperature", [(301, 1.0), (1000, 0.7)])
def test_values_entropy_and_both_gradients_match_float64(monkeypatch, dtype, tolerance, vocab, temperature):
    monkeypatch.setattr(linear_module, "CHUNK_BYTES", vocab * 4 * 3)  # forward: chunks of 3 tokens
    monkeypatch.setattr(linear_module, "SLAB_BYTES", 7 * 4 * 100)     # backward: slabs of 100 columns
    hidden, weight, labels = inputs(7, 32, vocab, dtype)
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    logp, entropy = kernels.linear_logprobs(h, w, labels, temperature, return_entropy=True)
    upstream = torch.randn(7), torch.randn(7)
    (logp * upstream[0] + entropy * upstream[1]).sum().backward()
    h64, w64 = hidden.double().requires_grad_(True), weight.double().requires_grad_(True)
    ref_logp, ref_entropy = reference.logprobs_from_logits(h64 @ w64.t(), labels, temperature, return_entropy=True)
    (ref_logp * upstream[0] + ref_entropy * upstream[1]).sum().backward()
    scale = float((h64 @ w64.t()).detach().abs().max()) / temperature
    torch.testing.assert_close(logp.double(), ref_logp.detach(), atol=1e-5 * max(scale, 1), rtol=1e-5)
    torch.testing.assert_close(entropy.double(), ref_entropy.detach(), atol=1e-5 * max(scale, 1), rtol=1e-5)
    assert h.grad.dtype == dtype and w.grad.dtype == dtype
    assert relative_error(h.grad, h64.grad) < tolerance
    assert relative_error(w.grad, w64.grad) < tolerance


def test_frozen_head_and_determinism():
    hidden, weight, labels = inputs(5, 16, 257, torch.float32)
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    kernels.linear_logprobs(h, w, labels, weight_grad=False).sum().backward()
    assert h.grad is not None and w.grad is None
    first = kernels.linear_logprobs(hidden, weight, labels)
    assert torch.equal(first, kernels.linear_logprobs(hidden, weight, labels))  # bit for bit


@pytest.mark.parametrize("options", [{}, {"dual_clip": 3.0, "entropy_coef": 0.01, "kl_coef": 0.1,
                                          "aggregation": "seq-mean-token-mean", "temperature": 0.8}])
def test_ppo_loss_from_hidden_equals_the_loss_from_logits(options):
    batch, steps, hidden_size, vocab = 2, 5, 24, 333
    hidden = torch.randn(batch, steps, hidden_size)
    weight = torch.randn(vocab, hidden_size) * 0.3
    labels = torch.randint(0, vocab, (batch, steps))
    mask = torch.rand(batch, steps) > 0.3
    mask[1, :2] = False
    with torch.no_grad():
        current = reference.logprobs_from_logits(hidden.double() @ weight.double().t(), labels,
                                                 options.get("temperature", 1.0))
    old = (current + 0.3 * torch.randn(batch, steps)).float()
    ref = (current + 0.3 * torch.randn(batch, steps)).float()
    advantages = torch.randn(batch, steps)
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    loss, stats = kernels.ppo_policy_loss_from_hidden(h, w, labels, old, advantages, mask, ref_logp=ref, **options)
    loss.backward()
    h64, w64 = hidden.double().requires_grad_(True), weight.double().requires_grad_(True)
    ref_loss, ref_stats = reference.ppo_policy_loss(h64 @ w64.t(), labels, old.double(), advantages.double(), mask,
                                                    ref_logp=ref.double(), **options)
    ref_loss.backward()
    assert abs(loss.item() - ref_loss.item()) < 1e-5 * max(1.0, abs(ref_loss.item()))
    assert relative_error(h.grad, h64.grad) < 1e-4 and relative_error(w.grad, w64.grad) < 1e-4
    assert float(h.grad[~mask].abs().max()) == 0.0  # masked rows are never computed
    for name in ("entropy", "ratio", "approx_kl"):
        assert abs(float(stats[name]) - float(ref_stats[name])) < 1e-4, name


def test_bad_shapes_are_refused():
    hidden, weight, labels = inputs(4, 8, 50, torch.float32)
    with pytest.raises(ValueError, match="weight \\[V, H\\]"):
        kernels.linear_logprobs(hidden, weight[:, :4], labels)
    with pytest.raises(ValueError, match="labels"):
        kernels.linear_logprobs(hidden, weight, labels[:2])
