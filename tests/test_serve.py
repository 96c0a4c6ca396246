"""``python -m stepcoder.serve`` and its client: Sandbox Fusion's API through its own client package, /judge
against a local Sandbox, tokens, limits and malformed requests, a full queue, SIGTERM, several servers,
and a training run judged remotely against the same run judged locally. (The sandbox attacks run through
a server too: ``guarded`` in test_sandbox_attacks.py.)"""
from __future__ import annotations

import json
import os
import random
import threading
import time
import urllib.error
import urllib.request
import warnings
from pathlib import Path

import pytest
from serving import SERVE_TOKEN, Served

from stepcoder import train
from stepcoder.data import load_apps_plus, load_builtin, load_problems
from stepcoder.remote import RemoteSandbox
from stepcoder.sandbox import Sandbox, TestCase
from stepcoder.wire import decode_value, encode_value

# The 16-problem file; STEPCODER_SERVE_APPS_PLUS=.../valid_all.json runs the same check on all 500 (~4 min).
APPS_PLUS = Path(os.environ.get("STEPCODER_SERVE_APPS_PLUS", "")
                 or Path(__file__).resolve().parents[2] / "shared" / "data" / "apps_plus" / "valid.json")
LIMITS = ("--max_timeout", "2", "--max_wall_timeout", "4", "--max_queue", "4", "--max_jobs", "4",
          "--max_program_bytes", "100000", "--max_request_bytes", "2000000", "--timeout", "1")
SPIN = "x = 0\nwhile True:\n    x += 1\n"


@pytest.fixture(scope="module")
def server():
    served = Served(2, *LIMITS)
    yield served
    code, output = served.stop()
    assert code == 0, output


def post(url: str, body, token: str | None = SERVE_TOKEN, raw: bytes | None = None) -> tuple[int, dict, dict]:
    data = raw if raw is not None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(url, data=data, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read()), dict(response.headers)
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read()), dict(error.headers)


def jobs_judged(served: Served) -> int:
    request = urllib.request.Request(served.base + "/metrics", headers={"Authorization": f"Bearer {served.token}"})
    text = urllib.request.urlopen(request, timeout=10).read().decode()
    counts = [line.rsplit(" ", 1)[1] for line in text.splitlines() if line.startswith("stepcoder_serve_jobs_total")]
    return sum(map(int, counts))


def health(served) -> dict:
    return json.loads(urllib.request.urlopen(urllib.request.Request(served.url + "/health"), timeout=10).read())


def wait_for(condition, what: str, seconds: float = 30.0):
    """Polls `condition` until it returns something true (returned), failing after `seconds`."""
    end = time.monotonic() + seconds
    while not (value := condition()):
        assert time.monotonic() < end, f"waited {seconds} s for {what}"
        time.sleep(0.02)
    return value


def in_background(call, *args) -> tuple[threading.Thread, list]:
    """Runs `call(*args)` on a thread; its return value, or the exception it raised, lands in the list."""
    outcome: list = []

    def target():
        try:
            outcome.append(call(*args))
        except BaseException as error:  # noqa: BLE001 - the test asserts on it
            outcome.append(error)

    thread = threading.Thread(target=target)
    thread.start()
    return thread, outcome


# --- Sandbox Fusion's API, through its own client ---------------------------------------------------------


