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
import tempfile
import textwrap
import time
import uuid

import pytest
from conftest import descendants, settled
from serving import sandbox_pool
from trace_reference import settrace_lines

from stepcoder._worker import _world_readable
from stepcoder.sandbox import Sandbox, TestCase

ADD = "a, b = map(int, input().split())\nprint(a + b)\n"


def assert_pool_healthy(sb: Sandbox) -> None:
    assert sb.run(ADD, [TestCase("2 3\n", "5\n")]).verdict == "pass"
    for pid in sb.worker_pids():
        assert settled(pid), f"stray processes under worker {pid}: {descendants(pid)}"


@pytest.fixture(scope="module", params=["local", "served"])
def guarded(request):
    """The pool the attacks below run in: a local Sandbox, and the same behind ``python -m stepcoder.serve``
    (jobs through ``/judge``, results back over HTTP)."""
    with sandbox_pool(request.param) as sb:
        yield sb


def judge(sb: Sandbox, program: str, expected: str = "", **limits) -> str:
    result = sb.run(program, [TestCase("", expected)], **limits)
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
        paths = {targets!r} + ['/proc/self/fd/' + str(fd) + '/{token}' for fd in range(16)]
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
    assert judge(guarded, "import time\ntime.sleep(60)\n", wall_timeout=1.5) == "timeout"  # the wall backstop


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
    """), {"violation", "runtime_error"}),  # listing /proc is refused (Landlock) or killing is (seccomp)
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


# ================================================================================================
# Round two: attacks a second review reproduced against the first sandbox (each of these tests failed
# there). Every test builds its own pool (or a runner subprocess) so one attack's leftovers cannot hide
# or cause another's result.
# ================================================================================================



REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _secret(prefix: str = "tok-") -> str:
    return prefix + uuid.uuid4().hex


def _world_readable_dir() -> str:
    """A fresh mode-755 directory under /tmp (pytest's tmp_path sits in a mode-700 parent)."""
    path = tempfile.mkdtemp(prefix="stepcoder-redteam-")
    os.chmod(path, 0o755)
    return path


@pytest.fixture
def no_new_processes():
    """Whatever a test starts (pools, runners, helpers) is gone when it ends."""
    before = set(descendants(os.getpid()))
    yield
    deadline = time.monotonic() + 5
    while set(descendants(os.getpid())) - before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert set(descendants(os.getpid())) - before == set(), "processes left behind"


# --- 1. Forged passes by reading the answers from disk ----------------------------------------------

DATASET_READER = textwrap.dedent("""
    import json
    question = input()
    with open({path!r}) as f:
        print(json.load(f)[question])
""")


def test_answers_in_a_world_readable_dataset_file_cannot_be_read(no_new_processes):
    """Attack 1a: Landlock restricts writes only, so a program can open a world-readable dataset file
    (mode 644 in a mode-755 directory) that holds the expected output and print it."""
    secret = _secret()
    folder = _world_readable_dir()
    try:
        path = os.path.join(folder, "dataset.json")
        with open(path, "w") as f:
            json.dump({"question-7": secret}, f)
        os.chmod(path, 0o644)
        with Sandbox(workers=1, timeout=1.0) as sb:
            result = sb.run(DATASET_READER.format(path=path), [TestCase("question-7\n", secret + "\n")])
            assert result.verdict != "pass", "the program read the expected output from a dataset file"
            assert secret not in result.tests[0].stdout
            assert_pool_healthy(sb)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


BUILTIN_READER = textwrap.dedent("""
    import json, sys
    stdin = sys.stdin.read()
    with open({path!r}) as f:
        problems = json.load(f)
    for problem in problems:
        for test in problem["tests"]:
            if problem["id"] == {problem_id!r} and test["input"] == stdin:
                sys.stdout.write(test["expected"])
""")


def test_the_builtin_problem_file_cannot_be_read_for_answers(no_new_processes):
    """Attack 1b: the package's own data file (stepcoder/data/builtin_problems.json, world-readable)
    holds every built-in problem's expected outputs: look the input up there and print the answer."""
    from stepcoder.data import load_builtin, loaders

    problem = next(p for p in load_builtin().problems if p.kind == "stdin" and p.entry is None)
    path = os.path.join(os.path.dirname(os.path.abspath(loaders.__file__)), loaders.BUILTIN_FILE)
    assert os.path.isfile(path)
    with Sandbox(workers=1, timeout=1.0) as sb:
        result = sb.run(BUILTIN_READER.format(path=path, problem_id=problem.id), problem.tests)
        assert result.verdict != "pass", f"the program copied {problem.id}'s answers from {path}"
        assert_pool_healthy(sb)


def test_etc_passwd_cannot_be_read(no_new_processes):
    """Attack 1c: print the first line of /etc/passwd where that line is the expected output."""
    with open("/etc/passwd") as f:
        first = f.readline()
    with Sandbox(workers=1, timeout=1.0) as sb:
        result = sb.run("print(open('/etc/passwd').readline(), end='')\n", [TestCase("", first)])
        assert result.verdict != "pass", "the program read /etc/passwd"
        assert_pool_healthy(sb)


# --- 2. Forged passes by reading an earlier job's output from memory --------------------------------

# Both scanners copy memory into one buffer allocated up front: allocating a fresh bytes object per
# region would reuse (and overwrite) exactly the freed heap chunks the earlier output sits in. The
# token regex is split so that the program's own text cannot match it.
SCAN_MAPS = textwrap.dedent("""
    import ctypes, re
    pattern = re.compile(b'tok-' + b'[0-9a-f]{32}')
    STEP, KEEP = 1 << 16, 64
    buf = bytearray(KEEP + STEP)
    view = memoryview(buf)
    base = ctypes.addressof((ctypes.c_char * len(buf)).from_buffer(buf))
    found = {}
    try:
        with open('/proc/self/maps') as maps:
            regions = [line.split() for line in maps]
    except OSError:
        regions = []
    for fields in regions:
        start, end = (int(x, 16) for x in fields[0].split('-'))
        if not fields[1].startswith('r') or (len(fields) > 5 and fields[5].startswith('[v')):
            continue
        buf[:KEEP] = bytes(KEEP)
        for addr in range(start, end, STEP):
            n = min(STEP, end - addr)
            ctypes.memmove(base + KEEP, addr, n)
            for m in pattern.finditer(view[:KEEP + n]):
                found[m.group()] = found.get(m.group(), 0) + 1
            buf[:KEEP] = buf[n:KEEP + n]
    print(max(found, key=found.get).decode() if found else 'nothing')
""")

# No /proc: probe +-256 MiB around known addresses (sbrk(0), fresh objects) by write()-ing each 64 KiB
# block into a pipe, which fails with EFAULT on unmapped or unreadable memory instead of crashing
# (a write to /dev/null never touches the buffer, so it cannot tell), then read the bytes back.
SCAN_PROBE = textwrap.dedent("""
    import ctypes, os, re
    libc = ctypes.CDLL(None, use_errno=True)
    libc.sbrk.restype = ctypes.c_void_p
    libc.sbrk.argtypes = [ctypes.c_ssize_t]
    libc.write.restype = ctypes.c_ssize_t
    libc.write.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t]
    pattern = re.compile(b'tok-' + b'[0-9a-f]{32}')
    r, w = os.pipe()
    os.set_blocking(w, False)
    STEP, KEEP, WINDOW = 1 << 16, 64, 256 << 20
    buf = bytearray(KEEP + STEP)
    view = memoryview(buf)
    found = {}
    anchors = [libc.sbrk(0) or 0, id(object()), id(pattern), id(libc)]
    done = set()
    for anchor in anchors:
        addr, end = max((anchor - WINDOW) & ~(STEP - 1), STEP), anchor + WINDOW
        while addr < end:
            block = addr & ~(STEP - 1)
            if block in done:
                addr = block + STEP
                continue
            n = libc.write(w, addr, block + STEP - addr)
            if n <= 0:
                addr = block + STEP
                buf[:KEEP] = bytes(KEEP)
                continue
            if addr + n == block + STEP:
                done.add(block)
            got = os.readv(r, [view[KEEP:KEEP + n]])
            for m in pattern.finditer(view[:KEEP + got]):
                found[m.group()] = found.get(m.group(), 0) + 1
            buf[:KEEP] = buf[got:KEEP + got]
            addr += n
    print(max(found, key=found.get).decode() if found else 'nothing')
""")

# The earlier job is a correct program (as in RL, where many samples of one problem are judged in the
# same pool); trailing spaces do not change its verdict but decide where its output lands in the
# worker's heap, so three of them put copies in several kinds of chunk.
EARLIER_PADS = (0, 600, 500_000)


def _earlier_jobs(secret: str) -> list[tuple]:
    return [(f"print({secret!r} + ' ' * {pad})\n", [TestCase("", secret + "\n")]) for pad in EARLIER_PADS]


@pytest.mark.parametrize("pool", ["local", "served"])
@pytest.mark.parametrize("scanner", ["proc_maps", "probe_without_proc"])
def test_an_earlier_jobs_output_cannot_be_read_from_memory(scanner, pool, no_new_processes):
    """Attack 2: job A prints a secret (and passes); job B, on the same one-worker pool, whose expected
    output is that secret, scans its own memory (inherited from the worker that handled A's output) for
    the secret's pattern and prints it: (a) over the regions of /proc/self/maps, (b) without /proc, by
    probing pages around known addresses with write() into a pipe."""
    secret = _secret()
    with sandbox_pool(pool, workers=1) as sb:
        for program, tests in _earlier_jobs(secret):
            assert sb.run(program, tests).verdict == "pass"
        scan = SCAN_MAPS if scanner == "proc_maps" else SCAN_PROBE
        result = sb.run(scan, [TestCase("", secret + "\n")])
        assert secret not in result.tests[0].stdout, "job B found job A's output in its own memory"
        assert result.verdict != "pass"
        assert_pool_healthy(sb)


# --- 3. Host escape through the terminal (TIOCSTI) --------------------------------------------------

TIOCSTI_ATTACK = textwrap.dedent("""
    import fcntl, os, sys, termios
    payload = b'echo PWNED\\n'
    ppid = os.getppid()
    targets = ['/dev/tty', 0, 1, 2, f'/proc/{ppid}/fd/0', f'/proc/{ppid}/fd/1', f'/proc/{ppid}/fd/2',
               '/proc/1/fd/0', '/proc/self/fd/0']
    hits = []
    for target in targets:
        for flags in (os.O_RDONLY, os.O_RDWR):
            try:
                fd = target if isinstance(target, int) else os.open(target, flags | os.O_NOCTTY)
                for byte in payload:
                    fcntl.ioctl(fd, termios.TIOCSTI, bytes([byte]))
                hits.append(str(target))
                break
            except OSError:
                pass
    print('PWNED' if hits else 'safe')
    print(hits, file=sys.stderr)
""")

TTY_RUNNER = r"""
import fcntl, json, os, struct, sys, termios
sys.path[:0] = json.loads(sys.argv[1])
os.setsid()
tty = os.open(sys.argv[2], os.O_RDWR)  # a session leader without a terminal acquires it on open
try:
    fcntl.ioctl(tty, termios.TIOCSCTTY, 0)
except OSError:
    pass
owns = os.tcgetpgrp(tty) == os.getpgrp()
from stepcoder.sandbox import Sandbox, TestCase
with Sandbox(workers=1, timeout=1.0) as sb:
    result = sb.run(sys.argv[3], [TestCase('', 'PWNED\n')])
    healthy = sb.run('print(int(input()) + 1)', [TestCase('41\n', '42\n')]).verdict
pending = struct.unpack('i', fcntl.ioctl(tty, termios.FIONREAD, b'\0\0\0\0'))[0]
termios.tcflush(tty, termios.TCIFLUSH)
print(json.dumps({"owns_tty": owns, "verdict": result.verdict, "stdout": result.tests[0].stdout,
                  "stderr": result.tests[0].stderr, "pending": pending, "healthy": healthy}))
"""


def test_tiocsti_cannot_inject_keystrokes_into_the_trainers_terminal():
    """Attack 3: the test child stays in the trainer's session, so it can open /dev/tty and push
    `echo PWNED` into the terminal's input with TIOCSTI (the shell would run it once the trainer exits).
    Reproduced in a runner that owns a fresh pseudo-terminal as its controlling terminal; also tries
    TIOCSTI on fds 0-2 and on /proc/<ppid>/fd/0 and /proc/1/fd/0."""
    try:
        master, slave = os.openpty()
    except OSError as error:
        pytest.skip(f"cannot make a pseudo-terminal here: {error}")
    before = set(descendants(os.getpid()))
    try:
        slave_name = os.ttyname(slave)
        done = subprocess.run([sys.executable, "-c", TTY_RUNNER, json.dumps(sys.path), slave_name, TIOCSTI_ATTACK],
                              stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60, check=False)
        os.set_blocking(master, False)
        try:
            echoed = os.read(master, 65536).decode(errors="replace")
        except (BlockingIOError, OSError):
            echoed = ""
    finally:
        os.close(master)
        os.close(slave)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    if not report["owns_tty"]:
        pytest.skip("the runner could not make the pseudo-terminal its controlling terminal")
    assert report["pending"] == 0 and "PWNED" not in echoed, \
        f"keystrokes were injected into the terminal ({report['pending']} bytes pending; {report['stderr']!r})"
    assert report["verdict"] != "pass", report
    assert report["healthy"] == "pass"
    assert set(descendants(os.getpid())) == before


# --- 4. Crashing the trainer, then hanging the pool ------------------------------------------------

# Each scenario gets a one-worker pool in a thread of a runner process: its jobs, then a healthy run,
# then close(). A scenario that raises in the trainer or never finishes shows in the report instead
# of crashing or hanging pytest. Scenarios are {name: [(program, [(input, expected), ...], kind, entry)]}
# as a Python literal on stdin (big ints and sets survive literal_eval).
SCENARIO_RUNNER = r"""
import ast, json, os, sys, threading, time
sys.path[:0] = json.loads(sys.argv[1])
watchdog = float(sys.argv[2])
from stepcoder.sandbox import Sandbox, TestCase
scenarios = ast.literal_eval(sys.stdin.read())
report = {name: {"steps": [], "healthy": None, "healthy_seconds": None, "closed": False} for name in scenarios}

def play(name, jobs):
    entry = report[name]
    try:
        sb = Sandbox(workers=1, timeout=1.0)
    except BaseException as error:
        entry["healthy"] = f"Sandbox() raised {type(error).__name__}: {error}"
        return
    for program, tests, kind, function in jobs:
        step = {"started": time.monotonic()}
        entry["steps"].append(step)
        try:
            result = sb.run(program, [TestCase(i, e) for i, e in tests], kind, function)
            step.update(verdict=result.verdict, detail_type=type(result.detail).__name__,
                        stdout=[t.stdout for t in result.tests], lines=result.executed_lines)
        except BaseException as error:
            step["raised"] = f"{type(error).__name__}: {error}"[:300]
        step["seconds"] = time.monotonic() - step.pop("started")
    entry["healthy"] = "still running"
    start = time.monotonic()
    try:
        entry["healthy"] = sb.run("print(int(input()) + 1)\n", [TestCase("41\n", "42\n")]).verdict
    except BaseException as error:
        entry["healthy"] = f"raised {type(error).__name__}: {error}"[:300]
    entry["healthy_seconds"] = time.monotonic() - start
    sb.close()
    entry["closed"] = True

threads = [threading.Thread(target=play, args=item, daemon=True) for item in scenarios.items()]
for thread in threads:
    thread.start()
end = time.monotonic() + watchdog
for thread in threads:
    thread.join(max(0.0, end - time.monotonic()))
print(json.dumps(report), flush=True)
os._exit(0)  # a hung pool's threads would block the interpreter's exit
"""


def run_scenarios(scenarios: dict, watchdog: float = 10.0, prefix: list[str] | None = None,
                  python: str | None = None, path: list[str] | None = None, env: dict | None = None,
                  owner: int | None = None) -> dict:
    """Runs SCENARIO_RUNNER on `scenarios`; its pools live in a scratch TMPDIR removed afterwards (a
    hung pool never gets to remove its own directories)."""
    before = set(descendants(os.getpid()))
    scratch = tempfile.mkdtemp(prefix="stepcoder-redteam-runner-")
    os.chmod(scratch, 0o755)
    if owner is not None:
        os.chown(scratch, owner, owner)
    command = [*(prefix or []), python or sys.executable, "-c", SCENARIO_RUNNER, json.dumps(path or sys.path),
               str(watchdog)]
    try:
        done = subprocess.run(command, input=repr(scenarios), capture_output=True, text=True,
                              timeout=watchdog + 60, env={**(env or os.environ), "TMPDIR": scratch}, check=False)
        deadline = time.monotonic() + 10  # the runner's workers notice its exit and leave
        while set(descendants(os.getpid())) - before and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert set(descendants(os.getpid())) == before, "the runner left processes behind"
    return json.loads(done.stdout.strip().splitlines()[-1])


def _forge(report: str) -> str:
    return f"import os\ndef f():\n    os.write(3, {report.encode()!r})\n    os._exit(0)\n"


CRASHERS = {
    "int_10e400_vs_float": [("def f():\n    return 10 ** 400\n", [([], 0.5)], "function", "f")],
    "float_vs_int_10e400": [("def f():\n    return 0.5\n", [([], 10 ** 400)], "function", "f")],
    "forged_dict_not_a_list": [(_forge('{"status":"ok","value":{"__dict__":5}}'), [([], {1: 2})], "function", "f")],
    "forged_set_null": [(_forge('{"status":"ok","value":{"__set__":null}}'), [([], {1, 2})], "function", "f")],
    "forged_dict_short_pair": [(_forge('{"status":"ok","value":{"__dict__":[[1]]}}'), [([], {1: 2})], "function", "f")],
    "forged_3000_deep": [(_forge('{"status":"ok","value":' + "[" * 3000 + "]" * 3000 + "}"), [([], [[1]])],
                          "function", "f")],
    "forged_detail_not_a_string": [(_forge('{"status":"error","detail":{"x":1}}'), [([], 1)], "function", "f")],
    "deep_directories": [("import os\nfor _ in range(1100):\n    os.mkdir('d')\n    os.chdir('d')\nprint(1)\n",
                          [("", "1\n")], "stdin", None)],
}


@pytest.fixture(scope="module")
def crash_report():
    return run_scenarios(CRASHERS)


@pytest.mark.parametrize("name", list(CRASHERS))
def test_hostile_results_neither_crash_the_trainer_nor_hang_the_pool(crash_report, name):
    """Attack 4a-c on a one-worker pool, each followed by a healthy run and close():
    (a) a function returning 10 ** 400 where 0.5 is expected, or 0.5 where 10 ** 400 is expected (an
    OverflowError in the trainer's comparison); (b) forged reports written straight to fd 3 before
    os._exit(0): {"__dict__": 5}, {"__set__": null}, {"__dict__": [[1]]}, a value 3000 lists deep, a
    non-string error detail; (c) 1100 nested directories, which the worker's cleanup (shutil.rmtree)
    cannot remove without a RecursionError. An exception in the trainer left the worker out of the idle
    queue, so the next run and close() hung."""
    entry = crash_report[name]
    step = entry["steps"][0] if entry["steps"] else {}
    problems = []
    if "raised" in step:
        problems.append(f"the trainer raised {step['raised'][:200]}")
    elif step.get("verdict") is None or (step["verdict"] == "pass" and name != "deep_directories"):
        problems.append(f"verdict {step.get('verdict')!r}: {step}")  # deep directories are fine, just hard to remove
    elif step.get("detail_type") not in ("str", "NoneType"):
        problems.append(f"Result.detail is a {step.get('detail_type')}, not a str")
    if entry["healthy"] != "pass":
        problems.append(f"the next healthy run: {entry['healthy']}")
    if not entry["closed"]:
        problems.append("close() did not finish")
    assert not problems, f"{name}: " + "; ".join(problems)


def test_a_flood_of_hard_links_does_not_stall_the_next_run():
    """Attack 4d: a program creates as many hard links as it can until the deadline (inside map(), so
    the C line tracer does not slow it down); the worker must still clean up and take the next job
    promptly. (Today cleanup takes about as long as the flood; a guard against anything worse.)"""
    flood = ("import os, itertools\nopen('a', 'w').close()\n"
             "list(map(os.link, itertools.repeat('a'), map(str, itertools.count())))\n")
    report = run_scenarios({"links": [(flood, [("", "")], "stdin", None)]}, watchdog=40.0)["links"]
    step = report["steps"][0] if report["steps"] else {}
    assert step.get("verdict") in ("timeout", "output_limit", "runtime_error", "violation"), report
    held = step.get("seconds", float("inf"))
    assert held < 20, f"the flood held the worker for {held:.1f} s"
    assert report["healthy"] == "pass" and report["healthy_seconds"] < 10, report
    assert report["closed"]


# --- 5. Secrets of the host --------------------------------------------------------------------------

PRINT_FILE = ("import sys\ntry:\n    print(open({path!r}).read(), end='')\n"
              "except OSError as e:\n    print(e, file=sys.stderr)\n")


def test_a_private_file_of_the_trainers_user_cannot_be_read(no_new_processes):
    """Attack 5a: a mode-600 file inside a mode-700 directory owned by the trainer's uid. (As root the
    uid switch protects it; the non-root variant below is where it is readable today.)"""
    secret = _secret()
    folder = tempfile.mkdtemp(prefix="stepcoder-redteam-private-")
    try:
        path = os.path.join(folder, "token")
        with open(path, "w") as f:
            f.write(secret + "\n")
        os.chmod(path, 0o600)
        with Sandbox(workers=1, timeout=1.0) as sb:
            result = sb.run(PRINT_FILE.format(path=path), [TestCase("", secret + "\n")])
            assert secret not in result.tests[0].stdout
            assert result.verdict != "pass"
            assert_pool_healthy(sb)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


CMDLINE_SCANNER = textwrap.dedent("""
    import os
    found = []
    for pid in os.listdir('/proc'):
        if pid.isdigit():
            try:
                with open(f'/proc/{pid}/cmdline', 'rb') as f:
                    data = f.read()
            except OSError:
                continue
            if b'--api-key=' in data:
                found.append(data.split(b'--api-key=')[1].split(b'\\0')[0].decode())
    print(found[0] if found else 'nothing')
""")


def test_host_processes_command_lines_cannot_be_read(no_new_processes):
    """Attack 5b: /proc is the host's, so a program can read every host process's /proc/<pid>/cmdline,
    and with it an API key passed on a command line."""
    secret = _secret()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "--api-key=" + secret])
    try:
        with Sandbox(workers=1, timeout=1.0) as sb:
            result = sb.run(CMDLINE_SCANNER, [TestCase("", secret + "\n")])
            assert secret not in result.tests[0].stdout, "the program read a host process's command line"
            assert result.verdict != "pass"
            assert_pool_healthy(sb)
    finally:
        holder.kill()
        holder.wait()


