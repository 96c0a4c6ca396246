"""Run under torchrun by tests/test_scale.py: the trainer's own main, and this rank's peak host memory by
the end of start-up (models built, sharded and loaded: read as the curriculum is made, right after).

    python -m torch.distributed.run --nproc_per_node N startup_runner.py OUT_DIR [--whole_on_every_rank] -- TRAIN_ARGS

Writes OUT_DIR/rank-R.json: {"peak_rss_mb": ...} (start-up). --whole_on_every_rank loads the checkpoint on every rank
and warms the whole model up there (as before the sharded start), for comparison.
"""
from __future__ import annotations

import json
import os
import resource
import sys
from pathlib import Path

from stepcoder import learners, startup, train

if __name__ == "__main__":
    out, flags = Path(sys.argv[1]), sys.argv[2:]
    if flags and flags[0] == "--whole_on_every_rank":
        learners.from_rank0 = lambda config: False
        learners.sharded_warmup = lambda config: False
        flags = flags[1:]
    make_curriculum = startup.make_curriculum

    def after_start_up(*args, **kwargs):
        (out / f"rank-{os.environ.get('RANK', '0')}.json").write_text(
            json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
        return make_curriculum(*args, **kwargs)

    startup.make_curriculum = after_start_up
    train.main(flags[flags.index("--") + 1:])
