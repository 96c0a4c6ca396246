"""After 10,000 runs (passes, failures, crashes, violations, timeouts) no zombie or stray process is
left: while the pool lives, each worker's shim has only the worker proper (PID 1 of its namespace)
below it once the last job process has exited; after close(),
nothing at all, and no process runs under the uid of any worker the pool ever had (replacements included)."""
from __future__ import annotations

import os

import pytest

from conftest import descendants, sandbox_uid_processes, settled
from stepcoder.sandbox import Sandbox, TestCase

PROGRAMS = [
    ("print(int(input()) + 1)\n", "pass"),
    ("print(int(input()) + 2)\n", "wrong_answer"),
    ("print(1 // 0)\n", "runtime_error"),
    ("import os\nos.fork()\n", "violation"),
    ("import ctypes\nctypes.string_at(0)\n", "runtime_error"),
    ("import threading\nt = threading.Thread(target=print)\nt.start()\nt.join()\nprint(int(input()) + 1)\n", "wrong_answer"),
]
TIMEOUTS = 10
pytestmark = pytest.mark.slow  # 10,000 runs: about 25 s on an idle 2-core machine


def test_no_zombie_or_stray_process_after_10000_runs(monkeypatch):
    spawned: list[int] = []
    spawn = Sandbox._spawn

    def recording_spawn(self):
        worker = spawn(self)
        spawned.append(worker.pid)
        return worker

    monkeypatch.setattr(Sandbox, "_spawn", recording_spawn)
    jobs, expected = [], []
    for i in range(10_000 - TIMEOUTS):
        program, verdict = PROGRAMS[i % len(PROGRAMS)]
        jobs.append((program, [TestCase(f"{i}\n", f"{i + 1}\n")]))
        expected.append(verdict)
    jobs += [("while True:\n    pass\n", [TestCase("", "")])] * TIMEOUTS
    expected += ["timeout"] * TIMEOUTS
    # The loops end on CPU time; the wall backstop is wide because a job that imports a module from disk
    # (ctypes) can stall for seconds on I/O when the machine is busy, and that is not what this tests.
    with Sandbox(workers=2, timeout=0.3, wall_timeout=30) as sb:
        verdicts = [r.verdict for r in sb.run_many(jobs)]
        assert verdicts == expected
        for pid in sb.worker_pids():
            assert settled(pid), descendants(pid)
        workers = sb.worker_pids()
    assert set(workers) <= set(spawned)
    assert descendants(os.getpid()) == {}
    assert all(not os.path.exists(f"/proc/{pid}") for pid in workers)
    assert sandbox_uid_processes(spawned) == []