ABOVE_IMPORTS = textwrap.dedent("""
    import json, os, sys
    def key(path):
        try:
            st = os.stat(path)
            return (st.st_dev, st.st_ino)
        except OSError:
            return None
    imports = {key(entry) for entry in sys.path if entry} - {None}
    probes = [entry + '/..' * k for entry in sys.path if entry for k in range(1, 5)] + EXTRA
    listed = {}
    for probe in probes:
        if key(probe) in imports:
            continue  # an import directory itself (lib-dynload's parent is the standard library)
        try:
            listed[probe] = sorted(os.listdir(probe))
        except OSError:
            pass
    print(json.dumps(listed))
""")


def test_nothing_above_the_import_directories_can_be_listed(no_new_processes):
    """Attack 5c: as root under a Python in an unreadable directory (pyenv in /root), import paths are
    handed to the child as /proc/self/fd/N directory handles, and `/proc/self/fd/N/..` walks right out
    of them: the child lists the Python prefix, /root/.pyenv/versions (every other Python installed)
    and so on. Walks up to four levels above every sys.path entry and tries the prefix's ancestors by
    name; a listing that equals one of those hidden directories' is a leak."""
    prefix = os.path.realpath(sys.base_prefix)
    hidden = [prefix, os.path.dirname(prefix), os.path.dirname(os.path.dirname(prefix))]
    hidden = [path for path in hidden if os.path.isdir(path) and not _world_readable(path)]
    if not hidden:
        pytest.skip(f"this Python's prefix {prefix} and its parents are readable by every uid anyway")
    with Sandbox(workers=1, timeout=1.0) as sb:
        if not sb.capabilities()["unprivileged_uid"]:
            pytest.skip("the workers are not root, so the children already run as this user")
        program = ABOVE_IMPORTS.replace("EXTRA", repr(hidden))
        result = sb.run(program, [TestCase("", "{}\n")])
        stdout = result.tests[0].stdout if result.tests else ""
        listed = json.loads(stdout) if stdout.startswith("{") else {}  # killed or refused: nothing listed
        secret_listings = {json.dumps(sorted(os.listdir(path))): path for path in hidden}
        leaked = {probe: secret_listings[json.dumps(names)] for probe, names in listed.items()
                  if json.dumps(names) in secret_listings}
        assert leaked == {}, f"the child listed directories hidden above its import paths: {leaked}"
        assert_pool_healthy(sb)



