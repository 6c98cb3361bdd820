"""The run-directory lock: one job per run directory. Two jobs on one run_dir race (one resumes a
checkpoint the other prunes, ranks of both split one rendezvous), so a second start is refused
before any work, naming the holder:

    lmforge train configs/debug.yaml run_dir=runs/x &
    lmforge train configs/debug.yaml run_dir=runs/x    # exit 2: "run_dir runs/x is in use by pid 1234 on host h
                                                       #  (started …, lock renewed 4 s ago); wait for it, …"

The lock is RUN_DIR/lmforge.lock, JSON {host, boot, pid, pid_start, start, token, job}. Who holds it:
lmforge's driver for local and Ray runs (launcher/base.hold_run_dir, for the whole job including Ray
Train's restarts), passing its token to the ranks in $LMFORGE_RUN_LOCK; rank 0 of a job started
without lmforge's launcher (torchrun, srun in slurm/torchrun.sbatch, a Ray Tune trial) through
`for_rank` in train.main. `lmforge launch --on slurm` only checks (`check_free`): the job's rank 0
takes it, and a requeued job (same SLURM_JOB_ID) takes its own lock back.

A lock is taken over, with a warning, when its holder is a dead process on this host (pid gone, or
the pid now belongs to a process started later), when its holder is on another host and has not
renewed it for dist.lock_stale_s (a heartbeat thread touches it every lock_stale_s/10 s), and,
silently, when it belongs to our own Slurm job. Imports nothing of lmforge's but the config error.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import threading
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from .config import ConfigError

LOCK_NAME = "lmforge.lock"
ENV = "LMFORGE_RUN_LOCK"  # the driver's token, for the ranks it starts


class RunDirInUse(ConfigError):
    """Another live job holds the run directory (the CLI prints it on one line and exits 2)."""


def lock_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / LOCK_NAME


def _boot_id() -> str | None:
    """Same host name but another boot id: another machine (containers) or a reboot; either way
    its pids mean nothing here, so only the staleness rule applies."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def _pid_start(pid: int) -> int | None:
    """The process's start time (clock ticks since boot, /proc/<pid>/stat field 22): a pid reused by a
    later process has another one."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])  # fields after the "(comm)" start at field 3


def _job_id() -> str | None:
    """Slurm's job id (a requeued job keeps it), else the Ray job submission id, else None."""
    if os.environ.get("SLURM_JOB_ID"):
        return os.environ["SLURM_JOB_ID"]
    try:
        meta = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")).get("metadata") or {}
        return meta.get("job_submission_id")
    except (ValueError, AttributeError):
        return None


def _now_iso() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def read(run_dir: str | Path) -> tuple[dict, float] | None:
    """The lock's record and its age in seconds since the holder last renewed it; None if free. An
    unreadable record (a foreign writer's half-written file) counts as held by an unknown holder."""
    path = lock_path(run_dir)
    try:
        age = time.time() - path.stat().st_mtime
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        record = json.loads(text)
        if not isinstance(record, dict):
            raise ValueError
    except ValueError:
        record = {}
    return record, max(0.0, age)


