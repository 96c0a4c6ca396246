"""Every Triton launch the public ops make, compiled for real GPUs on a machine without one.

Triton compiles for a named target with no device present: the ptxas and cuobjdump its wheel bundles
take a kernel down to a cubin and read its resource use. Here the public ops
(``stepcoder.kernels``) run on CPU tensors with their Triton path forced on, under a stand-in
driver that names the target GPU; each launch is compiled (Triton's own argument binding and
specialization, as on the day) instead of run. Nothing is listed by hand, so a new kernel, dtype or
constexpr reaches the check by being used.

    python tests/aot_compile.py     # the table: kernel, dtype, vocabularies, target, registers, spills, shared memory

Run without TRITON_INTERPRET (the kernels must be JIT functions, not the interpreter's); exits 1 on a
compile error, a spill or shared memory over the target's limit. tests/test_kernels_compile.py runs it.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import importlib
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.runtime.driver import driver
from triton.runtime.jit import JITFunction

# Architectures compiled for, with the most shared memory one block may use (bytes, opted in): A100,
# H100/H200 and B200.
TARGETS = {80: 163 * 1024, 90: 227 * 1024, 100: 227 * 1024}
VOCABS = (32256, 128256, 151936, 152064)  # DeepSeek-Coder, Llama 3, Qwen2.5 (Coder) 7B, Qwen2.5 (Coder) 32B
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MODULES = ("logprobs", "ppo_loss", "linear_logprobs", "gae", "value_loss", "whiten")
TOOLS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


@dataclass
class Launch:
    """One compiled specialization of a kernel for one target, and the work that launched it."""

    kernel: str
    dtype: str           # of its first tensor argument
    constexprs: tuple[tuple[str, object], ...]
    warps: int
    arch: int
    registers: int
    spill_bytes: int     # local memory per thread (STACK + LOCAL): registers spilled
    shared_bytes: int    # static + dynamic shared memory per block
    vocabs: set[int]

    def problems(self) -> list[str]:
        said = f"{self.kernel} ({self.dtype}, {dict(self.constexprs)}, {self.warps} warps) on sm_{self.arch}"
        found = []
        if self.spill_bytes:
            found.append(f"{said}: spills {self.spill_bytes} bytes per thread to local memory")
        if self.shared_bytes > TARGETS[self.arch]:
            found.append(f"{said}: {self.shared_bytes} bytes of shared memory, over sm_{self.arch}'s "
                         f"{TARGETS[self.arch]}")
        return found


class TargetDriver:
    """Stands in for the CUDA driver where Triton asks which device and target it compiles for."""

    def __init__(self, arch: int):
        self.target = GPUTarget("cuda", arch, 32)

    def get_current_device(self) -> int:
        return self.target.arch  # a cache key of its own per architecture

    def get_current_stream(self, device=None) -> int:
        return 0

    def get_current_target(self) -> GPUTarget:
        return self.target

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")


def resources(cubin: bytes) -> dict[str, int]:
    """REG, STACK, LOCAL and SHARED (static) of the one function in `cubin`, read by cuobjdump."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        done = subprocess.run([os.path.join(TOOLS, "cuobjdump"), "--dump-resource-usage", file.name],
                              capture_output=True, text=True, check=True)
    line = next(line for line in done.stdout.splitlines() if "REG:" in line)
    return {key: int(value) for key, value in re.findall(r"(REG|STACK|LOCAL|SHARED):(\d+)", line)}


