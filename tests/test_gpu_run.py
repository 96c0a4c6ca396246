"""benchmarks/gpu_run.sh --dry-run: the device day's script runs on the CPU (the Triton interpreter, tiny
shapes) so that it cannot rot before the day; every check it makes passes and it writes its JSON."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # the whole device script under the interpreter: about 30 s


def test_the_device_script_runs_dry_on_the_cpu(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_run.sh"), "--dry-run"], capture_output=True,
                          text=True, timeout=900, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    names = [check["name"] for check in report["checks"]]
    assert report["device"] == "CPU (dry run)" and all(check["ok"] for check in report["checks"])
    assert any(name.startswith("PPO loss") for name in names) and any(name.startswith("training run") for name in names)
    assert all(check["name"] in done.stdout for check in report["checks"])  # the printed table
