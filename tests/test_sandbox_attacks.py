"""Programs that try to escape the sandbox or harm the host. Each must end in the right verdict with
the host unharmed, the pool healthy, and no process left behind.

The attacks that would hurt the machine if a layer were broken (kill(-1) as root ends every process it
can reach; a fork bomb) run in a child Python inside a throwaway PID namespace
(`unshare --pid --fork --mount-proc`), and are skipped where that namespace cannot be made.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import uuid

import pytest

from conftest import descendants
from stepcoder.sandbox import Sandbox, TestCase

ADD = "a, b = map(int, input().split())\nprint(a + b)\n"


def assert_pool_healthy(sb: Sandbox) -> None:
    assert sb.run(ADD, [TestCase("2 3\n", "5\n")]).verdict == "pass"
    for pid in sb.worker_pids():
        left = descendants(pid)
        assert "Z" not in left.values(), f"zombie under worker {pid}: {left}"
        assert len(left) <= 1, f"stray processes under worker {pid}: {left}"  # only the PID-namespace init


@pytest.fixture(scope="module")
def guarded():
    with Sandbox(workers=2, timeout=1.0) as sb:
        yield sb


def judge(sb: Sandbox, program: str, expected: str = "") -> str:
    result = sb.run(program, [TestCase("", expected)])
    assert_pool_healthy(sb)
    return result.verdict


def test_network_socket_is_refused(guarded):
    assert judge(guarded, "import socket\nsocket.create_connection(('127.0.0.1', 9))\n") == "violation"
    assert judge(guarded, "import socket\nsocket.socketpair()\n") == "violation"


def test_raw_socket_syscall_through_ctypes_is_refused(guarded):
    program = "import ctypes\nlibc = ctypes.CDLL(None)\nprint(libc.syscall(41, 2, 1, 0))\n"  # socket(AF_INET, ...)
    assert judge(guarded, program) == "violation"


@pytest.mark.parametrize("program", [
    "import os\nos.system('touch /tmp/stepcoder-pwned')\n",
    "import subprocess\nsubprocess.run(['/bin/true'])\n",
    "import os\nos.execv('/bin/true', ['true'])\n",
    "import os\nos.posix_spawn('/bin/true', ['true'], {})\n",
    "import os\nos.fork()\n",
])
def test_new_processes_and_programs_are_refused(guarded, program):
    assert judge(guarded, program) == "violation"
    assert not os.path.exists("/tmp/stepcoder-pwned")


def test_writing_outside_its_directory_is_refused(guarded):
    token = uuid.uuid4().hex
    targets = [f"/tmp/{token}", f"/dev/shm/{token}", f"/var/tmp/{token}", f"../{token}", f"../../{token}",
               f"{os.getcwd()}/{token}", f"/root/{token}", f"/etc/{token}"]
    program = textwrap.dedent(f"""
        import os
        written = []
        paths = {targets!r} + ['/proc/self/fd/' + fd + '/{token}' for fd in os.listdir('/proc/self/fd')]
        for path in paths:
            try:
                with open(path, 'w') as f:
                    f.write('x')
                written.append(path)
            except OSError:
                pass
        open('inside.txt', 'w').write('fine')
        print(written, open('inside.txt').read())
    """)
    assert judge(guarded, program, "[] fine\n") == "pass"
    leftovers = [path for path in targets if os.path.exists(path) or os.path.exists(os.path.join("/tmp", token))]
    assert leftovers == []


def test_allocating_ten_gib_is_a_memory_limit(guarded):
    assert judge(guarded, "x = bytearray(10 * 1024 ** 3)\nprint(len(x))\n") == "memory_limit"
    assert judge(guarded, "x = [0] * (10 * 1024 ** 3 // 8)\n") == "memory_limit"


def test_printing_100_mib_is_an_output_limit(guarded):
    assert judge(guarded, "import sys\nsys.stdout.write('x' * (100 << 20))\n") == "output_limit"
    assert judge(guarded, "import os\nos.write(1, b'x' * (100 << 20))\n") == "output_limit"
    assert judge(guarded, "import sys\nsys.stderr.write('x' * (100 << 20))\n") == "output_limit"


def test_a_loop_ignoring_every_catchable_signal_times_out(guarded):
    program = textwrap.dedent("""
        import signal
        for sig in (signal.SIGTERM, signal.SIGALRM, signal.SIGXCPU, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        while True:
            pass
    """)
    assert judge(guarded, program) == "timeout"
    assert judge(guarded, "import time\ntime.sleep(60)\n") == "timeout"


def test_ptrace_and_process_memory_are_refused(guarded):
    assert judge(guarded, "import ctypes\nctypes.CDLL(None).ptrace(0, 0, 0, 0)\n") == "violation"
    program = "import ctypes\nctypes.CDLL(None).syscall(310, 1, 0, 0, 0, 0, 0)\n"  # process_vm_readv
    assert judge(guarded, program) == "violation"


def test_closing_stdout_and_exiting_before_output_never_pass(guarded):
    assert judge(guarded, "import os\nos.close(1)\nprint(5)\n", "5\n") in ("wrong_answer", "runtime_error")
    assert judge(guarded, "import os\nos._exit(0)\nprint(5)\n", "5\n") == "wrong_answer"
    program = "import sys, os\nsys.stdout.write('5\\n')\nsys.stdout.flush()\nos._exit(0)\n"
    assert judge(guarded, program, "5\n") == "pass"  # what it printed is what counts


def test_an_object_whose_eq_always_says_true_does_not_pass(guarded):
    program = textwrap.dedent("""
        class Liar:
            def __eq__(self, other):
                return True
            __hash__ = object.__hash__
        class LyingList(list):
            def __eq__(self, other):
                return True
        def liar():
            return Liar()
        def lying_list():
            return LyingList([0])
    """)
    for entry in ("liar", "lying_list"):
        result = guarded.run(program, [TestCase([], [1, 2, 3])], kind="function", entry=entry)
        assert result.verdict == "wrong_answer"


def test_expected_output_cannot_be_read_from_its_own_memory(guarded):
    secret = f"secret-{uuid.uuid4().hex}"
    program = textwrap.dedent("""
        import gc, re
        prefix = 'secret-'
        found = set()
        for obj in gc.get_objects():
            for text in (obj if isinstance(obj, (list, tuple, set)) else [obj]):
                if isinstance(text, str) and text.startswith(prefix) and len(text) == len(prefix) + 32:
                    found.add(text)
        try:  # non-dumpable after the uid change, so this is refused there; elsewhere it finds nothing
            with open('/proc/self/maps') as maps, open('/proc/self/mem', 'rb', 0) as mem:
                for line in maps:
                    start, end = (int(x, 16) for x in line.split()[0].split('-'))
                    if 'r' not in line.split()[1] or end - start > 1 << 28:
                        continue
                    try:
                        mem.seek(start)
                        chunk = mem.read(end - start)
                    except (OSError, ValueError, OverflowError):
                        continue
                    found.update(m.decode() for m in re.findall(rb'secret-[0-9a-f]{32}', chunk))
        except PermissionError:
            pass
        found.discard(prefix + 'x' * 32)
        print(sorted(found)[0] if found else 'nothing')
    """)
    result = guarded.run(program, [TestCase("", secret + "\n")])
    assert result.verdict == "wrong_answer"
    assert secret not in result.tests[0].stdout


def test_deep_recursion_and_segfault_are_runtime_errors(guarded):
    assert judge(guarded, "def f(n):\n    return f(n + 1)\nf(0)\n") == "runtime_error"
    unbounded = "import sys\nsys.setrecursionlimit(10 ** 8)\ndef f(n):\n    return f(n + 1)\nf(0)\n"
    assert judge(guarded, unbounded) in ("runtime_error", "memory_limit", "timeout")  # whichever limit it hits first
    finite = "import sys\nsys.setrecursionlimit(10 ** 6)\ndef f(n):\n    return 0 if n == 0 else 1 + f(n - 1)\nprint(f(100000))\n"
    assert judge(guarded, finite, "100000\n") == "pass"
    assert judge(guarded, "import ctypes\nctypes.string_at(0)\n") == "runtime_error"


def test_legitimate_threads_pass(guarded):
    program = textwrap.dedent("""
        import threading
        from concurrent.futures import ThreadPoolExecutor
        totals = []
        workers = [threading.Thread(target=lambda k=k: totals.append(sum(range(k * 1000)))) for k in range(8)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        with ThreadPoolExecutor(4) as pool:
            squares = list(pool.map(lambda x: x * x, range(10)))
        print(len(totals), sum(squares))
    """)
    assert judge(guarded, program, "8 285\n") == "pass"


def test_reading_secrets_of_the_host_is_refused(guarded):
    if not guarded.capabilities()["unprivileged_uid"]:
        pytest.skip("the workers are not root, so the test children already run as this user")
    program = "for path in ('/etc/shadow', '/root/.bash_history', '/proc/1/environ'):\n" \
              "    try:\n        open(path).read(1)\n        print(path)\n    except OSError:\n        pass\n"
    assert judge(guarded, program, "") == "pass"


# ------------------------------------------------------------------------------------------------
# Lethal attacks, each run from a throwaway PID namespace so that a broken layer cannot hurt the host.

LETHAL = {
    "kill_all": ("import os, signal\nos.kill(-1, signal.SIGKILL)\nprint('survived')\n", {"violation"}),
    "kill_parent": ("import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\nprint('survived')\n",
                    {"violation", "runtime_error"}),
    "kill_everyone_found": (textwrap.dedent("""
        import os, signal
        for pid in os.listdir('/proc'):
            if pid.isdigit() and int(pid) != os.getpid():
                os.kill(int(pid), signal.SIGKILL)
        print('survived')
    """), {"violation"}),
    "fork_bomb": ("import os\nwhile True:\n    os.fork()\n", {"violation"}),
    "tgkill_parent": ("import ctypes, os\nctypes.CDLL(None).syscall(234, os.getppid() or 1, 1, 9)\n", {"violation"}),
}

RUNNER = """
import json, os, sys
sys.path[:0] = json.loads(sys.argv[1])
from stepcoder.sandbox import Sandbox, TestCase
attacks = json.loads(sys.argv[2])
with Sandbox(workers=2, timeout=1.0) as sb:
    verdicts = {name: sb.run(program, [TestCase('', 'x\\n')]).verdict for name, program in attacks.items()}
    healthy = sb.run('print(int(input()) + 1)', [TestCase('41\\n', '42\\n')]).verdict
print(json.dumps({"verdicts": verdicts, "healthy": healthy}))
"""


def _throwaway_pid_namespace() -> list[str] | None:
    unshare = shutil.which("unshare")
    if unshare is None:
        return None
    for prefix in ([unshare, "--pid", "--fork", "--mount-proc"],
                   [unshare, "--user", "--map-root-user", "--pid", "--fork", "--mount-proc"]):
        if subprocess.run([*prefix, "true"], capture_output=True).returncode == 0:
            return prefix
    return None


def test_lethal_attacks_inside_a_throwaway_pid_namespace():
    prefix = _throwaway_pid_namespace()
    if prefix is None:
        pytest.skip("cannot create a throwaway PID namespace here (unshare missing or refused)")
    before = set(descendants(os.getpid()))
    attacks = {name: program for name, (program, _) in LETHAL.items()}
    done = subprocess.run([*prefix, sys.executable, "-c", RUNNER, json.dumps(sys.path), json.dumps(attacks)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    for name, (_, allowed) in LETHAL.items():
        assert report["verdicts"][name] in allowed, (name, report["verdicts"][name])
    assert report["healthy"] == "pass"
    assert set(descendants(os.getpid())) == before  # the namespace and everything in it are gone


def test_without_namespaces_the_other_layers_still_hold():
    with Sandbox(workers=1, timeout=1.0, namespaces=False) as sb:
        layers = sb.capabilities()
        assert not any(layers["namespaces"][name] for name in ("user", "net", "mount", "pid"))
        assert judge(sb, "import socket\nsocket.socket()\n") == "violation"
        assert judge(sb, "import os\nos.fork()\n") == "violation"
        token = uuid.uuid4().hex
        assert judge(sb, f"open('/tmp/{token}', 'w').write('x')\n") == "runtime_error"
        assert not os.path.exists(f"/tmp/{token}")
        assert judge(sb, "x = bytearray(10 * 1024 ** 3)\n") == "memory_limit"
