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

Without a GPU the ranks are forked from one pre-imported process (Python's forkserver, started
before preflight so that its imports overlap it): torch, DeepSpeed, transformers and the rank code
are imported once per job instead of once per rank (BENCHMARKS.md, "A short run's start": a 2-rank
debug run, 15.3 -> 12.4 s of CPU). The forkserver is a fresh interpreter that only imported
modules (no thread, no tensor op), the state fork is safe from. With a GPU each rank is its own
`python -m lmforge.training.train`: a CUDA driver initialised before a fork is unusable in the child.

`kill -TERM <lmforge pid>` (or SIGUSR1) stops the job gracefully: the ranks save a checkpoint and the
command exits 75; running it again resumes. Ctrl-C aborts at once. A rank that fails takes the job
down: the others get SIGTERM (they save nothing: their step cannot finish without the failed
rank), then SIGKILL after a grace period, and the command exits with the failed rank's status.
`kill -9 <lmforge pid>` leaves nothing running: each rank is SIGKILLed when this process dies
(PR_SET_PDEATHSIG) and also polls for it (training/leftovers.py).
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from lmforge.training import startup
from lmforge.training.config import Config
from lmforge.training.leftovers import die_with_parent

# Nothing here imports torch at module level: the CLI starts the forkserver (fork_server) before the
# driver's preflight imports torch, so the server's imports and the driver's run side by side.

GRACE_S = 10  # a failed job's other ranks: SIGTERM, then SIGKILL after this long


def rank_command(config_path: Path) -> list[str]:
    return [sys.executable, "-u", "-m", "lmforge.training.train", str(config_path)]


def rank_env(rank: int, nproc: int, port: int) -> dict:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", _threads(nproc))
    env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc),
               GROUP_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
               LMFORGE_LAUNCHER_PID=str(os.getpid()),  # the ranks' orphan watch (training/leftovers.py)
               **startup.TIMELINE.env())  # the driver's part of the startup line
    return env


def preload(cfg: Config) -> list[str]:
    """What every rank of this config imports: the forkserver imports it once."""
    mods = ["lmforge.launcher.forkserver_exit", "torch", "deepspeed", "transformers", "lmforge.training.train",
            # DeepSpeed's optimizer check imports its Muon module, which imports torch._dynamo (~1 s)
            "deepspeed.runtime.zero.muon.muon_optimizer", "transformers.models.llama.modeling_llama"]
    if cfg.finetune.method != "full":
        mods.append("peft")
    if cfg.finetune.method == "qlora" or cfg.train.optimizer.endswith("8bit"):
        mods.append("bitsandbytes")
    return mods


def fork_server(cfg: Config, nproc: int):
    """The multiprocessing context the ranks are forked from, its server already importing
    (started now, it works while the driver runs preflight); None: start each rank with exec."""
    if nproc == 1 or sys.platform != "linux" or gpu_present():
        return None
    os.environ.setdefault("OMP_NUM_THREADS", _threads(nproc))  # read when the server imports torch
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(preload(cfg))
    from multiprocessing import forkserver

    forkserver.ensure_running()
    return ctx


def gpu_present() -> bool:
    """A GPU driver's device node: ranks are then exec'd (a GPU's driver is not fork-safe). Asked
    without importing torch (1 s), which is what keeps the forkserver's start early."""
    return any(Path(p).exists() for p in ("/dev/nvidiactl", "/dev/nvidia0", "/dev/kfd", "/dev/dxg"))


