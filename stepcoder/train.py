"""``python -m stepcoder.train``: PPO from unit-test feedback with CCCS and FGO (StepCoder).

One step, top to bottom (CleanRL's PPO is the model):
  1. rollouts: each problem's prompt (with its CCCS prefix) sampled `rollouts_per_prompt` times with the
     KV cache; programs go to the sandbox as soon as their batch is generated;
  2. rewards: the verdict's reward on the last generated token, minus kl_coef * KL(policy || reference)
     on every generated token (or in the loss: --kl_in_loss); FGO masks tokens on lines that never ran;
  3. old log-probs, reference log-probs and values in one no-grad pass each; advantages
     (``stepcoder.advantages``): GAE whitened over the tokens in the policy loss, or, without a critic,
     each rollout against the other rollouts of its prompt (--advantage grpo|rloo);
  4. ppo_epochs x mini-batches x micro-batches: the clipped policy loss (action mask x FGO mask) and the
     clipped value loss (action mask; GAE only), each normalised by the global count of its tokens;
  5. the curriculum advances problems whose recent pass rate reached rho; metrics, samples, checkpoints.

With no arguments it builds a small GPT-2 and tokenizer offline, warms them up on the canonical
solutions of the generated training problems (``synthetic:train``), trains on them on the CPU, and
evaluates held-out pass@1 (``synthetic:heldout``) before the first update and after the last.
"""
from __future__ import annotations

import copy
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
from tqdm.auto import tqdm

from stepcoder import checkpoint, kernels, lora, rundir
from stepcoder.advantages import gae_advantages, group_advantages
from stepcoder.cccs import Curriculum, problem_stages, reach_warning
from stepcoder.config import ConfigError, TrainConfig, check_installed, parse_config, to_json
from stepcoder.data import DataError, Problem, load_problems
from stepcoder.distributed import (
    all_gather,
    all_sum,
    broadcast,
    compute,
    compute_dtype,
    no_sync,
    replicate,
    setup,
    copy_shards,
    load_from_rank0,
    shard,
    sharded,
    unwrap,
    world,
)
from stepcoder.engines import HFEngine, Sampling, VLLMEngine, check_sleep_mode, engine_directory, eos_ids
from stepcoder.generation import encode_prompts
from stepcoder.heldout import Evaluation, compare, describe, evaluate_policy, plot_curve
from stepcoder.kernels.reference import kl_penalty
from stepcoder.metrics import bootstrap_ci
from stepcoder.models import (
    build_default_model,
    build_default_tokenizer,
    checkpoint_activations,
    checkpoint_dtype,
    load_model,
    load_model_skeleton,
    load_reference,
    make_critic,
    position_ids,
    without_dropout,
)
from stepcoder.output import write_atomically
from stepcoder.phases import phase
from stepcoder.prompts import CODE_FENCE, build_prompt, chat_option
from stepcoder.rollouts import Sample, collect_rollouts, importance_weights, reward_of
from stepcoder.remote import open_sandbox
from stepcoder.sandbox import Sandbox, SandboxError
from stepcoder.schedules import learning_rate_factor
from stepcoder.trackers import open_tracker
from stepcoder.warmup import context_needed, context_of, sized_warmup, supervised_warmup


# --------------------------------------------------------------------------------------------------
# Experience: padded tensors, rewards, advantages


@dataclass
class Batch:
    input_ids: torch.Tensor       # [N, P + R]: left-padded prompts, right-padded responses
    attention_mask: torch.Tensor
    responses: torch.Tensor       # [N, R]
    action_mask: torch.Tensor     # [N, R]: generated tokens (EOS included)
    policy_mask: torch.Tensor     # action mask x FGO mask
    unexecuted: torch.Tensor      # [N, R]: generated tokens on lines no test ran (what FGO masks), in every arm
    scores: torch.Tensor          # [N]: the verdicts' rewards
    prompts: list[tuple[str, int]]  # [N]: each rollout's prompt (problem, CCCS stage): its group
    engine_logp: torch.Tensor | None = None  # [N, R]: the sampling engine's log-probs (vLLM), else None


def pad_batch(samples: list[Sample], tokenizer, config: TrainConfig, device) -> Batch:
    pad = tokenizer.pad_token_id
    width = max(len(s.prompt_ids) for s in samples)
    length = max(max(len(s.response_ids) for s in samples), 1)
    ids = torch.full((len(samples), width + length), pad, dtype=torch.long)
    attention = torch.zeros_like(ids)
    action = torch.zeros(len(samples), length)
    fgo = torch.zeros(len(samples), length)
    executed = torch.zeros(len(samples), length)
    recorded = all(s.engine_logprobs is not None for s in samples)
    engine_logp = torch.zeros(len(samples), length)
    for row, sample in enumerate(samples):
        prompt, response = sample.prompt_ids, sample.response_ids
        ids[row, width - len(prompt):width] = torch.tensor(prompt)
        ids[row, width:width + len(response)] = torch.tensor(response, dtype=torch.long)
        attention[row, width - len(prompt):width + len(response)] = 1
        action[row, :len(response)] = 1
        fgo[row, :len(response)] = torch.tensor(sample.fgo, dtype=torch.float)
        executed[row, :len(response)] = torch.tensor(sample.executed or [1] * len(response), dtype=torch.float)
        if recorded:
            engine_logp[row, :len(response)] = torch.tensor(sample.engine_logprobs, dtype=torch.float)
    scores = torch.tensor([reward_of(s.verdict, config) - (config.truncation_penalty if s.truncated else 0.0)
                           for s in samples])
    return Batch(ids.to(device), attention.to(device), ids[:, width:].to(device), action.to(device),
                 (action * fgo).to(device), (action * (1 - executed)).to(device), scores.to(device),
                 [(s.problem.id, s.stage) for s in samples],
                 engine_logp.to(device) if recorded else None)


