"""``python -m stepcoder.train``: PPO from unit-test feedback with CCCS and FGO (StepCoder).

One step, top to bottom (CleanRL's PPO is the model):
  1. rollouts: each problem's prompt (with its CCCS prefix) sampled `rollouts_per_prompt` times with the
     KV cache; programs go to the sandbox as soon as their batch is generated (``stepcoder.rollouts``);
  2. rewards: the verdict's reward on the last generated token, minus kl_coef * KL(policy || reference)
     on every generated token (or in the loss: --kl_in_loss); FGO masks tokens on lines that never ran;
  3. old log-probs, reference log-probs and values in one no-grad pass each; advantages: GAE whitened
     over the tokens in the policy loss, or, without a critic, each rollout against the other rollouts of
     its prompt (--advantage grpo|rloo) (``stepcoder.ppo.score_rollouts``);
  4. ppo_epochs x mini-batches x micro-batches: the clipped policy loss (action mask x FGO mask) and the
     clipped value loss (action mask; GAE only), each normalised by the global count of its tokens
     (``stepcoder.ppo.ppo_update``);
  5. the new weights to the rollout engine; the curriculum advances problems whose recent pass rate
     reached rho; metrics, samples, held-out evaluations, checkpoints.

Set-up (flags, data, models, engine, sandbox) is ``stepcoder.startup``; what is logged, ``stepcoder.runlog``.
With no arguments it builds a small GPT-2 and tokenizer offline, warms them up on the canonical
solutions of the generated training problems (``synthetic:train``), trains on them on the CPU, and
evaluates held-out pass@1 (``synthetic:heldout``) before the first update and after the last.
"""
from __future__ import annotations

import time

from tqdm.auto import tqdm

from stepcoder.batching import pad_batch
from stepcoder.distributed import all_gather, world
from stepcoder.heldout import held_out_evaluation, report_evaluations
from stepcoder.phases import phase
from stepcoder.ppo import ppo_update, score_rollouts
from stepcoder.rollouts import Sample, collect_rollouts
from stepcoder.runlog import step_metrics, summarize
from stepcoder.selection import problem_batch
from stepcoder.startup import Run, exit_on, start_run


def train_step(run: Run, step: int) -> tuple[list[Sample], dict]:
    """Step `step` + 1: rollouts judged, scored, one PPO update, the new weights to the engine, the
    curriculum told the verdicts. Returns this rank's rollouts and the step's metrics (all ranks)."""
    config, timings = run.config, {}
    problems = problem_batch(run.problems, run.state["position"], config, config.seed)
    samples = collect_rollouts(run.engine, run.tokenizer, problems, run.curriculum, run.sandbox, config, timings)
    with phase("forward", timings):
        batch = pad_batch(samples, run.tokenizer, config, run.device)
        experience = score_rollouts(run.policy, run.reference, run.critic, batch, config)
    with phase("update", timings):
        update = ppo_update(run.policy, run.critic, run.optimizers, batch, experience, config, run.generator)
        update["learning_rate"] = run.schedulers[0].get_last_lr()[0]  # the rate this step's update used
        for scheduler in run.schedulers:
            scheduler.step()
    with phase("sync", timings):
        run.engine.sync(run.policy)  # the next rollouts (and evaluations) sample from the updated policy
    if run.curriculum is not None:  # every rank's verdicts, each for the stage it was generated at
        for rollouts in all_gather([(s.problem.id, s.verdict == "pass", s.stage) for s in samples]):
            for problem_id, passed, stage in rollouts:
                run.curriculum.record(problem_id, passed, stage)
    return samples, step_metrics(step + 1, samples, batch, experience, update, run.curriculum, timings)


def main(argv: list[str] | None = None) -> list[dict]:
    run = start_run(argv)
    config, logger, world_size = run.config, run.logger, world()[1]
    first_step = run.state["step"]
    with run.sandbox:
        if run.eval_problems and first_step == 0:
            with exit_on(ValueError):  # a --start_evaluation file that does not fit this run
                held_out_evaluation(run.engine, run.tokenizer, run.eval_problems, run.sandbox, config, 0, logger)
        started, evaluating = time.perf_counter(), logger.eval_seconds
        progress = tqdm(range(first_step, run.last_step), desc="ppo", unit="step", disable=world()[0] != 0)
        for step in progress:
            samples, metrics = train_step(run, step)
            logger.step(metrics)
            if (step + 1) % config.sample_every == 0:
                logger.samples(step + 1, samples)
            progress.set_postfix(pass_rate=f"{metrics['pass_rate']:.2f}", reward=f"{metrics['reward_mean']:+.2f}",
                                 stage=f"{metrics['cccs_stage_mean']:.2f}")
            run.state = {"step": step + 1, "position": run.state["position"] + config.problems_per_step * world_size}
            if run.eval_problems and (step + 1 == config.total_steps or
                                      (config.eval_every and (step + 1) % config.eval_every == 0)):
                held_out_evaluation(run.engine, run.tokenizer, run.eval_problems, run.sandbox, config, step + 1,
                                    logger)
            if (step + 1) % config.save_steps == 0 or step + 1 == run.last_step:
                run.save(step + 1)
        if config.total_steps == 0:  # a warm-up-only run: its model, saved as any checkpoint is
            run.save(0)
        ppo_seconds = time.perf_counter() - started - (logger.eval_seconds - evaluating)
    run.engine.close()
    logger.close()
    if world()[0] == 0:
        print(summarize(logger.history, run.build_seconds, run.last_step - first_step, ppo_seconds,
                        logger.eval_seconds))
    report_evaluations(logger, config)
    return logger.history


if __name__ == "__main__":
    main()