def _threads(nproc: int) -> str:
    # One thread per rank's share of the cores (torchrun would force 1 and warn).
    return str(max(1, (os.cpu_count() or 1) // nproc))


def _forked_rank(argv: list[str], env: dict) -> None:
    """A rank in a process forked from the forkserver: the environment it would have been exec'd
    with, then what `python -u -m lmforge.training.train CONFIG` runs."""
    import setproctitle

    # ps and pgrep show what an exec'd rank would show (the forkserver's command line otherwise);
    # first: it takes its room from the process's initial environment block. /proc/PID/environ
    # keeps the forkserver's variables: the rendezvous is in the launcher's log.
    setproctitle.setproctitle(" ".join(rank_command(Path(argv[0])) + argv[1:]))
    os.environ.clear()
    os.environ.update(env, PYTHONUNBUFFERED="1")
    # The forkserver exits when no process holds the write end of its "alive" pipe, and hands that
    # end to every child it forks; a rank keeping it would keep the forkserver, and so itself (its
    # parent-death signal), alive after the launcher is killed.
    from multiprocessing import forkserver

    alive = getattr(forkserver._forkserver, "_forkserver_alive_fd", None)
    if alive is not None:
        os.close(alive)
        forkserver._forkserver._forkserver_alive_fd = None
    die_with_parent(os.getppid())()  # the forkserver, which exits with the launcher
    sys.argv = ["lmforge.training.train", *argv]
    for stream in (sys.stdout, sys.stderr):
        stream.reconfigure(line_buffering=True, write_through=True)
    from lmforge.training import train

    train.exit_with(train.cli(argv))


class ForkedRank:
    """A forked rank with the subprocess.Popen surface that supervise() uses."""

    def __init__(self, process):
        self.process = process
        self.pid = process.pid

    @property
    def returncode(self) -> int | None:
        return self.process.exitcode

    def poll(self) -> int | None:
        return self.process.exitcode

    def send_signal(self, signum: int) -> None:
        if self.process.exitcode is None:
            os.kill(self.pid, signum)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def start_ranks(config_path: Path, nproc: int, ctx=None) -> list:
    from lmforge.training.preflight import free_port, get_logger

    port = free_port()
    if ctx is None:
        ranks = [subprocess.Popen(rank_command(config_path), env=rank_env(r, nproc, port), preexec_fn=die_with_parent())
                 for r in range(nproc)]
    else:
        ranks = []
        for r in range(nproc):
            p = ctx.Process(target=_forked_rank, args=([str(config_path)], rank_env(r, nproc, port)),
                            name=f"lmforge-rank{r}")
            p.start()
            ranks.append(ForkedRank(p))
    get_logger(0).info(f"started {nproc} ranks{' (forked)' if ctx else ''}: pids "
                       f"{', '.join(str(p.pid) for p in ranks)}, rendezvous 127.0.0.1:{port}")
    return ranks


def launch(cfg: Config, config_path: Path, nproc: int, ctx=None) -> int:
    """Run the job's ranks; `ctx`: fork_server()'s, to fork them from it."""
    from lmforge.launcher.base import StopOnSignal
    from lmforge.training.preflight import EXIT_STOPPED

    if nproc == 1:
        from lmforge.training.train import main

        return EXIT_STOPPED if main(cfg).get("stopped") else 0
    ranks = start_ranks(config_path, nproc, ctx)

    def interrupt(signum: int) -> None:
        for p in ranks:
            if p.poll() is None:
                p.send_signal(signum)

    with StopOnSignal(cfg.run_dir, interrupt=interrupt) as stopper:
        rc = supervise(ranks)
    return stopper.outcome(rc)


def supervise(ranks: list) -> int:
    """Wait for every rank. All 0 (or all 75, a stop): that status. The first rank to fail decides
    the job's status (of ranks found failed together, one killed by a signal) and the others are
    ended, as torchrun ends them."""
    from lmforge.training.preflight import EXIT_STOPPED

    failed: int | None = None
    deadline = None
    while any(p.poll() is None for p in ranks):
        if failed is None:
            bad = [p.returncode for p in ranks if p.returncode not in (None, 0, EXIT_STOPPED)]
            if bad:
                # a rank killed by a signal is the cause; its peers' errors ("connection closed") follow from it
                failed = next((c for c in bad if c < 0), bad[0])
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