def test_the_sandbox_fusion_client_gets_sandbox_fusions_status_fields(server):
    pytest.importorskip("sandbox_fusion")  # this test alone needs the client; the others speak plain HTTP
    from sandbox_fusion import RunCodeRequest, run_code

    def run(code: str, **extra):
        request = RunCodeRequest(code=code, language="python", run_timeout=1, **extra)
        return run_code(request, endpoint=server.url, max_attempts=1)

    echo = run("a, b = map(int, input().split())\nprint(a * b)\n", stdin="6 7\n")
    assert (echo.status, echo.run_result.status, echo.run_result.return_code) == ("Success", "Finished", 0)
    assert echo.run_result.stdout == "42\n" and echo.compile_result is None

    crash = run("def f():\n    raise ValueError('boom')\nf()\n")
    assert (crash.status, crash.run_result.status, crash.run_result.return_code) == ("Failed", "Finished", 1)
    assert "Traceback" in crash.run_result.stderr and "ValueError: boom" in crash.run_result.stderr

    spin = run(SPIN)
    assert (spin.status, spin.run_result.status, spin.run_result.return_code) == ("Failed", "TimeLimitExceeded", None)
    assert spin.run_result.cpu_time >= 1.0

    syntax = run("print('unclosed'\n")
    assert (syntax.status, syntax.run_result.status, syntax.run_result.return_code) == ("Failed", "Finished", 1)
    assert "SyntaxError" in syntax.run_result.stderr

    flood = run("import sys\nsys.stdout.write('x' * 10_000_000)\n")
    assert flood.status == "Failed" and flood.run_result.status == "Finished" and flood.run_result.return_code != 0
    assert len(flood.run_result.stdout) == 1 << 20 and "cap" in flood.message  # cut at the server's cap

    exits = run("import sys\nprint('partial')\nsys.exit(3)\n")
    assert (exits.status, exits.run_result.return_code, exits.run_result.stdout) == ("Failed", 3, "partial\n")

    with pytest.raises(Exception, match="Python programs only"):  # the client raises on SandboxError
        run_code(RunCodeRequest(code="int main() {}", language="cpp"), endpoint=server.url, max_attempts=1)


def test_verls_request_reaches_run_code_by_the_endpoint_url_alone(server):
    """veRL posts its own JSON (with memory_limit_MB) to the full endpoint URL it is given."""
    payload = {"compile_timeout": 10, "run_timeout": 1, "code": "print(input()[::-1])", "stdin": "abc\n",
               "memory_limit_MB": 256, "language": "python", "files": {}, "fetch_files": []}
    status, reply, _ = post(server.url + "/run_code", payload, token=None)
    assert status == 200 and reply["status"] == "Success" and reply["run_result"]["stdout"] == "cba\n"
    payload.update(code="x = bytearray(512 << 20)\nprint(len(x))")  # over the 256 MB it asked for
    status, reply, _ = post(server.url + "/run_code", payload, token=None)
    assert status == 200 and reply["status"] == "Failed" and "MemoryError" in reply["run_result"]["stderr"]


# --- /judge against a local Sandbox ------------------------------------------------------------------


def _break(program: str, how: int) -> str:
    return [program.replace("print(", "print(1+", 1), program.replace("\n", "\n1/0\n", 1),
            program + "\nwhile True:\n    pass\n", program.replace("(", "(( ", 1)][how % 4]


def _same(local, remote) -> None:
    timing = ("seconds", "cpu_seconds", "max_rss_kb")
    assert (remote.verdict, remote.executed_lines, remote.detail, remote.warnings) == (
        local.verdict, local.executed_lines, local.detail, local.warnings)
    assert [{k: v for k, v in vars(t).items() if k not in timing} for t in remote.tests] == [
        {k: v for k, v in vars(t).items() if k not in timing} for t in local.tests]


@pytest.mark.slow
@pytest.mark.skipif(not APPS_PLUS.is_file(), reason=f"APPS+ data not found at {APPS_PLUS}")
def test_judge_gives_a_local_sandboxs_verdicts_and_lines_on_apps_plus(server):
    problems = load_apps_plus(str(APPS_PLUS)).problems
    jobs = [p.job(p.solutions[0]) for p in problems]
    jobs += [p.job(_break(p.solutions[0], i)) for i, p in enumerate(problems)]
    limits = [{"timeout": 0.3} if index % 4 == 2 else {} for index in range(len(problems))]  # the endless loops
    limits = [{}] * len(problems) + limits
    with Sandbox(workers=2, timeout=1.0) as local_pool:
        local = [future.result() for future in local_pool.submit_many(jobs, limits)]
    with RemoteSandbox(server.url, timeout=1.0) as remote_pool:
        futures = [remote_pool.submit(*job, **extra) for job, extra in zip(jobs, limits)]
        remote = [future.result() for future in futures]
    assert sum(result.verdict == "pass" for result in local[:len(problems)]) >= 0.99 * len(problems)
    assert {result.verdict for result in local[len(problems):]} >= {"wrong_answer", "runtime_error", "timeout"}
    for local_result, remote_result in zip(local, remote):
        _same(local_result, remote_result)