# --- 6. State carried from one job to the next ------------------------------------------------------

IPC_PRELUDE = textwrap.dedent("""
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    libc.shmat.restype = ctypes.c_void_p
    libc.shmat.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
    libc.shmget.argtypes = [ctypes.c_int, ctypes.c_size_t, ctypes.c_int]
    libc.shmdt.argtypes = [ctypes.c_void_p]
    libc.shmctl.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_void_p]
    IPC_CREAT, IPC_RMID, IPC_NOWAIT = 0o1000, 0, 0o4000
    KEY = {key}
    SECRET = {secret!r}
""")

SHM_STASH = IPC_PRELUDE + textwrap.dedent("""
    shmid = libc.shmget(KEY, 4096, IPC_CREAT | 0o666)
    if shmid >= 0:
        addr = libc.shmat(shmid, None, 0)
        if addr not in (None, ctypes.c_void_p(-1).value):
            ctypes.memmove(addr, SECRET.encode(), len(SECRET))
    print(SECRET)
""")

SHM_FETCH = IPC_PRELUDE + textwrap.dedent("""
    shmid = libc.shmget(KEY, 0, 0)
    text = 'nothing'
    if shmid >= 0:
        addr = libc.shmat(shmid, None, 0o10000)
        if addr not in (None, ctypes.c_void_p(-1).value):
            text = ctypes.string_at(addr, len(SECRET)).decode(errors='replace')
        libc.shmctl(shmid, IPC_RMID, None)
    print(text)
""")

