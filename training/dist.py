"""Process-group setup, the runtime choice (device, backend, precision, attention), and the
rank-0 logger.

Every rank reads only the torchrun-style environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT), so the same code runs under `lmforge train`, torchrun, the `deepspeed` CLI, srun and
Ray Train. A plain `python -m lmforge.training.train CONFIG` gets single-process defaults here,
because DeepSpeed otherwise falls back to MPI discovery and fails on `No module named 'mpi4py'`.

This module imports nothing else of lmforge's but leftovers.py (orphaned ranks, shared-memory segments).
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import signal
import socket
import sys
import threading
import warnings
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch

from . import leftovers


@dataclass(frozen=True)
class Runtime:
    """What this machine runs on: chosen once, printed at start."""
    device_type: str      # "cuda" | "cpu"
    backend: str          # "nccl" | "gloo"
    precision: str        # "bf16" | "fp16" | "fp32"
    attention: str        # "flash_attention_2" | "sdpa" | "eager"
    device_name: str

    def describe(self) -> str:
        return (f"device={self.device_type} ({self.device_name}) backend={self.backend} "
                f"precision={self.precision} attention={self.attention}")


def select_runtime(precision: str = "auto", attention: str = "auto") -> Runtime:
    """The one place the GPU path (NCCL, bf16, flash-attn) or the CPU path (gloo, fp32, SDPA) is chosen."""
    cuda = torch.cuda.is_available()
    if precision == "auto":
        precision = "bf16" if cuda and torch.cuda.is_bf16_supported() else "fp32"
    if precision in ("bf16", "fp16") and not cuda:
        # DeepSpeed's CPU path trains in fp32; half precision on CPU is slower and not what
        # a user asking for it on a GPU cluster means. Refuse rather than silently change it.
        raise ValueError(f"train.precision={precision} needs CUDA; this machine has none (use auto or fp32)")
    if attention == "auto":
        attention = "flash_attention_2" if cuda and importlib.util.find_spec("flash_attn") else "sdpa"
    if attention == "flash_attention_2" and not (cuda and importlib.util.find_spec("flash_attn")):
        raise ValueError("model.attention=flash_attention_2 needs CUDA and the flash-attn package "
                         "(pip install 'lmforge[gpu]'); use auto or sdpa")
    # On CPU, which ATen kernels run (DEFAULT / AVX2 / AVX512) follows the instruction set: say it.
    name = torch.cuda.get_device_name() if cuda else (
        f"{os.uname().machine} CPU, {torch.backends.cpu.get_cpu_capability()} kernels")
    return Runtime("cuda" if cuda else "cpu", "nccl" if cuda else "gloo", precision, attention, name)


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def default_extensions_dir() -> str:
    """A private, persistent TORCH_EXTENSIONS_DIR: DeepSpeed JIT-builds its shared-memory comm op
    at the first init_distributed (~45-70 s on 2 cores); kept across runs, later starts take
    seconds. Keyed by the torch build and the environment (a second venv compiles with other
    include paths, and sharing one directory would make each rebuild the other's ops)."""
    root = Path(os.environ.get("LMFORGE_CACHE", "~/.cache/lmforge")).expanduser()
    env = hashlib.sha256(sys.prefix.encode()).hexdigest()[:8]
    # ...and by the CPU: the ops are compiled with -march=native, so an AVX-512 node's build would
    # die of SIGILL on an AVX2 node sharing the cache (a home directory on NFS).
    cpu = hashlib.sha256(_cpu_flags().encode()).hexdigest()[:8]
    return str(root / "torch_extensions" / f"torch-{torch.__version__}-{env}-cpu{cpu}")


def _cpu_flags() -> str:
    """The instruction-set flags of this CPU (what -march=native compiles for)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return " ".join(sorted(line.split(":", 1)[1].split()))
    except OSError:
        pass
    return os.uname().machine


def single_process_env() -> None:
    """Set the torchrun variables for a run started without a launcher (one rank)."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))


def setup(runtime: Runtime, timeout_s: int = 1800) -> DistInfo:
    single_process_env()
    leftovers.exit_when_orphaned()  # a killed launcher (or torchrun) leaves no ranks behind
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if local_rank == 0:  # one rank per machine, before DeepSpeed creates this run's segments
        removed = leftovers.remove_stale_segments()
        if removed:
            get_logger(rank).info(f"removed {len(removed)} shared-memory segment(s) of killed runs from "
                                  f"{leftovers.SHM_DIR}: {', '.join(removed)}")
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", default_extensions_dir())
    if runtime.device_type == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
        if "OMP_NUM_THREADS" not in os.environ:
            # Ranks on one box share its cores; oversubscription makes every rank slower. The
            # same thread count under every launcher also keeps CPU losses bitwise reproducible.
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    # DeepSpeed 0.19 calls torch collectives that torch 2.13 deprecates, warning at every step.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    import deepspeed  # imported here: the driver process and config tools never pay for it

    deepspeed.init_distributed(dist_backend=runtime.backend, timeout=timedelta(seconds=timeout_s),
                               verbose=False)
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world, device=device)