def learner_temperature(config: TrainConfig) -> float:
    """The temperature the learner's log-probs are taken at: the sampling one, or 1 for greedy rollouts
    (--temperature 0), which are scored under the model's own distribution."""
    return config.temperature or 1.0


def response_logits(model, batch: Batch, rows) -> torch.Tensor:
    """Logits at the positions that predict the response tokens plus one: [n, R + 1, V], computed only
    there (`logits_to_keep`), handed to the kernels as a causal LM's output."""
    width = batch.responses.shape[1]
    attention = batch.attention_mask[rows]
    return model(input_ids=batch.input_ids[rows], attention_mask=attention, position_ids=position_ids(attention),
                 logits_to_keep=width + 1, use_cache=False).logits


def response_hidden(model, batch: Batch, rows) -> torch.Tensor:
    """The last hidden states at the positions that predict the response tokens: [n, R, H]. The model
    runs through its own forward (so DDP sees it) with the LM head kept to one position and no KV cache;
    only the trunk's output is kept (a hook), not every layer's hidden states."""
    width = batch.responses.shape[1]
    attention = batch.attention_mask[rows]
    captured = []
    hook = lora.trunk(unwrap(model)).register_forward_hook(lambda module, args, output: captured.append(output[0]))
    try:
        model(input_ids=batch.input_ids[rows], attention_mask=attention, position_ids=position_ids(attention),
              logits_to_keep=1, use_cache=False)
    finally:
        hook.remove()
    return captured[0][:, -width - 1:-1]


def lm_head_weight(model, config: TrainConfig) -> torch.Tensor | None:
    """The LM head's weight when the output layer is a plain linear map (no bias, no logit scaling or
    softcapping): the losses then take hidden states and never materialize [tokens x vocab] logits.
    Not under FSDP2, where the weight outside the model's forward is a shard."""
    model = unwrap(model)
    head = model.get_output_embeddings()
    settings = model.config
    plain = (isinstance(head, torch.nn.Linear) and head.bias is None
             and not getattr(settings, "final_logit_softcapping", None)
             and getattr(settings, "logit_scale", None) in (None, 1, 1.0))
    return head.weight if plain and config.fused_lm_head == "auto" and not sharded(config.strategy) else None


def response_logprobs(model, batch: Batch, rows, config: TrainConfig) -> torch.Tensor:
    """Per-token log-probs of the responses, from hidden states when the head allows it."""
    weight = lm_head_weight(model, config)
    if weight is None:
        return kernels.logprobs_from_logits(response_logits(model, batch, rows), batch.responses[rows],
                                            learner_temperature(config))
    hidden = response_hidden(model, batch, rows)
    labels = batch.responses[rows]
    return kernels.linear_logprobs(hidden.reshape(-1, hidden.shape[-1]), weight, labels.reshape(-1),
                                   learner_temperature(config)).view(labels.shape)


def reference_logprobs(reference, batch: Batch, rows, config: TrainConfig) -> torch.Tensor:
    """The reference's log-probs; a LoRA run's reference is its policy with the adapter switched off."""
    with lora.adapter_disabled(unwrap(reference)):
        return response_logprobs(reference, batch, rows, config)


def response_values(critic, batch: Batch, rows) -> torch.Tensor:
    """V of the state before each response token: [n, R]."""
    width = batch.responses.shape[1]
    return critic(batch.input_ids[rows], batch.attention_mask[rows])[:, -width - 1:-1]


@torch.no_grad()
def score_rollouts(policy, reference, critic, batch: Batch, config: TrainConfig) -> dict:
    """Old and reference log-probs and values (no-grad forwards in chunks of forward_batch_size
    rollouts; no reference when kl_coef is 0, no values without a critic), then advantages: GAE over
    KL-shaped rewards, or a group baseline (grpo, rloo) on the score less kl_coef x the response's KL,
    unless the KL goes into the loss (kl_in_loss)."""
    chunks = [slice(start, start + config.forward_batch_size)
              for start in range(0, batch.responses.shape[0], config.forward_batch_size)]
    with compute(config, batch.input_ids.device):
        old_logp = torch.cat([response_logprobs(policy, batch, rows, config) for rows in chunks])
        ref_logp = None if reference is None else \
            torch.cat([reference_logprobs(reference, batch, rows, config) for rows in chunks])
        values = None if critic is None else \
            torch.cat([response_values(critic, batch, rows) for rows in chunks]) * batch.action_mask
    kl = torch.zeros_like(old_logp) if ref_logp is None else \
        kl_penalty(old_logp, ref_logp, config.kl_estimator) * batch.action_mask
    kl_in_reward = 0.0 if config.kl_in_loss else config.kl_coef
    experience = {"old_logp": old_logp, "ref_logp": ref_logp, "values": values, "kl": kl}
    if config.advantage == "gae":
        experience["advantages"], experience["returns"], experience["rewards"] = gae_advantages(
            batch.scores, values, kl, batch.action_mask, batch.policy_mask, kl_in_reward, config.gamma, config.lam)
    else:
        scores = batch.scores - kl_in_reward * kl.sum(-1)
        advantages = group_advantages(scores, batch.prompts, config.rollouts_per_prompt, config.advantage,
                                      scale=not config.grpo_no_std)
        experience["advantages"] = advantages[:, None] * batch.action_mask
    experience["is_weights"] = torch.ones_like(old_logp) if batch.engine_logp is None else importance_weights(
        old_logp, batch.engine_logp, batch.policy_mask, config.rollout_is, config.rollout_is_cap)
    return experience