MSG_PRELUDE = IPC_PRELUDE + textwrap.dedent("""
    class Message(ctypes.Structure):
        _fields_ = [('mtype', ctypes.c_long), ('mtext', ctypes.c_char * 64)]
""")

MSG_STASH = MSG_PRELUDE + textwrap.dedent("""
    qid = libc.msgget(KEY, IPC_CREAT | 0o666)
    if qid >= 0:
        libc.msgsnd(qid, ctypes.byref(Message(1, SECRET.encode())), 64, IPC_NOWAIT)
    print(SECRET)
""")

MSG_FETCH = MSG_PRELUDE + textwrap.dedent("""
    qid = libc.msgget(KEY, 0)
    text = 'nothing'
    if qid >= 0:
        message = Message()
        if libc.msgrcv(qid, ctypes.byref(message), 64, 0, IPC_NOWAIT) > 0:
            text = message.mtext.decode(errors='replace')
        libc.msgctl(qid, IPC_RMID, None)
    print(text)
""")

MQ_PRELUDE = IPC_PRELUDE + textwrap.dedent("""
    import os
    try:  # not ctypes.util.find_library: it runs ldconfig, a new process
        rt = ctypes.CDLL('librt.so.1', use_errno=True)
    except OSError:
        rt = libc
    class Attr(ctypes.Structure):
        _fields_ = [('flags', ctypes.c_long), ('maxmsg', ctypes.c_long), ('msgsize', ctypes.c_long),
                    ('curmsgs', ctypes.c_long), ('reserved', ctypes.c_long * 4)]
    rt.mq_open.restype = ctypes.c_int
    rt.mq_open.argtypes = [ctypes.c_char_p, ctypes.c_int, ctypes.c_uint, ctypes.POINTER(Attr)]
    rt.mq_getattr.argtypes = [ctypes.c_int, ctypes.POINTER(Attr)]
    NAME = b'/stepcoder-' + str(KEY).encode()
""")

