"""Fault injection for tests and fire drills: what clusters do to runs, on demand, through the real
code paths (docs/reliability.md). Read once from the environment; inert when the variables are unset.

    LMFORGE_FAULT_NONFINITE=4,5,6 lmforge train configs/debug.yaml --nproc 2   # steps 4-6 get a NaN loss
    LMFORGE_FAULT_HANG=1:3 lmforge train configs/debug.yaml --nproc 2 dist.hang_timeout_s=10  # rank 1 hangs at step 3
    LMFORGE_FAULT_KILL_IN_SAVE=1:10 lmforge train configs/debug.yaml --nproc 2   # rank 1 SIGKILLed mid-save of step_10
    LMFORGE_FAULT_SLOW=0.5 lmforge train configs/debug.yaml --nproc 2    # every step takes 0.5 s longer, idle
    LMFORGE_FAULT_SLOW_WRITE=2 lmforge train configs/debug.yaml --nproc 2  # each checkpoint file 2 s slower to write

A poisoned step multiplies the loss by NaN before backward, so the gradients are NaN for real and
DeepSpeed's overflow check, lmforge's guard and the checkpoint filter all see what a real divergence
gives them. Each listed step fires once per process: a rollback that replays the step finds it clean.
"""

from __future__ import annotations

import os
import signal
import time


class Faults:
    def __init__(self, nonfinite: set[int], hang: tuple[int, int] | None, kill_in_save: tuple[int, int] | None = None,
                 slow_s: float = 0.0, slow_write_s: float = 0.0):
        self._nonfinite = set(nonfinite)
        self._hang = hang
        self._kill_in_save = kill_in_save
        self._slow_s = slow_s
        self.slow_write_s = slow_write_s  # a slow filesystem: checkpoint.save sleeps this long per file

    @classmethod
    def from_env(cls) -> "Faults":
        steps = {int(s) for s in os.environ.get("LMFORGE_FAULT_NONFINITE", "").split(",") if s.strip()}

        def rank_step(name: str) -> tuple[int, int] | None:
            value = os.environ.get(name, "")
            return tuple(int(x) for x in value.split(":")) if value else None
        return cls(steps, rank_step("LMFORGE_FAULT_HANG"), rank_step("LMFORGE_FAULT_KILL_IN_SAVE"),
                   float(os.environ.get("LMFORGE_FAULT_SLOW") or 0),
                   float(os.environ.get("LMFORGE_FAULT_SLOW_WRITE") or 0))

    def poison(self, step: int) -> bool:
        """True once for each listed step: make this step's loss non-finite."""
        if step in self._nonfinite:
            self._nonfinite.discard(step)
            return True
        return False

    def maybe_hang(self, rank: int, step: int) -> None:
        """Block this rank forever at the listed rank:step (a deadlock as the watchdog sees it), or
        for LMFORGE_FAULT_SLOW seconds at every step: a long job's pace without its CPU (a test that
        waits for a time limit leaves the cores to the other tests)."""
        if self._hang is not None and self._hang == (rank, step):
            while True:
                time.sleep(3600)
        if self._slow_s:
            time.sleep(self._slow_s)

    def maybe_die_saving(self, rank: int, step: int) -> None:
        """SIGKILL this rank at the listed rank:step, inside the save (DeepSpeed's files written, the
        checkpoint not yet published): a kill during a save, at a moment no outside poller can hit."""
        if self._kill_in_save is not None and self._kill_in_save == (rank, step):
            os.kill(os.getpid(), signal.SIGKILL)
