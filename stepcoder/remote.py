"""Judging on other machines: ``RemoteSandbox`` speaks to one or more ``python -m stepcoder.serve`` servers
with the interface of a local ``Sandbox`` (``submit``, ``run``, ``run_many``, ``close``), so the trainer and
``evaluate`` take ``--sandbox_url URL[,URL...]`` and change nothing else. Verdicts and executed lines are
the server's ``Sandbox``'s, for the same job under the same limits, which every request states.

Each job goes to the server with the fewest jobs in flight per worker. A server that refuses a
connection, drops it, times out or answers 5xx is set aside for a back-off and the job retried on
another (a judge is idempotent), for up to ``retry_seconds`` without any server answering; a full queue
(429) is waited out, not counted as a failure. Only the standard library is used: the trainer needs
no HTTP package.

A URL carries its token in the path (``http://host:8080/t/TOKEN``, as Sandbox Fusion clients take it), or
the token comes from ``token=`` / ``$STEPCODER_SERVE_TOKEN`` and travels as ``Authorization: Bearer``.
"""
from __future__ import annotations

import http.client
import json
import os
import threading
import time
import urllib.parse
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Iterable, Sequence

from stepcoder.sandbox import C_TRACER_SLOWDOWN, WALL_FACTOR, WALL_SLACK, Result, Sandbox, SandboxError
from stepcoder.wire import WireError, decode_result, encode_job

TOKEN_ENV = "STEPCODER_SERVE_TOKEN"
IN_FLIGHT_PER_WORKER = 2       # requests kept at a server per worker: its queue never runs dry
MAX_CONNECTIONS = 512
BACKOFF_START, BACKOFF_MAX = 0.5, 10.0
START_WAIT = 30.0              # seconds to wait at start for servers still coming up
CONNECT_TIMEOUT = 10.0


@dataclass
class _Server:
    url: str                   # as given, for messages (the token masked)
    host: str
    port: int
    path: str                  # the base path, "/t/TOKEN" or ""
    secure: bool
    headers: dict
    capacity: int = 1          # its workers, from /health
    in_flight: int = 0
    down_until: float = 0.0
    backoff: float = BACKOFF_START
    layers: dict = field(default_factory=dict)

    def connect(self, timeout: float) -> http.client.HTTPConnection:
        kind = http.client.HTTPSConnection if self.secure else http.client.HTTPConnection
        return kind(self.host, self.port, timeout=timeout)


