"""stepcoder.kernels against float64 references on fresh random inputs (through the Triton
interpreter on CPU): shapes, dtypes, strides, temperatures, extreme logits, masks, gradients."""
from __future__ import annotations

import importlib
import math

import pytest
import torch

from stepcoder import kernels
from stepcoder.kernels import reference

gae_module = importlib.import_module("stepcoder.kernels.gae")  # the module, not the function it exports
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # on CPU the kernels run in the Triton interpreter


@pytest.fixture(autouse=True)
def on_device():
    """Every tensor a test makes lives where the kernels run (a GPU when there is one)."""
    torch.set_default_device(DEVICE)
    yield
    torch.set_default_device(None)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Frobenius norm of the difference over that of the reference (bf16 makes elementwise atol fragile)."""
    return float((actual.double() - expected).norm() / expected.norm().clamp(min=1e-30))


def grad_tolerance(dtype: torch.dtype) -> float:
    return 1e-4 if dtype == torch.float32 else 2e-2  # gradients come back in the logits' dtype


def make_logits(shape, dtype, regime: str, generator=None) -> torch.Tensor:
    x = torch.randn(shape, generator=generator)
    if regime == "large":
        x = x * 100
    elif regime == "negative":
        x = x * 2 - 50  # all far below 0: a phantom 0-column would dominate the softmax
    return x.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("vocab, regime, temperature", [(37, "normal", 1.0), (1000, "large", 0.7),
                                                        (5003, "negative", 1.3)])
@pytest.mark.parametrize("layout", ["strided", "flat"])
def test_logprobs_and_entropy_match_float64(dtype, vocab, regime, temperature, layout):
    if layout == "strided":
        full = make_logits((2, 4, vocab), dtype, regime)
        labels = torch.randint(0, vocab, (2, 3))
        labels[0, 0] = vocab - 1
        leaf = full.clone().requires_grad_(True)
        logits = leaf[:, :-1]  # read through its strides, never copied
        assert not logits.is_contiguous()
    else:
        leaf = make_logits((5, vocab), dtype, regime).requires_grad_(True)
        logits, labels = leaf, torch.randint(0, vocab, (5,))
    logp, entropy = kernels.logprobs_from_logits(logits, labels, temperature, return_entropy=True)
    assert logp.dtype == torch.float32 and logp.shape == labels.shape
    weights = torch.randn(labels.shape), torch.randn(labels.shape)
    (logp * weights[0] + entropy * weights[1]).sum().backward()

    exact = leaf.detach().double().requires_grad_(True)
    view = exact[:, :-1] if layout == "strided" else exact
    ref_logp, ref_entropy = reference.logprobs_from_logits(view, labels, temperature, return_entropy=True)
    (ref_logp * weights[0] + ref_entropy * weights[1]).sum().backward()
    scale = max(1.0, float(view.detach().abs().max()) / temperature)
    torch.testing.assert_close(logp.double(), ref_logp, atol=2e-6 * scale, rtol=1e-5)
    torch.testing.assert_close(entropy.double(), ref_entropy, atol=2e-6 * scale, rtol=1e-5)
    assert leaf.grad.dtype == dtype
    assert relative_error(leaf.grad, exact.grad) < grad_tolerance(dtype)


def test_logprobs_with_minus_infinity_logits_have_no_nan():
    logits = torch.randn(4, 300)
    logits[:, 100:] = float("-inf")  # a masked vocabulary
    labels = torch.randint(0, 100, (4,))
    logp, entropy = kernels.logprobs_from_logits(logits, labels, return_entropy=True)
    ref_logp, ref_entropy = reference.logprobs_from_logits(logits.double(), labels, return_entropy=True)
    assert torch.isfinite(logp).all() and torch.isfinite(entropy).all()
    torch.testing.assert_close(logp.double(), ref_logp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(entropy.double(), ref_entropy, atol=1e-5, rtol=1e-5)


def test_logprob_gradient_alone_and_entropy_alone():
    leaf = torch.randn(3, 200, requires_grad=True)
    labels = torch.randint(0, 200, (3,))
    kernels.logprobs_from_logits(leaf, labels, 0.8).sum().backward()
    exact = leaf.detach().double().requires_grad_(True)
    reference.logprobs_from_logits(exact, labels, 0.8).sum().backward()
    assert relative_error(leaf.grad, exact.grad) < 1e-5
    leaf.grad = None
    kernels.logprobs_from_logits(leaf, labels, return_entropy=True)[1].sum().backward()
    exact.grad = None
    reference.logprobs_from_logits(exact, labels, return_entropy=True)[1].sum().backward()
    assert relative_error(leaf.grad, exact.grad) < 1e-5


POLICY_OPTIONS = [
    {},
    {"dual_clip": 3.0, "entropy_coef": 0.01, "aggregation": "seq-mean-token-mean"},
    {"kl_coef": 0.1, "kl_estimator": "k3", "aggregation": "seq-mean-token-sum", "temperature": 0.6},
    {"kl_coef": 0.2, "kl_estimator": "k1", "clip_low": 0.1, "clip_high": 0.28, "dual_clip": 2.0},
    {"kl_coef": 0.05, "kl_estimator": "k2", "entropy_coef": 0.02, "normalizer": 50.0},
]


def policy_inputs(dtype, vocab=700, batch=3, steps=5, temperature=1.0):
    full = make_logits((batch, steps + 1, vocab), dtype, "normal") * 3
    labels = torch.randint(0, vocab, (batch, steps))
    mask = torch.rand(batch, steps) > 0.3
    mask[1] = False  # an all-masked sequence
    with torch.no_grad():
        current = reference.logprobs_from_logits(full[:, :-1].double(), labels, temperature)
    old = (current + torch.randn(batch, steps) * 0.4).float()
    ref = (current + torch.randn(batch, steps) * 0.4).float()
    advantages = torch.randn(batch, steps)
    return full, labels, old, advantages, mask, ref


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("options", POLICY_OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "plain")
@pytest.mark.parametrize("inplace", [None, True, False])
def test_ppo_policy_loss_matches_float64(dtype, options, inplace):
    full, labels, old, advantages, mask, ref = policy_inputs(dtype, temperature=options.get("temperature", 1.0))
    leaf = full.clone().requires_grad_(True)
    loss, stats = kernels.ppo_policy_loss(leaf[:, :-1], labels, old, advantages, mask, ref_logp=ref,
                                          inplace_backward=inplace, **options)
    (3.0 * loss).backward()
    exact = full.double().requires_grad_(True)
    ref_loss, _ = reference.ppo_policy_loss(exact[:, :-1], labels, old.double(), advantages.double(), mask,
                                            ref_logp=ref.double(), **options)
    (3.0 * ref_loss).backward()
    assert abs(loss.item() - ref_loss.item()) <= 1e-5 * max(1.0, abs(ref_loss.item()))
    assert relative_error(leaf.grad, exact.grad) < grad_tolerance(dtype)
    assert float(leaf.grad[:, -1].abs().max()) == 0.0  # the row outside the slice is untouched
    assert float(leaf.grad[1].abs().max()) == 0.0      # masked rows get no gradient
    with torch.no_grad():  # the stats, against the reference at the kernel's own precision
        _, fp32_stats = reference.ppo_policy_loss(full[:, :-1].float(), labels, old, advantages, mask, ref_logp=ref,
                                                  **options)
    assert set(stats) == set(fp32_stats)
    for name, value in stats.items():
        assert abs(float(value) - float(fp32_stats[name])) < 1e-4, name


def test_ppo_first_ratio_is_exactly_one_and_no_clipping():
    full, labels, _, advantages, mask, _ = policy_inputs(torch.bfloat16, vocab=5003)
    logits = full[:, :-1]
    with torch.no_grad():
        old = kernels.logprobs_from_logits(logits, labels)
    loss, stats = kernels.ppo_policy_loss(logits.clone().requires_grad_(True), labels, old, advantages, mask)
    assert float(stats["ratio"]) == 1.0 and float(stats["clipfrac"]) == 0.0 and float(stats["approx_kl"]) == 0.0
    again = kernels.logprobs_from_logits(logits, labels)
    assert torch.equal(old, again)  # deterministic, bit for bit


def test_ppo_loss_with_every_token_masked_is_zero():
    full, labels, old, advantages, _, ref = policy_inputs(torch.float32)
    mask = torch.zeros_like(labels, dtype=torch.bool)
    leaf = full.clone().requires_grad_(True)
    loss, stats = kernels.ppo_policy_loss(leaf[:, :-1], labels, old, advantages, mask, ref_logp=ref, kl_coef=0.1)
    loss.backward()
    assert loss.item() == 0.0 and float(leaf.grad.abs().max()) == 0.0
    assert all(math.isfinite(float(v)) for v in stats.values())


def test_in_place_backward_refuses_logits_another_backward_needs():
    logits = torch.randn(4, 50, requires_grad=True)
    squashed = torch.tanh(logits)  # tanh's backward needs its output, which the loss would overwrite
    loss, _ = kernels.ppo_policy_loss(squashed, torch.randint(0, 50, (4,)), torch.zeros(4), torch.ones(4),
                                      torch.ones(4, dtype=torch.bool))
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_default_in_place_rule_spares_the_callers_leaves_and_reuses_intermediates():
    """By default the gradient overwrites the logits only when autograd owns them: a leaf the caller made
    (or a view of one) keeps its values; a model's output (here hidden @ W) becomes d loss / d logits."""
    full, labels, old, advantages, mask, _ = policy_inputs(torch.float32)
    exact = full.double().requires_grad_(True)
    reference.ppo_policy_loss(exact[:, :-1], labels, old.double(), advantages.double(), mask)[0].backward()
    for make in (lambda leaf: leaf, lambda leaf: leaf[:, :-1], lambda leaf: leaf.view(-1, full.shape[-1])):
        leaf = full.clone().requires_grad_(True)
        logits = make(leaf)
        flat_labels = labels if logits.dim() == 3 else torch.cat([labels, labels[:, :1]], 1).reshape(-1)
        per_token = [t if logits.dim() == 3 else torch.cat([t, torch.zeros_like(t[:, :1])], 1).reshape(-1)
                     for t in (old, advantages, mask)]
        kernels.ppo_policy_loss(logits, flat_labels, *per_token)[0].backward()
        assert torch.equal(leaf.detach(), full), "the caller's leaf was overwritten"
        assert leaf.grad.data_ptr() != leaf.data_ptr()
        assert relative_error(leaf.grad, exact.grad) < grad_tolerance(torch.float32)

    hidden = torch.randn(full.shape[0], full.shape[1], 64, requires_grad=True)
    weight = (torch.randn(64, full.shape[-1]) / 8).requires_grad_(True)
    logits = hidden @ weight  # an intermediate: its memory is autograd's
    loss, _ = kernels.ppo_policy_loss(logits, labels, old, advantages, mask)
    exact = (hidden.detach() @ weight.detach()).double().requires_grad_(True)
    reference.ppo_policy_loss(exact[:, :-1], labels, old.double(), advantages.double(), mask)[0].backward()
    assert relative_error(logits.detach(), exact.grad) < grad_tolerance(torch.float32)  # overwritten in place
    loss.backward()
    exact_hidden = hidden.detach().double().requires_grad_(True)
    exact_weight = weight.detach().double().requires_grad_(True)
    reference.ppo_policy_loss((exact_hidden @ exact_weight)[:, :-1], labels, old.double(), advantages.double(),
                              mask)[0].backward()
    assert relative_error(hidden.grad, exact_hidden.grad) < 1e-4
    assert relative_error(weight.grad, exact_weight.grad) < 1e-4


