"""Everything a training run does before its first step, as one ``Run``: the configuration checked, the
output folder claimed (or the checkpoint to resume from found), the problems selected, the models built,
warmed up and distributed, the optimizers and the curriculum (restored on resume), the log, the rollout
engine and the sandbox. A bad flag, file or checkpoint stops the run here with a message naming it,
before any work that would be lost."""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from stepcoder import checkpoint, learners, rundir
from stepcoder.cccs import Curriculum
from stepcoder.config import ConfigError, TrainConfig, check_installed, parse_config, to_json
from stepcoder.data import DataError, Problem
from stepcoder.distributed import broadcast, compute, compute_dtype, setup, unwrap, world
from stepcoder.engines import HFEngine, VLLMEngine, check_sleep_mode, engine_directory, eos_ids
from stepcoder.lora import language_model
from stepcoder.phases import phase
from stepcoder.remote import open_sandbox
from stepcoder.runlog import Logger
from stepcoder.sandbox import Sandbox, SandboxError
from stepcoder.schedules import learning_rate_factor
from stepcoder.selection import cccs_stages, make_curriculum, select_eval_problems, select_problems, select_warmup
from stepcoder.warmup import sized_warmup


@contextlib.contextmanager
def exit_on(*errors: type[Exception], prefix: str = ""):
    """Stops the run with ``error: <prefix><the error>`` on any of `errors`: what the user must change."""
    try:
        yield
    except errors as error:
        sys.exit(f"error: {prefix}{error}")


@dataclass
class Run:
    """A run's state between steps; ``policy`` and ``critic`` as they train (sharded or replicated)."""

    config: TrainConfig
    device: torch.device
    problems: list[Problem]
    eval_problems: list[Problem]
    tokenizer: object
    policy: torch.nn.Module
    critic: torch.nn.Module | None
    reference: torch.nn.Module | None
    optimizers: list[torch.optim.Optimizer]
    schedulers: list[torch.optim.lr_scheduler.LRScheduler]
    curriculum: Curriculum | None
    generator: torch.Generator  # the mini-batch order
    state: dict  # {"step": steps done, "position": problems drawn}: what a checkpoint resumes from
    logger: Logger
    engine: object
    sandbox: Sandbox
    export_dtype: torch.dtype
    save_reference: bool
    build_seconds: float
    last_step: int

    def save(self, step: int) -> None:
        """A checkpoint of the run as it is now; a full disk stops the run, the last whole checkpoint stays."""
        config = self.config
        base = self.policy if config.lora_r else self.reference  # a LoRA run's base: its policy without the adapter
        with exit_on(checkpoint.SaveError), phase("save"):
            checkpoint.save(Path(config.output_dir), step,
                            {"policy": self.policy, "critic": self.critic, "reference": base}, self.tokenizer,
                            self.optimizers, self.schedulers, self.curriculum, self.state, to_json(config),
                            self.generator, self.export_dtype, self.save_reference, config.share_trunk,
                            config.save_total_limit)


def checked_config(argv: list[str] | None) -> tuple[TrainConfig, torch.device]:
    """The parsed flags, every package they need present, the process group up, and the combinations
    refused that this world cannot run."""
    with exit_on(ConfigError):
        config = parse_config(argv)
        check_installed(config)
    device = setup(config.device, config.dist_timeout_minutes)
    world_size = world()[1]
    if world_size > 1 and config.share_trunk:
        sys.exit("error: share_trunk: a shared trunk is for single-process runs (under torchrun the critic "
                 "keeps its own trunk)")
    if world_size > 1 and config.lora_r and config.advantage == "gae" and config.strategy == "fsdp2":
        sys.exit("error: lora_r: with --advantage gae the critic's adapter sits on the policy's base tensors, "
                 "which FSDP2 cannot shard twice; use --advantage grpo or rloo (no critic), or --strategy ddp")
    if config.vllm_enable_sleep_mode:
        with exit_on(ValueError):
            check_sleep_mode()  # before any work: the engine starts only after the warm-up
    return config, device


def claim_output(config: TrainConfig) -> Path | None:
    """The checkpoint to resume from (rank 0 verifies it once and tells the others), after rank 0 has
    claimed the output folder (a finished run's folder is moved aside only when asked)."""
    resume_from = None
    if world()[0] == 0:
        with exit_on(ValueError):  # a damaged checkpoint named, or another run's folder
            resume_from = checkpoint.find(config.output_dir, config.resume_from_checkpoint)
            moved = rundir.claim(Path(config.output_dir), config.resume_from_checkpoint is not None,
                                 config.overwrite_output_dir)
        if moved:
            print(moved)
    return broadcast(resume_from)


def build_optimizers(policy, critic, config: TrainConfig) -> tuple[list, list]:
    """AdamW for what trains in the policy (with LoRA: the adapter) and in the critic (with a shared
    trunk: its head only), each with the learning-rate schedule."""
    trained = [p for p in policy.parameters() if p.requires_grad]
    optimizers = [torch.optim.AdamW(trained, lr=config.learning_rate, betas=(0.9, 0.95), weight_decay=0.0)]
    if critic is not None:
        critic_parameters = list(unwrap(critic).head.parameters()) if config.share_trunk else \
            [p for p in critic.parameters() if p.requires_grad]
        optimizers.append(torch.optim.AdamW(critic_parameters, lr=config.critic_learning_rate, betas=(0.9, 0.95),
                                            weight_decay=0.0))
    schedule = functools.partial(learning_rate_factor, total_steps=config.total_steps,
                                 warmup_steps=config.warmup_steps, kind=config.lr_scheduler_type)
    return optimizers, [torch.optim.lr_scheduler.LambdaLR(o, schedule) for o in optimizers]