class RemoteSandbox:
    """A ``Sandbox`` whose workers are ``stepcoder.serve`` servers.

    Args:
        urls: ``"http://a:8080/t/TOKEN,http://b:8080/t/TOKEN"`` or a list of URLs.
        timeout, wall_timeout, memory_mb, trace, stop_on_first_failure: as for ``Sandbox``; sent with
            every job (a server caps them at its own maxima).
        token: sent as a bearer token to servers whose URL carries none (default: ``$STEPCODER_SERVE_TOKEN``).
        retry_seconds: how long a job may go without any server answering before ``SandboxError``.
    """

    def __init__(self, urls: str | Sequence[str], timeout: float = 2.0, memory_mb: int = 1024, *,
                 wall_timeout: float | None = None, trace: bool = True, stop_on_first_failure: bool = True,
                 token: str | None = None, retry_seconds: float = 300.0):
        urls = [url.strip() for url in (urls.split(",") if isinstance(urls, str) else urls) if url.strip()]
        if not urls:
            raise ValueError("sandbox_url: give at least one server URL, e.g. http://judge-1:8080/t/TOKEN")
        token = token or os.environ.get(TOKEN_ENV) or None
        self.timeout = float(timeout)
        self.wall_timeout = float(WALL_FACTOR * timeout + WALL_SLACK if wall_timeout is None else wall_timeout)
        self.defaults = {"timeout": self.timeout, "wall_timeout": self.wall_timeout, "memory_mb": memory_mb,
                         "trace": trace, "stop_on_first_failure": stop_on_first_failure}
        self.retry_seconds = retry_seconds
        self._servers = [_parse_url(url, token) for url in urls]
        self._lock = threading.Lock()
        self._local = threading.local()
        self._closed = False
        self._turn = 0
        self._start()
        slots = min(MAX_CONNECTIONS, sum(IN_FLIGHT_PER_WORKER * server.capacity for server in self._servers))
        self._threads = ThreadPoolExecutor(max_workers=max(1, slots), thread_name_prefix="stepcoder-remote")

    def __enter__(self) -> RemoteSandbox:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._threads.shutdown(wait=True)

    def capabilities(self) -> dict:
        """The isolation layers of the first server that answered."""
        return next((dict(server.layers) for server in self._servers if server.layers), {})

    def submit(self, program: str, tests, kind: str = "stdin", entry: str | None = None, setup: str = "",
               **limits) -> Future:
        if self._closed:
            raise ValueError("this RemoteSandbox is closed")
        asked = {**self.defaults, **{name: value for name, value in limits.items() if value is not None}}
        if "timeout" in limits and "wall_timeout" not in limits:
            asked["wall_timeout"] = WALL_FACTOR * asked["timeout"] + WALL_SLACK
        try:
            body = json.dumps(encode_job(program, tests, kind, entry, setup, **asked)).encode()
        except (WireError, TypeError, AttributeError) as error:
            raise ValueError(f"job: cannot be sent to a sandbox server: {error}") from None
        # the longest a server may take: every test to its wall limit (stretched for the C tracer)
        seconds = 60.0 + len(tests) * asked["wall_timeout"] * C_TRACER_SLOWDOWN
        return self._threads.submit(self._judge, body, seconds)

    def run(self, program: str, tests, kind: str = "stdin", entry: str | None = None, setup: str = "",
            **limits) -> Result:
        return self.submit(program, tests, kind, entry, setup, **limits).result()

    def run_many(self, jobs: Iterable[tuple], progress: bool = False, **limits) -> list[Result]:
        futures = [self.submit(*job, **limits) for job in jobs]
        return [future.result() for future in futures]

    # ----------------------------------------------------------------------------------------------

    def _start(self) -> None:
        """Reads every server's pool size from /health. A wrong token is an error at once. Servers that do
        not answer are warned about and retried later, as long as one did; when none does, they are asked
        again for up to START_WAIT seconds (a fleet started together with the trainer)."""
        deadline = time.monotonic() + START_WAIT
        failures: dict[str, str] = {}
        while True:
            for server in self._servers:
                if server.layers and server.url not in failures:
                    continue
                try:
                    status, data = self._request(server, "GET", "/health", None, CONNECT_TIMEOUT)
                except (OSError, http.client.HTTPException) as failure:
                    failures[server.url] = f"{type(failure).__name__}: {failure}"
                    continue
                if status == 401:
                    raise SandboxError(f"sandbox server {server.url} refused the token: give it in the URL "
                                       f"(http://host:port/t/TOKEN) or in ${TOKEN_ENV}")
                if status != 200:
                    raise SandboxError(f"sandbox server {server.url}: /health answered {status}: {data[:200]!r}")
                health = json.loads(data)
                server.capacity, server.layers = int(health["workers"]), health.get("layers", {})
                failures.pop(server.url, None)
            if len(failures) < len(self._servers) or time.monotonic() + 1.0 > deadline:
                break
            time.sleep(1.0)
        if len(failures) == len(self._servers):
            raise SandboxError("no sandbox server answered: " + "; ".join(f"{u}: {e}" for u, e in failures.items()))
        for url, failure in failures.items():
            warnings.warn(f"sandbox server {url} is not answering ({failure}); jobs go to the others and it is "
                          "retried", RuntimeWarning, stacklevel=3)
        for server in self._servers:
            if server.url in failures:
                self._set_aside(server)

    def _judge(self, body: bytes, seconds: float) -> Result:
        deadline = time.monotonic() + self.retry_seconds
        last = "no attempt"
        while True:
            server = self._pick()
            try:
                status, data = self._request(server, "POST", "/judge", body, seconds)
            except (OSError, http.client.HTTPException) as failure:
                last = f"{server.url}: {type(failure).__name__}: {failure}"
                self._set_aside(server)
            else:
                if status == 200:
                    self._recovered(server)
                    return decode_result(json.loads(data), f"the reply of {server.url}")
                message = _message(data)
                if status == 429:  # alive and busy: wait, and this does not count against the deadline
                    deadline = time.monotonic() + self.retry_seconds
                    time.sleep(1.0)
                    continue
                if status in (400, 413):
                    raise ValueError(f"sandbox server {server.url} refused the job: {message}")
                if status == 401:
                    raise SandboxError(f"sandbox server {server.url} refused the token")
                last = f"{server.url}: HTTP {status}: {message}"
                self._set_aside(server)
            finally:
                with self._lock:
                    server.in_flight -= 1
            if time.monotonic() > deadline:
                raise SandboxError(f"no sandbox server judged the job in {self.retry_seconds:.0f} s; last: {last}")

    def _pick(self) -> _Server:
        """The live server with the fewest jobs in flight per worker (ties in turn); when every server is
        set aside, the one back soonest, after waiting for it."""
        while True:
            with self._lock:
                now = time.monotonic()
                live = [server for server in self._servers if server.down_until <= now]
                if live:
                    self._turn += 1
                    count = len(self._servers)
                    server = min(live, key=lambda s: (s.in_flight / s.capacity,
                                                      (self._servers.index(s) - self._turn) % count))
                    server.in_flight += 1
                    return server
                wait = min(server.down_until for server in self._servers) - now
            time.sleep(max(0.0, wait))

    def _set_aside(self, server: _Server) -> None:
        with self._lock:
            server.down_until = time.monotonic() + server.backoff
            server.backoff = min(BACKOFF_MAX, server.backoff * 2)

    def _recovered(self, server: _Server) -> None:
        if server.backoff != BACKOFF_START:
            with self._lock:
                server.backoff = BACKOFF_START

    def _request(self, server: _Server, method: str, path: str, body: bytes | None,
                 seconds: float) -> tuple[int, bytes]:
        """One request on this thread's kept-alive connection to `server`; a connection the server closed
        while idle is reopened once, silently."""
        connections = self._local.__dict__.setdefault("connections", {})
        for attempt in (0, 1):
            connection = connections.get(id(server))
            reused = connection is not None
            if connection is None:
                connection = connections[id(server)] = server.connect(seconds)
            connection.timeout = seconds
            if connection.sock is not None:
                connection.sock.settimeout(seconds)
            try:
                headers = dict(server.headers, **({"Content-Type": "application/json"} if body is not None else {}))
                connection.request(method, server.path + path, body=body, headers=headers)
                response = connection.getresponse()
                return response.status, response.read()
            except (ConnectionResetError, BrokenPipeError, http.client.RemoteDisconnected):
                connections.pop(id(server)).close()
                if not reused or attempt == 1:
                    raise
            except BaseException:
                connections.pop(id(server)).close()
                raise
        raise AssertionError("unreachable")


