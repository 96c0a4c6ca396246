"""Shared helpers for the GPU benchmarks."""
from __future__ import annotations

import torch


def measure_cuda(benchmark, function, args, rounds: int = 10, warmup: int = 3) -> float:
    """Times `function(*args)` to completion on the GPU with pytest-benchmark; records and returns the
    peak memory it allocated beyond what existed before (MiB)."""
    for _ in range(warmup):
        function(*args)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()

    def timed():
        function(*args)
        torch.cuda.synchronize()

    benchmark.pedantic(timed, rounds=rounds, warmup_rounds=1)
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    benchmark.extra_info["peak_extra_mib"] = round(peak, 1)
    return peak