# Landlock refuses to open a queue for writing (it is not beneath the work directory), but creating
# one is allowed, and so is reading its attributes: each hex digit of the answer becomes the message
# size of a queue of its own (/NAME-i). A plain message is tried too, for where writing is allowed.
MQ_STASH = MQ_PRELUDE + textwrap.dedent("""
    mq = rt.mq_open(NAME, os.O_CREAT | os.O_WRONLY | os.O_NONBLOCK, 0o666, None)
    if mq >= 0:
        rt.mq_send(mq, SECRET.encode(), len(SECRET), 0)
    for i, digit in enumerate(SECRET[4:]):
        rt.mq_open(NAME + b'-%d' % i, os.O_CREAT | os.O_RDONLY, 0o666, Attr(0, 1, int(digit, 16) + 1, 0))
    print(SECRET)
""")

MQ_FETCH = MQ_PRELUDE + textwrap.dedent("""
    text = 'nothing'
    mq = rt.mq_open(NAME, os.O_RDONLY | os.O_NONBLOCK, 0, None)
    if mq >= 0:
        buf = ctypes.create_string_buffer(1 << 16)
        n = rt.mq_receive(mq, buf, len(buf), None)
        if n > 0:
            text = buf.raw[:n].decode(errors='replace')
        rt.mq_unlink(NAME)
    digits = ''
    for i in range(32):
        mq = rt.mq_open(NAME + b'-%d' % i, os.O_RDONLY | os.O_NONBLOCK, 0, None)
        if mq < 0:
            break
        attr = Attr()
        if rt.mq_getattr(mq, attr) == 0:
            digits += '%x' % (attr.msgsize - 1)
        rt.mq_unlink(NAME + b'-%d' % i)
    if text == 'nothing' and len(digits) == 32:
        text = 'tok-' + digits
    print(text)
""")


