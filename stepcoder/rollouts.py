"""The trainer's rollouts: prompts (with their CCCS prefixes) sampled by an engine
(``stepcoder.engines``), judged in the sandbox, given FGO masks; the rewards of verdicts; and the
importance weights that correct for an engine whose log-probs are not exactly the learner's.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from stepcoder.cccs import Curriculum
from stepcoder.config import IS_MODES, TrainConfig
from stepcoder.data import Problem
from stepcoder.detokenize import code_tokens, continuation
from stepcoder.engines import Sampling
from stepcoder.fgo import token_mask
from stepcoder.phases import phase
from stepcoder.prompts import STOP_STRING, build_prompt, chat_option
from stepcoder.sandbox import Sandbox


@dataclass
class Sample:
    problem: Problem
    stage: int
    prefix: str
    prompt_ids: list[int]
    response_ids: list[int]
    completion: str
    verdict: str = ""
    executed_lines: list[int] = dataclasses.field(default_factory=list)
    tests_ran: bool = False
    executed: list[int] = dataclasses.field(default_factory=list)  # per response token: 0 = on lines no test ran
    fgo: list[int] = dataclasses.field(default_factory=list)  # the loss mask: `executed`, or all ones (--no_fgo)
    spans: list[tuple[int, int]] = dataclasses.field(default_factory=list)  # each code token's text in `completion`
    truncated: bool = False  # generation hit max_new_tokens
    wall_timeout: bool = False  # judged timeout by the sandbox's wall-clock backstop, not by CPU time
    engine_logprobs: list[float] | None = None  # the sampling engine's log-prob of each response token (vLLM)


def reward_of(verdict: str, config: TrainConfig) -> float:
    if verdict == "pass":
        return config.reward_pass
    if verdict == "wrong_answer":
        return config.reward_wrong_answer
    if verdict == "compile_error":
        return config.reward_compile_error
    return config.reward_runtime_error  # runtime error, timeout, memory, output limit, violation


def collect_rollouts(engine, tokenizer, problems: list[Problem], curriculum: Curriculum | None, sandbox: Sandbox,
                     config: TrainConfig, timings: dict) -> list[Sample]:
    """Samples, each judged; a batch's programs are in the sandbox while the next batch generates. A
    prompt's rollouts are consecutive (its group, for grpo and rloo)."""
    chat = chat_option(config.chat)
    work = []
    for problem in problems:
        prefix = curriculum.prefix(problem.id) if curriculum else ""
        stage = curriculum.stage(problem.id) if curriculum else 0
        prompt = build_prompt(problem, prefix, tokenizer, chat)
        work += [(problem, stage, prefix, prompt)] * config.rollouts_per_prompt
    sampling = Sampling(config.max_new_tokens, config.temperature, config.top_p, logprobs=engine.name != "hf")
    samples, futures = [], []
    with phase("generate", timings):
        for begin in range(0, len(work), config.generation_batch_size):
            chunk = work[begin:begin + config.generation_batch_size]
            for (problem, stage, prefix, _), generation in zip(chunk, engine.generate([item[3] for item in chunk],
                                                                                       sampling)):
                response_ids = generation.response_ids
                completion, spans = continuation(tokenizer, generation.prompt_ids,
                                                 code_tokens(tokenizer, response_ids))
                truncated = len(response_ids) >= config.max_new_tokens and \
                    response_ids[-1] != tokenizer.eos_token_id and \
                    STOP_STRING not in "\n" + completion  # stopped by the length limit, not by the model
                samples.append(Sample(problem, stage, prefix, generation.prompt_ids, response_ids, completion,
                                      spans=spans, truncated=truncated, engine_logprobs=generation.logprobs))
                futures.append(sandbox.submit(*problem.job(problem.program(completion, prefix))))
        engine.release()  # the learner's turn: a sleeping engine frees its memory
    with phase("sandbox", timings):  # the judging left once generation is done
        for sample, future in zip(samples, futures):
            result = future.result()
            sample.verdict, sample.executed_lines = result.verdict, result.executed_lines
            sample.tests_ran, sample.wall_timeout = bool(result.tests), result.wall_timeout
    for sample in samples:  # measured in every arm: what FGO masks, or would mask (--no_fgo)
        sample.executed = fgo_mask(sample, tokenizer)
        sample.fgo = sample.executed if not config.no_fgo else [1] * len(sample.response_ids)
    return samples


def fgo_mask(sample: Sample, tokenizer) -> list[int]:
    """FGO mask over the response tokens; special tokens (EOS) stay in the loss. The spans are those
    of the decode that gave ``sample.completion`` (``stepcoder.detokenize.continuation``)."""
    special = set(tokenizer.all_special_ids)
    mask = iter(token_mask(sample.problem.context(sample.prefix), sample.completion, sample.spans,
                           sample.executed_lines, sample.problem.entry, sample.tests_ran))
    return [1 if token in special else next(mask) for token in sample.response_ids]


def importance_weights(old_logp: torch.Tensor, engine_logp: torch.Tensor, mask: torch.Tensor, mode: str,
                       cap: float) -> torch.Tensor:
    """Truncated importance weights for rollouts sampled by an engine whose log-probs differ from the
    learner's (vLLM's kernels, bf16), [N, R] like the log-probs: per token min(exp(old - engine), cap);
    "sequence": min(exp(sum over the sequence's `mask` tokens of (old - engine)), cap) on each of its
    tokens; "none": 1. They multiply the per-token policy loss (TRL's, veRL's and OpenRLHF's truncated
    importance sampling). Computed in float64, the exponent capped first so nothing overflows."""
    if mode == "none":
        return torch.ones_like(old_logp)
    if mode not in IS_MODES:
        raise ValueError(f"rollout_is: {mode!r} is not one of {', '.join(IS_MODES)}")
    difference = (old_logp.double() - engine_logp.double()) * (mask > 0)
    if mode == "sequence":
        difference = difference.sum(-1, keepdim=True).expand_as(difference)
    return difference.clamp(max=math.log(cap)).exp().to(old_logp.dtype)
