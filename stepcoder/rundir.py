"""An output directory belongs to one run. Starting a run where another one left its files is refused
(continue it with ``--resume_from_checkpoint latest``, or start over with ``--overwrite_output_dir``, which
moves the old folder aside, never deletes it); a resumed run drops the rows the interrupted one wrote past
its checkpoint, saying how many."""
from __future__ import annotations

import json
import time
from pathlib import Path

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


def keep_rows_through(path: Path, step: int) -> int:
    """Drops the JSONL rows of `path` whose step is past `step` (an interrupted run's, done again after
    resuming); returns how many went."""
    if not path.exists():
        return 0
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    kept = [line for line in lines if json.loads(line).get("step", 0) <= step]
    if len(kept) != len(lines):
        path.write_text("".join(line + "\n" for line in kept))
    return len(lines) - len(kept)