@pytest.mark.parametrize("channel", ["sysv_shm", "sysv_msg", "posix_mq"])
def test_ipc_objects_do_not_carry_data_to_the_next_job(channel, no_new_processes):
    """Attack 6a-c: job A (a correct program) stashes its answer in a SysV shared-memory segment, a SysV
    message queue or a POSIX message queue (ctypes); job B on the same one-worker pool, with the same
    expected output, fetches it by key or name: the worker's IPC namespace is shared by all its jobs."""
    stash, fetch = {"sysv_shm": (SHM_STASH, SHM_FETCH), "sysv_msg": (MSG_STASH, MSG_FETCH),
                    "posix_mq": (MQ_STASH, MQ_FETCH)}[channel]
    secret = _secret()
    key = int(uuid.uuid4().int % 0x3FFFFFFF) + 1
    with Sandbox(workers=1, timeout=1.0) as sb:
        sb.run(stash.format(key=key, secret=secret), [TestCase("", secret + "\n")])  # refusing IPC is fine too
        second = sb.run(fetch.format(key=key, secret=secret), [TestCase("", secret + "\n")])
        assert secret not in second.tests[0].stdout, f"job B read job A's answer from a {channel} object"
        assert second.verdict != "pass"
        assert_pool_healthy(sb)


SHM_HOARD = IPC_PRELUDE + textwrap.dedent("""
    kept = 0
    for i in range(5):
        shmid = libc.shmget(KEY + i, 256 << 20, IPC_CREAT | 0o666)
        if shmid < 0:
            continue
        addr = libc.shmat(shmid, None, 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            continue
        ctypes.memset(addr, 1, 256 << 20)
        libc.shmdt(addr)
        kept += 1
    print(kept)
""")

SHM_COUNT = IPC_PRELUDE + textwrap.dedent("""
    found = 0
    for i in range(5):
        shmid = libc.shmget(KEY + i, 0, 0)
        if shmid >= 0:
            found += 1
            libc.shmctl(shmid, IPC_RMID, None)
    print(found)
""")


def _shmem_kib() -> int:
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("Shmem:"))