def rollout_mismatch(batch: Batch, experience: dict) -> dict:
    """How far the engine's log-probs of the sampled tokens are from the learner's (before the update)
    over the policy-loss tokens, and the mean importance weight there; all ranks together. The HF
    engine samples from the learner itself: its weights are 1, nothing to compare."""
    mask = (batch.policy_mask > 0).to(experience["old_logp"].dtype)
    if batch.engine_logp is None:  # the same on every rank: all skip the collectives together
        return {"rollout_is_ratio_mean": 1.0}
    gap = (experience["old_logp"] - batch.engine_logp).abs() * mask
    sums = all_sum(torch.stack([gap.sum(), (experience["is_weights"] * mask).sum(), mask.sum()]).double())
    largest = max(all_gather(float(gap.max()) if gap.numel() else 0.0))
    tokens = max(float(sums[2]), 1.0)
    return {"rollout_is_ratio_mean": float(sums[1]) / tokens if float(sums[2]) else 1.0,
            "rollout_logprob_abs_diff_max": largest, "rollout_logprob_abs_diff_mean": float(sums[0]) / tokens}


def ppo_update(policy, critic, optimizers, batch: Batch, experience: dict, config: TrainConfig,
               generator: torch.Generator) -> dict:
    """ppo_epochs x mini-batches (one optimizer step each) x micro-batches (gradient accumulation).
    The statistics are those of all ranks together: losses summed (each is a share of the global token
    mean), the per-token ones weighted by their tokens."""
    policy.train()
    if critic is not None:
        critic.train()
    _, world_size = world()
    kl_in_loss = config.kl_in_loss and experience["ref_logp"] is not None
    names = ("clipfrac", "approx_kl", "entropy", "ratio")
    totals = torch.zeros(3 + len(names), dtype=torch.float64)  # policy loss, value loss, tokens, token-weighted
    updates = 0
    count = batch.responses.shape[0]
    head = lm_head_weight(policy, config)
    for _ in range(config.ppo_epochs):
        order = torch.randperm(count, generator=generator).to(batch.responses.device)
        for mini in order.chunk(config.num_mini_batches):
            # Global token counts, so the loss is a token mean over the whole mini-batch on every rank.
            policy_tokens = all_sum(batch.policy_mask[mini].sum().detach().clone()).clamp(min=1) / world_size
            value_tokens = all_sum(batch.action_mask[mini].sum().detach().clone()).clamp(min=1) / world_size
            micro_batches = mini.chunk(config.gradient_accumulation_steps)
            for index, micro in enumerate(micro_batches):
                last = index == len(micro_batches) - 1
                with no_sync(policy, last), no_sync(critic, last), compute(config, batch.input_ids.device):
                    options = dict(clip_low=config.cliprange, clip_high=config.cliprange_high or config.cliprange,
                                   dual_clip=config.dual_clip, temperature=learner_temperature(config),
                                   entropy_coef=config.entropy_coef, normalizer=policy_tokens)
                    if kl_in_loss:
                        options.update(ref_logp=experience["ref_logp"][micro], kl_coef=config.kl_coef,
                                       kl_estimator=config.kl_estimator)
                    # the rollout importance weights scale each token's loss (the mask is its weight)
                    policy_mask = batch.policy_mask[micro] * experience["is_weights"][micro]
                    per_token = (batch.responses[micro], experience["old_logp"][micro],
                                 experience["advantages"][micro], policy_mask)
                    if head is not None:
                        loss, stats = kernels.ppo_policy_loss_from_hidden(response_hidden(policy, batch, micro), head,
                                                                          *per_token, weight_grad=head.requires_grad,
                                                                          **options)
                    else:
                        loss, stats = kernels.ppo_policy_loss(response_logits(policy, batch, micro), *per_token,
                                                              **options)
                    loss.backward()
                    value_loss = torch.zeros(())
                    if critic is not None:
                        values = response_values(critic, batch, micro)
                        value_loss, _ = kernels.value_loss(values, experience["values"][micro],
                                                           experience["returns"][micro], batch.action_mask[micro],
                                                           clip=config.cliprange_value or None,
                                                           normalizer=value_tokens)
                        value_loss.backward()
                tokens = float((batch.policy_mask[micro] > 0).sum())
                totals += torch.tensor([loss.item() / world_size, value_loss.item() / world_size, tokens]
                                       + [float(stats[name]) * tokens for name in names], dtype=torch.float64)
            for model, optimizer in zip((policy, critic), optimizers):  # no critic: one optimizer
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            updates += 1
    totals = all_sum(totals.to(batch.responses.device)).cpu()
    result = {"policy_loss": float(totals[0]) / updates}
    if critic is not None:
        result["value_loss"] = float(totals[1]) / updates
    result.update({name: float(totals[3 + i] / totals[2].clamp(min=1)) for i, name in enumerate(names)})
    return result


