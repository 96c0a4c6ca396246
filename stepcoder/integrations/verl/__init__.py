"""StepCoder's sandbox and rewards as a veRL reward function (veRL 0.9's ``custom_reward_function``).

    python -m stepcoder.integrations.verl.prepare --data apps_plus:train.json --output train.parquet --cccs
    python -m verl.trainer.main_ppo data.train_files=train.parquet ... \\
        reward.custom_reward_function.path=$(python -c "import stepcoder.integrations.verl as m; print(m.__file__)") \\
        reward.custom_reward_function.name=compute_score

Each row's ``reward_model.ground_truth`` holds its task (``stepcoder.integrations.common.Task``: the
context a completion continues and the tests), so reward workers on any machine judge without the
dataset. ``$STEPCODER_SANDBOX_URL`` sends the judging to ``python -m stepcoder.serve`` servers.
veRL has no per-token mask in its reward interface, so FGO is not applied here; CCCS stages are rows.
"""
from __future__ import annotations

from stepcoder.integrations.common import Task, judge

DATA_SOURCE = "stepcoder"


def compute_score(data_source: str, solution_str: str, ground_truth: str, extra_info: dict | None = None,
                  **kwargs) -> dict:
    """veRL's reward call: the judged completion's reward as ``score``, with its verdict (logged)."""
    (judged,) = judge([Task.from_json(ground_truth)], [solution_str])
    return {"score": judged.reward, "verdict": judged.verdict, "passed": float(judged.verdict == "pass")}