def _hashable(value) -> bool:
    try:
        hash(value)
    except TypeError:
        return False
    return True


def test_function_problems_and_their_python_values_cross_the_wire_unchanged(server):
    rng = random.Random(7)

    def value(depth: int = 0):
        leaves = [None, True, rng.randint(-10**30, 10**30), rng.random() * 1e6, float("inf"), "s\u00e9\ud800",
                  b"\x00\xff", complex(1.5, -2), 1 << 5000]
        if depth > 3 or rng.random() < 0.4:
            return rng.choice(leaves)
        items = [value(depth + 1) for _ in range(rng.randint(0, 3))]
        hashable = [item for item in items if _hashable(item)]
        return rng.choice([items, tuple(items), set(hashable), frozenset(hashable),
                           {item: value(depth + 1) for item in hashable}])

    for _ in range(300):
        original = value()
        back = decode_value(json.loads(json.dumps(encode_value(original))), "value")
        assert repr(back) == repr(original) or back == original
        assert type(back) is type(original)
    nan = decode_value(json.loads(json.dumps(encode_value(float("nan")))), "value")
    assert nan != nan
    problems = [p for p in load_problems("synthetic:train").problems if p.kind != "stdin"][:12]
    assert problems, "the synthetic set has function problems"
    typed = "def f(a, b):\n    return (type(a).__name__, type(b).__name__, sorted(b) if isinstance(b, set) else b)\n"
    jobs = [p.job(p.solutions[0]) for p in problems]
    jobs.append((typed, [TestCase([(1, 2), {3, 4}], ("tuple", "set", [3, 4]))], "function", "f"))
    with Sandbox(workers=1, timeout=1.0) as local_pool, RemoteSandbox(server.url, timeout=1.0) as remote_pool:
        for local_result, remote_result in zip(local_pool.run_many(jobs), remote_pool.run_many(jobs)):
            _same(local_result, remote_result)
    assert remote_result.verdict == "pass"  # the tuple and the set arrived as a tuple and a set


# --- access -----------------------------------------------------------------------------------------------


def test_without_the_right_token_nothing_runs(server):
    canary = {"program": "open('canary', 'w').write('ran')\nx = 0\nfor i in range(10**6):\n    x += i\nprint(x)\n",
              "tests": [{"input": "", "output": "499999500000"}]}
    before = jobs_judged(server)
    near = server.base + "/t/" + SERVE_TOKEN[:-1] + "/judge"  # all but the last character
    for url, token in ((server.base + "/judge", None), (server.base + "/judge", "wrong"),
                       (server.base + "/t/wrong/judge", None), (near, None), (server.base + "/run_code", None)):
        status, reply, _ = post(url, canary, token=token)
        assert status == 401 and "token" in reply["error"], (url, token)
    status, _, _ = post(server.base + "/judge", None, token=None, raw=b"x" * 3_000_000)  # over the body limit
    assert status == 401  # refused before the body is read
    assert jobs_judged(server) == before  # not one of them ran
    status, reply, _ = post(server.base + "/judge", canary)  # the control: with the token it runs (and passes)
    assert status == 200 and reply["verdict"] == "pass" and jobs_judged(server) == before + 1
    status, reply, _ = post(server.url + "/judge", canary, token=None)
    assert status == 200 and reply["verdict"] == "pass"


