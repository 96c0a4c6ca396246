"""A run killed with SIGKILL during generation, during a checkpoint save and during the update, and resumed
with ``--resume_from_checkpoint latest`` after each kill, ends where an uninterrupted run ends: the same
metrics and sample rows, the same weights and optimizer state, to the bit (the runs are deterministic at a
fixed thread count). The kills land at random moments inside their phases (``STEPCODER_CHAOS``, see
stepcoder/phases.py); each kill leaves no sandbox process behind. A save that runs out of disk space stops
the run with a message and leaves the checkpoint before it whole."""
from __future__ import annotations

import json
import os
import random
import select
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from conftest import sandbox_uid_processes
from serving import Served
from stepcoder.checkpoint import damage

pytestmark = pytest.mark.slow  # chaos: runs killed at random points and resumed
BASE = ["--data", "builtin", "--limit", "8", "--problems_per_step", "4", "--rollouts_per_prompt", "2",
        "--max_new_tokens", "40", "--sft_steps", "20", "--generation_batch_size", "8", "--num_mini_batches", "2",
        "--sandbox_workers", "1", "--save_steps", "1", "--save_total_limit", "2", "--sample_every", "1"]
ARMS = {"gae": ["--advantage", "gae", "--kl_coef", "0.01"],
        "grpo-lora": ["--advantage", "grpo", "--lora_r", "4", "--kl_coef", "0.01"]}
STEPS = 3
RUN_TIMEOUT = 900  # seconds: a run that hangs fails the test rather than CI
# (phase, which entry into it in that process, the longest delay drawn): the first process is killed in
# its second save (checkpoint-2: a save takes 0.1-0.2 s here, so the kill lands among its files, or at
# the latest as it ends), the second, resumed from checkpoint-1 (or -2), in its first generation, the third
# in its first update.
KILLS = [("save", 2, 0.1), ("generate", 1, 0.2), ("update", 1, 0.1)]


# Runs start in children forked from one process that has imported the trainer and the model code (about
# 6 s a start on 2 cores), each as `python -m stepcoder.train` would run: its own environment, stdout and
# stderr, exit status; SIGKILL ends it as it ends any process.
FORK_SERVER = r"""
import json, os, runpy, sys, tempfile, traceback
import stepcoder.train
from transformers import GPT2LMHeadModel
for line in sys.stdin:
    job = json.loads(line)
    pid = os.fork()
    if pid == 0:
        os.environ.clear()
        os.environ.update(job["env"])
        tempfile.tempdir = None  # as a fresh process would: the temp dir from this run's TMPDIR
        import torch
        torch.set_num_threads(1)  # runs compared to the bit: no reduction's order may depend on the machine
        for fd, name in ((1, "stdout"), (2, "stderr")):
            os.dup2(os.open(job[name], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
        sys.argv = ["stepcoder.train", *job["argv"]]
        code = 0
        try:
            runpy.run_module("stepcoder.train", run_name="__main__", alter_sys=True)
        except SystemExit as exit:
            code = exit.code if isinstance(exit.code, int) else 0 if exit.code is None else 1
            if not isinstance(exit.code, (int, type(None))):
                print(exit.code, file=sys.stderr)
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    print(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), flush=True)
"""


