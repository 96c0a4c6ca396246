"""A roofline model of the fused ops at the anchor shapes (../shared/ANCHORS.md): what each operation
cannot avoid moving and computing, what this package's design moves and computes (step by step, from
the kernels' own tiling constants), and the floors those give on an H100 and an H200, beside the
anchors' measured times on one H100. A model, not a measurement: the GPU timings are pending
(benchmarks/gpu_run.sh).

    python benchmarks/roofline.py        # the markdown table benchmarks/RESULTS.md quotes
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from stepcoder.kernels.linear_logprobs import SLAB_BYTES, chunk_tokens


@dataclass(frozen=True)
class Machine:
    name: str
    bandwidth: float  # bytes/s of HBM
    flops: float      # dense bf16 FLOP/s


MACHINES = (Machine("H100 SXM", 3.35e12, 989e12), Machine("H200", 4.8e12, 989e12),
            Machine("H100 as measured (ANCHORS.md: 2 GiB copy, 8192^3 matmul)", 2.97e12, 757e12))

# Measured on one H100 (ANCHORS.md, 2026-11-26), ms, fwd + bwd.
ANCHOR_MS = {("ppo", 151936): {"eager": 61.16, "torch.compile": 14.17, "Liger": 2.52},
             ("ppo", 32256): {"eager": 13.17, "torch.compile": 2.70, "Liger": 1.10},
             ("lm_head", 151936): {"eager": 61.85, "Liger FLCE": 97.29, "cut-cross-entropy": 61.48},
             ("lm_head", 32256): {"eager": 12.87, "Liger FLCE": 14.79, "cut-cross-entropy": 20.75}}


@dataclass(frozen=True)
class Op:
    name: str
    key: tuple[str, int]
    need_bytes: float    # what the operation cannot avoid moving to or from HBM
    need_flops: float
    design_bytes: float  # what this package's kernels move, modelled step by step
    design_flops: float
    note: str

    def floor_ms(self, machine: Machine, design: bool = False) -> float:
        moved, work = (self.design_bytes, self.design_flops) if design else (self.need_bytes, self.need_flops)
        return 1e3 * max(moved / machine.bandwidth, work / machine.flops)


def ppo_loss(tokens: int, vocab: int, itemsize: int = 2, l2_hits: bool = True) -> Op:
    """``ppo_policy_loss`` from bf16 logits, forward and backward. Unavoidable: read the logits once and
    write their gradient once (the gradient formed in the forward pass), plus a few floats per token.
    Design: ``_ppo_forward_kernel`` reads each row twice (online statistics, then the gradient) and
    writes the gradient over the logits; the second read hits L2 while the rows in flight fit
    (``L2_BUDGET``), else it comes from HBM. Backward only scales the gradient when the upstream one is
    not 1 (a loss summed as is: never)."""
    elements = tokens * vocab
    per_token = tokens * (8 + 4 * 4 + 1 + 6 * 4)  # labels, old log-p, advantage, weight, valid; 6 outputs
    need = 2 * itemsize * elements + per_token
    design = (2 if l2_hits else 3) * itemsize * elements + per_token
    flops = 2 * 8 * elements  # exp, scale, max/sum updates: about 8 per element per pass, two passes
    return Op(f"PPO loss from logits, N={tokens}, V={vocab:,}, bf16" + ("" if l2_hits else " (no L2 reuse)"),
              ("ppo", vocab), need, flops / 2, design, flops,
              "memory-bound; the second pass over a row reads L2" if l2_hits else "second pass from HBM")


def lm_head(tokens: int, hidden: int, vocab: int, itemsize: int = 2) -> Op:
    """``linear_logprobs`` (LM head + log-prob), forward and backward, bf16 weights and hidden states.
    Unavoidable: one forward GEMM and two backward GEMMs (6 N H V FLOPs), reading hidden and the weight
    once and writing their gradients once. Design (kernels/linear_logprobs.py): forward in token chunks
    of ``chunk_tokens(V)``: each chunk's GEMM reads the whole weight and writes fp32 logits that the row
    kernel reads back; backward in vocabulary slabs of SLAB_BYTES: each slab recomputes its logits for
    all tokens (a fourth GEMM), the row kernel turns them into dZ in place (fp32 read and write), dZ is
    cast to bf16, then dH accumulates in fp32 and dW is written for the slab."""
    n, h, v = tokens, hidden, vocab
    gemm = 2 * n * h * v
    need_bytes = 2 * itemsize * (n * h + v * h)
    chunk = chunk_tokens(v)
    chunks = math.ceil(n / chunk)
    forward = chunks * (v * h * itemsize) + n * h * itemsize + 2 * (n * v * 4)  # W per chunk; logits out, back
    slab = max(1, SLAB_BYTES // (n * 4))
    slabs = math.ceil(v / slab)
    per_slab = lambda width: (n * h * itemsize + width * h * itemsize  # noqa: E731  logits GEMM inputs
                              + n * width * 4                           # its fp32 output
                              + 2 * n * width * 4                       # row kernel: dZ in place
                              + n * width * (4 + itemsize)              # cast to bf16
                              + n * width * itemsize + width * h * itemsize + 2 * n * h * 4  # dH += dZ W
                              + n * width * itemsize + n * h * itemsize + width * h * itemsize)  # dW
    backward = sum(per_slab(min(slab, v - start)) for start in range(0, v, slab))
    return Op(f"LM head + log-prob, N={n}, H={h}, V={v:,}, bf16", ("lm_head", v), need_bytes, 3 * gemm,
              forward + backward, 4 * gemm,
              f"compute-bound; forward chunks of {chunk} tokens read the weight {chunks}x, backward {slabs} slabs")


def rows() -> list[Op]:
    return [ppo_loss(8192, 151936), ppo_loss(8192, 151936, l2_hits=False), ppo_loss(8192, 32256),
            lm_head(8192, 4096, 151936), lm_head(8192, 4096, 32256)]


def markdown() -> str:
    head = ("| operation | unavoidable GB | design GB | design / unavoidable traffic | unavoidable TFLOP | "
            "design / unavoidable FLOPs | " + " | ".join(f"floor on {m.name} (ms)" for m in MACHINES[:2])
            + " | design's floor on H100 SXM (ms) | measured on one H100 (ms, ANCHORS.md) | note |")
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for op in rows():
        anchors = ", ".join(f"{name} {ms}" for name, ms in ANCHOR_MS.get(op.key, {}).items())
        floors = " | ".join(f"{op.floor_ms(m):.2f}" for m in MACHINES[:2])
        lines.append(f"| {op.name} | {op.need_bytes / 1e9:.2f} | {op.design_bytes / 1e9:.2f} | "
                     f"{op.design_bytes / op.need_bytes:.2f} | {op.need_flops / 1e12:.2f} | "
                     f"{op.design_flops / op.need_flops:.2f} | {floors} | {op.floor_ms(MACHINES[0], True):.2f} | "
                     f"{anchors} | {op.note} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown())