@contextlib.contextmanager
def compiling_for(arch: int, record: list) -> Iterator[None]:
    """Within: every kernel launch compiles for sm_`arch` (nothing runs) and is appended to `record`
    as (JITFunction, bound constexprs, CompiledKernel); the public ops take their Triton path on CPU
    tensors. Everything is put back on exit."""
    launch = JITFunction.run
    modules = [importlib.import_module(f"stepcoder.kernels.{name}") for name in MODULES]
    dispatch = [(module, module.use_triton) for module in modules if hasattr(module, "use_triton")]
    active = driver._active

    def compile_instead(self, *args, grid, warmup, **kwargs):
        kernel = launch(self, *args, grid=grid, warmup=True, **kwargs)
        names = {p.name for p in self.params}
        bound = inspect.signature(self.fn).bind(*args, **{k: v for k, v in kwargs.items() if k in names}).arguments
        constexprs = tuple((p.name, bound[p.name]) for p in self.params if p.is_constexpr and p.name in bound)
        dtype = next(value.dtype for value in bound.values() if isinstance(value, torch.Tensor))
        record.append((self, dtype, constexprs, kernel))
        return kernel

    JITFunction.run = compile_instead
    for module, _ in dispatch:
        module.use_triton = lambda tensor: True
    driver.set_active(TargetDriver(arch))
    try:
        yield
    finally:
        JITFunction.run = launch
        for module, original in dispatch:
            module.use_triton = original
        driver._active = active


def exercise(dtype: torch.dtype, vocab: int) -> None:
    """Every public op, forward and backward, with each option that selects a kernel or a constexpr."""
    from stepcoder import kernels

    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, vocab, (2, 3), generator=generator)
    per_token = lambda: torch.randn(2, 3, generator=generator)  # noqa: E731
    mask = torch.ones(2, 3)

    def logits(grad: bool = True) -> torch.Tensor:
        return torch.randn(2, 4, vocab, generator=generator).to(dtype).requires_grad_(grad)

    for entropy in (False, True):
        result = kernels.logprobs_from_logits(logits(), labels, return_entropy=entropy)
        sum(part.sum() for part in (result if entropy else (result,))).backward()
    options = [{}, {"dual_clip": 3.0}, {"entropy_coef": 0.01}] + \
        [{"ref_logp": per_token(), "kl_coef": 0.1, "kl_estimator": name} for name in ("k1", "k2", "k3")]
    for option in options:
        loss, _ = kernels.ppo_policy_loss(logits(), labels, per_token(), per_token(), mask, **option)
        loss.backward()
    with torch.no_grad():
        kernels.ppo_policy_loss(logits(grad=False), labels, per_token(), per_token(), mask)
    hidden = torch.randn(6, 64, generator=generator).to(dtype).requires_grad_()
    weight = torch.randn(vocab, 64, generator=generator).to(dtype).requires_grad_()
    logp, entropy = kernels.linear_logprobs(hidden, weight, labels.reshape(-1), return_entropy=True)
    (logp.sum() + entropy.sum()).backward()
    loss, _ = kernels.ppo_policy_loss_from_hidden(hidden.view(2, 3, 64), weight, labels, per_token(), per_token(),
                                                  mask, entropy_coef=0.01)
    loss.backward()


def exercise_small_ops(dtype: torch.dtype) -> None:
    """The ops on per-token values (no vocabulary): value loss, GAE, whitening."""
    from stepcoder import kernels

    generator = torch.Generator().manual_seed(0)
    values = lambda: torch.randn(4, 50, generator=generator).to(dtype)  # noqa: E731
    mask = torch.ones(4, 50)
    for clip in (None, 0.2):
        loss, _ = kernels.value_loss(values().requires_grad_(), values(), values(), mask, clip=clip)
        loss.backward()
    kernels.gae(values(), values(), mask)
    for shift in (False, True):
        kernels.masked_whiten(values(), mask, shift_mean=shift)


def compile_all(arches=tuple(TARGETS), vocabs=VOCABS, dtypes=DTYPES, extra=None) -> list[Launch]:
    """Every launch of `exercise` and `exercise_small_ops` (and `extra(dtype)`), compiled for each
    architecture; one row per kernel specialization and target."""
    table: dict[tuple, Launch] = {}
    measured: dict[str, dict[str, int]] = {}
    for arch in arches:
        for dtype in dtypes:
            for vocab in (*vocabs, None):
                record: list = []
                with compiling_for(arch, record):
                    if vocab is None:
                        if dtype != torch.float16:  # the trainer's per-token values are fp32 (bf16 critics)
                            exercise_small_ops(dtype)
                        if extra is not None:
                            extra(dtype)
                    else:
                        exercise(dtype, vocab)
                for function, data_dtype, constexprs, kernel in record:
                    cubin = kernel.asm["cubin"]
                    digest = hashlib.sha256(cubin).hexdigest()
                    if digest not in measured:
                        measured[digest] = resources(cubin)
                    use = measured[digest]
                    key = (function.fn.__name__, str(data_dtype).removeprefix("torch."), constexprs,
                           kernel.metadata.num_warps, arch)
                    row = table.setdefault(key, Launch(*key, 0, 0, 0, set()))
                    # specializations that differ only in their integer arguments share a row: the worst
                    row.registers = max(row.registers, use["REG"])
                    row.spill_bytes = max(row.spill_bytes, use["STACK"] + use["LOCAL"])
                    row.shared_bytes = max(row.shared_bytes, use["SHARED"] + kernel.metadata.shared)
                    if vocab is not None:
                        row.vocabs.add(vocab)
    return list(table.values())


