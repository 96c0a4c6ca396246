"""The device day's checks in one process (benchmarks/gpu_run.sh runs it): every kernel on the GPU against
the float64 reference, the bf16 GEMM path of the fused LM head (``torch.mm(out_dtype=)``, CUDA only), the
fused LM head's peak memory against eager, and a short training run of the small model on the GPU with
the Triton kernels inside (``--precision auto`` and ``fp32``), whose trained policy's log-probs are then
checked against the CPU reference. Prints one table and writes $OUT/gpu_check.json.

    python benchmarks/gpu_check.py            # on the lent GPU
    python benchmarks/gpu_check.py --dry-run  # the same on the CPU: the Triton interpreter, tiny shapes
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Check:
    name: str
    ok: bool
    figure: str   # what was measured, in words and numbers
    seconds: float


def relative_error(mine: torch.Tensor, exact: torch.Tensor) -> float:
    mine, exact = mine.detach().double(), exact.detach().double()
    return float((mine - exact).norm() / exact.norm().clamp(min=1e-30))


def kernel_checks(device: str, tokens: int, vocab: int, hidden: int) -> list[Check]:
    """Each fused op in bf16 and fp32 against the reference evaluated in float64 on the same inputs."""
    from stepcoder import kernels
    from stepcoder.kernels import reference

    checks = []
    generator = torch.Generator(device="cpu").manual_seed(0)
    rand = lambda *shape: torch.randn(*shape, generator=generator).to(device)  # noqa: E731
    labels = torch.randint(0, vocab, (tokens,), generator=generator).to(device)
    old, advantages = -rand(tokens).abs(), rand(tokens)
    mask = (torch.rand(tokens, generator=generator) > 0.2).float().to(device)
    for dtype, tolerance in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        began = time.perf_counter()
        logits = (2 * rand(tokens, vocab)).to(dtype)
        exact = logits.double().requires_grad_()
        mine = logits.clone().requires_grad_()
        logp, entropy = kernels.logprobs_from_logits(mine, labels, return_entropy=True)
        ref_logp, ref_entropy = reference.logprobs_from_logits(exact, labels, return_entropy=True)
        (logp.sum() + entropy.sum()).backward()
        (ref_logp.sum() + ref_entropy.sum()).backward()
        errors = [relative_error(logp, ref_logp), relative_error(entropy, ref_entropy),
                  relative_error(mine.grad, exact.grad)]
        checks.append(Check(f"log-probs + entropy, fwd+bwd, {str(dtype)[6:]}", max(errors) < tolerance,
                            f"relative errors {', '.join(f'{e:.1e}' for e in errors)} (< {tolerance:g})",
                            time.perf_counter() - began))

        began = time.perf_counter()
        mine = logits.clone().requires_grad_()
        exact = logits.double().requires_grad_()
        loss, _ = kernels.ppo_policy_loss(mine, labels, old, advantages, mask, dual_clip=3.0, entropy_coef=0.01,
                                          ref_logp=old - 0.1, kl_coef=0.05, inplace_backward=False)
        ref_loss, _ = reference.ppo_policy_loss(exact, labels, old.double(), advantages.double(), mask.double(),
                                                dual_clip=3.0, entropy_coef=0.01, ref_logp=old.double() - 0.1,
                                                kl_coef=0.05)
        loss.backward()
        ref_loss.backward()
        errors = [relative_error(loss, ref_loss), relative_error(mine.grad, exact.grad)]
        checks.append(Check(f"PPO loss (dual clip, entropy, k3 KL), fwd+bwd, {str(dtype)[6:]}",
                            max(errors) < tolerance, f"relative errors {', '.join(f'{e:.1e}' for e in errors)}",
                            time.perf_counter() - began))

        began = time.perf_counter()
        states = (0.5 * rand(tokens, hidden)).to(dtype).requires_grad_()
        weight = (0.05 * rand(vocab, hidden)).to(dtype).requires_grad_()
        exact_states, exact_weight = (t.detach().double().requires_grad_() for t in (states, weight))
        logp = kernels.linear_logprobs(states, weight, labels)  # bf16 on CUDA: torch.mm(out_dtype=fp32)
        ref_logp = reference.logprobs_from_logits(exact_states @ exact_weight.t(), labels)
        logp.sum().backward()
        ref_logp.sum().backward()
        errors = [relative_error(logp, ref_logp), relative_error(states.grad, exact_states.grad),
                  relative_error(weight.grad, exact_weight.grad)]
        checks.append(Check(f"LM head + log-prob, fwd+bwd, {str(dtype)[6:]}", max(errors) < tolerance,
                            f"relative errors {', '.join(f'{e:.1e}' for e in errors)}", time.perf_counter() - began))

    began = time.perf_counter()
    rows = max(2, tokens // 64)
    values, old_values, returns = rand(rows, 64), rand(rows, 64), rand(rows, 64)
    value_mask = (torch.rand(rows, 64, generator=generator) > 0.2).float().to(device)
    pairs = [(kernels.value_loss(values, old_values, returns, value_mask)[0],
              reference.value_loss(values.double(), old_values.double(), returns.double(), value_mask.double())[0]),
             (kernels.gae(values, old_values, value_mask)[0],
              reference.gae(values.double(), old_values.double(), value_mask.double())[0]),
             (kernels.masked_whiten(values, value_mask), reference.masked_whiten(values.double(), value_mask.double()))]
    errors = [relative_error(mine, exact) for mine, exact in pairs]
    checks.append(Check("value loss, GAE, whitening (fp32)", max(errors) < 1e-5,
                        f"relative errors {', '.join(f'{e:.1e}' for e in errors)}", time.perf_counter() - began))
    return checks


def memory_check(device: str, tokens: int, vocab: int, hidden: int) -> list[Check]:
    """The fused LM head's peak extra memory against eager's (its point: no [tokens x vocab] logits)."""
    if device != "cuda":
        return [Check("LM head peak memory", True, "skipped: measured on CUDA only", 0.0)]
    from stepcoder import kernels

    began = time.perf_counter()
    states = (0.5 * torch.randn(tokens, hidden, device=device)).to(torch.bfloat16)
    weight = (0.02 * torch.randn(vocab, hidden, device=device)).to(torch.bfloat16)
    labels = torch.randint(0, vocab, (tokens,), device=device)
    peaks = {}
    for name in ("fused", "eager"):
        h, w = states.clone().requires_grad_(), weight.clone().requires_grad_()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        if name == "fused":
            kernels.linear_logprobs(h, w, labels).sum().backward()
        else:
            torch.log_softmax((h @ w.t()).float(), -1).gather(-1, labels[:, None]).sum().backward()
        torch.cuda.synchronize()
        peaks[name] = (torch.cuda.max_memory_allocated() - base) / 2**20
    return [Check(f"LM head peak extra memory, N={tokens}, H={hidden}, V={vocab}", peaks["fused"] < peaks["eager"],
                  f"fused {peaks['fused']:.0f} MiB, eager {peaks['eager']:.0f} MiB", time.perf_counter() - began)]


def training_checks(device: str, dry_run: bool, work: Path) -> list[Check]:
    """A short run of the small model on `device` with the kernels inside, at each precision; then its
    trained policy's response log-probs on `device` (Triton, the run's precision) against the CPU reference."""
    from stepcoder import kernels
    from stepcoder.generation import load_model

    checks = []
    size = ["--total_steps", "1", "--sft_steps", "5", "--n_layer", "1", "--n_embd", "32", "--limit", "8",
            "--max_new_tokens", "16"] if dry_run else ["--total_steps", "4", "--sft_steps", "100", "--limit", "64"]
    for precision in ("auto",) if dry_run else ("auto", "fp32"):  # on a CPU both are fp32
        began = time.perf_counter()
        output = work / f"train-{precision}"
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
        done = subprocess.run([sys.executable, "-m", "stepcoder.train", *size, "--device", device, "--precision",
                               precision, "--data", "builtin", "--eval_data", "none", "--advantage", "grpo",
                               "--problems_per_step", "2", "--rollouts_per_prompt", "4", "--generation_batch_size", "8",
                               "--save_steps", "100", "--output_dir", str(output)], capture_output=True, text=True,
                              env=env, cwd=work)
        if done.returncode != 0:
            checks.append(Check(f"training run, --precision {precision}", False, done.stderr[-600:],
                                time.perf_counter() - began))
            continue
        rows = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
        finite = all(torch.isfinite(torch.tensor(row["policy_loss"])) for row in rows if "policy_loss" in row)
        policy, _ = load_model(str(output / f"checkpoint-{rows[-1]['step']}" / "policy"), device="cpu")
        ids = torch.randint(0, policy.config.vocab_size, (4, 24), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            exact = kernels.reference.logprobs_from_logits(policy.double()(ids).logits[:, :-1], ids[:, 1:])
            policy = policy.float().to(device)
            autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "auto" and device == "cuda")
            with autocast:
                logits = policy(ids.to(device)).logits[:, :-1]
            mine = kernels.logprobs_from_logits(logits, ids[:, 1:].to(device)).cpu()
        tolerance = 5e-2 if precision == "auto" and device == "cuda" else 1e-4
        error = relative_error(mine, exact)
        checks.append(Check(f"training run, --precision {precision}: {len(rows)} steps, then log-probs vs CPU",
                            finite and error < tolerance,
                            f"policy loss finite: {finite}; log-prob relative error {error:.1e} (< {tolerance:g})",
                            time.perf_counter() - began))
    return checks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="on the CPU: the Triton interpreter, tiny shapes")
    args = parser.parse_args(argv)
    if args.dry_run:
        if os.environ.get("TRITON_INTERPRET") != "1":
            sys.exit("error: --dry-run needs TRITON_INTERPRET=1 set before Python starts (gpu_run.sh --dry-run does)")
        device, shapes, memory = "cpu", (8, 300, 16), (8, 300, 16)
    else:
        if not torch.cuda.is_available():
            sys.exit("error: no CUDA device; on a CPU run this with --dry-run")
        device, shapes, memory = "cuda", (1024, 151936, 256), (8192, 151936, 4096)
    where = torch.cuda.get_device_name() if device == "cuda" else "CPU (dry run)"
    import triton

    print(f"{where}: torch {torch.__version__}, triton {triton.__version__}", flush=True)
    with tempfile.TemporaryDirectory() as scratch:
        checks = kernel_checks(device, *shapes) + memory_check(device, *memory) + \
            training_checks(device, args.dry_run, Path(scratch))
    width = max(len(check.name) for check in checks)
    for check in checks:
        print(f"{'ok  ' if check.ok else 'FAIL'} {check.name:<{width}}  {check.figure}  ({check.seconds:.1f} s)")
    out = os.environ.get("OUT")
    if out:
        Path(out, "gpu_check.json").write_text(json.dumps(
            {"device": where, "torch": torch.__version__, "triton": triton.__version__,
             "checks": [asdict(check) for check in checks]}, indent=1))
    return 0 if all(check.ok for check in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
