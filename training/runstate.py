"""RUN_DIR/run.json: what rank 0 says about the current start of a run, for `lmforge status`: when
it began (host, pid, Slurm job, world size, steps to go) and how it ended (finished, stopped, early
stopped, with the run's summary). Failures are recorded separately, by whichever process sees them
(dist.record_failure: failure.json). Imports nothing heavy: `lmforge status` reads it too.

    lmforge status runs/debug
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

FILE = "run.json"


def _write(run_dir: str | Path, record: dict) -> None:
    path = Path(run_dir) / FILE
    tmp = path.with_name(f".{FILE}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(record, indent=1))
        os.replace(tmp, path)
    except OSError:
        pass  # a full disk must not end the run; status then says less


def read(run_dir: str | Path) -> dict | None:
    try:
        record = json.loads((Path(run_dir) / FILE).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def started(run_dir: str | Path, step: int, total_steps: int, world_size: int, headline: str) -> None:
    _write(run_dir, {"state": "running", "started": time.time(), "host": socket.gethostname(), "pid": os.getpid(),
                     "slurm_job": os.environ.get("SLURM_JOB_ID"), "world_size": world_size, "start_step": step,
                     "total_steps": total_steps, "headline": headline})


def ended(run_dir: str | Path, state: str, summary: dict[str, float]) -> None:
    """state: finished, stopped or early_stopped."""
    record = read(run_dir) or {}
    _write(run_dir, {**record, "state": state, "ended": time.time(), "summary": summary})
