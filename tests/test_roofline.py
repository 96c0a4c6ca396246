"""benchmarks/roofline.py against the arithmetic done by hand for the anchor shapes (ANCHORS.md's floors
are these, at the measured copy bandwidth and matmul rate)."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

spec = importlib.util.spec_from_file_location("roofline",
                                              Path(__file__).resolve().parents[1] / "benchmarks" / "roofline.py")
roofline = sys.modules["roofline"] = importlib.util.module_from_spec(spec)  # its dataclasses look it up there
spec.loader.exec_module(roofline)


def test_the_floors_are_the_anchors_arithmetic():
    measured = roofline.MACHINES[2]
    ppo = roofline.ppo_loss(8192, 151936)
    assert ppo.need_bytes == pytest.approx(4 * 8192 * 151936, rel=1e-3)  # bf16 logits read, gradient written
    assert ppo.floor_ms(measured) == pytest.approx(1.68, abs=0.01)       # ANCHORS.md's floor
    assert roofline.ppo_loss(8192, 151936, l2_hits=False).design_bytes == pytest.approx(1.5 * ppo.need_bytes, rel=1e-3)
    head = roofline.lm_head(8192, 4096, 151936)
    assert head.need_flops == 6 * 8192 * 4096 * 151936 and head.design_flops == 8 * 8192 * 4096 * 151936
    assert head.floor_ms(measured) == pytest.approx(40.41, abs=0.05)
    # the forward reads the whole weight once per token chunk: 38 chunks of 220 tokens at V = 151,936
    assert head.design_bytes > 38 * 151936 * 4096 * 2
    assert "| LM head + log-prob, N=8192, H=4096, V=151,936, bf16 |" in roofline.markdown()