# --------------------------------------------------------------------------------------------------
# Logging


class Logger:
    """metrics.jsonl (one object per step), samples.jsonl, TensorBoard when asked; rank 0 only."""

    def __init__(self, config: TrainConfig, resumed_at: int | None):
        self.output = Path(config.output_dir)
        self.enabled = world()[0] == 0
        self.history: list[dict] = []
        self.evals: list[dict] = []  # held-out evaluation rows, also in metrics.jsonl
        self.eval_seconds = 0.0  # spent evaluating in this process
        self.board = None
        if not self.enabled:
            return
        metrics, samples = self.output / "metrics.jsonl", self.output / "samples.jsonl"
        if resumed_at is not None:
            # Steps after the checkpoint were lost with the interrupted run; they are done again.
            (rows, dropped), (_, dropped_samples) = (rundir.keep_rows_through(path, resumed_at)
                                                     for path in (metrics, samples))
            if dropped or dropped_samples:
                print(f"resuming at step {resumed_at}: dropped {dropped} metrics rows and {dropped_samples} sample "
                      "rows that the interrupted run wrote after it")
            self.history = [row for row in rows if "eval_pass@1" not in row]
            self.evals = [row for row in rows if "eval_pass@1" in row]
        else:
            metrics.write_text("")
            samples.write_text("")
        self.board = open_tracker(config, self.output)

    def step(self, metrics: dict) -> None:
        """A step's row: in history, metrics.jsonl and TensorBoard."""
        if self.enabled:
            self.history.append(metrics)
            self._write(metrics)

    def evaluation(self, row: dict) -> None:
        """A held-out evaluation's row: in metrics.jsonl (beside the steps) and TensorBoard."""
        if self.enabled:
            self.evals.append(row)
            self.eval_seconds += row["time_eval_s"]
            self._write(row)

    def _write(self, row: dict) -> None:
        self._append(self.output / "metrics.jsonl", json.dumps(row) + "\n")
        if self.board is not None:
            self.board.log(row, row["step"])

    def samples(self, step: int, samples: list[Sample]) -> None:
        """Every rank's rollouts of the step, in order, with the rank that made them (collective)."""
        rows = all_gather([{"step": step, "task_id": sample.problem.id, "stage": sample.stage, "prefix": sample.prefix,
                            "completion": sample.completion, "verdict": sample.verdict} for sample in samples])
        if not self.enabled:
            return
        text = "".join(json.dumps({**row, "rank": rank}) + "\n" for rank, ranks_rows in enumerate(rows)
                       for row in ranks_rows)
        self._append(self.output / "samples.jsonl", text)

    @staticmethod
    def _append(path: Path, text: str) -> None:
        """Appends, or stops the run saying why (a full disk): what was written up to the last checkpoint
        stays, and a resumed run drops a row cut short."""
        try:
            with open(path, "a") as f:
                f.write(text)
        except OSError as error:
            sys.exit(f"error: could not append to {path}: {error.strerror or error}; the run stops here (free "
                     "space, then continue with --resume_from_checkpoint latest)")


def step_metrics(step: int, samples: list[Sample], batch: Batch, experience: dict, update: dict,
                 curriculum: Curriculum | None, timings: dict) -> dict:
    """Every number summed over ranks before it is averaged."""
    outcomes: dict[str, int] = {}
    wall_timeouts = 0
    for verdicts in all_gather([(s.verdict, s.wall_timeout) for s in samples]):
        for verdict, by_wall in verdicts:
            outcomes[verdict] = outcomes.get(verdict, 0) + 1
            wall_timeouts += by_wall
    action = batch.action_mask
    truncated = action.new_tensor(float(sum(s.truncated for s in samples)))
    weight = experience["advantages"].abs()  # each token's weight in the policy gradient, before masking
    full = action.new_tensor(float(sum(not s.prefix for s in samples)))
    sums = all_sum(torch.stack([batch.scores.sum(), experience["kl"].sum(), action.sum(),
                                (action - batch.policy_mask).sum(), action.new_tensor(float(len(samples))),
                                truncated, batch.unexecuted.sum(), (weight * action).sum(),
                                (weight * batch.policy_mask * batch.unexecuted).sum(), full]).double())
    score, kl, tokens, masked, count, truncated, unexecuted, weights, unexecuted_weights, full = (
        float(value) for value in sums)
    metrics = {"step": step, "reward_mean": score / count,
               "pass_rate": outcomes.get("pass", 0) / max(sum(outcomes.values()), 1),
               "kl": kl / max(tokens, 1.0), "response_length_mean": tokens / count,
               "truncated_frac": truncated / count, "fgo_masked_frac": masked / max(tokens, 1.0),
               # FGO's mechanism, in every arm: the generated tokens on lines no test ran, and the share of
               # the policy gradient's weight (|advantage| x loss mask) they receive: 0 with FGO
               "unexecuted_frac": unexecuted / max(tokens, 1.0),
               "unexecuted_grad_share": unexecuted_weights / weights if weights else 0.0,
               "full_generation_frac": full / count,  # rollouts writing the whole program (no CCCS prefix)
               "outcomes": outcomes, "sandbox_wall_timeouts": wall_timeouts}
    metrics.update({name: value for name, value in update.items()})
    metrics.update(rollout_mismatch(batch, experience))
    if experience["ref_logp"] is None:  # kl_coef 0: no reference, nothing measured
        del metrics["kl"]
    if curriculum is not None:
        metrics["cccs_stage_mean"] = curriculum.mean_stage()
        metrics["cccs_histogram"] = {str(k): v for k, v in curriculum.histogram().items()}
        metrics["cccs_full_windows"] = curriculum.full_windows()
    else:
        metrics["cccs_stage_mean"] = 0.0
    metrics.update({name: round(value, 4) for name, value in timings.items()})
    return metrics


