"""Local launch: N ranks on this machine.

    lmforge train configs/debug.yaml --nproc 2

One rank runs in this process (with the torchrun variables set, see training.dist). More ranks are
this launcher's own children: it owns the rendezvous (rank 0's TCP store on a free loopback port)
and sets the variables torchrun would (RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR,
MASTER_PORT), so the ranks run exactly the code torchrun's would (tests/test_train.py compares the
two bitwise). Not starting torchrun saves a Python process that imports torch (~2 s of CPU and of
wall time before the first step) and lets the launcher read each rank's own exit status. The ranks
read the resolved config that the driver dumped into the run directory, so every rank sees exactly
the validated tree.

`kill -TERM <lmforge pid>` (or SIGUSR1) stops the job gracefully: the ranks save a checkpoint and the
command exits 75; running it again resumes. Ctrl-C aborts at once. A rank that fails takes the job
down: the others get SIGTERM (they save nothing: their step cannot finish without the failed
rank), then SIGKILL after a grace period, and the command exits with the failed rank's status.
`kill -9 <lmforge pid>` leaves nothing running: each rank is SIGKILLed when this process dies
(PR_SET_PDEATHSIG) and also polls for it (training/leftovers.py).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from lmforge.training.config import Config
from lmforge.launcher.base import StopOnSignal
from lmforge.training.preflight import EXIT_STOPPED, die_with_parent, free_port

GRACE_S = 10  # a failed job's other ranks: SIGTERM, then SIGKILL after this long


def rank_command(config_path: Path) -> list[str]:
    return [sys.executable, "-u", "-m", "lmforge.training.train", str(config_path)]


def rank_env(rank: int, nproc: int, port: int) -> dict:
    env = dict(os.environ)
    # One thread per rank's share of the cores (torchrun would force 1 and warn).
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc),
               GROUP_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
               LMFORGE_LAUNCHER_PID=str(os.getpid()))  # the ranks' orphan watch (training/leftovers.py)
    return env


def launch(cfg: Config, config_path: Path, nproc: int) -> int:
    if nproc == 1:
        from lmforge.training.train import main

        return EXIT_STOPPED if main(cfg).get("stopped") else 0
    port = free_port()
    ranks = [subprocess.Popen(rank_command(config_path), env=rank_env(r, nproc, port), preexec_fn=die_with_parent())
             for r in range(nproc)]

    def interrupt(signum: int) -> None:
        for p in ranks:
            if p.poll() is None:
                p.send_signal(signum)

    with StopOnSignal(cfg.run_dir, interrupt=interrupt) as stopper:
        rc = supervise(ranks)
    return stopper.outcome(rc)


def supervise(ranks: list[subprocess.Popen]) -> int:
    """Wait for every rank. All 0 (or all 75, a stop): that status. The first rank to fail decides
    the job's status and the others are ended, as torchrun ends them."""
    failed: int | None = None
    deadline = None
    while any(p.poll() is None for p in ranks):
        if failed is None:
            bad = [p.returncode for p in ranks if p.returncode not in (None, 0, EXIT_STOPPED)]
            if bad:
                failed = bad[0]
                print(f"lmforge: a rank exited with status {failed}; ending the others", file=sys.stderr, flush=True)
                for p in ranks:
                    if p.poll() is None:
                        p.send_signal(signal.SIGTERM)
                deadline = time.monotonic() + GRACE_S
        elif time.monotonic() > deadline:
            for p in ranks:
                if p.poll() is None:
                    p.kill()
        time.sleep(0.1)
    if failed is not None:
        return failed if failed > 0 else 128 - failed  # killed by a signal: the shell's convention
    codes = {p.returncode for p in ranks}
    if codes <= {0, EXIT_STOPPED}:
        return EXIT_STOPPED if EXIT_STOPPED in codes else 0
    code = next(c for c in (p.returncode for p in ranks) if c not in (0, EXIT_STOPPED))
    return code if code > 0 else 128 - code
