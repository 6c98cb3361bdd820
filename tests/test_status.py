"""`lmforge status` on one run directory through its life: running (with an ETA), stalled (a rank
hangs), failed (the whole job SIGKILLed: no record), stopped (STOP), finished. The diverged and the
launcher-recorded failures are asserted where those runs happen (tests/test_reliability.py,
tests/test_async_checkpoint.py).

    .venv/bin/python -m pytest tests/test_status.py
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest

from conftest import BIN, DEBUG, REPO, debug_overrides, env, lmforge

pytestmark = pytest.mark.slow


def status(run_dir, *flags) -> tuple[int, dict, str]:
    js = lmforge("status", run_dir, "--json", *flags, check=False)
    text = lmforge("status", run_dir, *flags, check=False)
    assert js.returncode == text.returncode in (0, 1), js.stderr
    return js.returncode, json.loads(js.stdout)[0], text.stdout


def test_status_through_a_runs_life(tmp_path, data_cache):
    run_dir = tmp_path / "run"
    args = ["train", DEBUG, "--nproc", "2", *debug_overrides(run_dir, data_cache, "train.steps=12", "checkpoint.interval=2",
                                                             "eval.interval=0", "dist.hang_timeout_s=600")]
    assert status(run_dir.parent)[1]["health"] == "not started"

    # rank 0 hangs before step 6: running while the steps come, stalled once they stop
    job = subprocess.Popen([str(BIN / "lmforge"), *map(str, args)], cwd=REPO, start_new_session=True,
                           env={**env(), "LMFORGE_FAULT_HANG": "0:6"}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 180
        while time.time() < deadline:
            if (run_dir / "run.json").is_file():
                rc, st, text = status(run_dir)
                if st["step"] == 5:
                    break
            time.sleep(0.2)
        assert (rc, st["health"], st["total_steps"]) == (0, "running", 12), text
        assert st["eta_s"] > 0 and st["tokens_per_s"] > 0 and st["checkpoint"]["tag"] in ("step_2", "step_4"), text
        assert f"pid {job.pid} on host" in st["holder"] and "ETA " in text and "step 5/12 (42%)" in text
        time.sleep(3)
        rc, st, text = status(run_dir, "--stall-factor", "3", "--stall-min-s", "2")
        assert (rc, st["health"]) == (1, "stalled") and st["cause"].startswith("no step for "), text
        assert text.startswith(f"{run_dir}: stalled (no step for ")
    finally:
        os.killpg(job.pid, signal.SIGKILL)  # the whole job, driver included: nobody records anything
        job.wait()
    time.sleep(0.5)
    rc, st, text = status(run_dir)
    assert (rc, st["health"]) == (1, "failed") and "ended without a record" in st["cause"], text
    assert st["checkpoint"]["tag"] == "step_4" and st["holder"] is None

    # a STOP request: stopped (resumable), then the rest of the run: finished
    (run_dir / "STOP").write_text("test\n")
    assert lmforge(*args, check=False).returncode == 75
    rc, st, text = status(run_dir)
    assert (rc, st["health"], st["step"], st["checkpoint"]["tag"]) == (0, "stopped", 5, "step_5"), text
    lmforge(*args)
    rc, st, text = status(run_dir)
    assert (rc, st["health"], st["step"], st["checkpoint"]["tag"]) == (0, "finished", 12, "step_12"), text
    assert st["eta_s"] is None and st["eval"]["metric"] == "eval/ppl" and st["eval"]["step"] == 12
    assert text.splitlines()[0] == f"{run_dir}: finished"
