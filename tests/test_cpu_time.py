"""Verdicts by CPU time: a correct program passes however busy the machine is, a spinning one is stopped
at its CPU limit, a sleeping one by the wall-clock backstop, and every thread's CPU time counts."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from stepcoder.sandbox import Sandbox, TestCase

# CPU work in pure Python: ~N iterations of an add and a compare
BURN = "n = int(input())\ntotal = 0\nfor i in range(n):\n    total += i & 7\nprint('done')\n"
CPUS = len(os.sched_getaffinity(0))


@pytest.fixture
def busy_machine():
    """3 x the CPU count processes spinning beside the sandbox, killed at the end. Each in a session of
    its own, as other jobs or ranks are: with the kernel's autogroup scheduling, spinners sharing this
    session would share one CPU share between them, while every test child (a session leader) has its own."""
    spinners = [subprocess.Popen([sys.executable, "-S", "-c", "while True: pass"], start_new_session=True)
                for _ in range(3 * CPUS)]
    try:
        yield len(spinners)
    finally:
        for spinner in spinners:
            spinner.kill()
        for spinner in spinners:
            spinner.wait()


def iterations_for(sandbox: Sandbox, cpu_seconds: float) -> int:
    """Iterations of BURN that cost about `cpu_seconds` of CPU in this sandbox (CPU time, so measuring it on
    a busy machine is fine)."""
    n = 200_000
    for _ in range(6):
        used = sandbox.run(BURN, [TestCase(f"{n}\n", "done\n")]).tests[0].cpu_seconds
        if used > 0.2:
            break
        n *= 4
    return int(n * cpu_seconds / used)


def test_a_correct_program_passes_on_a_crowded_machine(busy_machine):
    assert busy_machine == 3 * CPUS
    with Sandbox(workers=1, timeout=1.0, trace=False) as sandbox:
        n = iterations_for(sandbox, 0.5)
        result = sandbox.run(BURN, [TestCase(f"{n}\n", "done\n")])
    test = result.tests[0]
    assert result.verdict == "pass", (result.detail, test.cpu_seconds, test.seconds)
    assert 0.3 < test.cpu_seconds < 1.0
    # the counterfactual: judged by wall-clock time at the same limit, this correct program would have failed
    assert test.seconds > 1.0, f"the load did not slow the program (wall {test.seconds:.2f} s)"


def test_a_spinning_program_is_stopped_at_its_cpu_limit():
    with Sandbox(workers=1, timeout=1.0, trace=False) as sandbox:
        result = sandbox.run("while True:\n    pass\n", [TestCase("", "")])
    test = result.tests[0]
    assert result.verdict == "timeout" and test.timed_out_by == "cpu" and not result.wall_timeout
    assert 1.0 <= test.cpu_seconds < 1.25, test.cpu_seconds


def test_a_sleeping_program_is_stopped_by_the_wall_backstop():
    with Sandbox(workers=1, timeout=0.5, wall_timeout=1.5, trace=False) as sandbox:
        result = sandbox.run("import time\ntime.sleep(1000)\n", [TestCase("", "")])
    test = result.tests[0]
    assert result.verdict == "timeout" and test.timed_out_by == "wall" and result.wall_timeout
    assert 1.5 <= test.seconds < 3.0 and test.cpu_seconds < 0.5
    assert "wall-clock backstop" in result.detail


def test_every_thread_is_charged():
    """16 threads hashing (hashlib releases the GIL) while the main thread waits in join: only the
    threads' CPU time can reach the limit before the wall backstop. (How far CPU time outruns the wall
    clock depends on how many CPUs the machine spares, so it is not asserted: over 1.3x on the idle 2-CPU VM.)"""
    program = ("import hashlib, threading\n"
               "block = bytes(1 << 20)\n"
               "def work():\n"
               "    while True:\n"
               "        hashlib.sha256(block).digest()\n"
               "threads = [threading.Thread(target=work) for _ in range(16)]\n"
               "for t in threads:\n"
               "    t.start()\n"
               "for t in threads:\n"
               "    t.join()\n")
    with Sandbox(workers=1, timeout=1.0, wall_timeout=30.0, trace=False) as sandbox:
        result = sandbox.run(program, [TestCase("", "")])
    test = result.tests[0]
    assert result.verdict == "timeout" and test.timed_out_by == "cpu", (result.detail, test.seconds)
    assert test.cpu_seconds >= 1.0 and test.seconds < 30.0


def test_wall_timeout_defaults_and_checks():
    with Sandbox(workers=1, timeout=0.5) as sandbox:
        assert sandbox.wall_timeout == 3.0  # 4 x timeout + 1
    with pytest.raises(ValueError, match="wall_timeout"):
        Sandbox(workers=1, timeout=2.0, wall_timeout=1.0)
