"""The divergence guard: what a run does when its loss or gradients stop being finite, or spike.

    lmforge train configs/debug.yaml --nproc 2 train.lr=1e10 train.on_nonfinite=stop   # exit 76, naming the step

A non-finite step updates nothing: DeepSpeed's ZeRO optimizers skip the step when the global grad
norm is not finite (lmforge's DeepSpeed config turns the check on for bf16 too, and a non-finite loss
is made to give NaN gradients), and the scheduler does not advance. The guard counts such steps (and,
with train.spike_threshold, losses far above the recent median); after train.max_nonfinite in a row,
train.on_nonfinite decides: `skip` goes on (and gives up after twice as many), `rollback` reloads the
newest checkpoint and keeps the data position (the window that led there is skipped, as large runs
do after loss spikes; at most MAX_ROLLBACKS to one checkpoint), `stop` gives up. Giving up saves
nothing and exits dist.EXIT_DIVERGED. Every rank sees the same all-reduced loss and global norm, so
every rank takes the same decision without talking.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter, deque

MAX_ROLLBACKS = 3  # to one checkpoint: past that its data no longer explain the divergence


class Diverged(RuntimeError):
    """The run gave up at `step`: the CLI exits dist.EXIT_DIVERGED with this message."""

    def __init__(self, step: int, message: str):
        super().__init__(message)
        self.step = step


class NonFiniteGuard:
    def __init__(self, mode: str, max_in_a_row: int, spike_threshold: float | None):
        self.mode, self.limit, self.spike_threshold = mode, max_in_a_row, spike_threshold
        self.in_a_row = 0
        self.total = 0           # bad steps over the run (TensorBoard: train/bad_steps)
        self.rollbacks = Counter()  # checkpoint name -> rollbacks to it
        self._recent: deque[float] = deque(maxlen=100)

    def problem(self, loss: float, grad_norm: float | None) -> str | None:
        """Why this step is bad, or None. grad_norm None: the optimizer computed none."""
        if not math.isfinite(loss):
            return f"non-finite loss ({loss})"
        if grad_norm is not None and not math.isfinite(grad_norm):
            return f"non-finite gradient norm ({grad_norm})"
        if self.spike_threshold and len(self._recent) >= 10:
            median = statistics.median(self._recent)
            if loss > self.spike_threshold * median:
                return f"loss spike ({loss:.4g} > {self.spike_threshold:g} x median {median:.4g})"
        return None

    def check(self, loss: float, grad_norm: float | None) -> tuple[str | None, str | None]:
        """(problem, action) for a finished step; action None (go on), "rollback" or "stop"."""
        problem = self.problem(loss, grad_norm)
        if problem is None:
            self.in_a_row = 0
            self._recent.append(loss)
            return None, None
        self.in_a_row += 1
        self.total += 1
        if self.in_a_row < self.limit:
            return problem, None
        if self.mode == "skip":
            return problem, "stop" if self.in_a_row >= 2 * self.limit else None
        return problem, self.mode

    def may_roll_back_to(self, checkpoint_name: str) -> bool:
        return self.rollbacks[checkpoint_name] < MAX_ROLLBACKS

    def rolled_back(self, checkpoint_name: str) -> None:
        self.rollbacks[checkpoint_name] += 1
        self.in_a_row = 0