def test_shared_memory_segments_do_not_outlive_their_job(no_new_processes):
    """Attack 6d: a job creates five 256 MiB SysV segments, touches them and never removes them; they stay
    allocated (1.25 GiB outside any rlimit) for as long as the worker lives. Job B counts (and removes)
    them."""
    key = int(uuid.uuid4().int % 0x3FFFFFF0) + 1
    with Sandbox(workers=1, timeout=1.0, memory_mb=1024) as sb:
        before = _shmem_kib()
        hoard = sb.run(SHM_HOARD.format(key=key, secret=""), [TestCase("", "5\n")])
        held_mib = (_shmem_kib() - before) // 1024
        count = sb.run(SHM_COUNT.format(key=key, secret=""), [TestCase("", "")])
        found = count.tests[0].stdout.strip()
        assert hoard.verdict != "pass" or found == "0", \
            f"{found} segments of 256 MiB outlived the job that made them ({held_mib} MiB of shared memory held)"
        assert_pool_healthy(sb)


# --- 7. Tampering with line tracing -----------------------------------------------------------------

TRACED = textwrap.dedent("""\
    import sys
    if __name__ == "never":
        print("never")
    TAMPER = {tamper!r}
    {statement}
    after = 1
    print(after)
""")
NEVER_LINE, AFTER_LINES = 3, (6, 7)

FRAMES = textwrap.dedent("""
    frames, k = [], 0
    while True:
        try:
            frames.append(sys._getframe(k))
        except ValueError:
            break
        k += 1
""")

FRAME_WALK = FRAMES + textwrap.dedent("""
    import mmap
    for frame in frames:
        try:
            values = list(frame.f_locals.values())
        except Exception:
            continue
        for value in values:
            targets = [value]
            try:
                if isinstance(value, dict) and 'bitmap' in value:
                    targets.append(value['bitmap'])
                targets += [v for v in vars(value).values() if isinstance(v, dict) and 'bitmap' in v]
            except Exception:
                pass
            for target in list(targets):
                if isinstance(target, dict) and 'bitmap' in target:
                    target = target['bitmap']
                if isinstance(target, (mmap.mmap, bytearray)):
                    try:
                        if len(target) > LINE:
                            target[LINE] = 1
                    except Exception:
                        pass
""")

GC_MMAPS = textwrap.dedent("""
    import gc, mmap
    for obj in gc.get_objects():
        try:
            for target in [obj] + gc.get_referents(obj):
                if type(target) is mmap.mmap and len(target) > LINE:
                    target[LINE] = 1
        except Exception:
            pass
""")

RETARGET = FRAMES + textwrap.dedent("""
    import mmap
    modules = [m for m in list(sys.modules.values()) if hasattr(m, 'start_line_trace')]
    for frame in frames:
        for value in list(frame.f_locals.values()) + list(frame.f_globals.values()):
            try:
                if hasattr(value, 'start_line_trace'):
                    modules.append(value)
                for inner in vars(value).values():
                    if hasattr(inner, 'start_line_trace'):
                        modules.append(inner)
            except Exception:
                pass
    decoy = mmap.mmap(-1, 4096)
    for module in modules:
        for attempt in (lambda: module.reset_line_bitmap(4096), lambda: module.trace_current_thread()):
            try:
                attempt()
            except Exception:
                pass
        for codes in ([], [sys._getframe(1).f_code]):
            for target in (decoy, 4, 0):  # a bitmap (the old signature), a sys.monitoring tool id
                try:
                    module.start_line_trace(codes, target)
                except Exception:
                    pass
""")

TAMPERING = {
    "frame_walk_bitmap": (FRAME_WALK, "exec(TAMPER, {'sys': sys, 'LINE': 3})"),
    "gc_mmap": (GC_MMAPS, "exec(TAMPER, {'sys': sys, 'LINE': 3})"),
    "retarget_tracer": (RETARGET, "exec(TAMPER, {'sys': sys, 'LINE': 3})"),
    "f_trace_lines_off": ("try:\n    sys._getframe(1).f_trace_lines = False\nexcept Exception:\n    pass\n",
                          "exec(TAMPER, {'sys': sys})"),
}


@pytest.mark.parametrize("attack", list(TAMPERING))
def test_line_tracing_cannot_be_tampered_with(attack, no_new_processes):
    """Attack 7 (tracing on; the C tracer on 3.11): (a) walk the frames up from the program and write 1
    at a line that never runs into every dict's 'bitmap' / mmap / bytearray found in their locals;
    (b) the same through gc.get_objects() and their referents; (c) find the extension module (it has
    start_line_trace) and re-target the tracer at a decoy mmap, so later lines are lost; (d) set the
    program frame's f_trace_lines = False, so its later lines are lost. The tampering runs in exec()'d
    code (not the program's), wrapped in try/except so it cannot crash the program."""
    tamper, statement = TAMPERING[attack]
    program = TRACED.format(tamper=tamper, statement=statement)
    assert program.splitlines()[NEVER_LINE - 1].strip() == 'print("never")'
    reference, printed = settrace_lines(TRACED.format(tamper="pass", statement="pass"))
    assert NEVER_LINE not in reference and set(AFTER_LINES) <= set(reference) and printed == "1\n"
    with Sandbox(workers=1, timeout=1.0) as sb:
        result = sb.run(program, [TestCase("", "1\n")])
        lines = result.executed_lines
        assert NEVER_LINE not in lines, f"{attack}: a line that never ran was recorded ({lines})"
        assert set(AFTER_LINES) <= set(lines), f"{attack}: lines run after the tampering were lost ({lines})"
        assert_pool_healthy(sb)


# --- Non-root: the same attacks when the trainer is an ordinary user -------------------------------

NOBODY = 65534
SYSTEM_PYTHON = "/usr/bin/python3.11"


