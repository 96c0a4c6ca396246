"""The learner's models: the policy, the frozen reference and the critic, built or loaded, warmed up,
then sharded (FSDP2) or replicated (DDP), so that no device ever holds a whole fp32 model when sharded;
and the checks that every prompt fits their context."""
from __future__ import annotations

import copy
from pathlib import Path

import torch

from stepcoder import lora
from stepcoder.config import TrainConfig
from stepcoder.data import DataError, Problem
from stepcoder.distributed import compute_dtype, copy_shards, load_from_rank0, replicate, shard, sharded, world
from stepcoder.generation import encode_prompts
from stepcoder.models import (
    build_default_model,
    build_default_tokenizer,
    checkpoint_activations,
    checkpoint_dtype,
    load_model,
    load_model_skeleton,
    load_reference,
    make_critic,
    without_dropout,
)
from stepcoder.prompts import CODE_FENCE, build_prompt, chat_option
from stepcoder.warmup import context_needed, context_of, supervised_warmup


def tokenizer_corpus(problems: list[Problem]) -> list[str]:
    """The texts the small default tokenizer is trained on: what the model reads and writes (the plain
    prompt, each canonical solution, the closing fence). Trained on questions and solutions alone, the
    fence was three one-backtick tokens; the 2-layer model often wrote two and stopped, and a quarter of
    its greedy programs failed to compile for that alone, so PPO's held-out gain was mostly learning to
    count backticks, and how much of it there was to learn varied from machine to machine."""
    return [build_prompt(problem, "", None, False) + solution + CODE_FENCE
            for problem in problems for solution in problem.solutions]


