"""An output directory belongs to one run. Starting a run where another one left its files is refused
(continue it with ``--resume_from_checkpoint latest``, or start over with ``--overwrite_output_dir``, which
moves the old folder aside, never deletes it); a resumed run drops the rows the interrupted one wrote past
its checkpoint, saying how many."""
from __future__ import annotations

import json
import time
from pathlib import Path

from stepcoder.output import write_atomically

RUN_FILES = ("config.json", "metrics.jsonl", "samples.jsonl", "eval_summary.json", "eval", "tensorboard")


def run_files(output: Path) -> list[str]:
    """What of a run the folder holds (file and checkpoint names), empty for a new or empty folder."""
    if not output.is_dir():
        return []
    found = [name for name in RUN_FILES if (output / name).exists()]
    found += sorted(path.name + "/" for path in output.glob("checkpoint-*") if path.is_dir())
    return found


def claim(output: Path, resuming: bool, overwrite: bool) -> str | None:
    """Makes `output` this run's; returns a message to print (where old files went), or raises ValueError
    naming the folder and the ways on when it holds another run."""
    found = run_files(output)
    if found and not resuming:
        if not overwrite:
            shown = ", ".join(found[:4]) + (", ..." if len(found) > 4 else "")
            raise ValueError(f"output_dir: {output} already holds a run ({shown}); continue it with "
                             "--resume_from_checkpoint latest, or start a new one there with --overwrite_output_dir "
                             "(the old folder is moved aside, not deleted)")
        aside = output.with_name(f"{output.name}.previous-{time.strftime('%Y%m%d-%H%M%S')}")
        output.rename(aside)
        output.mkdir(parents=True)
        return f"--overwrite_output_dir: the previous run's files are now in {aside}"
    output.mkdir(parents=True, exist_ok=True)
    return None


def keep_rows_through(path: Path, step: int) -> tuple[list[dict], int]:
    """The JSONL rows of `path` up to `step`; the file is rewritten (atomically) without the rows past it,
    which an interrupted run wrote and the resumed one does again, and without a last line that a kill cut
    short. Returns (the rows kept, how many went); ValueError names a damaged line anywhere else."""
    if not path.exists():
        return [], 0
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    kept = []
    for number, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                break  # the interrupted run was killed while writing it
            raise ValueError(f"{path}, line {number}: not a JSON row ({line[:80]!r}); the file is damaged") from None
        if row.get("step", 0) <= step:
            kept.append((line, row))
    if len(kept) != len(lines):
        write_atomically(path, "".join(line + "\n" for line, _ in kept))
    return [row for _, row in kept], len(lines) - len(kept)
