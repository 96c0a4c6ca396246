"""Shared fixtures. Sandbox tests need the compiled extension (`pip install -e .`). Without a GPU the
Triton kernels run under the interpreter, which must be switched on before triton is imported."""
from __future__ import annotations

import os
import time
from collections.abc import Iterable

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from stepcoder.sandbox import Sandbox


@pytest.fixture(scope="session", autouse=True)
def no_stray_files():
    """Nothing a test runs may write into the directory the suite runs from (a reference tracer running
    a test program there once left `scratch.txt` at the repository root)."""
    caches = {".pytest_cache", ".benchmarks", "__pycache__"}
    before = set(os.listdir("."))
    yield
    stray = set(os.listdir(".")) - before - caches
    assert not stray, f"the tests left files in {os.getcwd()}: {sorted(stray)}"


@pytest.fixture(scope="module")
def sandbox():
    with Sandbox(workers=2, timeout=1.0) as sb:
        yield sb


def descendants(pid: int) -> dict[int, str]:
    """Every live descendant of `pid`, mapped to its state letter (Z = zombie), from /proc."""
    children: dict[int, list[int]] = {}
    states: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        states[int(entry)] = fields[0]
        children.setdefault(int(fields[1]), []).append(int(entry))
    found, stack = {}, list(children.get(pid, []))
    while stack:
        current = stack.pop()
        found[current] = states.get(current, "?")
        stack.extend(children.get(current, []))
    return found


def settled(pid: int, seconds: float = 5.0) -> bool:
    """Whether, within `seconds`, at most one process is left below the worker `pid` (the worker proper,
    PID 1 of its namespace, below the pool's shim), and no zombie: a job process exits right after its
    last answer, so it may still be on its way out."""
    end = time.monotonic() + seconds
    while True:
        left = descendants(pid)
        if len(left) <= 1 and "Z" not in left.values():
            return True
        if time.monotonic() > end:
            return False
        time.sleep(0.01)


def sandbox_uid_processes(worker_pids: Iterable[int] | None = None) -> list[int]:
    """Every process running under a sandbox uid, whoever started it; with `worker_pids`, only under the
    uids of those workers (a worker's uid is the base plus its pid), so that another test run on the same
    machine (CI runs two at once) cannot be counted as this one's stray."""
    from stepcoder._worker import SANDBOX_UID_BASE

    uids = None if worker_pids is None else {SANDBOX_UID_BASE + pid for pid in worker_pids}
    found = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/status") as f:
                uid = next(int(line.split()[1]) for line in f if line.startswith("Uid:"))
        except (OSError, StopIteration):
            continue
        if SANDBOX_UID_BASE <= uid < SANDBOX_UID_BASE + (1 << 23) and (uids is None or uid in uids):
            found.append(int(entry))
    return found


@pytest.fixture
def wrapped(monkeypatch) -> dict:
    """What the trainer hands to ``learners.wrap_models`` as a run starts: policy, critic, reference, config,
    and ``live_models``, how many language models (modules with ``generate``) are in memory then."""
    import gc

    import torch

    from stepcoder import learners

    held: dict = {}
    original = learners.wrap_models

    def spy(policy, critic, reference, config, device):
        live = [o for o in gc.get_objects() if isinstance(o, torch.nn.Module) and hasattr(o, "generate")]
        held.update(policy=policy, critic=critic, reference=reference, config=config, live_models=len(live))
        return original(policy, critic, reference, config, device)

    monkeypatch.setattr(learners, "wrap_models", spy)
    return held
