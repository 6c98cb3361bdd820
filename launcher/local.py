"""Local launch: N ranks on this machine.

    lmforge train configs/debug.yaml --nproc 2

One rank runs in this process (with the torchrun variables set, see training.dist); more ranks run
under torch.distributed.run (torchrun) on a free loopback port, which owns the rendezvous, forwards
signals and tears the group down if one rank fails. The ranks read the resolved config that the
driver dumped into the run directory, so every rank sees exactly the validated tree.

`kill -TERM <lmforge pid>` (or SIGUSR1) stops the job gracefully: the ranks save a checkpoint
and the command exits 75; running it again resumes. Ctrl-C aborts at once. `kill -9 <lmforge pid>`
leaves nothing running: torchrun dies with this process (PR_SET_PDEATHSIG) and each rank exits
when its torchrun is gone (training/leftovers.py).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from lmforge.training.config import Config
from lmforge.launcher.base import StopOnSignal
from lmforge.training.preflight import EXIT_STOPPED, die_with_parent, free_port


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
    child = subprocess.Popen(torchrun_command(config_path, nproc, free_port()), env=env, preexec_fn=die_with_parent())
    with StopOnSignal(cfg.run_dir, interrupt=child.send_signal) as stopper:
        rc = child.wait()
    return stopper.outcome(rc)
