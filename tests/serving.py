"""Test helpers for ``python -m stepcoder.serve``: a server subprocess on a free loopback port, and a
``RemoteSandbox`` over one that looks like a local pool to the sandbox tests (the attack tests run on both)."""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile

from stepcoder.sandbox import Sandbox

SERVE_TOKEN = "test-token-3f9a"


class Served:
    """A ``python -m stepcoder.serve`` subprocess on a free loopback port, with a temp dir of its own."""

    def __init__(self, workers: int, *flags: str, token: str | None = SERVE_TOKEN):
        self.token = token
        self.tmp = tempfile.mkdtemp(prefix="stepcoder-served-")
        command = [sys.executable, "-m", "stepcoder.serve", "--port", "0", "--workers", str(workers), *flags]
        if token:
            command += ["--token", token]
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                        env=dict(os.environ, TMPDIR=self.tmp))
        line = self.process.stdout.readline()
        found = re.search(r"http://[^ ]+:(\d+)", line)
        if not found:
            self.process.kill()
            raise RuntimeError(f"stepcoder.serve did not start: {line}{self.process.stdout.read()}")
        self.port = int(found.group(1))
        self.base = f"http://127.0.0.1:{self.port}"
        self.url = f"{self.base}/t/{token}" if token else self.base

    def worker_pids(self) -> list[int]:
        """The server's children: its sandbox workers."""
        return [int(entry) for entry in os.listdir("/proc")
                if entry.isdigit() and _parent(int(entry)) == self.process.pid]

    def stop(self) -> tuple[int, str]:
        """SIGTERM; the exit status and the rest of its output."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        output = self.process.communicate(timeout=60)[0]
        if self.process.returncode < 0:  # killed (a test's kill -9): it could not clean up after itself
            shutil.rmtree(self.tmp, ignore_errors=True)
        with contextlib.suppress(OSError):
            os.rmdir(self.tmp)  # empty unless the server left something behind (tests look before)
        return self.process.returncode, output


def _parent(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    return int(stat[stat.rindex(")") + 2:].split()[1])


@contextlib.contextmanager
def served_sandbox(workers: int = 2, timeout: float = 1.0, *flags: str):
    """A RemoteSandbox over a fresh server, with ``worker_pids()`` (the server's workers) as a local pool has."""
    from stepcoder.remote import RemoteSandbox

    server = Served(workers, *flags)
    try:
        with RemoteSandbox(server.url, timeout=timeout) as remote:
            remote.worker_pids = server.worker_pids
            remote.server = server
            yield remote
    finally:
        server.stop()


def sandbox_pool(kind: str, workers: int = 2, timeout: float = 1.0):
    """A local ``Sandbox`` or, for kind "served", the same behind ``stepcoder.serve`` (attack tests run on both)."""
    if kind == "served":
        return served_sandbox(workers, timeout)
    return Sandbox(workers=workers, timeout=timeout)
