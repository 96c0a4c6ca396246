"""The trainer's numbers, pinned: a 3-step run (GAE, and GRPO) must write the metrics and samples rows it
wrote when the rows were pinned, time fields aside. A change meant to leave the algorithm alone (moving
code between modules, say) must pass it; a change to the update's math fails it.

The pinned rows are in tests/pinned/; after a change that is meant to alter the numbers, rewrite them
with ``STEPCODER_PIN_ROWS=1 python -m pytest tests/test_pinned_rows.py`` and say why in the commit. One
thread, so that no reduction's order depends on the machine's load.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from stepcoder import train

PINNED = Path(__file__).parent / "pinned"
# a warm-up long enough that the rollouts pass, fail and crash in the same step
FLAGS = ["--data", "builtin", "--limit", "8", "--problems_per_step", "4", "--rollouts_per_prompt", "2",
         "--max_new_tokens", "40", "--sft_steps", "60", "--generation_batch_size", "8", "--num_mini_batches", "2",
         "--sandbox_workers", "1", "--save_steps", "100", "--sample_every", "1", "--total_steps", "3"]
ARMS = {"gae": ["--advantage", "gae", "--kl_coef", "0.01"],
        "grpo": ["--advantage", "grpo", "--kl_coef", "0.01"]}


@pytest.fixture
def one_thread(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the PyTorch references, as a CPU run uses
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def rows(path: Path) -> list[dict]:
    return [{name: value for name, value in json.loads(line).items() if not name.startswith("time_")}
            for line in path.read_text().splitlines()]


@pytest.mark.parametrize("arm", ARMS)
def test_a_three_step_run_writes_the_pinned_rows(arm, one_thread, tmp_path):
    train.main([*FLAGS, *ARMS[arm], "--output_dir", str(tmp_path / arm)])
    found = {name: rows(tmp_path / arm / f"{name}.jsonl") for name in ("metrics", "samples")}
    pinned = PINNED / f"{arm}.json"
    if os.environ.get("STEPCODER_PIN_ROWS") == "1":
        pinned.parent.mkdir(exist_ok=True)
        pinned.write_text(json.dumps(found, indent=1) + "\n")
    expected = json.loads(pinned.read_text())
    assert [row["step"] for row in found["metrics"]] == [1, 2, 3]
    for index, (row, want) in enumerate(zip(found["metrics"], expected["metrics"], strict=True)):
        assert row == want, f"metrics row {index + 1}: " + ", ".join(
            f"{name}: {row.get(name)!r} != {want.get(name)!r}" for name in sorted(set(row) | set(want))
            if row.get(name) != want.get(name))
    assert found["samples"] == expected["samples"]
