"""The supervised warm-up before RL: cross-entropy on each problem's canonical solution continued from
every CCCS prefix, so the model has seen the prompts it will be given; how long it is for the small
default model; and how many positions each problem needs (the small model's context is sized to them, a
loaded model's is checked against them before any work)."""
from __future__ import annotations

import dataclasses
import math
import random

import torch
from tqdm import tqdm

from stepcoder import kernels
from stepcoder.config import SMALL_MODEL_WARMUP_PASSES, SMALL_MODEL_WARMUP_STEPS, TrainConfig
from stepcoder.data import Problem
from stepcoder.distributed import compute, world
from stepcoder.generation import encode_prompts
from stepcoder.models import position_ids
from stepcoder.prompts import CODE_FENCE, build_prompt, chat_option


def warmup_examples(problems: list[Problem], stages: dict[str, list[str]], tokenizer,
                    chat: bool | None) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, target ids) for each problem's canonical solution continued from each of its CCCS
    prefixes: the prompt with one BOS, the target (the rest of the solution, the closing fence, EOS)
    with none."""
    examples = []
    for problem in problems:
        if not problem.solutions:
            continue
        solution = problem.solutions[0]
        for prefix in stages[problem.id]:
            context = problem.context(prefix)
            target = solution[len(context):] if solution.startswith(context) else solution
            prompt_ids = encode_prompts(tokenizer, [build_prompt(problem, prefix, tokenizer, chat)])["input_ids"][0]
            target_ids = tokenizer(target + CODE_FENCE, add_special_tokens=False)["input_ids"] + \
                [tokenizer.eos_token_id]
            examples.append((prompt_ids.tolist(), target_ids))
    return examples


WARMUP_BATCH = 16  # canonical-solution examples per supervised warm-up step


def sized_warmup(config: TrainConfig, problems: list[Problem], stages: dict[str, list[str]]) -> TrainConfig:
    """The small default model's warm-up length (sft_steps None): SMALL_MODEL_WARMUP_STEPS, or
    SMALL_MODEL_WARMUP_PASSES passes over the warm-up examples when that is fewer."""
    if config.sft_steps is not None:
        return config
    examples = sum(len(stages[problem.id]) for problem in problems if problem.solutions)
    passes = math.ceil(SMALL_MODEL_WARMUP_PASSES * examples / WARMUP_BATCH)
    return dataclasses.replace(config, sft_steps=min(SMALL_MODEL_WARMUP_STEPS, passes))


def supervised_warmup(policy, tokenizer, problems: list[Problem], stages: dict[str, list[str]], config: TrainConfig,
                      device) -> float:
    """Cross-entropy on each problem's canonical solution, continued from every CCCS prefix in `stages`,
    so the model has seen the prompts it will be given. Returns the last loss."""
    examples = warmup_examples(problems, stages, tokenizer, chat_option(config.chat))
    optimizer = torch.optim.AdamW(policy.parameters(), lr=config.sft_learning_rate)
    generator = random.Random(config.seed)
    policy.train()
    loss = torch.tensor(float("nan"))
    for _ in tqdm(range(config.sft_steps), desc="supervised warm-up", unit="step", disable=world()[0] != 0,
                  leave=False):
        chosen = [examples[generator.randrange(len(examples))] for _ in range(WARMUP_BATCH)]
        width = max(len(p) + len(t) for p, t in chosen)
        ids = torch.full((len(chosen), width), tokenizer.pad_token_id)
        labels = torch.full((len(chosen), width), -100)
        attention = torch.zeros_like(ids)
        for row, (prompt, target) in enumerate(chosen):
            sequence = prompt + target
            ids[row, width - len(sequence):] = torch.tensor(sequence)
            labels[row, width - len(target):] = torch.tensor(target)
            attention[row, width - len(sequence):] = 1
        ids, labels, attention = ids.to(device), labels.to(device), attention.to(device)
        with compute(config, device):
            # targets are right-aligned: logits only where they are predicted (the prompt needs none),
            # [B, T + 1] positions for [B, T] labels, as a causal LM's output
            keep = max(len(target) for _, target in chosen)
            logits = policy(input_ids=ids, attention_mask=attention, position_ids=position_ids(attention),
                            logits_to_keep=keep + 1, use_cache=False).logits
            targets = labels[:, -keep:]
            kept = targets != -100
            logp = kernels.logprobs_from_logits(logits, targets.clamp(min=0))
            loss = -(logp * kept).sum() / kept.sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return loss.item()


def context_needed(problems: list[Problem], stages: dict[str, list[str]], tokenizer, config: TrainConfig,
                   eval_problems: list[Problem] = (),
                   sft: tuple[list[Problem], dict[str, list[str]]] | None = None) -> dict[str, int]:
    """Per problem, the positions it needs: its longest prompt (at `stages`) plus --max_new_tokens (held-out
    problems: full generation), and with --sft_steps each warm-up example (`sft`'s problems at their
    prefixes, by default `problems` at `stages`): prompt + the rest of the solution."""
    chat = chat_option(config.chat)
    needed: dict[str, int] = {}
    for problem in problems:
        prompt = len(encode_prompts(tokenizer, [build_prompt(problem, stages[problem.id][0], tokenizer, chat)])
                     ["input_ids"][0])
        needed[problem.id] = prompt + config.max_new_tokens
    if config.sft_steps:
        sft_problems, sft_stages = sft or (problems, stages)
        for problem in sft_problems:
            examples = warmup_examples([problem], sft_stages, tokenizer, chat)
            needed[problem.id] = max([needed.get(problem.id, 0)] + [len(p) + len(t) for p, t in examples])
    for problem in eval_problems:
        prompt = encode_prompts(tokenizer, [build_prompt(problem, "", tokenizer, chat)])["input_ids"][0]
        needed[problem.id] = max(needed.get(problem.id, 0), len(prompt) + config.max_new_tokens)
    return needed


def context_of(model) -> int | None:
    return next((getattr(model.config, name) for name in ("max_position_embeddings", "n_positions")
                 if getattr(model.config, name, None)), None)