class Trainer:
    """`python -m stepcoder.train` runs, started by the fork server."""

    def __init__(self, scratch: Path):
        self.scratch, self.runs = scratch, 0
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        self.server = subprocess.Popen([sys.executable, "-c", FORK_SERVER], stdin=subprocess.PIPE,
                                       stdout=subprocess.PIPE, text=True, env=env)

    def __call__(self, output: Path, *flags: str, chaos: str | None = None) -> subprocess.CompletedProcess:
        env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "STEPCODER_CHAOS")}
        if chaos:
            env["STEPCODER_CHAOS"] = chaos
        resume = ["--resume_from_checkpoint", "latest"] if output.exists() else []
        argv = [*flags, "--output_dir", str(output), *resume]
        self.runs += 1
        streams = {name: str(self.scratch / f"run{self.runs}.{name}") for name in ("stdout", "stderr")}
        self.tmp = self.scratch / f"run{self.runs}.tmp"  # the run's temp dir: its sandbox pool's folders
        self.tmp.mkdir()
        env["TMPDIR"] = str(self.tmp)
        self.server.stdin.write(json.dumps({"argv": argv, "env": env, **streams}) + "\n")
        self.server.stdin.flush()
        if not select.select([self.server.stdout], [], [], RUN_TIMEOUT)[0]:
            self.server.kill()
            pytest.fail(f"a training run took over {RUN_TIMEOUT} s: {argv}")
        status = self.server.stdout.readline()
        assert status, "the fork server died"
        return subprocess.CompletedProcess(argv, int(status), Path(streams["stdout"]).read_text(),
                                           Path(streams["stderr"]).read_text())

    def close(self) -> None:
        self.server.stdin.close()
        self.server.wait(timeout=60)


@pytest.fixture(scope="module")
def train(tmp_path_factory):
    trainer = Trainer(tmp_path_factory.mktemp("streams"))
    yield trainer
    trainer.close()


def rows(path: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if not k.startswith("time_")}
            for line in path.read_text().splitlines()]


def state(checkpoint: Path, tmp_path: Path) -> dict:
    """Everything the checkpoint's state/ holds (weights that train, optimizer states) as one dict."""
    target = tmp_path / f"{checkpoint.parent.name}-{checkpoint.name}.pt"
    dcp_to_torch_save(checkpoint / "state", target)
    return torch.load(target, weights_only=False)


