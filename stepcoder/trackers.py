"""Where a run's metrics rows go besides metrics.jsonl (``--report_to``): TensorBoard, or Weights & Biases.

A tracker takes the rows metrics.jsonl gets (the steps' and the held-out evaluations'), rank 0 only:
their numbers (``step`` is the x axis, not a series; a dict of numbers such as ``outcomes`` as
``outcomes/pass``, ...; strings and lists are left to metrics.jsonl).

Weights & Biases: the run is named ``--run_name`` (default: the output directory's name), in the project
``$WANDB_PROJECT`` (default ``stepcoder``; ``$WANDB_ENTITY``, ``$WANDB_MODE`` and the rest of wandb's
variables apply as usual); its config is the run's config.json. wandb keeps its files in
``OUTPUT_DIR/wandb`` unless ``$WANDB_DIR`` says where. The run's id is kept in ``OUTPUT_DIR/wandb_run_id``,
so a run continued with ``--resume_from_checkpoint`` logs to the same wandb run (``resume="allow"``).
The resumed run does again the steps the interrupted one took after its checkpoint; wandb's steps only go
forward, so those redone steps are not logged again there: wandb keeps the interrupted run's rows for them
(metrics.jsonl has the redone ones), and the steps past the ones it had are logged as usual. Offline
(``WANDB_MODE=offline``) each process writes its own ``offline-run-*-ID`` folder under the one id.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Protocol

from stepcoder.config import TrainConfig, to_json
from stepcoder.output import write_atomically

WANDB_RUN_ID = "wandb_run_id"  # in the output directory


class Tracker(Protocol):
    def log(self, row: dict, step: int) -> None: ...

    def close(self) -> None: ...


def scalars(row: dict) -> dict[str, float]:
    """The numbers of a metrics row, but its step; a dict's numbers as `name/key`."""
    found = {}
    for name, value in row.items():
        if isinstance(value, dict):
            found.update((f"{name}/{key}", number) for key, number in value.items()
                         if isinstance(number, (int, float)))
        elif isinstance(value, (int, float)) and name != "step":
            found[name] = value
    return found


class TensorBoard:
    def __init__(self, directory: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(directory))

    def log(self, row: dict, step: int) -> None:
        for name, value in scalars(row).items():
            self.writer.add_scalar(name, value, step)

    def close(self) -> None:
        self.writer.close()


class WandB:
    def __init__(self, config: TrainConfig, output: Path):
        import wandb

        saved = output / WANDB_RUN_ID
        resuming = config.resume_from_checkpoint is not None and saved.exists()
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT") or "stepcoder",
                              name=config.run_name or output.resolve().name,
                              id=saved.read_text().strip() if resuming else None,  # None: $WANDB_RUN_ID, or new
                              resume="allow", dir=None if os.environ.get("WANDB_DIR") else str(output),
                              config=json.loads(to_json(config)), reinit="finish_previous")
        write_atomically(saved, self.run.id + "\n")
        # A resumed wandb run (online) starts past the last step the interrupted run logged; the steps
        # before it that this run does again would be refused by wandb, one warning each.
        self.first = self.run.starting_step
        self.skipped: list[int] = []

    def log(self, row: dict, step: int) -> None:
        if step < self.first:
            if not self.skipped:
                print(f"wandb: run {self.run.id} resumed at step {self.first}; steps this run does again before "
                      "it keep the interrupted run's values there (metrics.jsonl has the new ones)", file=sys.stderr)
            self.skipped.append(step)
            return
        self.run.log(scalars(row), step=step)

    def close(self) -> None:
        self.run.finish()


def open_tracker(config: TrainConfig, output: Path) -> Tracker | None:
    """The tracker `--report_to` names, or None (none; TensorBoard where torch cannot import it, said)."""
    if config.report_to == "tensorboard":
        try:
            return TensorBoard(output / "tensorboard")
        except ImportError:
            print("warning: --report_to tensorboard, but tensorboard is not installed; logging to jsonl only",
                  file=sys.stderr)
            return None
    if config.report_to == "wandb":
        return WandB(config, output)
    return None
