"""The progress watchdog: a job whose ranks stop finishing steps ends, with every rank's stacks.

    lmforge train configs/debug.yaml --nproc 2 dist.hang_timeout_s=600

No step, evaluation or save finished for dist.hang_timeout_s → each rank writes its Python stacks
(faulthandler, all threads) to RUN_DIR/hang-<time>/rank_<N>.txt and exits dist.EXIT_HUNG, so
torchrun, Ray's and Slurm's restart policies see a failed job instead of one that waits forever. A
deadlocked collective never returns to Python, hence a thread and os._exit, not an exception. The
first rank to fire creates the hang-* directory; every other rank's watchdog sees it at its next poll
and dumps too, and the first waits (a grace period) for all of them before exiting, because its exit
makes the others' collectives fail and their stacks would show the failure instead of the hang.
"""

from __future__ import annotations

import faulthandler
import os
import socket
import threading
import time
from pathlib import Path

from .dist import EXIT_HUNG
from .runstate import record_failure


class Watchdog:
    def __init__(self, timeout_s: float, run_dir: str | Path, rank: int, world_size: int, log):
        self.timeout_s, self.run_dir, self.rank, self.log = timeout_s, Path(run_dir), rank, log
        self.world_size = world_size
        self._poll = min(5.0, timeout_s / 4) if timeout_s > 0 else 0
        self.doing = "starting"
        self._last = time.monotonic()
        self._stop = threading.Event()
        self._thread = None
        if timeout_s > 0:
            self._thread = threading.Thread(target=self._watch, name="lmforge-watchdog", daemon=True)
            self._thread.start()

    def beat(self, doing: str) -> None:
        """Progress was made; `doing` is what comes next (named in the stack files)."""
        self._last = time.monotonic()
        self.doing = doing

    def close(self) -> None:
        self._stop.set()

    def __enter__(self) -> "Watchdog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _watch(self) -> None:
        started = time.time()
        while not self._stop.wait(self._poll):
            idle = time.monotonic() - self._last
            if idle > self.timeout_s:
                self._fire(idle, self._hang_dir(started) or self._new_hang_dir(), first=True)
            # another rank fired: dump too. Looked for only once this rank is stalled as well (a
            # hang stalls every rank), so a healthy run never lists a shared run_dir from every rank.
            elif idle > self.timeout_s / 2 and (other := self._hang_dir(started)) is not None:
                self._fire(idle, other, first=False)

    def _hang_dir(self, since: float) -> Path | None:
        """The hang-* directory another rank of this job created, if any."""
        for d in sorted(self.run_dir.glob("hang-*"), reverse=True):
            if d.is_dir() and d.stat().st_mtime >= since - 1:
                return d
        return None

    def _new_hang_dir(self) -> Path:
        d = self.run_dir / time.strftime("hang-%Y%m%d-%H%M%S", time.gmtime())
        d.mkdir(parents=True, exist_ok=True)
        return d

    def _fire(self, idle: float, hang_dir: Path, first: bool) -> None:
        reason = (f"no progress for {idle:.0f} s (dist.hang_timeout_s={self.timeout_s:g}) on rank {self.rank} "
                  f"while {self.doing}" if first else f"rank {self.rank} was {self.doing} ({idle:.0f} s since its "
                  f"last progress) when another rank's watchdog fired")
        try:
            out = hang_dir / f"rank_{self.rank}.txt"
            with open(out, "w") as f:
                f.write(f"{reason}\nhost {socket.gethostname()} pid {os.getpid()}\n\n")
                f.flush()
                faulthandler.dump_traceback(f, all_threads=True)
            reason += f"; stacks in {out.parent}"
        except OSError as e:
            reason += f"; could not write the stacks ({e})"
        if first:
            record_failure(self.run_dir, EXIT_HUNG, reason, self.rank)
            deadline = time.monotonic() + 3 * self._poll + 5
            while time.monotonic() < deadline and len(list(hang_dir.glob("rank_*.txt"))) < self.world_size:
                time.sleep(0.2)
        self.log.error(f"hang: {reason}; exiting {EXIT_HUNG}")
        for handler in self.log.handlers:
            handler.flush()
        os._exit(EXIT_HUNG)
