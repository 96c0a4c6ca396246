"""``python -m stepcoder.integrations.verl.prepare --data SPEC --output train.parquet [--cccs]``: problems
as veRL's parquet rows: ``data_source``, ``prompt`` (chat messages), ``ability``, ``reward_model:
{style, ground_truth}``, ``extra_info``. With ``--cccs`` every CCCS stage of a problem is a row of its
own (its prefix given in the prompt), longest prefix first; without, full generation only."""
from __future__ import annotations

import sys

from stepcoder.integrations.common import Task, prepare_arguments, staged
from stepcoder.integrations.verl import DATA_SOURCE
from stepcoder.prompts import instruction


def chat_request(problem, context: str) -> str:
    """The user turn: the task, and the code to continue when there is some (a CCCS prefix, starter code)."""
    text = instruction(problem)
    if context:
        return (f"{text}\n\nContinue this code; answer with only the code that follows it, in one ```python "
                f"block:\n```python\n{context}```")
    return f"{text}\n\nAnswer with the complete Python code in one ```python block."


def rows(problems, cccs: bool) -> list[dict]:
    out = []
    for problem, stage, prefix in staged(problems, cccs):
        task = Task.of(problem, stage, prefix)
        out.append({"data_source": DATA_SOURCE,
                    "prompt": [{"role": "user", "content": chat_request(problem, task.context)}],
                    "ability": "code",
                    "reward_model": {"style": "rule", "ground_truth": task.to_json()},
                    "extra_info": {"problem_id": problem.id, "stage": stage, "index": len(out)}})
    return out


def main(argv: list[str] | None = None) -> None:
    args, problems = prepare_arguments("python -m stepcoder.integrations.verl.prepare", __doc__,
                                       "the parquet file to write", argv)
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        sys.exit("error: writing parquet needs pyarrow (veRL installs it): pip install pyarrow")
    table = rows(problems, args.cccs)
    pq.write_table(pa.Table.from_pylist(table), args.output)
    print(f"wrote {len(table)} rows ({len(problems)} problems) to {args.output}")


if __name__ == "__main__":
    main()
