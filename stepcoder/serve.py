"""``python -m stepcoder.serve``: the sandbox as an HTTP service, so that judging can run on CPU machines
beside the GPU nodes, and any stack that speaks Sandbox Fusion's API can use it unchanged.

    python -m stepcoder.serve --host 0.0.0.0 --port 8080 --workers 16 --token "$STEPCODER_SERVE_TOKEN"

Endpoints (each also under ``/t/TOKEN/``, for clients that take only an endpoint URL):
- ``POST /run_code``: Sandbox Fusion's request and response, for ``language: "python"``.
- ``POST /judge``: this package's own API: one job or a list of jobs (``stepcoder.wire``), answered with
  the ``Result`` a local ``Sandbox`` gives (verdict, per-test results, executed lines).
- ``GET /health``: pool size, busy workers, queued jobs. ``GET /metrics``: Prometheus text (jobs per
  verdict, job latency quantiles, requests per endpoint and status).

Every request is judged under the server's own ceilings whatever it asks for; a full queue answers 429
with ``Retry-After``; malformed requests get a 400 naming the field. SIGTERM (or SIGINT) stops accepting
connections, lets the requests in flight finish, then stops the workers and removes their directories.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import hmac
import ipaddress
import json
import os
import signal
import sys
import time
from dataclasses import dataclass, fields

from stepcoder.sandbox import TAIL_BYTES, WALL_FACTOR, WALL_SLACK, Sandbox, SandboxError, TestCase
from stepcoder.wire import WireError, decode_job, encode_result

TOKEN_ENV = "STEPCODER_SERVE_TOKEN"
LATENCY_WINDOW = 10_000   # job latencies kept for the /metrics quantiles
QUANTILES = (0.5, 0.9, 0.99)
PYTHON_LANGUAGES = ("python", "python3")
TAILS_PER_REQUEST = 64 << 20  # bytes of stdout and stderr tails one /judge reply may carry


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    workers: int = os.cpu_count() or 1
    token: str | None = None
    timeout: float = 2.0               # CPU seconds per test when a job names none
    memory_mb: int = 1024              # per test when a job names none
    max_timeout: float = 10.0          # ceilings applied whatever a request asks
    max_wall_timeout: float = 60.0
    max_memory_mb: int = 4096
    output_bytes: int = 1 << 20        # cap on each test's stdout and stderr (a program past it is stopped)
    max_request_bytes: int = 64 << 20
    max_program_bytes: int = 1 << 20
    max_input_bytes: int = 32 << 20    # one test's input and expected output together
    max_jobs: int = 1024               # per /judge request
    max_tests: int = 10_000            # per job
    max_queue: int = 4096              # jobs admitted and not yet judged, all clients together
    shutdown_timeout: float = 60.0     # how long SIGTERM waits for requests in flight


class BadRequest(ValueError):
    """A 400: the message names the field."""


class Service:
    """The pool, the admission count and the statistics behind the handlers."""

    def __init__(self, config: ServeConfig, sandbox: Sandbox):
        self.config = config
        self.sandbox = sandbox
        self.pending = 0                  # jobs admitted, not yet judged
        self.stopping = False
        self.verdicts: collections.Counter[str] = collections.Counter()
        self.requests: collections.Counter[tuple[str, int]] = collections.Counter()
        self.latencies: collections.deque[float] = collections.deque(maxlen=LATENCY_WINDOW)
        self.latency_sum = 0.0
        self.latency_count = 0

    # ---- admission and judging -------------------------------------------------------------------

    async def judge(self, jobs: list[tuple], limits: list[dict]):
        """Results of `jobs`, or None when the queue cannot take them all (the caller answers 429)."""
        if self.pending + len(jobs) > self.config.max_queue:
            return None
        try:
            futures = self.sandbox.submit_many(jobs, limits)
        except ValueError as error:
            raise BadRequest(str(error)) from None
        self.pending += len(jobs)
        started = time.monotonic()
        try:
            results = await asyncio.gather(*(self._timed(future, started) for future in futures))
        finally:
            self.pending -= len(jobs)
        return results

    async def _timed(self, future, started: float):
        result = await asyncio.wrap_future(future)
        seconds = time.monotonic() - started
        self.verdicts[result.verdict] += 1
        self.latencies.append(seconds)
        self.latency_sum += seconds
        self.latency_count += 1
        return result

    def ceilings(self, timeout, wall_timeout, memory_mb) -> dict:
        """A job's limits under the server's maxima (what it asked, or the server's default)."""
        config = self.config
        cpu = min(float(timeout or config.timeout), config.max_timeout)
        limits = {"timeout": cpu, "memory_mb": min(memory_mb or config.memory_mb, config.max_memory_mb)}
        limits["wall_timeout"] = min(wall_timeout or WALL_FACTOR * cpu + WALL_SLACK, config.max_wall_timeout)
        limits["wall_timeout"] = max(limits["wall_timeout"], cpu)
        return limits

    # ---- /judge ----------------------------------------------------------------------------------

    def parse_judge(self, body) -> tuple[list[tuple], list[dict], bool]:
        config = self.config
        single = type(body) is dict
        jobs = [body] if single else body
        if type(jobs) is not list or not jobs:
            raise BadRequest("body: expected a job object or a non-empty list of jobs")
        if len(jobs) > config.max_jobs:
            raise BadRequest(f"body: {len(jobs)} jobs, over this server's --max_jobs {config.max_jobs}")
        parsed, limits = [], []
        for index, job in enumerate(jobs):
            where = "job" if single else f"jobs[{index}]"
            try:
                args, asked = decode_job(job, where)
            except WireError as error:
                raise BadRequest(str(error)) from None
            self._check_sizes(args, where)
            for name in ("timeout", "wall_timeout", "memory_mb"):
                if name in asked and not (asked[name] > 0 and asked[name] < float("inf")):
                    raise BadRequest(f"{where}.{name}: must be a positive number, got {asked[name]!r}")
            if "memory_mb" in asked and asked["memory_mb"] < 64:
                raise BadRequest(f"{where}.memory_mb: must be at least 64, got {asked['memory_mb']}")
            capped = self.ceilings(asked.get("timeout"), asked.get("wall_timeout"), asked.get("memory_mb"))
            capped["tail_bytes"] = asked.get("tail_bytes", TAIL_BYTES)
            for flag in ("trace", "stop_on_first_failure"):
                if flag in asked:
                    capped[flag] = asked[flag]
            parsed.append(args)
            limits.append(capped)
        # A reply holds each test's stdout and stderr tails: their sum stays under TAILS_PER_REQUEST
        # (a request's usual ~20 tests keep the full default 2 KiB; 10,000 tests x 1024 jobs would not).
        tests = sum(len(args[1]) for args in parsed)
        for capped in limits:
            capped["tail_bytes"] = min(capped["tail_bytes"], config.output_bytes, TAILS_PER_REQUEST // (2 * tests))
        return parsed, limits, single

    def _check_sizes(self, args: tuple, where: str) -> None:
        config = self.config
        program, tests = args[0], args[1]
        size = len(program.encode("utf-8", "surrogatepass"))
        if size > config.max_program_bytes:
            raise BadRequest(f"{where}.program: {size} bytes, over this server's --max_program_bytes "
                             f"{config.max_program_bytes}")
        if len(tests) > config.max_tests:
            raise BadRequest(f"{where}.tests: {len(tests)} tests, over this server's --max_tests {config.max_tests}")
        for number, test in enumerate(tests):
            size = _size(test.input) + _size(test.expected)
            if size > config.max_input_bytes:
                raise BadRequest(f"{where}.tests[{number}]: {size} bytes of input and output, over this "
                                 f"server's --max_input_bytes {config.max_input_bytes}")

    # ---- /run_code -------------------------------------------------------------------------------

    def parse_run_code(self, body) -> tuple[str, str, dict] | str:
        """The program, its stdin and its limits; or the message of a Sandbox Fusion ``SandboxError``
        (a well-formed request this server cannot serve: another language, files)."""
        if type(body) is not dict:
            raise BadRequest("body: expected a Sandbox Fusion RunCodeRequest object")
        code = _typed(body, "code", (str,), required=True)
        language = _typed(body, "language", (str,), required=True)
        stdin = _typed(body, "stdin", (str, type(None))) or ""
        run_timeout = _typed(body, "run_timeout", (int, float))
        _typed(body, "compile_timeout", (int, float))
        memory = _typed(body, "memory_limit_MB", (int,))
        files = _typed(body, "files", (dict,)) or {}
        fetch = _typed(body, "fetch_files", (list,)) or []
        if run_timeout is not None and not 0 < run_timeout < float("inf"):
            raise BadRequest(f"run_timeout: must be a positive number of seconds, got {run_timeout!r}")
        if language not in PYTHON_LANGUAGES:
            return f"stepcoder.serve runs Python programs only (language 'python'); got language {language!r}"
        if files or fetch:
            return ("stepcoder.serve does not take files or fetch_files: each test runs in an empty private "
                    "directory; pass data on stdin")
        size = len(code.encode("utf-8", "surrogatepass"))
        if size > self.config.max_program_bytes:
            raise BadRequest(f"code: {size} bytes, over this server's --max_program_bytes "
                             f"{self.config.max_program_bytes}")
        if len(stdin.encode("utf-8", "surrogatepass")) > self.config.max_input_bytes:
            raise BadRequest(f"stdin: over this server's --max_input_bytes {self.config.max_input_bytes}")
        # Sandbox Fusion's run_timeout is wall-clock; here it is the CPU limit, with a wall backstop of
        # twice it, so that the caller's HTTP timeout (veRL: run + compile timeouts + 10 s) still holds.
        timeout = run_timeout or 10.0
        limits = self.ceilings(timeout, 2.0 * min(timeout, self.config.max_timeout),
                               memory if memory is not None and memory > 0 else None)
        limits["memory_mb"] = max(limits["memory_mb"], 64)
        return code, stdin, dict(limits, trace=False, stop_on_first_failure=True, tail_bytes=self.config.output_bytes)

    def run_code_response(self, result) -> dict:
        """A sandbox Result as Sandbox Fusion's RunCodeResponse."""
        cap = self.config.output_bytes
        if result.verdict == "compile_error":  # Python has no compile step there: the run fails
            run = {"status": "Finished", "execution_time": 0.0, "cpu_time": 0.0, "return_code": 1, "stdout": "",
                   "stderr": f"{result.detail}\n"}
            return _fusion("Failed", "", run)
        test = result.tests[0]
        run = {"status": "Finished", "execution_time": test.seconds, "cpu_time": test.cpu_seconds,
               "return_code": test.return_code, "stdout": test.stdout, "stderr": test.stderr}
        message = ""
        if result.verdict == "timeout":
            run.update(status="TimeLimitExceeded", return_code=None)
            message = test.detail or ""
        elif result.verdict == "output_limit":
            message = f"the program was stopped: its output reached this server's {cap}-byte cap"
        elif result.verdict in ("violation", "memory_limit"):
            message = test.detail or ""
            if result.verdict == "memory_limit" and "MemoryError" not in test.stderr:
                run["stderr"] += "MemoryError\n"  # what Python prints; the sandbox reports it instead
        succeeded = run["status"] == "Finished" and run["return_code"] == 0 and result.verdict != "output_limit"
        return _fusion("Success" if succeeded else "Failed", message, run)

    # ---- /health and /metrics --------------------------------------------------------------------

    def health(self) -> dict:
        workers = self.config.workers
        return {"status": "stopping" if self.stopping else "ok", "workers": workers,
                "busy": min(self.pending, workers), "queued": max(0, self.pending - workers),
                "max_queue": self.config.max_queue, "layers": self.sandbox.capabilities()}

    def metrics(self) -> str:
        health = self.health()
        lines = ["# TYPE stepcoder_serve_workers gauge", f"stepcoder_serve_workers {health['workers']}",
                 "# TYPE stepcoder_serve_busy_workers gauge", f"stepcoder_serve_busy_workers {health['busy']}",
                 "# TYPE stepcoder_serve_queued_jobs gauge", f"stepcoder_serve_queued_jobs {health['queued']}",
                 "# TYPE stepcoder_serve_jobs_total counter"]
        lines += [f'stepcoder_serve_jobs_total{{verdict="{verdict}"}} {count}'
                  for verdict, count in sorted(self.verdicts.items())]
        lines.append("# TYPE stepcoder_serve_requests_total counter")
        lines += [f'stepcoder_serve_requests_total{{endpoint="{endpoint}",code="{code}"}} {count}'
                  for (endpoint, code), count in sorted(self.requests.items())]
        lines.append("# TYPE stepcoder_serve_job_seconds summary")
        recent = sorted(self.latencies)
        for quantile in QUANTILES:
            value = recent[min(len(recent) - 1, int(quantile * len(recent)))] if recent else float("nan")
            lines.append(f'stepcoder_serve_job_seconds{{quantile="{quantile}"}} {value:.6f}')
        lines += [f"stepcoder_serve_job_seconds_sum {self.latency_sum:.6f}",
                  f"stepcoder_serve_job_seconds_count {self.latency_count}"]
        return "\n".join(lines) + "\n"


def _fusion(status: str, message: str, run: dict) -> dict:
    return {"status": status, "message": message, "compile_result": None, "run_result": run,
            "executor_pod_name": None, "files": {}}


def _typed(body: dict, name: str, types: tuple, required: bool = False):
    if name not in body or body[name] is None:
        if required:
            raise BadRequest(f"{name}: missing")
        return None
    value = body[name]
    if type(value) not in types:  # bool is no int here
        names = " or ".join("null" if kind is type(None) else kind.__name__ for kind in types)
        raise BadRequest(f"{name}: expected {names}, got {type(value).__name__}")
    return value


def _size(value) -> int:
    """Roughly the bytes a test value holds (strings and bytes counted exactly, the rest by repr)."""
    if value is None:
        return 0
    if isinstance(value, str):
        return len(value)
    if isinstance(value, bytes):
        return len(value)
    return len(repr(value))


# ---- the HTTP layer --------------------------------------------------------------------------------


def build_app(service: Service):
    """The aiohttp application: routes, token check, body limits, JSON errors."""
    from aiohttp import web

    token = service.config.token

    def error(status: int, message: str, **headers) -> web.Response:
        return web.json_response({"error": message}, status=status, headers=headers)

    @web.middleware
    async def guard(request: web.Request, handler):
        endpoint = request.match_info.route.resource.canonical if request.match_info.route.resource else "unknown"
        endpoint = endpoint.replace("/t/{token}", "")
        if token is not None:
            given = request.match_info.get("token")
            if given is None:
                scheme, _, value = request.headers.get("Authorization", "").partition(" ")
                given = value.strip() if scheme.lower() == "bearer" else ""
            if not hmac.compare_digest(given.encode("utf-8", "surrogateescape"), token.encode()):
                service.requests[(endpoint, 401)] += 1
                return error(401, "a valid token is needed: 'Authorization: Bearer TOKEN' or the path /t/TOKEN/...")
        try:
            response = await handler(request)
        except web.HTTPException as http:
            response = error(http.status, http.reason)
        service.requests[(endpoint, response.status)] += 1
        return response

    def full() -> web.Response:
        return error(429, f"the queue is full ({service.config.max_queue} jobs); retry later", **{"Retry-After": "1"})

    async def read_json(request: web.Request):
        try:
            data = await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise BadRequest(f"body: over this server's --max_request_bytes {service.config.max_request_bytes}")
        try:
            return json.loads(data)
        except (UnicodeDecodeError, ValueError, RecursionError) as failure:
            raise BadRequest(f"body: not valid JSON ({type(failure).__name__}: {str(failure)[:200]})") from None

    async def judge(request: web.Request) -> web.Response:
        try:
            jobs, limits, single = service.parse_judge(await read_json(request))
            results = await service.judge(jobs, limits)
        except ValueError as bad:  # BadRequest, or the pool's own check of a job's data
            return error(413 if "max_request_bytes" in str(bad) else 400, str(bad))
        except SandboxError as broken:
            return error(503, f"the sandbox pool failed: {broken}")
        if results is None:
            return full()
        encoded = [encode_result(result) for result in results]
        return web.json_response(encoded[0] if single else encoded)

    async def run_code(request: web.Request) -> web.Response:
        try:
            parsed = service.parse_run_code(await read_json(request))
            if isinstance(parsed, str):
                return web.json_response(_fusion("SandboxError", parsed, None))
            code, stdin, limits = parsed
            results = await service.judge([(code, [TestCase(stdin, "")], "stdin", None, "")], [limits])
        except ValueError as bad:  # BadRequest, or the pool's own check of a job's data
            return error(413 if "max_request_bytes" in str(bad) else 400, str(bad))
        except SandboxError as broken:
            return web.json_response(_fusion("SandboxError", f"the sandbox pool failed: {broken}", None))
        if results is None:
            return full()
        return web.json_response(service.run_code_response(results[0]))

    async def health(request: web.Request) -> web.Response:
        return web.json_response(service.health())

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(text=service.metrics(), content_type="text/plain", charset="utf-8")

    app = web.Application(client_max_size=service.config.max_request_bytes, middlewares=[guard])
    for prefix in ("", "/t/{token}"):
        app.router.add_post(prefix + "/judge", judge)
        app.router.add_post(prefix + "/run_code", run_code)
        app.router.add_get(prefix + "/health", health)
        app.router.add_get(prefix + "/metrics", metrics)
    return app


async def serve(config: ServeConfig) -> None:
    """Runs until SIGTERM or SIGINT; then finishes the requests in flight and stops the pool."""
    from aiohttp import web

    with Sandbox(workers=config.workers, timeout=config.timeout, memory_mb=config.memory_mb,
                 output_bytes=config.output_bytes) as sandbox:
        service = Service(config, sandbox)
        runner = web.AppRunner(build_app(service), access_log=None, shutdown_timeout=config.shutdown_timeout)
        await runner.setup()
        site = web.TCPSite(runner, config.host, config.port, shutdown_timeout=config.shutdown_timeout)
        await site.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        port = runner.addresses[0][1] if runner.addresses else config.port
        print(f"stepcoder.serve: {config.workers} workers on http://{config.host}:{port} "
              f"({'token required' if config.token else 'no token: loopback only'})", flush=True)
        await stop.wait()
        service.stopping = True
        print(f"stepcoder.serve: stopping ({service.pending} jobs in flight)", flush=True)
        await runner.cleanup()
    print("stepcoder.serve: stopped", flush=True)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_args(argv: list[str] | None = None) -> ServeConfig:
    defaults = ServeConfig()
    parser = argparse.ArgumentParser(prog="python -m stepcoder.serve", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    helps = {"host": "address to bind; anything but loopback needs --token",
             "token": f"required from every client; ${TOKEN_ENV} is better (a command line is visible to "
                      "every user of the machine)",
             "workers": "sandbox worker processes (one test at a time each)",
             "timeout": "CPU seconds per test when a job names none",
             "memory_mb": "address space per test when a job names none",
             "output_bytes": "cap on a test's stdout and on its stderr",
             "max_queue": "jobs admitted and not yet judged; beyond it, 429",
             "shutdown_timeout": "seconds SIGTERM waits for requests in flight",
             "port": "port to listen on (0: a free one, printed at start)",
             "max_timeout": "ceiling on a job's CPU seconds per test", "max_wall_timeout": "ceiling on a job's "
             "wall-clock backstop per test", "max_memory_mb": "ceiling on a job's memory per test",
             "max_request_bytes": "largest request body (413 beyond)", "max_program_bytes": "largest program",
             "max_input_bytes": "largest input plus expected output of one test", "max_jobs": "jobs per "
             "/judge request", "max_tests": "tests per job"}
    for spec in fields(ServeConfig):
        default = getattr(defaults, spec.name)
        kind = str if spec.name in ("host", "token") else type(default)
        parser.add_argument(f"--{spec.name}", type=kind, default=default, help=helps[spec.name])
    args = parser.parse_args(argv)
    config = ServeConfig(**vars(args))
    config.token = config.token or os.environ.get(TOKEN_ENV) or None
    for name in ("workers", "max_request_bytes", "max_program_bytes", "max_input_bytes", "max_jobs", "max_tests",
                 "max_queue", "port"):
        if getattr(config, name) < (0 if name == "port" else 1):
            parser.error(f"--{name} must be positive, got {getattr(config, name)}")
    for name in ("timeout", "max_timeout", "max_wall_timeout", "shutdown_timeout"):
        if not getattr(config, name) > 0:
            parser.error(f"--{name} must be a positive number of seconds")
    if config.max_jobs > config.max_queue:
        parser.error("--max_jobs must be at most --max_queue (a request is admitted whole or not at all)")
    if config.max_wall_timeout < config.max_timeout:
        parser.error("--max_wall_timeout must be at least --max_timeout")
    if config.memory_mb < 64 or config.max_memory_mb < config.memory_mb:
        parser.error("--memory_mb must be at least 64 and at most --max_memory_mb")
    if config.output_bytes < 1024:
        parser.error("--output_bytes must be at least 1024")
    if config.token is None and not is_loopback(config.host):
        parser.error(f"--host {config.host} is reachable from other machines: give --token (or set ${TOKEN_ENV}) "
                     "so that only your clients can run programs here")
    return config


def main(argv: list[str] | None = None) -> None:
    config = parse_args(argv)
    try:
        import aiohttp  # noqa: F401
    except ImportError:
        sys.exit('error: stepcoder.serve needs aiohttp: pip install -e ".[serve]"')
    try:
        asyncio.run(serve(config))
    except OSError as failure:
        sys.exit(f"error: cannot serve on {config.host}:{config.port}: {failure.strerror or failure}")


if __name__ == "__main__":
    main()