def build_models(config: TrainConfig, problems: list[Problem], stages: dict[str, list[str]],
                 resume_from: Path | None, device, eval_problems: list[Problem] = (),
                 sft: tuple[list[Problem], dict[str, list[str]]] | None = None) -> tuple:
    """(policy, reference, tokenizer, save_reference, export_dtype), before any wrapping; `stages` are every
    CCCS prefix of `problems` (their prompts must fit), `sft` the warm-up's problems and prefixes
    (``select_warmup``; default: `problems` at `stages`). The policy is
    in fp32 (the optimizer's master weights, whatever dtype the checkpoint is stored in, which is
    `export_dtype`); the frozen reference in the compute dtype when sharded, else in fp32 (it computes as
    the policy does). The reference is the starting policy:
    saved when it is not the base checkpoint as loaded (a warm-up changed it, or the model was built
    here), otherwise rebuilt on resume from the base checkpoint by the same deterministic steps.
    With LoRA (lora_r) the policy is those base weights, frozen in the compute dtype, with an adapter
    on them, and the reference is the policy itself (``reference_logprobs`` switches the adapter off)."""
    fresh = config.model_name_or_path is None
    adapted = config.lora_r > 0
    dtype = compute_dtype(config.precision, torch.device(device))
    home = model_home(config, device)
    export_dtype = torch.float32 if fresh else checkpoint_dtype(config.model_name_or_path)
    keep_reference = config.kl_coef > 0  # beta = 0: no reference model at all
    reference = None
    if resume_from is not None:
        saved = resume_from / "reference"
        base = str(saved if saved.exists() else config.model_name_or_path)
        # the trained weights come from state/; a LoRA run's adapter from there too, on its base weights
        policy, tokenizer = load_model(base if adapted else str(resume_from / "policy"), dtype=torch.float32)
        if keep_reference and not adapted:
            reference = load_reference(base, tokenizer, dtype=torch.float32)
    else:
        if fresh:  # its context: 1024 positions, or as many as the data needs (APPS+), in steps of 64
            tokenizer = build_default_tokenizer(tokenizer_corpus(problems))
            longest = max(context_needed(problems, stages, tokenizer, config, eval_problems, sft).values(),
                          default=0)
            policy = build_default_model(tokenizer, config.seed, config.n_layer, config.n_embd,
                                         max(1024, -(-longest // 64) * 64))
        elif from_rank0(config) and world()[0] != 0:  # its shards come from rank 0 (distribute)
            policy, tokenizer = load_model_skeleton(config.model_name_or_path)
        else:
            policy, tokenizer = load_model(config.model_name_or_path, dtype=torch.float32)
            if config.sft_steps and context_of(policy) is not None:
                limit = context_of(policy)
                over = {ident: size for ident, size in
                        context_needed(problems, stages, tokenizer, config, sft=sft).items() if size > limit}
                if over:
                    ident, size = max(over.items(), key=lambda item: item[1])
                    raise DataError(f"{len(over)} problems need more than the model's {limit} positions for the "
                                    f"warm-up or generation (e.g. {ident}: {size}); lower --max_new_tokens, leave "
                                    "them out (--limit, --difficulty), or use a model with a longer context")
        if config.sft_steps and not sharded_warmup(config):  # the whole model on each rank's device
            loss = supervised_warmup(without_dropout(policy).to(device), tokenizer, *(sft or (problems, stages)),
                                     config, device)
            if world()[0] == 0:
                print(f"supervised warm-up: {config.sft_steps} steps, final loss {loss:.3f}")
        to_home(policy, home)
        reference = copy.deepcopy(policy) if keep_reference and not adapted else None
    policy = to_home(without_dropout(policy), home)
    if reference is not None:
        # The reference computes as the starting policy does, so the KL starts at exactly 0: sharded,
        # FSDP2's mixed precision casts both to the compute dtype, so the reference is stored in it; else the
        # policy's fp32 weights run under autocast (matmuls in bf16, norms and softmax in fp32), which a
        # reference stored in bf16 would not repeat, so it stays in fp32.
        stored = dtype if sharded(config.strategy) else torch.float32
        reference = to_home(without_dropout(reference), home, stored).eval()
        reference.requires_grad_(False)
    if config.gradient_checkpointing:
        checkpoint_activations(policy)
    if adapted:
        policy = lora.attach(policy, config.lora_r, config.lora_alpha, config.lora_target_modules, dtype)
        reference = policy if keep_reference else None
    # a LoRA run saves its base weights whenever they are not the base checkpoint: resuming needs them
    save_reference = (keep_reference or adapted) and (fresh or config.sft_steps > 0)
    return policy, reference, tokenizer, save_reference, export_dtype


def sharded_warmup(config: TrainConfig) -> bool:
    """Whether the supervised warm-up trains the sharded policy (FSDP2 over several ranks, no adapter), after
    ``wrap_models``, so that no device holds the whole model and its AdamW states (108 GB for 6.7B); the
    reference and the critic's trunk then take the warmed-up shards (``copy_shards``)."""
    return sharded(config.strategy) and bool(config.sft_steps) and not config.lora_r


def model_home(config: TrainConfig, device) -> torch.device:
    """Where the models are built: on `device`, or under FSDP2 in host memory, from where sharding moves
    them to the device one unit at a time, so that no rank's device ever holds a whole model (6.7B: a
    26.9 GB fp32 policy, as much again for the critic, 13.5 GB of reference)."""
    return torch.device("cpu") if sharded(config.strategy) else torch.device(device)


def from_rank0(config: TrainConfig) -> bool:
    """Whether only rank 0 reads the checkpoint and the others receive their shards from it (the paper's
    setting: a checkpoint, FSDP2 over several ranks, no warm-up, no adapter, not resuming), so that a
    node's host memory holds one whole copy of the models, not one per rank."""
    return (sharded(config.strategy) and config.model_name_or_path is not None and not config.sft_steps
            and not config.lora_r and config.resume_from_checkpoint is None)


def to_home(model: torch.nn.Module, home: torch.device, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """`model` moved to `home` (and `dtype`); a skeleton on the meta device only changes dtype: rank 0 fills
    it once it is sharded."""
    if any(parameter.is_meta for parameter in model.parameters()):
        return model if dtype is None else model.to(dtype=dtype)
    return model.to(device=home) if dtype is None else model.to(device=home, dtype=dtype)


def wrap_models(policy, critic, reference, config: TrainConfig, device) -> tuple:
    """(train_policy, train_critic): sharded in place (fsdp2) or wrapped (ddp) under torchrun; the
    reference is sharded too under fsdp2 (no optimizer state; with reference_offload, in CPU memory)."""
    if world()[1] == 1:
        return policy, critic
    if config.strategy == "ddp":
        return replicate(policy, device), None if critic is None else replicate(critic, device)
    dtype = compute_dtype(config.precision, device)
    # a LoRA policy's root unit is the transformers model inside the peft wrapper: generate() runs that
    # model's forward, never the wrapper's, and FSDP2 needs its root's forward to run first
    shard(lora.language_model(policy), dtype, device)
    if critic is not None:
        shard(critic, dtype, device, trunk=critic.trunk)
    if reference is not None and reference is not policy:  # LoRA: the reference is the policy, sharded above
        shard(reference, dtype, device, offload=config.reference_offload)
    return policy, critic


def check_prompts_fit(model, tokenizer, problems: list[Problem], stages: dict[str, list[str]],
                      config: TrainConfig) -> int:
    """The longest prompt's tokens (a problem's longest is its first CCCS stage's). Raises DataError
    naming the problems whose longest prompt plus max_new_tokens exceeds the model's context: they would
    be cut off silently mid-generation."""
    chat = chat_option(config.chat)
    longest = {p.id: len(encode_prompts(tokenizer, [build_prompt(p, stages[p.id][0], tokenizer, chat)])["input_ids"][0])
               for p in problems}
    limit = context_of(model)
    if limit is None:
        return max(longest.values())
    over = {problem: length for problem, length in longest.items() if length + config.max_new_tokens > limit}
    if over:
        examples = ", ".join(f"{problem} ({length} tokens)" for problem, length in list(over.items())[:5])
        raise DataError(f"{len(over)} prompts do not fit the model's context of {limit} tokens with max_new_tokens "
                        f"{config.max_new_tokens}: {examples}; lower --max_new_tokens or leave these problems out")
    return max(longest.values())


def build_critic(policy, config: TrainConfig, device):
    """The value model for GAE (grpo and rloo build none): the policy's trunk, shared (--share_trunk) or a
    copy, under a value head."""
    if config.advantage != "gae":
        return None
    critic = to_home(make_critic(policy, config.share_trunk), model_home(config, device))
    if config.gradient_checkpointing and not config.share_trunk:
        checkpoint_activations(critic.trunk)
    return critic


def distribute(policy, critic, reference, tokenizer, config: TrainConfig, device,
               warmup: tuple[list[Problem], dict[str, list[str]]] | None) -> tuple:
    """(policy, critic) as they train: sharded or replicated (``wrap_models``); under ``from_rank0`` the other
    ranks' shards are filled from rank 0's whole weights, taken before sharding replaced them; given
    `warmup` (problems, prefixes) under ``sharded_warmup``, the sharded policy is warmed up, and the reference
    and the critic's trunk take its shards (the starting policy is the warmed-up one)."""
    models = [model for model in (policy, critic, reference) if model is not None]
    whole = [model.state_dict() if world()[0] == 0 else None for model in models] if from_rank0(config) else None
    train_policy, train_critic = wrap_models(policy, critic, reference, config, device)
    if whole is not None:
        for model, weights in zip(models, whole):  # an offloaded reference keeps its shards in host memory
            offloaded = model is reference and config.reference_offload
            load_from_rank0(model, weights, torch.device("cpu") if offloaded else torch.device(device))
        del whole
    if warmup is not None and sharded_warmup(config):
        loss = supervised_warmup(train_policy, tokenizer, *warmup, config, device)
        if world()[0] == 0:
            print(f"supervised warm-up: {config.sft_steps} steps, final loss {loss:.3f}")
        if reference is not None:
            copy_shards(train_policy, reference)
        if critic is not None:
            copy_shards(train_policy.base_model, train_critic.trunk)
    return train_policy, train_critic
