"""``python -m stepcoder.serve`` under load, side by side with the local pool in one run: 32 concurrent
clients post single-job ``/judge`` requests for 20 s against a server whose queue holds fewer jobs than
there are clients (so 429s happen), then the same jobs go through a local ``Sandbox`` of as many workers.

    pytest benchmarks/test_serve_bench.py -s

Targets: no failed request but 429s; every judged job gets the verdict and executed lines the local pool
gives it; the server's throughput within 15 % of the local pool's (traced jobs of ~20-60 ms of CPU, as
rollouts are); the server's resident memory flat between the end of the warm-up and the end of the load.
"""
from __future__ import annotations

import asyncio
import json
import os
import random
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from serving import SERVE_TOKEN, Served  # noqa: E402

from stepcoder.sandbox import Sandbox, TestCase  # noqa: E402
from stepcoder.wire import encode_job  # noqa: E402

aiohttp = pytest.importorskip("aiohttp")

WORKERS = os.cpu_count() or 2
CLIENTS, SECONDS, WARMUP = 32, 20.0, 4.0
QUEUE = 16   # fewer slots than clients
PROGRAMS = {
    "pass": "n = int(input())\ntotal = 0\nfor i in range(n):\n    if i % 3:\n        total += i\nprint(total)\n",
    "wrong": "n = int(input())\nprint(sum(range(n)))\n",
    "crash": "n = int(input())\nvalues = list(range(n))\nprint(values[n])\n",
}


def workload(count: int, seed: int = 0) -> list[tuple]:
    rng = random.Random(seed)
    jobs = []
    for _ in range(count):
        n = rng.randint(50_000, 150_000)
        name = rng.choice(["pass", "pass", "wrong", "crash"])
        jobs.append((PROGRAMS[name], [TestCase(f"{n}\n", f"{sum(i for i in range(n) if i % 3)}\n")]))
    return jobs


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of the process itself (not its workers)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def load(url: str, bodies: list[bytes], expected: list[tuple], pid: int) -> dict:
    counts = {"judged": 0, "throttled": 0, "failed": 0, "wrong": 0}
    marks: dict[str, float] = {}
    start = time.monotonic()
    headers = {"Authorization": f"Bearer {SERVE_TOKEN}", "Content-Type": "application/json"}
    connector = aiohttp.TCPConnector(limit=CLIENTS)
    async with aiohttp.ClientSession(connector=connector, headers=headers) as session:

        async def client(index: int) -> None:
            turn = index
            while time.monotonic() - start < SECONDS:
                job = turn % len(bodies)
                async with session.post(url + "/judge", data=bodies[job]) as response:
                    if response.status == 429:  # as RemoteSandbox does: wait as long as the server says
                        counts["throttled"] += 1
                        await asyncio.sleep(float(response.headers["Retry-After"]))
                        continue
                    if response.status != 200:
                        counts["failed"] += 1
                        continue
                    reply = await response.json()
                if WARMUP <= time.monotonic() - start < SECONDS:  # judged inside the measured window
                    counts["judged"] += 1
                counts["wrong"] += (reply["verdict"], reply["executed_lines"]) != expected[job]
                turn += CLIENTS

        async def watch() -> None:
            await asyncio.sleep(WARMUP)
            marks["rss_warm"], marks["cpu_warm"] = rss_mib(pid), cpu_seconds(pid)
            await asyncio.sleep(SECONDS - WARMUP)
            marks["cpu_end"] = cpu_seconds(pid)

        await asyncio.gather(watch(), *(client(index) for index in range(CLIENTS)))
    counts["seconds"] = SECONDS - WARMUP
    counts["server_cpu_share"] = (marks["cpu_end"] - marks["cpu_warm"]) / counts["seconds"]
    counts["rss_warm"], counts["rss_end"] = marks["rss_warm"], rss_mib(pid)
    return counts


def test_thirty_two_clients_against_one_server():
    jobs = workload(400)
    with Sandbox(workers=WORKERS, timeout=4.0) as local:
        local.run_many(jobs[:2 * WORKERS])  # warm
        started = time.monotonic()
        results = local.run_many(jobs)
        local_rate = len(jobs) / (time.monotonic() - started)
    expected = [(result.verdict, result.executed_lines) for result in results]
    assert {verdict for verdict, _ in expected} == {"pass", "wrong_answer", "runtime_error"}
    bodies = [json.dumps(encode_job(*job, timeout=4.0, wall_timeout=17.0, memory_mb=1024, trace=True,
                                    stop_on_first_failure=True)).encode() for job in jobs]
    served = Served(WORKERS, "--max_queue", str(QUEUE), "--max_jobs", "4")
    try:
        counts = asyncio.run(load(served.base, bodies, expected, served.process.pid))
    finally:
        code, output = served.stop()
    assert code == 0, output
    served_rate = counts["judged"] / counts["seconds"]
    growth = counts["rss_end"] - counts["rss_warm"]
    print(f"\nlocal pool: {local_rate:.1f} jobs/s; server: {served_rate:.1f} jobs/s with {CLIENTS} clients "
          f"(ratio {served_rate / local_rate:.3f}); {counts['judged']} judged after the warm-up, "
          f"{counts['throttled']} answered 429, {counts['failed']} failed, {counts['wrong']} misjudged; server "
          f"RSS {counts['rss_warm']:.1f} -> {counts['rss_end']:.1f} MiB; the server process used "
          f"{100 * counts['server_cpu_share']:.1f} % of a CPU")
    assert counts["failed"] == 0 and counts["wrong"] == 0
    assert counts["throttled"] > 0  # the queue did fill
    assert served_rate >= 0.85 * local_rate
    assert growth < 10.0
