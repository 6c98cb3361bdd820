"""What every launcher shares: the driver-side graceful stop and the steps before any rank starts
(preflight → absolute paths → config.yaml). Launch errors: lmforge.launcher.LaunchError.

    lmforge launch --on ray configs/debug.yaml --address 127.0.0.5:6379   # "launch error: cannot reach …"
    kill -TERM <lmforge pid>                                              # ranks checkpoint, exit 75
"""

from __future__ import annotations

import os
from contextlib import contextmanager
import signal
import sys
import time
from pathlib import Path
from typing import Iterator

from lmforge.training import startup
from lmforge.training.config import Config, dump_config
from lmforge.training.preflight import (EXIT_STOPPED, STOP_SIGNALS, check_run_dir_free, hold_run_dir, preflight,
                                       read_failure, record_failure, request_stop, stop_file)


def _exit_cause(rc: int) -> str:
    """The shell's convention: 128 + N is death by signal N."""
    if rc > 128:
        try:
            return f"a rank was killed by {signal.Signals(rc - 128).name} (exit {rc}): the kernel's OOM killer, " \
                   "a kill, or a lost node"
        except ValueError:
            pass
    return f"a rank exited with status {rc} (its log says why)"


@contextmanager
def prepared(cfg: Config, world_size: int, log, absolute: bool = True) -> Iterator[Config]:
    """A job's driver from validation to the end: refused at once if another job holds the run
    directory, then prepare(), then the run-directory lock held (training/runlock.py; its token in
    $LMFORGE_RUN_LOCK for the ranks) until the job ends. Taken after validation, so a refused config
    leaves no run directory behind; taken atomically, so of two starts racing past the check one wins."""
    check_run_dir_free(cfg.run_dir, cfg.dist.lock_stale_s)
    cfg = prepare(cfg, world_size, log, absolute=absolute, dump=False)
    with hold_run_dir(cfg.run_dir, cfg.dist.lock_stale_s, log):
        dump_config(cfg, Path(cfg.run_dir) / "config.yaml")
        startup.mark("driver preflight")
        yield cfg


def prepare(cfg: Config, world_size: int, log, absolute: bool = True, dump: bool = True) -> Config:
    """Before any rank starts: every check bad config or data can fail (training.preflight), paths
    made absolute for ranks that start elsewhere (Ray workers, batch jobs), the resolved config
    written to RUN_DIR/config.yaml for the ranks to read. Returns the config the ranks run: Hub
    ids pinned to the commits preflight resolved (training/hub.py)."""
    cfg = preflight(cfg, world_size, log).pinned
    if absolute:
        cfg = cfg.with_absolute_paths()
    if dump:
        dump_config(cfg, Path(cfg.run_dir) / "config.yaml")
    return cfg


class StopOnSignal:
    """Driver-side graceful stop, shared by the local and Ray launchers: SIGTERM/SIGUSR1 write the
    run's STOP file (the ranks checkpoint and exit at the next step) instead of being forwarded,
    because torchrun kills its ranks 30 s after forwarding a signal, which may be mid-save.
    SIGINT (Ctrl-C) still goes straight to `interrupt`, for a fast abort."""

    def __init__(self, run_dir: str | Path, interrupt=None):
        self.run_dir = run_dir
        self.interrupt = interrupt
        self.requested = False
        self.started = time.time()
        self._previous: dict = {}

    def __enter__(self) -> "StopOnSignal":
        self._previous = {s: signal.signal(s, self._on_stop) for s in STOP_SIGNALS}
        if self.interrupt is not None:
            self._previous[signal.SIGINT] = signal.signal(signal.SIGINT, lambda signum, _f: self.interrupt(signum))
        return self

    def _on_stop(self, signum, _frame) -> None:
        name = signal.Signals(signum).name
        print(f"lmforge: {name}: asking the ranks to checkpoint and stop", file=sys.stderr, flush=True)
        request_stop(self.run_dir, f"{name} to the launcher (pid {os.getpid()})")
        self.requested = True

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def outcome(self, rc: int) -> int:
        """EXIT_STOPPED when the ranks honoured our request (they consume the STOP file after the
        checkpoint); the code a failed rank recorded (divergence 76, hang 77: torchrun says 1 for
        every failure); otherwise the job's own status, and an unhonoured request is withdrawn."""
        if self.requested:
            if not stop_file(self.run_dir).exists():
                return EXIT_STOPPED
            stop_file(self.run_dir).unlink(missing_ok=True)
        failure = read_failure(self.run_dir, self.started) if rc else None
        if failure is not None:
            print(f"lmforge: the job failed with exit {failure['code']} on rank {failure['rank']} "
                  f"({failure['host']}): {failure['reason']}", file=sys.stderr, flush=True)
            return failure["code"]
        if rc not in (0, EXIT_STOPPED):  # no rank could say why (killed, crashed): what the launcher saw, for status
            record_failure(self.run_dir, rc, _exit_cause(rc), rank=-1)
        return rc
