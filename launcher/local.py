"""Local launch: N ranks on this machine.

    lmforge train configs/debug.yaml --nproc 2

One rank runs in this process (with the torchrun variables set, see training.dist); more ranks run
under torch.distributed.run (torchrun) on a free loopback port, which owns the rendezvous, forwards
signals and tears the group down if one rank fails. The ranks read the resolved config that the
driver dumped into the run directory, so every rank sees exactly the validated tree.

`kill -TERM <lmforge pid>` (or SIGUSR1) stops the job gracefully: the ranks save a checkpoint
and the command exits 75; running it again resumes. Ctrl-C aborts at once.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from lmforge.training.config import Config
from lmforge.training.dist import EXIT_STOPPED, STOP_SIGNALS, free_port, request_stop, stop_file


def torchrun_command(config_path: Path, nproc: int, port: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
            "--nnodes=1", "--master_addr=127.0.0.1", f"--master_port={port}",
            "-m", "lmforge.training.train", str(config_path)]


def launch(cfg: Config, config_path: Path, nproc: int) -> int:
    if nproc == 1:
        from lmforge.training.train import main

        return EXIT_STOPPED if main(cfg).get("stopped") else 0
    env = dict(os.environ)
    # One thread per rank's share of the cores; torchrun would force 1 and warn.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    child = subprocess.Popen(torchrun_command(config_path, nproc, free_port()), env=env)
    with StopOnSignal(cfg.run_dir, interrupt=child.send_signal) as stopper:
        rc = child.wait()
    return stopper.outcome(rc)


class StopOnSignal:
    """Driver-side graceful stop, shared by the local and Ray launchers: SIGTERM/SIGUSR1 write the
    run's STOP file (the ranks checkpoint and exit at the next step) instead of being forwarded,
    because torchrun kills its ranks 30 s after forwarding a signal, which may be mid-save.
    SIGINT (Ctrl-C) still goes straight to `interrupt`, for a fast abort."""

    def __init__(self, run_dir: str | Path, interrupt=None):
        self.run_dir = run_dir
        self.interrupt = interrupt
        self.requested = False
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
        checkpoint); otherwise the job's own status, and an unhonoured request is withdrawn."""
        if self.requested:
            if not stop_file(self.run_dir).exists():
                return EXIT_STOPPED
            stop_file(self.run_dir).unlink(missing_ok=True)
        return rc
