"""StepCoder's sandbox and rewards as an OpenRLHF 0.11 reward function: this file is the module that
``--reward.remote_url`` takes.

    python -m stepcoder.integrations.openrlhf --data apps_plus:train.json --output train.jsonl [--cccs]
    python -m openrlhf.cli.train_ppo_ray ... --data.prompt_data train.jsonl --data.input_key prompt \\
        --data.label_key label \\
        --reward.remote_url $(python -c "import stepcoder.integrations.openrlhf as m; print(m.__file__)")

Each row's label is its task's JSON (``stepcoder.integrations.common.Task``), so the reward needs nothing
but the label. ``scores`` are the pass indicators in [0, 1] (OpenRLHF's dynamic filtering reads them);
``$STEPCODER_SANDBOX_URL`` sends the judging to ``python -m stepcoder.serve`` servers.
"""
from __future__ import annotations

import json
import re
from collections import Counter

from stepcoder.integrations.common import Task, judge, prepare_arguments, staged

_TRAILING_SPECIALS = re.compile(r"(?:\s*(?:<\|[^|<>]{1,40}\|>|</s>|<eos>|<pad>|<unk>))+\s*$")


def reward_func(queries: list[str], prompts: list[str], labels: list[str], **kwargs) -> dict:
    """OpenRLHF's call: a query is the prompt followed by the response; the response is judged."""
    import torch

    responses = [response_of(query, prompt) for query, prompt in zip(queries, prompts)]
    judged = judge([Task.from_json(label) for label in labels], responses)
    verdicts = Counter(item.verdict for item in judged)
    return {"rewards": torch.tensor([item.reward for item in judged], dtype=torch.float32),
            "scores": torch.tensor([float(item.verdict == "pass") for item in judged], dtype=torch.float32),
            "extra_logs": {f"verdict_{verdict}": torch.tensor(count / len(judged))
                           for verdict, count in verdicts.items()}}


def response_of(query: str, prompt: str) -> str:
    """The response in a query: after the prompt (OpenRLHF decodes queries with special tokens, so a BOS
    may come first), without the special tokens that end it (EOS, padding)."""
    start = query.find(prompt)
    response = query[start + len(prompt):] if start >= 0 else query
    return _TRAILING_SPECIALS.sub("", response)


def main(argv: list[str] | None = None) -> None:
    """Writes the JSONL rows (``prompt``: the plain prompt, ending inside an open code block; ``label``)."""
    from stepcoder.prompts import build_prompt

    args, problems = prepare_arguments("python -m stepcoder.integrations.openrlhf", main.__doc__,
                                       "the JSONL file to write", argv)
    count = 0
    with open(args.output, "w") as out:
        for problem, stage, prefix in staged(problems, args.cccs):
            out.write(json.dumps({"prompt": build_prompt(problem, prefix, None, False),
                                  "label": Task.of(problem, stage, prefix).to_json()}) + "\n")
            count += 1
    print(f"wrote {count} rows ({len(problems)} problems) to {args.output}")


if __name__ == "__main__":
    main()
