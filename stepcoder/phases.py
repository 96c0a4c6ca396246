"""The phases of a training step (generate, sandbox, forward, update, sync, save): each one timed into the
step's metrics as ``time_<phase>_s``, and each one a place where a test can kill the run.

``STEPCODER_CHAOS=PHASE:N:SECONDS`` sends this process SIGKILL SECONDS after it enters PHASE for the Nth
time, or as it leaves the phase if that comes first, so the kill always lands inside the phase, at a moment
the caller chooses at random. It says where it struck on stderr first. The chaos test
(tests/test_crashes.py) kills runs this way during generation, the update and a checkpoint save, and shows
that resuming gives what an uninterrupted run gives. Unset, it costs a dictionary lookup per phase."""
from __future__ import annotations

import contextlib
import functools
import os
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator

_entered: Counter[str] = Counter()


@functools.cache
def _plan() -> tuple[str, int, float] | None:
    spec = os.environ.get("STEPCODER_CHAOS")
    if not spec:
        return None
    try:
        name, count, delay = spec.split(":")
        return name, int(count), float(delay)
    except ValueError:
        raise ValueError(f"STEPCODER_CHAOS={spec!r}: expected PHASE:N:SECONDS, e.g. save:2:0.05") from None


class _Strike:
    """SIGKILL to this process, from a timer thread after `delay` or from the phase's end, whichever is
    first (the lock keeps the message to one)."""

    def __init__(self, name: str, count: int, delay: float):
        self.where, self.lock = f"{name} #{count}", threading.Lock()
        self.timer = threading.Timer(delay, self.fire, args=(f"{delay:.3f} s in",))
        self.timer.daemon = True
        self.timer.start()

    def fire(self, when: str) -> None:
        with self.lock:
            print(f"chaos: SIGKILL in {self.where}, {when}", file=sys.stderr, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)


@contextlib.contextmanager
def phase(name: str, timings: dict[str, float] | None = None) -> Iterator[None]:
    """Runs the block as phase `name`; its seconds go to ``timings['time_<name>_s']`` when given."""
    _entered[name] += 1
    plan = _plan()
    strike = _Strike(name, _entered[name], plan[2]) if plan and plan[:2] == (name, _entered[name]) else None
    start = time.perf_counter()
    yield
    if strike is not None:
        strike.fire("as it ended")
    if timings is not None:
        timings[f"time_{name}_s"] = time.perf_counter() - start
