"""Every Triton launch the public ops make compiles for A100, H100/H200 and B200 (sm_80, sm_90,
sm_100) with no spill and shared memory within each target's limit, at the vocabularies of real code
models and every supported dtype; and the check fails on a kernel broken on purpose to spill. The
compilation runs in a process of its own (tests/aot_compile.py), without the Triton interpreter this
suite switches on."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # every launch compiled for three GPU targets: about 30 s
pytest.importorskip("triton")
HERE = Path(__file__).resolve().parent
FLAGS = {"WITH_ENTROPY": {False, True}, "DUAL_CLIP": {False, True}, "KL_MODE": {0, 1, 2, 3},
         "COMPUTE_GRAD": {False, True}, "CLIP": {False, True}, "CENTERED": {False, True}, "SHIFT_MEAN": {False, True}}


def compile_table(tmp_path: Path, *flags: str) -> tuple[subprocess.CompletedProcess, dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")  # compiled afresh, never taken from an older run
    done = subprocess.run([sys.executable, str(HERE / "aot_compile.py"), "--json", str(tmp_path / "table.json"),
                           *flags], capture_output=True, text=True, timeout=1500, env=env, cwd=tmp_path)
    assert (tmp_path / "table.json").exists(), done.stderr[-4000:]
    return done, json.loads((tmp_path / "table.json").read_text())


def test_every_launch_compiles_for_real_gpus_without_spills(tmp_path):
    done, table = compile_table(tmp_path)
    assert done.returncode == 0 and table["problems"] == [], done.stdout[-4000:]
    rows = table["rows"]
    assert {row["kernel"] for row in rows} == set(table["launchable"])  # no kernel left out of the sweep
    for kernel in table["launchable"]:
        assert {row["arch"] for row in rows if row["kernel"] == kernel} == {80, 90, 100}, kernel
    for name, values in FLAGS.items():  # every value the public options give each constexpr
        assert {row["constexprs"][name] for row in rows if name in row["constexprs"]} == values, name
    vocabulary = [row for row in rows if row["vocabs"]]
    assert {row["dtype"] for row in vocabulary} == {"float32", "bfloat16", "float16"}
    assert all(row["vocabs"] == [32256, 128256, 151936, 152064] for row in vocabulary)
    assert all(0 < row["registers"] <= 255 and row["spill_bytes"] == 0 for row in rows)


def test_a_kernel_that_spills_fails_the_check(tmp_path):
    done, table = compile_table(tmp_path, "--arch", "90", "--with_spilling_kernel")
    assert done.returncode == 1
    assert table["problems"] and all("_spilling_kernel" in problem and "spills" in problem
                                     for problem in table["problems"])
    assert any(row["kernel"] == "_spilling_kernel" and row["spill_bytes"] > 0 for row in table["rows"])
