"""checkpoint.async end to end: `lmforge train` on 2 ranks (ZeRO-3, the debug model) saving in the
background writes byte for byte the checkpoints a synchronous run writes (on a slow disk too, where
the next optimizer step waits for the optimizer state it writes from the live tensors), and a rank SIGKILLed
during a background write leaves the previous checkpoint as the newest complete one, from which the
same command resumes bitwise. The pieces (snapshot, markers): tests/test_units_async_checkpoint.py.

    pytest tests/test_async_checkpoint.py
"""

from __future__ import annotations

import json

import pytest

from conftest import DEBUG, STANDARD, debug_overrides, lmforge, losses
from lmforge.training.checkpoint import read_manifest, verify

pytestmark = pytest.mark.slow


def _files(ckpt) -> dict:
    """A checkpoint's files and their hashes, but config.yaml (which records checkpoint.async)."""
    return {k: v for k, v in read_manifest(ckpt)["files"].items() if k != "config.yaml"}


def test_background_saves_publish_the_bytes_a_synchronous_save_writes(debug_run, tmp_path, data_cache):
    reference, _ = debug_run("adamw", 3, 2)
    run_dir = tmp_path / "run"
    # a slow disk (each file 1 s late): the step after a save waits for the optimizer state to be
    # written from the live tensors, so what lands on disk is still the saved step's
    lmforge("train", DEBUG, *debug_overrides(run_dir, data_cache, *STANDARD, "checkpoint.async=true"), "--nproc", "2",
            env_extra={"LMFORGE_FAULT_SLOW_WRITE": "1"})
    assert losses(run_dir) == losses(reference)
    ckpts = run_dir / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir() if p.name.startswith(("step_", ".tmp"))) == ["step_30", "step_40"]
    for step in ("step_30", "step_40"):
        assert _files(ckpts / step) == _files(reference / "checkpoints" / step)
        assert verify(ckpts / step, contents=True) is None
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "checkpoint/stall_s" in r] == [10, 20, 30, 40]
    waits = {r["step"]: r["checkpoint/wait_s"] for r in rows if "checkpoint/wait_s" in r}
    assert sorted(waits) == [11, 21, 31] and min(waits.values()) > 0.3, waits


def test_a_kill_during_the_background_write_leaves_the_previous_checkpoint(debug_run, tmp_path, data_cache):
    reference, _ = debug_run("adamw", 3, 2)
    run_dir, ckpts = tmp_path / "run", tmp_path / "run" / "checkpoints"
    overrides = debug_overrides(run_dir, data_cache, *STANDARD, "checkpoint.async=true")
    # rank 1 SIGKILLs itself in its writer thread, its files of step_30 on disk, nothing published
    proc = lmforge("train", DEBUG, *overrides, "--nproc", "2", check=False,
                   env_extra={"LMFORGE_FAULT_KILL_IN_SAVE": "1:30"})
    assert proc.returncode != 0
    assert (ckpts / "latest").read_text() == "step_20" and not (ckpts / "step_30").exists()
    assert (ckpts / ".tmp_step_30").is_dir() and verify(ckpts / "step_20", contents=True) is None
    # what `lmforge status` says of it: the launcher recorded what it saw (rank 1's SIGKILL, as a rule;
    # rank 0's "connection closed" if that rank was seen to end first)
    status = lmforge("status", run_dir, check=False).stdout
    assert status.startswith(f"{run_dir}: failed (exit ") and "(the launcher on " in status, status
    assert "last checkpoint step_20 (" in status
    proc = lmforge("train", DEBUG, *overrides, "--nproc", "2")
    assert f"resumed from {ckpts / 'step_20'} at step 20" in proc.stderr
    assert losses(run_dir) == losses(reference)  # every step, the replayed ones included, bitwise
    assert not list(ckpts.glob(".tmp_*"))
