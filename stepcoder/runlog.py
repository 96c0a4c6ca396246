"""What a run writes as it goes, on rank 0: ``metrics.jsonl`` (one row per step and per held-out
evaluation), ``samples.jsonl`` (every rank's rollouts), TensorBoard or W&B when asked; each step's metrics
summed over ranks; the summary printed at the end."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from stepcoder import rundir
from stepcoder.batching import Batch
from stepcoder.cccs import Curriculum
from stepcoder.config import TrainConfig
from stepcoder.distributed import all_gather, all_sum, world
from stepcoder.ppo import rollout_mismatch
from stepcoder.rollouts import Sample
from stepcoder.trackers import open_tracker


class Logger:
    """metrics.jsonl (one object per step), samples.jsonl, TensorBoard or W&B when asked; rank 0 only."""

    def __init__(self, config: TrainConfig, resumed_at: int | None):
        self.output = Path(config.output_dir)
        self.enabled = world()[0] == 0
        self.history: list[dict] = []
        self.evals: list[dict] = []  # held-out evaluation rows, also in metrics.jsonl
        self.eval_seconds = 0.0  # spent evaluating in this process
        self.tracker = None
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
        self.tracker = open_tracker(config, self.output)

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
        if self.tracker is not None:
            self.tracker.log(row, row["step"])

    def close(self) -> None:
        """Flushes and closes the tracker (TensorBoard, W&B), if any."""
        if self.tracker is not None:
            self.tracker.close()

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