def assert_identical(a, b, where: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for key in a:
            assert_identical(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for index, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{where}[{index}]")
    else:
        assert a == b, where


def pool_processes(tmp: Path) -> list[int]:
    """The processes of a run's sandbox pool: its workers (each started with its folder, under the run's
    temp dir, on its command line), the shims and the PID-namespace workers below them, and their test
    children, which all inherit that command line."""
    found = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if str(tmp).encode() in f.read():
                    found.append(int(entry))
        except OSError:
            continue
    return found


def no_sandbox_left(before: list[int], tmp: Path, seconds: float = 10.0) -> str | None:
    """The killed run's pool dies with it (its workers see their socket close; a namespaced worker also
    has PR_SET_PDEATHSIG on its shim): None once no process of it is left, and no new process under a
    sandbox uid; else what outlived it."""
    end = time.monotonic() + seconds
    while True:
        left = pool_processes(tmp) + sorted(set(sandbox_uid_processes()) - set(before))
        if not left:
            return None
        if time.monotonic() > end:
            return f"still running {seconds} s after the kill: {left}"
        time.sleep(0.05)


@pytest.mark.parametrize("arm", ARMS)
def test_a_run_killed_during_generation_save_and_update_resumes_to_the_same_end(arm, train, tmp_path):
    flags = [*BASE, *ARMS[arm], "--total_steps", str(STEPS)]
    straight = train(tmp_path / "straight", *flags)
    assert straight.returncode == 0, straight.stderr[-3000:]

    seed = random.randrange(1 << 30)
    draw = random.Random(seed)
    chaotic = tmp_path / "chaos"
    for name, entry, longest in KILLS:
        delay = draw.uniform(0, longest)
        before = sandbox_uid_processes()
        killed = train(chaotic, *flags, chaos=f"{name}:{entry}:{delay:.4f}")
        context = f"seed {seed}, {name} #{entry} after {delay:.4f} s\n{killed.stderr[-3000:]}"
        assert killed.returncode == -signal.SIGKILL, context
        assert f"chaos: SIGKILL in {name} #{entry}" in killed.stderr, context
        assert list(train.tmp.glob("stepcoder-sandbox-*/w*")), context  # its pool's folders: its workers' names
        assert no_sandbox_left(before, train.tmp) is None, context + no_sandbox_left(before, train.tmp, 0)
    finished = train(chaotic, *flags)
    assert finished.returncode == 0, f"seed {seed}\n{finished.stderr[-3000:]}"

    assert rows(chaotic / "metrics.jsonl") == rows(tmp_path / "straight" / "metrics.jsonl")
    assert [row["step"] for row in rows(chaotic / "metrics.jsonl")] == list(range(1, STEPS + 1))
    assert rows(chaotic / "samples.jsonl") == rows(tmp_path / "straight" / "samples.jsonl")
    ends = [folder / f"checkpoint-{STEPS}" for folder in (tmp_path / "straight", chaotic)]
    assert_identical(state(ends[0], tmp_path), state(ends[1], tmp_path), "state")
    exported = ["policy/model.safetensors"] + (["adapter/adapter_model.safetensors"] if "lora" in arm else [])
    for name in exported:
        assert_identical(load_file(ends[0] / name), load_file(ends[1] / name), name)
    first = load_file(tmp_path / "straight" / f"checkpoint-{STEPS - 1}" / "policy" / "model.safetensors")
    assert any(not torch.equal(first[key], tensor) for key, tensor in load_file(ends[0] / exported[0]).items())
    assert not list(chaotic.glob(".staging-*"))  # a save cut short is redone or cleared, never left


def test_a_save_that_runs_out_of_space_stops_the_run_and_keeps_the_last_checkpoint(train, tmp_path):
    """A warm-up-only run's folder (checkpoint-0) is copied onto a tmpfs in a mount namespace of its own;
    the tmpfs is shrunk to leave half a checkpoint free, and the resumed run's first PPO step cannot save.
    Its sandbox is a judging server outside the namespace (one that maps a single uid cannot start a local
    pool)."""
    probe = ["unshare", "-rm", "mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(tmp_path)]
    if shutil.which("unshare") is None or subprocess.run(probe, capture_output=True).returncode:
        pytest.skip("needs unshare(1) and a tmpfs mounted in unprivileged user and mount namespaces")
    started = train(tmp_path / "start", *BASE, *ARMS["gae"], "--total_steps", "0")
    assert started.returncode == 0, started.stderr[-3000:]
    mount, kept = tmp_path / "disk", tmp_path / "after"
    mount.mkdir()
    server = Served(1)
    try:
        python = shlex.join([sys.executable, "-m", "stepcoder.train", *BASE, *ARMS["gae"], "--total_steps", "1",
                             "--sandbox_url", server.url, "--output_dir", str(mount / "run"),
                             "--resume_from_checkpoint", "latest"])
        script = f"""
            mount -t tmpfs -o size=64m tmpfs {mount} || exit 90
            cp -a {tmp_path / "start"} {mount}/run || exit 91
            used=$(du -sk {mount} | cut -f1); checkpoint=$(du -sk {mount}/run/checkpoint-0 | cut -f1)
            mount -o remount,size=$((used + checkpoint / 2))k {mount} || exit 92
            {python}
            status=$?
            cp -a {mount}/run {kept}
            exit $status
        """
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        done = subprocess.run(["unshare", "-rm", "sh", "-c", script], env=env, capture_output=True, text=True,
                              timeout=900)
    finally:
        server.stop()
    assert done.returncode == 1, f"{done.returncode}\n{done.stderr[-3000:]}"
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    message = done.stderr.strip().splitlines()[-1]
    assert message.startswith(f"error: could not write checkpoint-1 in {mount / 'run'}: no space left"), message
    assert f"{mount / 'run' / 'checkpoint-0'} is whole and untouched" in message, message
    assert "--resume_from_checkpoint latest" in message, message
    assert damage(kept / "checkpoint-0") is None  # every file, every byte, as its manifest says
    assert not (kept / "checkpoint-1").exists() and not list(kept.glob(".staging-*"))
    assert [row["step"] for row in rows(kept / "metrics.jsonl")] == [1]  # the step ran; only its save failed


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_a_row_that_cannot_be_written_stops_the_run_with_a_message():
    """/dev/full fails every write with ENOSPC, as a full disk does under metrics.jsonl."""
    from stepcoder.runlog import Logger

    with pytest.raises(SystemExit, match="could not append to /dev/full: No space left on device; the run stops"):
        Logger._append(Path("/dev/full"), '{"step": 1}\n')