def check_urls(urls: str) -> None:
    """Raises ValueError naming a malformed URL in a --sandbox_url list (before any work starts)."""
    given = [url.strip() for url in urls.split(",") if url.strip()]
    if not given:
        raise ValueError("sandbox_url: give at least one server URL, e.g. http://judge-1:8080/t/TOKEN")
    for url in given:
        _parse_url(url, None)


def _parse_url(url: str, token: str | None) -> _Server:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"sandbox_url: {url!r} is not a server URL; expected http://host:port[/t/TOKEN]")
    path = parts.path.rstrip("/")
    segments = path.split("/")
    in_path = len(segments) >= 3 and segments[-2] == "t" and segments[-1]
    headers = {} if in_path or not token else {"Authorization": f"Bearer {token}"}
    shown = url.replace(f"/t/{segments[-1]}", "/t/***") if in_path else url
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return _Server(shown, parts.hostname, port, path, parts.scheme == "https", headers)


def _message(data: bytes) -> str:
    try:
        return str(json.loads(data).get("error", data[:300]))
    except (ValueError, AttributeError):
        return repr(data[:300])


def open_sandbox(url: str | None, *, workers: int, **settings):
    """A local ``Sandbox`` of `workers` processes, or a ``RemoteSandbox`` over `url` when one is given."""
    if url:
        return RemoteSandbox(url, **settings)
    return Sandbox(workers=workers, **settings)