def _pid_alive(pid: int, pid_start: int | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return pid_start is None or _pid_start(pid) in (None, pid_start)


def verdict(record: dict, age: float, stale_s: float) -> str:
    """What a new start may do with a held lock: "refuse", "job" (our own Slurm job's: take it
    back), "dead" (holder on this host is gone), or "stale" (holder elsewhere stopped renewing)."""
    job = _job_id()
    if job is not None and record.get("job") == job:
        return "job"
    same_host = record.get("host") == socket.gethostname() and record.get("boot") == _boot_id()
    if same_host and isinstance(record.get("pid"), int):
        return "refuse" if _pid_alive(record["pid"], record.get("pid_start")) else "dead"
    return "stale" if age > stale_s else "refuse"


def describe(record: dict, age: float) -> str:
    job = f", job {record['job']}" if record.get("job") else ""
    return (f"pid {record.get('pid', '?')} on host {record.get('host', '?')} (started {record.get('start', '?')}{job}, "
            f"lock renewed {age:.0f} s ago)")


def _refusal(run_dir: str | Path, record: dict, age: float) -> RunDirInUse:
    return RunDirInUse(f"run_dir {run_dir} is in use by {describe(record, age)}; "
                       "wait for it, or use another run_dir")


def check_free(run_dir: str | Path, stale_s: float) -> None:
    """Refuse if a live holder has the run directory; take nothing (`lmforge launch --on slurm`:
    the driver only submits, the job's rank 0 takes the lock when it starts)."""
    held = read(run_dir)
    if held is not None and verdict(*held, stale_s) == "refuse":
        raise _refusal(run_dir, *held)


class RunLock:
    """A held lock: `acquire` takes it (or raises RunDirInUse), a heartbeat thread renews it,
    `release` deletes it if it is still ours. Also a context manager."""

    def __init__(self, run_dir: str | Path, stale_s: float, log: logging.Logger | None = None):
        self.run_dir, self.path, self.stale_s = run_dir, lock_path(run_dir), stale_s
        self.log = log or logging.getLogger("lmforge")
        self.token = secrets.token_hex(16)
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None

    def record(self) -> dict:
        return {"host": socket.gethostname(), "boot": _boot_id(), "pid": os.getpid(), "pid_start": _pid_start(os.getpid()),
                "start": _now_iso(), "token": self.token, "job": _job_id()}

    def _write_temp(self) -> Path:
        tmp = self.path.with_name(f"{LOCK_NAME}.{self.token}.tmp")
        with open(tmp, "w") as f:
            json.dump(self.record(), f)
            f.flush()
            os.fsync(f.fileno())
        return tmp

    def _create(self) -> bool:
        """Atomically create the lock, complete: link() of a written temp file fails with EEXIST
        when the lock exists, like O_CREAT|O_EXCL, but a reader never sees a half-written lock
        (and it is atomic on NFS too). Where links are not allowed, O_CREAT|O_EXCL itself."""
        tmp = self._write_temp()
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        except OSError:  # a file system without hard links
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "w") as f:
                f.write(tmp.read_text())
            return True
        finally:
            tmp.unlink(missing_ok=True)

    def _take_over(self) -> bool:
        """Replace a dead holder's lock. Two starts may both judge it dead: each replaces it, waits
        a moment for the other's replace to land, and only the one whose token is there keeps it."""
        os.replace(self._write_temp(), self.path)
        time.sleep(0.2)
        held = read(self.run_dir)
        return held is not None and held[0].get("token") == self.token

    def acquire(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(5):  # a lock released or replaced between our look and our move: look again
            if self._create():
                break
            held = read(self.run_dir)
            if held is None:
                continue
            record, age = held
            how = verdict(record, age, self.stale_s)
            if how == "refuse":
                raise _refusal(self.run_dir, record, age)
            if how == "job":
                self.log.info(f"run_dir {self.run_dir}: taking back the lock of our own Slurm job {record['job']} "
                              f"(a requeued start; it was {describe(record, age)})")
            else:
                self.log.warning(f"run_dir {self.run_dir}: taking over the lock of {describe(record, age)}: "
                                 + ("that process is gone" if how == "dead" else
                                    f"not renewed for more than dist.lock_stale_s={self.stale_s:g} s"))
            if self._take_over():
                break
        else:
            held = read(self.run_dir)
            raise _refusal(self.run_dir, *(held or ({}, 0.0)))
        self._heartbeat = threading.Thread(target=self._renew, name="lmforge-run-lock", daemon=True)
        self._heartbeat.start()
        return self

    def _renew(self) -> None:
        while not self._stop.wait(self.stale_s / 10):
            held = read(self.run_dir)
            if held is None or held[0].get("token") != self.token:
                self.log.error(f"run_dir {self.run_dir}: lost the run-directory lock"
                               + (f" to {describe(*held)}" if held else " (deleted)")
                               + "; another job may now write here")
                return
            try:
                os.utime(self.path)
            except FileNotFoundError:
                pass

    def release(self) -> None:
        """Stop renewing; delete the lock only if it is still ours (a taker's lock stays)."""
        self._stop.set()
        if self._heartbeat is not None and self._heartbeat is not threading.current_thread():
            self._heartbeat.join(timeout=5)
        held = read(self.run_dir)
        if held is not None and held[0].get("token") == self.token:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


@contextmanager
def hold(run_dir: str | Path, stale_s: float, log: logging.Logger | None = None):
    """The driver's hold for a whole job: the lock, with its token in $LMFORGE_RUN_LOCK for the
    ranks it starts (torchrun children, an in-process rank, Ray workers)."""
    previous = os.environ.get(ENV)
    with RunLock(run_dir, stale_s, log) as lock:
        os.environ[ENV] = lock.token
        try:
            yield lock
        finally:
            if previous is None:
                os.environ.pop(ENV, None)
            else:
                os.environ[ENV] = previous


@contextmanager
def for_rank(cfg):
    """train.main's hold: rank 0 of a job started without lmforge's launcher takes the lock for the
    run; every other rank, and rank 0 under a launcher that holds it (its token in $LMFORGE_RUN_LOCK
    is the lock's), does nothing. Reads RANK before the process group exists (unset: one process)."""
    token = os.environ.get(ENV)
    held = read(cfg.run_dir) if token else None
    if os.environ.get("RANK", "0") != "0" or (held is not None and held[0].get("token") == token):
        yield None
        return
    from .dist import get_logger

    with RunLock(cfg.run_dir, cfg.dist.lock_stale_s, get_logger(0)) as lock:
        yield lock