def test_a_server_reachable_from_other_machines_needs_a_token():
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "stepcoder.serve", "--host", "0.0.0.0", "--port", "0"],
                          capture_output=True, text=True, env={k: v for k, v in os.environ.items()
                                                               if k != "STEPCODER_SERVE_TOKEN"}, timeout=60)
    assert done.returncode == 2 and "--token" in done.stderr and "0.0.0.0" in done.stderr


# --- limits, malformed requests, the queue -------------------------------------------------------------


BAD = [
    (b"{not json", 400, "not valid JSON"),
    (b"\xff\xfe", 400, "not valid JSON"),
    (b"[" * 100_000, 400, "not valid JSON"),
    (json.dumps([]).encode(), 400, "non-empty list"),
    (json.dumps({"tests": [{"input": "", "output": ""}]}).encode(), 400, "job.program: missing"),
    (json.dumps({"program": 5, "tests": []}).encode(), 400, "job.program: expected str"),
    (json.dumps({"program": "", "tests": []}).encode(), 400, "job.tests: at least one"),
    (json.dumps({"program": "", "tests": [{"input": 1, "output": ""}]}).encode(), 400, "stdin tests"),
    (json.dumps({"program": "", "tests": [{"in": ""}]}).encode(), 400, "job.tests[0]"),
    (json.dumps({"program": "", "kind": "shell", "tests": [{"input": "", "output": ""}]}).encode(), 400, "job.kind"),
    (json.dumps({"program": "", "kind": "function", "tests": [{"input": [], "output": 1}]}).encode(), 400, "entry"),
    (json.dumps({"program": "", "tests": [{"input": "", "output": ""}], "timeout": "9"}).encode(), 400,
     "job.timeout: expected int or float"),
    (json.dumps({"program": "", "tests": [{"input": "", "output": ""}], "timeout": -1}).encode(), 400, "job.timeout"),
    (json.dumps({"program": "", "tests": [{"input": "", "output": ""}], "trace": 1}).encode(), 400, "job.trace"),
    (json.dumps({"program": "", "tests": [{"input": "", "output": ""}], "shell": True}).encode(), 400, "unknown"),
    (json.dumps({"program": "x" * 100_001, "tests": [{"input": "", "output": ""}]}).encode(), 400,
     "--max_program_bytes"),
    (json.dumps([{"program": "", "tests": [{"input": "", "output": ""}]}] * 5).encode(), 400, "--max_jobs"),
    (json.dumps({"program": "", "kind": "function", "entry": "f",
                 "tests": [{"input": [{"$set": [[1]]}], "output": 1}]}).encode(), 400, "unhashable"),
    (json.dumps({"program": "", "kind": "assert", "tests": [{"assert": "x = " + "-" * 200_000 + "1"}]}).encode(), 400,
     "does not compile"),  # the parser's MemoryError, in the server process, is the client's error
    (b"x" * 2_100_000, 413, "--max_request_bytes"),
]


@pytest.mark.parametrize("body, status, words", BAD, ids=[str(i) for i in range(len(BAD))])
def test_malformed_requests_get_a_4xx_naming_the_field(server, body, status, words):
    got, reply, _ = post(server.base + "/judge", None, raw=body)
    assert (got, words in reply["error"]) == (status, True), reply


def test_garbage_never_crashes_or_hangs_the_server(server):
    rng = random.Random(11)
    fragments = [b"{", b"}", b"[", b"]", b'"program"', b'"tests"', b":", b",", b'"input"', b"1e999", b"null",
                 b'"$tuple"', b'"\\ud800"', b"-0", b"true", b'"kind"', b'"function"', b'{"$dict": [[1, 2]]}']
    statuses = set()
    for _ in range(150):
        body = b"".join(rng.choice(fragments) for _ in range(rng.randint(0, 30)))
        status, reply, _ = post(server.base + "/judge", None, raw=body)
        statuses.add(status)
        assert status in (200, 400) and ("error" in reply or "verdict" in reply), (body, reply)
        status, reply, _ = post(server.base + "/run_code", None, raw=body)
        assert status in (200, 400), (body, reply)
    assert 400 in statuses
    assert post(server.base + "/judge", {"program": "print(1)", "tests": [{"input": "", "output": "1"}]})[1][
        "verdict"] == "pass"