@pytest.mark.parametrize("clip, normalizer", [(0.2, None), (None, None), (0.5, 100.0)])
def test_value_loss_matches_float64(clip, normalizer):
    values = torch.randn(4, 33, requires_grad=True)
    old = values.detach() + torch.randn(4, 33) * 0.3
    returns, mask = torch.randn(4, 33), torch.rand(4, 33) > 0.4
    loss, stats = kernels.value_loss(values, old, returns, mask, clip=clip, normalizer=normalizer)
    (2 * loss).backward()
    exact = values.detach().double().requires_grad_(True)
    ref_loss, _ = reference.value_loss(exact, old.double(), returns.double(), mask, clip, normalizer)
    (2 * ref_loss).backward()
    assert abs(loss.item() - ref_loss.item()) < 1e-6 * max(1, abs(ref_loss.item()))
    assert relative_error(values.grad, exact.grad) < 1e-6
    _, fp32_stats = reference.value_loss(values.detach(), old, returns, mask, clip, normalizer)
    for name in fp32_stats:
        assert abs(float(stats[name]) - float(fp32_stats[name])) < 1e-5, name


def textbook_gae(rewards, values, gamma, lam):
    """GAE on a sequence with no masked positions, straight from the definition (sum of discounted deltas)."""
    steps = len(rewards)
    deltas = [rewards[t] + gamma * (values[t + 1] if t + 1 < steps else 0.0) - values[t] for t in range(steps)]
    return [sum((gamma * lam) ** (k - t) * deltas[k] for k in range(t, steps)) for t in range(steps)]