def teardown() -> None:
    """Destroy the process group explicitly, also on error paths: a rank that exits without it
    can abort at exit (SIGABRT, "terminate called without an active exception")."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
        leftovers.unlink_own_segments()  # DeepSpeed's CPU comm op never removes its /dev/shm segment


def get_logger(rank: int) -> logging.Logger:
    """Rank 0 logs info to stderr; other ranks get a logger that only passes errors, so code
    never needs `if rank == 0` around a log line."""
    name = "lmforge" if rank == 0 else f"lmforge.rank{rank}"
    log = logging.getLogger(name)
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(
            "[lmforge %(asctime)s] %(message)s" if rank == 0 else f"[lmforge rank {rank}] %(message)s",
            datefmt="%H:%M:%S"))
        log.addHandler(handler)
        log.propagate = False
    log.setLevel(logging.INFO if rank == 0 else logging.ERROR)
    return log


# Exit status of a rank (and of `lmforge train`/`launch`) that stopped on request after publishing a
# checkpoint: sysexits' EX_TEMPFAIL, "try again later". The job can be requeued and will resume.
EXIT_STOPPED = 75
# A run that diverged (train.on_nonfinite gave up; nothing saved after the last good checkpoint) and
# one whose ranks stopped making progress (dist.hang_timeout_s; stacks in RUN_DIR/hang-<time>/).
EXIT_DIVERGED = 76
EXIT_HUNG = 77
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def stop_file(run_dir: str | Path) -> Path:
    """Touching this file asks a running job to checkpoint and stop at the next step boundary.
    Launchers write it when they are signalled (Slurm's warning signal, SIGTERM to the driver),
    so the ranks never depend on a signal reaching them through torchrun, srun or Ray."""
    return Path(run_dir) / "STOP"


def request_stop(run_dir: str | Path, reason: str) -> None:
    path = stop_file(run_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(reason + "\n")


class StopRequest:
    """A graceful stop asked for by SIGTERM/SIGUSR1 (Slurm's pre-emption or time-limit warning,
    torchrun forwarding SIGTERM, a user's kill) or by the STOP file in the run directory.

    Signals only set a flag; `agreed()` is called once per step by every rank and all-reduces the
    flags, so all ranks stop after the same step and save one checkpoint together. Handlers are
    installed only on the main thread (Ray Train runs the loop in another thread; there the Ray
    driver turns its own signals into the STOP file)."""

    def __init__(self, run_dir: str | Path, is_main: bool):
        self.path = stop_file(run_dir)
        self.is_main = is_main
        self.signal_name: str | None = None
        self._previous: dict = {}
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._on_signal) for s in STOP_SIGNALS}

    def _on_signal(self, signum, _frame) -> None:
        self.signal_name = signal.Signals(signum).name

    def agreed(self, device) -> str | None:
        """Collective: the reason to stop if any rank was asked to, else None. Every rank gets the
        same reason: a signal on any rank (named) outranks the STOP file, so the log does not depend
        on whether a signal or the file a launcher wrote from it was seen first."""
        if self.signal_name is not None:
            code = 2 + STOP_SIGNALS.index(signal.Signals[self.signal_name])
        else:
            code = 1 if self.is_main and self.path.exists() else 0
        flag = torch.tensor([code], dtype=torch.int32, device=device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        code = int(flag.item())
        if code >= 2:
            return STOP_SIGNALS[code - 2].name
        if code == 1 and self.path.exists():  # only the main rank reads the file (a node-local run dir)
            return f"{self.path} ({self.path.read_text().strip() or 'no reason given'})"
        return "the run's STOP file" if code else None

    def clear(self) -> None:
        """Consume the request (main rank) so the resumed run does not stop at once."""
        if self.is_main:
            self.path.unlink(missing_ok=True)

    def close(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}
