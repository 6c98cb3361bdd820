"""RUN_DIR/run.json: what rank 0 says about the current start of a run, for `lmforge status`: when
it began (host, pid, Slurm job, world size, steps to go) and how it ended (finished, stopped, early
stopped, with the run's summary). RUN_DIR/failure.json: why it failed, written by whichever process
sees it (a rank that diverged or hung, the launcher). Imports nothing heavy: `lmforge status` reads both.

    lmforge status runs/debug
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

FILE = "run.json"


FAILURE = "failure.json"


def _write(path: Path, record: dict, writer: str) -> None:
    """Atomically (a reader sees the old file or the new one; two writers, `writer` apart, each a
    complete one)."""
    tmp = path.with_name(f".{path.name}.{writer}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(record, indent=1))
        os.replace(tmp, path)
    except OSError:
        pass  # a full or gone disk must not end the run; status then says less


def _read(path: Path) -> dict | None:
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def read(run_dir: str | Path) -> dict | None:
    return _read(Path(run_dir) / FILE)


def failure_file(run_dir: str | Path) -> Path:
    """Why the last run of this directory failed, when a rank knew (divergence, hang): JSON with the
    exit code. torchrun reports every failed rank as exit 1, so launchers read the code from here."""
    return Path(run_dir) / FAILURE


def record_failure(run_dir: str | Path, code: int, reason: str, rank: int) -> None:
    """rank -1: the launcher. The first and the last process to fail both leave a complete file."""
    _write(failure_file(run_dir), {"code": code, "reason": reason, "rank": rank, "host": socket.gethostname(),
                                   "pid": os.getpid(), "time": time.time()}, f"rank{rank}")


def read_failure(run_dir: str | Path, since: float) -> dict | None:
    """The failure recorded after `since` (a time.time(): not an earlier start's), else None."""
    failure = _read(failure_file(run_dir))
    return failure if failure is not None and failure.get("time", 0) >= since else None


def started(run_dir: str | Path, step: int, total_steps: int, world_size: int, headline: str) -> None:
    _write(Path(run_dir) / FILE, {"state": "running", "started": time.time(), "host": socket.gethostname(),
                                  "pid": os.getpid(), "slurm_job": os.environ.get("SLURM_JOB_ID"),
                                  "world_size": world_size, "start_step": step, "total_steps": total_steps,
                                  "headline": headline}, "rank0")


def ended(run_dir: str | Path, state: str, summary: dict[str, float]) -> None:
    """state: finished, stopped or early_stopped."""
    record = read(run_dir) or {}
    _write(Path(run_dir) / FILE, {**record, "state": state, "ended": time.time(), "summary": summary}, "rank0")