def summarize(history: list[dict], build_seconds: float, steps: int, ppo_seconds: float, eval_seconds: float) -> str:
    """This process's times: building the models (with the warm-up), the PPO steps, the held-out
    evaluations; pass rate and reward of the run's first quarter against its last."""
    times = (f"model built and warmed up in {build_seconds:.1f} s; {steps} PPO steps in {ppo_seconds:.1f} s; "
             f"held-out evaluations {eval_seconds:.1f} s")
    if not history:
        return times
    quarter = max(len(history) // 4, 1)
    first, last = history[:quarter], history[-quarter:]

    def mean(rows, name):
        return sum(r[name] for r in rows) / len(rows)

    phases = {name: sum(r.get(name, 0.0) for r in history) for name in
              ("time_generate_s", "time_sandbox_s", "time_forward_s", "time_update_s", "time_sync_s")}
    dominant = max(phases, key=phases.get)
    lines = [times,
             f"pass rate: first quarter {mean(first, 'pass_rate'):.3f} -> last quarter {mean(last, 'pass_rate'):.3f}",
             f"reward:    first quarter {mean(first, 'reward_mean'):+.3f} -> "
             f"last quarter {mean(last, 'reward_mean'):+.3f}",
             "time per phase: " + ", ".join(f"{k[5:-2]} {v:.1f} s" for k, v in phases.items())
             + f" (dominant: {dominant[5:-2]})"]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------


def select_problems(config: TrainConfig) -> list[Problem]:
    problems = load_problems(config.data).problems
    problems = [p for p in problems if config.difficulty is None or p.difficulty == config.difficulty]
    problems = problems[:config.limit] if config.limit else problems
    if not problems:
        raise DataError(f"no problems to train on in {config.data}")
    return problems


def select_eval_problems(config: TrainConfig) -> list[Problem]:
    """The held-out problems (--eval_data, first --eval_limit), or none; a warning when they are the
    training problems themselves."""
    if config.eval_data is None:
        return []
    problems = load_problems(config.eval_data).problems
    problems = problems[:config.eval_limit] if config.eval_limit else problems
    if not problems:
        raise DataError(f"no problems to evaluate on in {config.eval_data}")
    if config.eval_data == config.data and world()[0] == 0:
        print(f"warning: --eval_data {config.eval_data} is the training data: the evaluation does not measure "
              "generalisation", file=sys.stderr)
    return problems


def held_out_evaluation(engine, tokenizer, problems: list[Problem], sandbox: Sandbox, config: TrainConfig,
                        step: int, logger: Logger) -> None:
    """Full programs sampled by the run's engine at eval_temperature (top_p 1), judged as `evaluate`
    judges them; the row goes to metrics.jsonl and the per-problem counts to eval/step-N.json. Step 0 is
    read from --start_evaluation when given (raises ValueError when it is not over these problems)."""
    if step == 0 and config.start_evaluation is not None:
        evaluation = Evaluation.read(Path(config.start_evaluation), [p.id for p in problems], config.eval_samples)
        if logger.enabled:
            evaluation.save(logger.output)
            logger.evaluation(evaluation.row(config.eval_data, config.eval_temperature))
        return
    settings = Sampling(config.max_new_tokens, config.eval_temperature)

    def sample(prompts: list[str]) -> list[tuple[list[int], list[int]]]:
        return [(g.prompt_ids, g.response_ids) for g in engine.generate(prompts, settings)]

    chat = chat_option(config.chat)
    evaluation = evaluate_policy(sample, tokenizer, problems, config.eval_samples, sandbox, chat, step,
                                 config.eval_batch_size)
    if logger.enabled:
        evaluation.save(logger.output)
        logger.evaluation(evaluation.row(config.eval_data, config.eval_temperature))


def report_evaluations(logger: Logger, config: TrainConfig) -> None:
    """eval_curve.png; and, when the run has evaluated its start and its end, eval_summary.json and the
    before/after lines with their confidence intervals."""
    if not logger.enabled or not logger.evals:
        return
    plot_curve(logger.evals, logger.output / "eval_curve.png")
    before, after = Evaluation.load(logger.output, 0), Evaluation.load(logger.output, config.total_steps)
    if before is None or after is None:
        return
    if config.total_steps == 0:  # a warm-up-only run: the start, nothing to compare it with
        low, high = bootstrap_ci(before.rates())
        print(f"held-out pass@1 on {config.eval_data} ({len(before.passed)} problems x {before.samples} samples, "
              f"T={config.eval_temperature}): {100 * before.pass_at(1):.1f}% [{100 * low:.1f}%, {100 * high:.1f}%]")
        return
    comparison = compare(before, after)
    # written last and atomically: its presence marks a finished run (python -m stepcoder.ablation)
    write_atomically(logger.output / "eval_summary.json", json.dumps(
        {"eval_data": config.eval_data, "temperature": config.eval_temperature, **comparison}, indent=2) + "\n")
    print(describe(comparison, config.eval_data, config.eval_temperature))


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


def make_curriculum(stages: dict[str, list[str]], config: TrainConfig) -> Curriculum:
    """The CCCS curriculum; --cccs_window defaults to one draw's rollouts (per problem: the rollouts of
    one prompt; global: one step's). Warns, naming the numbers, when it cannot move in this run."""
    rollouts_per_step = config.problems_per_step * world()[1] * config.rollouts_per_prompt
    window = config.cccs_window or (rollouts_per_step if config.cccs_mode == "global" else config.rollouts_per_prompt)
    warning = reach_warning(config.cccs_mode, window, [len(prefixes) for prefixes in stages.values()],
                            config.total_steps, rollouts_per_step, config.rollouts_per_prompt)
    if warning and world()[0] == 0:
        print(f"warning: {warning}", file=sys.stderr)
    return Curriculum(stages, threshold=config.cccs_threshold, window=window, mode=config.cccs_mode)


def problem_batch(problems: list[Problem], position: int, config: TrainConfig, seed: int) -> list[Problem]:
    """This rank's problems for the step at `position` in an epoch-wise shuffled order (same on every rank)."""
    rank, world_size = world()
    chosen, orders = [], {}
    for offset in range(config.problems_per_step * world_size):
        epoch, within = divmod(position + offset, len(problems))
        if epoch not in orders:
            orders[epoch] = np.random.default_rng(seed + epoch).permutation(len(problems))
        chosen.append(problems[orders[epoch][within]])
    return chosen[rank * config.problems_per_step:(rank + 1) * config.problems_per_step]


def select_warmup(config: TrainConfig, problems: list[Problem]) -> tuple[list[Problem], dict[str, list[str]]]:
    """The supervised warm-up's problems (--sft_data, else the training problems) and the prefixes each is
    continued from: every CCCS stage, or with --sft_whole_programs the whole program only. None without a
    warm-up (--sft_steps 0)."""
    if config.sft_steps == 0:
        return [], {}
    if config.sft_data is not None:
        problems = load_problems(config.sft_data).problems
        if not problems:
            raise DataError(f"no problems to warm up on in {config.sft_data}")
        if config.sft_data == config.eval_data and world()[0] == 0:
            print(f"warning: --sft_data {config.sft_data} is the held-out data: the evaluation does not measure "
                  "generalisation", file=sys.stderr)
    return problems, cccs_stages(problems, dataclasses.replace(config, no_cccs=config.sft_whole_programs))


def cccs_stages(problems: list[Problem], config: TrainConfig) -> dict[str, list[str]]:
    """Each problem's CCCS prefixes (longest first, ending with "" for full generation); with --no_cccs,
    or for a problem without a canonical solution that parses, full generation only (with a warning
    naming the problem: an APPS solution in Python 2, say)."""
    if config.no_cccs:
        return {problem.id: [""] for problem in problems}
    stages, unparsed = problem_stages(problems, config.cccs_loops)
    for problem, error in unparsed.items():
        if world()[0] == 0:
            print(f"warning: {problem}: the canonical solution does not parse ({error}); this problem is "
                  "trained at full generation only", file=sys.stderr)
    return stages


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
        elif from_rank0(config) and world()[0] != 0:  # its shards come from rank 0 (main: load_from_rank0)
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


def start_engine(config: TrainConfig, policy, tokenizer, longest_prompt: int, device):
    """The rollout engine: the learner's own generate (hf), or vLLM in this process with the policy's
    weights pushed in (``VLLMEngine.sync``), its context sized to the longest prompt plus max_new_tokens."""
    if config.rollout_engine == "hf":
        return HFEngine(policy, tokenizer, device, functools.partial(compute, config, device))
    model = lora.language_model(unwrap(policy))
    with engine_directory(policy, tokenizer) as directory:
        engine = VLLMEngine(directory, tokenizer, dtype=compute_dtype(config.precision, torch.device(device)),
                            max_model_len=longest_prompt + config.max_new_tokens, seed=config.seed,
                            gpu_memory_utilization=config.vllm_gpu_memory_utilization,
                            tensor_parallel_size=config.vllm_tensor_parallel_size,
                            enable_sleep_mode=config.vllm_enable_sleep_mode,
                            eos_token_ids=eos_ids(model.generation_config.eos_token_id))
    engine.sync(policy)
    return engine


def main(argv: list[str] | None = None) -> list[dict]:
    try:
        config = parse_config(argv)
        check_installed(config)
    except ConfigError as error:
        sys.exit(f"error: {error}")
    device = setup(config.device, config.dist_timeout_minutes)
    rank, world_size = world()
    if world_size > 1 and config.share_trunk:
        sys.exit("error: share_trunk: a shared trunk is for single-process runs (under torchrun the critic "
                 "keeps its own trunk)")
    if world_size > 1 and config.lora_r and config.advantage == "gae" and config.strategy == "fsdp2":
        sys.exit("error: lora_r: with --advantage gae the critic's adapter sits on the policy's base tensors, "
                 "which FSDP2 cannot shard twice; use --advantage grpo or rloo (no critic), or --strategy ddp")
    if config.vllm_enable_sleep_mode:
        try:
            check_sleep_mode()  # before any work: the engine starts only after the warm-up
        except ValueError as error:
            sys.exit(f"error: {error}")
    output = Path(config.output_dir)
    if rank == 0:
        try:
            resume_from = checkpoint.find(config.output_dir, config.resume_from_checkpoint)
            moved = rundir.claim(output, config.resume_from_checkpoint is not None, config.overwrite_output_dir)
        except ValueError as error:  # a damaged checkpoint named, or another run's folder
            sys.exit(f"error: {error}")
        if moved:
            print(moved)
    resume_from = broadcast(resume_from if rank == 0 else None)  # verified once, by rank 0
    try:
        problems = select_problems(config)
        eval_problems = select_eval_problems(config)
    except DataError as error:
        sys.exit(f"error: {error}")
    # every CCCS stage's prompt must fit whatever the RL arm (--no_cccs, --no_fgo), and the warm-up is the
    # same in every arm: one start for all arms
    warmup_stages = cccs_stages(problems, dataclasses.replace(config, no_cccs=False))
    stages = cccs_stages(problems, config) if config.no_cccs else warmup_stages
    try:
        sft = select_warmup(config, problems)
    except DataError as error:
        sys.exit(f"error: {error}")
    config = sized_warmup(config, *sft)
    if rank == 0:
        print(to_json(config))
        (output / "config.json").write_text(to_json(config))
    random.seed(config.seed)
    np.random.seed(config.seed)
    torch.manual_seed(config.seed)
    # Models: the policy, a frozen reference, and the critic; then sharded or replicated.
    started = time.perf_counter()
    try:
        policy, reference, tokenizer, save_reference, export_dtype = build_models(
            config, problems, warmup_stages, resume_from, device, eval_problems, sft)
    except DataError as error:  # data the model's context cannot hold, said before any training
        sys.exit(f"error: {error}")
    build_seconds = time.perf_counter() - started
    try:
        longest_prompt = max(
            check_prompts_fit(policy, tokenizer, problems, warmup_stages if config.sft_steps else stages, config),
            check_prompts_fit(policy, tokenizer, eval_problems, {p.id: [""] for p in eval_problems}, config)
            if eval_problems else 0)
    except DataError as error:
        sys.exit(f"error: {error}")
    if config.top_p < 1 and rank == 0:
        print(f"warning: top_p {config.top_p} samples from a truncated distribution while the PPO ratio uses the "
              "full softmax: the update is off-policy (use --top_p 1.0 for on-policy PPO)", file=sys.stderr)
    critic = None  # critic-free estimators (grpo, rloo) build no value model
    if config.advantage == "gae":
        critic = to_home(make_critic(policy, config.share_trunk), model_home(config, device))
        if config.gradient_checkpointing and not config.share_trunk:
            checkpoint_activations(critic.trunk)
    # rank 0's whole weights, before sharding replaces them: the other ranks' skeletons are filled from them
    models = [model for model in (policy, critic, reference) if model is not None]
    whole = [model.state_dict() if rank == 0 else None for model in models] if from_rank0(config) else None
    train_policy, train_critic = wrap_models(policy, critic, reference, config, device)
    if whole is not None:
        for model, weights in zip(models, whole):  # an offloaded reference keeps its shards in host memory
            offloaded = model is reference and config.reference_offload
            load_from_rank0(model, weights, torch.device("cpu") if offloaded else torch.device(device))
        del whole
    if sharded_warmup(config) and resume_from is None:
        started = time.perf_counter()
        loss = supervised_warmup(train_policy, tokenizer, *(sft or (problems, warmup_stages)), config, device)
        if rank == 0:
            print(f"supervised warm-up: {config.sft_steps} steps, final loss {loss:.3f}")
        if reference is not None:  # the starting policy is the warmed-up one
            copy_shards(train_policy, reference)
        if critic is not None:
            copy_shards(train_policy.base_model, train_critic.trunk)
        build_seconds += time.perf_counter() - started
    trained = [p for p in train_policy.parameters() if p.requires_grad]  # with LoRA: the adapter
    optimizers = [torch.optim.AdamW(trained, lr=config.learning_rate, betas=(0.9, 0.95), weight_decay=0.0)]
    if critic is not None:
        critic_parameters = list(critic.head.parameters()) if config.share_trunk else \
            [p for p in train_critic.parameters() if p.requires_grad]
        optimizers.append(torch.optim.AdamW(critic_parameters, lr=config.critic_learning_rate, betas=(0.9, 0.95),
                                            weight_decay=0.0))
    schedule = functools.partial(learning_rate_factor, total_steps=config.total_steps,
                                 warmup_steps=config.warmup_steps, kind=config.lr_scheduler_type)
    schedulers = [torch.optim.lr_scheduler.LambdaLR(o, schedule) for o in optimizers]

    curriculum = None if config.no_cccs else make_curriculum(stages, config)
    generator = torch.Generator().manual_seed(config.seed + rank)
    trainer_state = {"step": 0, "position": 0}
    if resume_from is not None:
        trainer_state = checkpoint.load(resume_from, train_policy, train_critic, optimizers, schedulers, generator)
        if curriculum is not None:
            curriculum.load_state_dict(json.loads((resume_from / "curriculum.json").read_text()))
    try:
        logger = Logger(config, resumed_at=trainer_state["step"] if resume_from is not None else None)
    except ValueError as error:  # a metrics or samples file damaged other than by a kill
        sys.exit(f"error: {error}")

    def save_checkpoint(step: int) -> None:  # the trainer state as it is when called
        base = train_policy if config.lora_r else reference  # a LoRA run's base: its policy without the adapter
        try:
            with phase("save"):
                checkpoint.save(output, step, {"policy": train_policy, "critic": train_critic, "reference": base},
                                tokenizer, optimizers, schedulers, curriculum, trainer_state, to_json(config),
                                generator, export_dtype, save_reference, config.share_trunk, config.save_total_limit)
        except checkpoint.SaveError as error:  # a full disk: the run stops, the last whole checkpoint stays
            sys.exit(f"error: {error}")

    first_step = trainer_state["step"]
    last_step = config.total_steps if config.stop_after_steps is None else min(
        config.total_steps, first_step + config.stop_after_steps)
    try:
        engine = start_engine(config, train_policy, tokenizer, longest_prompt, device)
    except ValueError as error:  # a setting the engine or this platform refuses, named
        sys.exit(f"error: {error}")
    try:
        sandbox = open_sandbox(config.sandbox_url, workers=sandbox_workers(config), timeout=config.sandbox_timeout,
                               wall_timeout=config.sandbox_wall_timeout, memory_mb=config.sandbox_memory_mb,
                               trace=True,  # with --no_fgo too: the lines no test ran are measured in every arm
                               stop_on_first_failure=config.fgo_coverage == "first_failure")
    except SandboxError as error:  # no server answered, or one refused the token
        sys.exit(f"error: sandbox_url: {error}")
    with sandbox:
        if eval_problems and first_step == 0:
            try:
                held_out_evaluation(engine, tokenizer, eval_problems, sandbox, config, 0, logger)
            except ValueError as error:  # a --start_evaluation file that does not fit this run
                sys.exit(f"error: {error}")
        started, evaluating = time.perf_counter(), logger.eval_seconds
        progress = tqdm(range(first_step, last_step), desc="ppo", unit="step", disable=rank != 0)
        for step in progress:
            timings: dict[str, float] = {}
            chosen = problem_batch(problems, trainer_state["position"], config, config.seed)
            samples = collect_rollouts(engine, tokenizer, chosen, curriculum, sandbox, config, timings)
            with phase("forward", timings):
                batch = pad_batch(samples, tokenizer, config, device)
                experience = score_rollouts(train_policy, reference, train_critic, batch, config)
            with phase("update", timings):
                update = ppo_update(train_policy, train_critic, optimizers, batch, experience, config, generator)
                update["learning_rate"] = schedulers[0].get_last_lr()[0]  # the rate this step's update used
                for scheduler in schedulers:
                    scheduler.step()
            with phase("sync", timings):
                engine.sync(train_policy)  # the next rollouts (and evaluations) sample from the updated policy
            if curriculum is not None:
                for rollouts in all_gather([(s.problem.id, s.verdict == "pass", s.stage) for s in samples]):
                    for problem_id, passed, stage in rollouts:
                        curriculum.record(problem_id, passed, stage)
            metrics = step_metrics(step + 1, samples, batch, experience, update, curriculum, timings)
            logger.step(metrics)
            if (step + 1) % config.sample_every == 0:
                logger.samples(step + 1, samples)
            progress.set_postfix(pass_rate=f"{metrics['pass_rate']:.2f}", reward=f"{metrics['reward_mean']:+.2f}",
                                 stage=f"{metrics['cccs_stage_mean']:.2f}")
            trainer_state = {"step": step + 1,
                             "position": trainer_state["position"] + config.problems_per_step * world_size}
            if eval_problems and (step + 1 == config.total_steps or (config.eval_every and
                                                                      (step + 1) % config.eval_every == 0)):
                held_out_evaluation(engine, tokenizer, eval_problems, sandbox, config, step + 1, logger)
            if (step + 1) % config.save_steps == 0 or step + 1 == last_step:
                save_checkpoint(step + 1)
        if config.total_steps == 0:  # a warm-up-only run: its model, saved as any checkpoint is
            save_checkpoint(0)
        ppo_seconds = time.perf_counter() - started - (logger.eval_seconds - evaluating)
    engine.close()
    if logger.board is not None:
        logger.board.close()
    if rank == 0:
        print(summarize(logger.history, build_seconds, last_step - first_step, ppo_seconds, logger.eval_seconds))
    report_evaluations(logger, config)
    return logger.history


if __name__ == "__main__":
    main()