def sandbox_workers(config: TrainConfig) -> int:
    """--sandbox_workers, or this rank's share of the CPUs it may run on, less one left to the trainer when
    the share is 4 or more. The trainer's thread keeps a GPU fed while the previous batch is judged, but
    after its last batch it only waits for verdicts: on 2 or 3 CPUs a CPU held back for it would idle
    through that wait, a third to a half of the pool (on 2 CPUs one worker judged a step's 64 rollouts
    in 2x the time two did). Verdicts are by CPU time, so sharing a CPU with the trainer changes none."""
    if config.sandbox_workers is not None:
        return config.sandbox_workers
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    share = max(1, len(os.sched_getaffinity(0)) // local_ranks)
    return share - 1 if share >= 4 else share


def start_engine(config: TrainConfig, policy, tokenizer, longest_prompt: int, device):
    """The rollout engine: the learner's own generate (hf), or vLLM in this process with the policy's
    weights pushed in (``VLLMEngine.sync``), its context sized to the longest prompt plus max_new_tokens."""
    if config.rollout_engine == "hf":
        return HFEngine(policy, tokenizer, device, functools.partial(compute, config, device))
    model = language_model(unwrap(policy))
    with engine_directory(policy, tokenizer) as directory:
        engine = VLLMEngine(directory, tokenizer, dtype=compute_dtype(config.precision, torch.device(device)),
                            max_model_len=longest_prompt + config.max_new_tokens, seed=config.seed,
                            gpu_memory_utilization=config.vllm_gpu_memory_utilization,
                            tensor_parallel_size=config.vllm_tensor_parallel_size,
                            enable_sleep_mode=config.vllm_enable_sleep_mode,
                            eos_token_ids=eos_ids(model.generation_config.eos_token_id))
    engine.sync(policy)
    return engine


def start_run(argv: list[str] | None = None) -> Run:
    config, device = checked_config(argv)
    rank = world()[0]
    resume_from = claim_output(config)
    with exit_on(DataError):
        problems = select_problems(config)
        eval_problems = select_eval_problems(config)
        # every CCCS stage's prompt must fit whatever the RL arm (--no_cccs, --no_fgo), and the warm-up is
        # the same in every arm: one start for all arms
        warmup_stages = cccs_stages(problems, dataclasses.replace(config, no_cccs=False))
        stages = cccs_stages(problems, config) if config.no_cccs else warmup_stages
        sft = select_warmup(config, problems)
    config = sized_warmup(config, *sft)
    if rank == 0:
        print(to_json(config))
        (Path(config.output_dir) / "config.json").write_text(to_json(config))
    random.seed(config.seed)
    np.random.seed(config.seed)
    torch.manual_seed(config.seed)

    # The models: the policy, a frozen reference and the critic; sharded or replicated; warmed up.
    started = time.perf_counter()
    with exit_on(DataError):  # data the model's context cannot hold, said before any training
        policy, reference, tokenizer, save_reference, export_dtype = learners.build_models(
            config, problems, warmup_stages, resume_from, device, eval_problems, sft)
        longest_prompt = max(
            learners.check_prompts_fit(policy, tokenizer, problems, warmup_stages if config.sft_steps else stages,
                                       config),
            learners.check_prompts_fit(policy, tokenizer, eval_problems, {p.id: [""] for p in eval_problems}, config)
            if eval_problems else 0)
    if config.top_p < 1 and rank == 0:
        print(f"warning: top_p {config.top_p} samples from a truncated distribution while the PPO ratio uses the "
              "full softmax: the update is off-policy (use --top_p 1.0 for on-policy PPO)", file=sys.stderr)
    critic = learners.build_critic(policy, config, device)
    policy, critic = learners.distribute(policy, critic, reference, tokenizer, config, device,
                                         sft if resume_from is None else None)
    build_seconds = time.perf_counter() - started

    optimizers, schedulers = build_optimizers(policy, critic, config)
    curriculum = None if config.no_cccs else make_curriculum(stages, config)
    generator = torch.Generator().manual_seed(config.seed + rank)
    state = {"step": 0, "position": 0}
    if resume_from is not None:
        state = checkpoint.load(resume_from, policy, critic, optimizers, schedulers, generator)
        if curriculum is not None:
            curriculum.load_state_dict(json.loads((resume_from / "curriculum.json").read_text()))
    with exit_on(ValueError):  # a metrics or samples file damaged other than by a kill
        logger = Logger(config, resumed_at=state["step"] if resume_from is not None else None)
    last_step = config.total_steps if config.stop_after_steps is None else min(
        config.total_steps, state["step"] + config.stop_after_steps)
    with exit_on(ValueError):  # a setting the engine or this platform refuses, named
        engine = start_engine(config, policy, tokenizer, longest_prompt, device)
    with exit_on(SandboxError, prefix="sandbox_url: "):  # no server answered, or one refused the token
        sandbox = open_sandbox(config.sandbox_url, workers=sandbox_workers(config), timeout=config.sandbox_timeout,
                               wall_timeout=config.sandbox_wall_timeout, memory_mb=config.sandbox_memory_mb,
                               trace=True,  # with --no_fgo too: the lines no test ran are measured in every arm
                               stop_on_first_failure=config.fgo_coverage == "first_failure")
    return Run(config, torch.device(device), problems, eval_problems, tokenizer, policy, critic, reference,
               optimizers, schedulers, curriculum, generator, state, logger, engine, sandbox, export_dtype,
               save_reference, build_seconds, last_step)