def test_the_output_tails_a_reply_carries_are_bounded():
    from stepcoder.serve import TAILS_PER_REQUEST, ServeConfig, Service

    service = Service(ServeConfig(max_tests=100_000, max_jobs=8), sandbox=None)
    body = [{"program": "", "tests": [{"input": "", "output": ""}] * 20_000, "tail_bytes": 1 << 20}] * 4
    _, limits, _ = service.parse_judge(body)
    assert [capped["tail_bytes"] for capped in limits] == [TAILS_PER_REQUEST // (2 * 80_000)] * 4
    _, limits, _ = service.parse_judge({"program": "", "tests": [{"input": "", "output": ""}] * 20})
    assert limits[0]["tail_bytes"] == 2048  # a usual request keeps the local default


def test_a_jobs_limits_are_capped_by_the_servers(server):
    """A job asking for 1000 CPU seconds and 5000 wall seconds gets the server's ceilings. Each ceiling is
    checked where the other cannot decide first whatever the machine's load: the CPU ceiling (0.5 s) on a
    server whose wall ceiling (30 s) a spinning program cannot reach before it, unless it got under 2 % of
    a core; the wall ceiling (the module server's 4 s) on a program that sleeps, whose CPU time stays ~0."""
    asked = {"tests": [{"input": "", "output": ""}], "timeout": 1000, "wall_timeout": 5000, "trace": False}
    sleeper, slept = in_background(post, server.base + "/judge", dict(asked, program="import time\ntime.sleep(100)\n"))
    cpu_capped = Served(1, "--max_timeout", "0.5", "--max_wall_timeout", "30")
    try:
        status, reply, _ = post(cpu_capped.base + "/judge", dict(asked, program=SPIN))
    finally:
        assert cpu_capped.stop()[0] == 0
    assert status == 200 and reply["verdict"] == "timeout", reply
    assert reply["tests"][0]["timed_out_by"] == "cpu" and 0.5 <= reply["tests"][0]["cpu_seconds"] < 1.5, reply
    sleeper.join()
    status, reply, _ = slept[0]
    assert status == 200 and reply["verdict"] == "timeout", reply
    assert reply["tests"][0]["timed_out_by"] == "wall" and 4.0 <= reply["tests"][0]["seconds"] < 10.0, reply


@pytest.mark.slow
def test_a_full_queue_answers_429_and_the_client_waits_it_out(server):
    slow = {"program": SPIN, "tests": [{"input": "", "output": ""}], "timeout": 1.0, "trace": False}
    holder, held = in_background(post, server.base + "/judge", [slow] * 4)
    wait_for(lambda: (state := health(server))["busy"] + state["queued"] == 4, "the 4 slow jobs to be admitted")
    status, reply, headers = post(server.base + "/judge", slow)
    assert status == 429 and "queue is full" in reply["error"] and headers["Retry-After"] == "1"
    with RemoteSandbox(server.url, timeout=1.0) as client:  # waits for room instead of failing
        assert client.run("print(2)", [TestCase("", "2\n")]).verdict == "pass"
    holder.join()
    assert held[0][0] == 200 and [t["verdict"] for t in held[0][1]] == ["timeout"] * 4, held
    state = health(server)
    assert (state["busy"], state["queued"], state["workers"]) == (0, 0, 2)


# --- shutdown, several servers, remote training ------------------------------------------------------------


def test_sigterm_lets_requests_in_flight_finish_then_cleans_up():
    """SIGTERM lands while the server is judging a job (it says so: "1 jobs in flight"), which sleeps
    1.5 s; the job's reply still comes back, and only then do the workers stop and the temp dir go."""
    served = Served(1)
    workers = served.worker_pids()
    assert len(workers) == 1
    job = {"program": "import time\ntime.sleep(1.5)\nprint(7)\n", "tests": [{"input": "", "output": "7\n"}],
           "trace": False}
    caller, replies = in_background(post, served.base + "/judge", job)
    wait_for(lambda: health(served)["busy"] == 1, "the job to start")
    tmp = served.tmp
    assert os.listdir(tmp), "the pool keeps its directories in the server's temp dir"
    code, output = served.stop()  # SIGTERM
    caller.join()
    assert code == 0 and "stopping (1 jobs in flight)" in output and "stopped" in output, output
    assert not isinstance(replies[0], BaseException), replies  # the request in flight was answered:
    assert replies[0][0] == 200 and replies[0][1]["verdict"] == "pass", replies
    assert not os.path.exists(tmp)  # empty, so removed: no directory left behind
    assert not any(os.path.exists(f"/proc/{pid}") for pid in workers)


@pytest.mark.slow
def test_jobs_spread_over_servers_and_survive_one_dying():
    first, second = Served(1), Served(1)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            client = RemoteSandbox([first.url, second.url, "http://127.0.0.1:9/t/x"], timeout=1.0)
        assert any("127.0.0.1:9" in str(w.message) and "***" in str(w.message) for w in caught)
        with client:
            program = "n = int(input())\nprint(sum(range(n)))\n"
            cases = [(program, [TestCase(f"{n}\n", f"{sum(range(n))}\n")]) for n in range(200_000, 200_040)]
            assert all(result.passed for result in client.run_many(cases))
            assert jobs_judged(first) > 5 and jobs_judged(second) > 5  # both took a share
            futures = [client.submit(*case) for case in cases]
            orphans = first.worker_pids()
            first.process.kill()  # kill -9 in the middle of the batch
            assert all(future.result().passed for future in futures)
        deadline = time.monotonic() + 10
        while any(os.path.exists(f"/proc/{pid}") for pid in orphans) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(os.path.exists(f"/proc/{pid}") for pid in orphans)  # its workers went with it
    finally:
        first.stop()
        assert second.stop()[0] == 0


@pytest.mark.slow
def test_training_judged_by_a_server_logs_what_local_judging_logs(tmp_path, monkeypatch):
    from test_train import TINY

    import torch

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    served, threads = Served(1), torch.get_num_threads()
    torch.set_num_threads(1)  # the two runs are compared to the bit: one thread, whatever the machine's load
    try:
        common = [*TINY, "--total_steps", "3", "--eval_limit", "4", "--eval_samples", "1", "--eval_every", "3"]
        local = train.main([*common, "--output_dir", str(tmp_path / "local")])
        remote = train.main([*common, "--output_dir", str(tmp_path / "remote"), "--sandbox_url", served.url])
        judged = jobs_judged(served)
    finally:
        torch.set_num_threads(threads)
        assert served.stop()[0] == 0
    strip = lambda row: {k: v for k, v in row.items() if not k.startswith("time_")}  # noqa: E731
    assert [strip(row) for row in remote] == [strip(row) for row in local]
    verdicts = {verdict for row in local for verdict, count in row["outcomes"].items() if count}
    assert len(local) == 3 and len(verdicts) >= 2, verdicts  # passes and failures were judged alike
    assert judged >= 3 * 8  # the remote run's rollouts were judged there (and its held-out evaluations)


def test_evaluate_judges_the_same_remotely(tmp_path, capsys):
    from stepcoder import evaluate

    served = Served(2)
    try:
        evaluate.main(["--data", "builtin", "--canonical", "--workers", "2", "--output", str(tmp_path / "local")])
        assert jobs_judged(served) == 0
        evaluate.main(["--data", "builtin", "--canonical", "--sandbox_url", served.url, "--output",
                       str(tmp_path / "remote")])
        judged = jobs_judged(served)
    finally:
        assert served.stop()[0] == 0
    rows = [(tmp_path / name / "verdicts.jsonl").read_text().splitlines() for name in ("local", "remote")]
    assert rows[0] == rows[1] and len(rows[0]) == len(load_builtin().problems)
    assert judged == len(rows[1])  # every verdict of the remote run was the server's, one job each
