"""No leftovers after a kill: processes that die with their parent, and DeepSpeed's shared-memory
segments removed by their owner at teardown and, after a kill, by the next start on this machine.

    kill -9 <lmforge pid>     # its ranks die with it (PR_SET_PDEATHSIG; under torchrun: within ~1 s, orphan watch)
    ls /dev/shm               # no deepspeed_allreduce_buffer_* of finished or killed runs

Imports nothing of lmforge's (the launcher reaches die_with_parent through training.preflight).
"""

from __future__ import annotations

import ctypes
import os
import re
import signal
import sys
import threading
import time
from pathlib import Path

SHM_DIR = Path("/dev/shm")
PR_SET_PDEATHSIG = 1


def die_with_parent(parent: int | None = None):
    """A Popen preexec_fn: the child gets SIGKILL when this process (or `parent`, for a child that
    calls it itself) dies (Linux PR_SET_PDEATHSIG; None elsewhere). Resolved before the fork, so
    the child only makes the system call."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = parent or os.getpid()

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return preexec


def exit_when_orphaned(poll_s: float = 1.0) -> None:
    """In a rank started by torchrun ($TORCHELASTIC_RUN_ID) or by lmforge's local launcher
    ($LMFORGE_LAUNCHER_PID): exit at once when that parent is gone, so a killed launcher or torchrun
    leaves no ranks behind (torchrun starts them in sessions of their own, so a kill of the
    launcher's process group misses them). Polled, besides PR_SET_PDEATHSIG: that fires when the
    *thread* that forked the child exits, and torchrun starts ranks from a worker thread of its own.
    Before exiting, the rank removes its shared-memory segment."""
    if not (os.environ.get("TORCHELASTIC_RUN_ID") or os.environ.get("LMFORGE_LAUNCHER_PID")):
        return
    parent = os.getppid()
    if parent == 1:  # the launcher died before we looked (where a subreaper adopts us, that window stays open)
        os.kill(os.getpid(), signal.SIGKILL)
    import multiprocessing

    # A rank forked by the local launcher's forkserver: its parent is the forkserver, which outlives
    # the launcher by its own shutdown (seconds); the pipe multiprocessing started it through closes
    # the moment the launcher dies, so the watch blocks on that instead of polling.
    started_by = multiprocessing.parent_process()

    def watch() -> None:
        if started_by is not None:
            started_by.join()
            parent_desc = f"launcher (pid {os.environ.get('LMFORGE_LAUNCHER_PID', '?')})"
        else:
            while os.getppid() == parent:
                time.sleep(poll_s)
            parent_desc = f"launcher (pid {parent})"
        print(f"lmforge: rank {os.environ.get('RANK', '?')} (pid {os.getpid()}): its {parent_desc} is gone; "
              "exiting", file=sys.stderr, flush=True)
        unlink_own_segments()
        os.kill(os.getpid(), signal.SIGKILL)  # no teardown: the peers are gone or going

    threading.Thread(target=watch, name="lmforge-orphan-watch", daemon=True).start()


# DeepSpeed's CPU comm op (csrc/cpu/comm/shm.cpp, shm_initialize) creates one segment per rank,
# "deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>", maps every rank's, and
# never unlinks them (its shared_close is never called), so every run used to leave them in /dev/shm
# (docs/deepspeed_workarounds.md#shm-segments).
_SEGMENT = "deepspeed_allreduce_buffer_{uid}_{addr}_{port}_{rank}"


def own_segments() -> list[Path]:
    """This rank's segment(s), named from the torchrun variables DeepSpeed read."""
    addr, port, rank = (os.environ.get(k, "") for k in ("MASTER_ADDR", "MASTER_PORT", "RANK"))
    if not (port and rank):
        return []
    return [SHM_DIR / _SEGMENT.format(uid=os.getuid(), addr=addr, port=port, rank=rank)]


def unlink_own_segments() -> None:
    """At teardown (after the process group is destroyed, so every peer has long mapped it): the
    name goes, the peers' mappings stay valid until they exit."""
    for path in own_segments():
        path.unlink(missing_ok=True)


def _mapped_shm() -> set[str]:
    """Every /dev/shm path a process we may inspect maps (/proc/*/maps). The ones we may not are
    other users' (or a container's init, even for root): they cannot map our segments, which
    DeepSpeed creates 0600, short of being privileged."""
    mapped = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            with open(proc / "maps") as f:
                for line in f:
                    i = line.find(" /dev/shm/")
                    if i >= 0:
                        mapped.add(line[i + 1:].rstrip("\n").removesuffix(" (deleted)"))
        except OSError:  # exited meanwhile, or not ours to read
            continue
    return mapped


def remove_stale_segments(min_age_s: float = 5.0) -> list[str]:
    """Before DeepSpeed starts (local rank 0): remove this user's deepspeed_* segments that no
    process maps, left by killed runs. A segment younger than min_age_s is left alone: DeepSpeed
    creates a segment and maps it a moment later, and a run starting beside us may be in between."""
    pattern = re.compile(r"deepspeed_\w")
    uid, now = os.getuid(), time.time()
    try:
        candidates = [p for p in SHM_DIR.iterdir() if pattern.match(p.name)]
    except OSError:
        return []
    mine = []
    for p in candidates:
        try:
            st = p.stat()
        except FileNotFoundError:
            continue
        if st.st_uid == uid and now - st.st_mtime > min_age_s:
            mine.append(p)
    if not mine:
        return []
    mapped = _mapped_shm()
    removed = []
    for p in mine:
        try:
            # unchanged since we looked (a run that reuses the port rewrote it: DeepSpeed write()s it)
            if str(p) not in mapped and now - p.stat().st_mtime > min_age_s:
                p.unlink()
                removed.append(p.name)
        except FileNotFoundError:
            pass
    return removed