def test_gae_reference_skips_masked_positions():
    """Masked positions are skipped: on the valid positions, GAE equals the textbook GAE of the
    sequence with the masked positions removed."""
    rewards, values = torch.randn(5, 12).double(), torch.randn(5, 12).double()
    mask = torch.rand(5, 12) > 0.35
    mask[:, -3:] = False
    advantages, returns = reference.gae(rewards, values, mask, 0.97, 0.9)
    for b in range(5):
        kept = mask[b].nonzero().flatten().tolist()
        expected = textbook_gae(rewards[b, kept].tolist(), values[b, kept].tolist(), 0.97, 0.9)
        assert advantages[b, kept].tolist() == pytest.approx(expected, abs=1e-9)
    torch.testing.assert_close(returns, advantages + values)


@pytest.mark.parametrize("batch, steps, block", [(3, 9, 1024), (2, 70, 16), (4, 33, 8)])
def test_gae_kernel_matches_float64(monkeypatch, batch, steps, block):
    monkeypatch.setattr(gae_module, "MAX_BLOCK_T", block)  # several chunks: the carry between them
    rewards, values = torch.randn(batch, steps), torch.randn(batch, steps)
    mask = torch.rand(batch, steps) > 0.3
    mask[0, -4:] = False
    mask[-1] = False
    advantages, returns = kernels.gae(rewards, values, mask, gamma=0.99, lam=0.95)
    ref_advantages, ref_returns = reference.gae(rewards.double(), values.double(), mask, 0.99, 0.95)
    torch.testing.assert_close(advantages.double(), ref_advantages, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(returns.double(), ref_returns, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shift_mean", [True, False])
def test_masked_whiten_matches_float64_and_statistics(shift_mean):
    x, mask = torch.randn(3, 500) * 4 + 7, torch.rand(3, 500) > 0.5
    out = kernels.masked_whiten(x, mask, shift_mean)
    torch.testing.assert_close(out.double(), reference.masked_whiten(x.double(), mask, shift_mean), atol=1e-5,
                               rtol=1e-5)
    chosen = x.double()[mask]
    expected = (chosen - chosen.mean()) / (chosen.var(unbiased=True) + 1e-8).sqrt()
    if not shift_mean:
        expected = expected + chosen.mean()
    torch.testing.assert_close(out.double()[mask], expected, atol=1e-5, rtol=1e-5)
    assert float(out[~mask].abs().max()) == 0.0
    single = torch.zeros(3, 500, dtype=torch.bool)
    single[0, 0] = True
    assert torch.isfinite(kernels.masked_whiten(x, single)).all()


@pytest.mark.skipif(DEVICE != "cpu", reason="about CPU tensors")
def test_cpu_without_the_interpreter_uses_the_reference(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    logits, labels = torch.randn(3, 40), torch.randint(0, 40, (3,))
    assert torch.equal(kernels.logprobs_from_logits(logits, labels), reference.logprobs_from_logits(logits, labels))
    rewards, values, mask = torch.randn(2, 5), torch.randn(2, 5), torch.ones(2, 5)
    assert torch.equal(kernels.gae(rewards, values, mask)[0], reference.gae(rewards, values, mask)[0])


def test_bad_arguments_raise_clear_errors():
    logits, labels = torch.randn(3, 40), torch.randint(0, 40, (3,))
    ones = torch.ones(3)
    with pytest.raises(ValueError, match="labels must have shape"):
        kernels.logprobs_from_logits(logits, labels[:2])
    with pytest.raises(ValueError, match="temperature"):
        kernels.logprobs_from_logits(logits, labels, temperature=0)
    with pytest.raises(ValueError, match="aggregation"):
        kernels.ppo_policy_loss(logits, labels, ones, ones, ones, aggregation="sum")
    with pytest.raises(ValueError, match="kl_estimator"):
        kernels.ppo_policy_loss(logits, labels, ones, ones, ones, kl_estimator="k4")
    with pytest.raises(ValueError, match="dual_clip"):
        kernels.ppo_policy_loss(logits, labels, ones, ones, ones, dual_clip=0.5)
    with pytest.raises(ValueError, match="advantages must have shape"):
        kernels.ppo_policy_loss(logits, labels, ones, torch.ones(2), ones)
    with pytest.raises(ValueError, match="one \\[B, T\\] shape"):
        kernels.gae(torch.ones(3), torch.ones(3), torch.ones(3))


@pytest.mark.parametrize("inplace", [None, True, False])
def test_causal_lm_logits_with_one_extra_position_are_used_in_place(inplace):
    """[B, T + 1, V] logits with [B, T] labels: position t predicts label t, the last position is
    dropped without a copy, its gradient is 0, and in place (asked for: this is a leaf) the gradient
    reuses the logits' memory."""
    full, labels, old, advantages, mask, _ = policy_inputs(torch.bfloat16)
    leaf = full.clone().requires_grad_(True)
    loss, _ = kernels.ppo_policy_loss(leaf, labels, old, advantages, mask, inplace_backward=inplace)
    loss.backward()
    exact = full.double().requires_grad_(True)
    reference.ppo_policy_loss(exact[:, :-1], labels, old.double(), advantages.double(), mask)[0].backward()
    assert relative_error(leaf.grad, exact.grad) < grad_tolerance(torch.bfloat16)
    assert float(leaf.grad[:, -1].abs().max()) == 0.0
    assert (leaf.grad.data_ptr() == leaf.data_ptr()) == (inplace is True)
    logits = full.clone().requires_grad_(True)
    logp, entropy = kernels.logprobs_from_logits(logits, labels, return_entropy=True)
    (logp.sum() + entropy.sum()).backward()
    exact.grad = None
    ref_logp, ref_entropy = reference.logprobs_from_logits(exact[:, :-1], labels, return_entropy=True)
    (ref_logp.sum() + ref_entropy.sum()).backward()
    torch.testing.assert_close(logp.double(), ref_logp.detach(), atol=1e-4, rtol=1e-5)
    assert relative_error(logits.grad, exact.grad) < grad_tolerance(torch.bfloat16)