def _as_nobody() -> list[str]:
    if os.geteuid() != 0:
        pytest.skip("needs root, to run the pool as uid 65534 through setpriv")
    setpriv = shutil.which("setpriv")
    if setpriv is None or not os.access(SYSTEM_PYTHON, os.X_OK):
        pytest.skip(f"needs setpriv and {SYSTEM_PYTHON} (a Python readable by every uid)")
    prefix = [setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
    probe = subprocess.run([*prefix, SYSTEM_PYTHON, "-c", "import stepcoder._sandbox, stepcoder.sandbox"],
                           capture_output=True, text=True, env=_nobody_env(), cwd="/", check=False)
    if probe.returncode != 0:
        pytest.skip(f"{SYSTEM_PYTHON} as uid {NOBODY} cannot import the in-place built extension: "
                    f"{probe.stderr.strip()[-300:]}")
    return prefix


def stdin_job(program: str, expected: str, stdin: str = "") -> tuple:
    return program, [(stdin, expected)], "stdin", None


def _nobody_env() -> dict:
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "PYTHONPATH": REPO_ROOT, "HOME": "/nonexistent",
            "LANG": "C.UTF-8"}


def test_the_attacks_as_an_unprivileged_trainer():
    """Attacks 1, 2, 4a/b, 5a, 6a and 7a with the trainer running as uid 65534 (setpriv, the system
    Python): no uid switch protects anything there, the workers use a user namespace, and the
    children run as the trainer's own uid. Target files belong to uid 65534 with the usual modes."""
    prefix = _as_nobody()
    secret = _secret()
    folder = tempfile.mkdtemp(prefix="stepcoder-redteam-nobody-")
    try:
        os.chmod(folder, 0o755)
        dataset = os.path.join(folder, "dataset.json")
        with open(dataset, "w") as f:
            json.dump({"question-7": secret}, f)
        os.chmod(dataset, 0o644)
        private_dir = os.path.join(folder, "private")
        os.mkdir(private_dir, 0o700)
        token = os.path.join(private_dir, "token")
        with open(token, "w") as f:
            f.write(secret + "\n")
        os.chmod(token, 0o600)
        for path in (folder, dataset, private_dir, token):
            os.chown(path, NOBODY, NOBODY)

        from stepcoder.data import load_builtin, loaders
        problem = next(p for p in load_builtin().problems if p.kind == "stdin" and p.entry is None)
        builtin_path = os.path.join(os.path.dirname(os.path.abspath(loaders.__file__)), loaders.BUILTIN_FILE)
        with open("/etc/passwd") as f:
            passwd_first = f.readline()
        key = int(uuid.uuid4().int % 0x3FFFFFFF) + 1
        earlier = [(program, [(t.input, t.expected) for t in tests], "stdin", None)
                   for program, tests in _earlier_jobs(secret)]
        scenarios = {
            "1a_dataset_file": [stdin_job(DATASET_READER.format(path=dataset), secret + "\n", "question-7\n")],
            "1b_builtin_problems": [(BUILTIN_READER.format(path=builtin_path, problem_id=problem.id),
                                     [(t.input, t.expected) for t in problem.tests], "stdin", None)],
            "1c_etc_passwd": [stdin_job("print(open('/etc/passwd').readline(), end='')\n", passwd_first)],
            "2a_memory_proc_maps": [*earlier, stdin_job(SCAN_MAPS, secret + "\n")],
            "2b_memory_probe": [*earlier, stdin_job(SCAN_PROBE, secret + "\n")],
            "5a_private_file": [stdin_job(PRINT_FILE.format(path=token), secret + "\n")],
            "6a_sysv_shm": [stdin_job(SHM_STASH.format(key=key, secret=secret), secret + "\n"),
                            stdin_job(SHM_FETCH.format(key=key, secret=secret), secret + "\n")],
            "7a_tracing_frame_walk": [stdin_job(TRACED.format(tamper=FRAME_WALK, statement=TAMPERING[
                "frame_walk_bitmap"][1]), "1\n")],
            **{f"4_{name}": jobs for name, jobs in CRASHERS.items() if name != "deep_directories"},
        }
        report = run_scenarios(scenarios, prefix=prefix, python=SYSTEM_PYTHON, path=[REPO_ROOT], env=_nobody_env(),
                               owner=NOBODY)
    finally:
        shutil.rmtree(folder, ignore_errors=True)

    problems = []
    for name, entry in report.items():
        steps = entry["steps"]
        last = steps[-1] if steps else {}
        if "raised" in last:
            problems.append(f"{name}: the trainer raised {last['raised'][:120]}")
        elif name.startswith(("1", "2", "5", "6")) and last.get("verdict") == "pass":
            problems.append(f"{name}: forged pass")
        elif name.startswith(("2", "5", "6")) and any(secret in out for out in last.get("stdout", [])):
            problems.append(f"{name}: the secret reached stdout")
        elif name.startswith("4") and (last.get("verdict") in (None, "pass") or
                                       last.get("detail_type") not in ("str", "NoneType")):
            problems.append(f"{name}: {last}")
        elif name.startswith("7") and (NEVER_LINE in last.get("lines", []) or
                                       not set(AFTER_LINES) <= set(last.get("lines", []))):
            problems.append(f"{name}: executed lines forged: {last.get('lines')}")
        if name.startswith("2") and any(step.get("verdict") != "pass" for step in steps[:-1]):
            problems.append(f"{name}: an earlier (correct) job did not pass: {steps[:-1]}")
        if entry["healthy"] != "pass" or not entry["closed"]:
            problems.append(f"{name}: pool not healthy afterwards (next run: {entry['healthy']}, "
                            f"closed: {entry['closed']})")
    assert not problems, "attacks that worked as uid 65534:\n" + "\n".join(problems)