def launchable_kernels() -> set[str]:
    """The JITFunctions of the kernel modules that are launched (not helpers they call): by name."""
    found = set()
    for name in MODULES:
        module = importlib.import_module(f"stepcoder.kernels.{name}")
        found |= {attr for attr, value in vars(module).items()
                  if isinstance(value, JITFunction) and attr.endswith("_kernel")}
    return found


def markdown(launches: list[Launch]) -> str:
    """One line per kernel specialization; registers, spills and shared memory per target."""
    arches = sorted({row.arch for row in launches})
    per_target = lambda name: " / ".join(f"sm_{arch}" for arch in arches) + f" {name}"  # noqa: E731
    lines = [f"| kernel | dtype | constexprs | warps | vocabularies | {per_target('registers')} | "
             f"{per_target('spills (bytes)')} | {per_target('shared memory (bytes)')} |", "|---|---|---|---|---|---|---|---|"]
    grouped: dict[tuple, dict[int, Launch]] = {}
    for row in launches:
        grouped.setdefault((row.kernel, row.dtype, row.constexprs, row.warps), {})[row.arch] = row
    for (kernel, dtype, constexprs, warps), by_arch in sorted(grouped.items(), key=lambda item: str(item[0])):
        cells = lambda field: " / ".join(str(getattr(by_arch[a], field)) if a in by_arch else "—"  # noqa: E731
                                         for a in arches)
        vocabs = ", ".join(f"{v:,}" for v in sorted(set().union(*(r.vocabs for r in by_arch.values())))) or "—"
        lines.append(f"| {kernel} | {dtype} | {', '.join(f'{k}={v}' for k, v in constexprs)} | {warps} | {vocabs} | "
                     f"{cells('registers')} | {cells('spill_bytes')} | {cells('shared_bytes')} |")
    return "\n".join(lines)


@triton.jit
def _spilling_kernel(x_ptr, out_ptr, BLOCK: tl.constexpr):
    """Broken on purpose (the check's own test): a whole block of values stays live across a reduction
    in one warp, 512 per thread, more than the 255 registers a thread has."""
    offsets = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offsets)
    tl.store(out_ptr + offsets, x / tl.sum(x * x, axis=0))


def exercise_spilling_kernel(dtype: torch.dtype) -> None:
    x = torch.randn(16384).to(dtype)
    _spilling_kernel[(1,)](x, torch.empty_like(x), BLOCK=16384, num_warps=1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=list(TARGETS), choices=list(TARGETS))
    parser.add_argument("--json", help="also write the rows here")
    parser.add_argument("--with_spilling_kernel", action="store_true",
                        help="add a kernel broken on purpose to spill: the check must fail")
    args = parser.parse_args(argv)
    rows = compile_all(args.arch, extra=exercise_spilling_kernel if args.with_spilling_kernel else None)
    problems = [problem for row in rows for problem in row.problems()]
    print(f"triton {triton.__version__}: {len(rows)} kernel specializations x targets")
    print(markdown(rows))
    print("problems:", "; ".join(problems) or "none")
    if args.json:
        with open(args.json, "w") as file:
            json.dump({"triton": triton.__version__, "problems": problems, "launchable": sorted(launchable_kernels()),
                       "rows": [{**dataclasses.asdict(row), "constexprs": dict(row.constexprs),
                                 "vocabs": sorted(row.vocabs)} for row in rows]}, file, default=str)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
