"""What clusters and users do to a run, end to end through `lmforge train` (2 gloo ranks): divergence
(exit 76, nothing non-finite published), a rollback past a bad data window, a hang (every rank's
stacks, exit 77), and the chaos drill: repeated SIGKILLs of the job, of the launcher alone and of one
rank, at random moments and during saves, each followed by a resume; the final losses equal the
uninterrupted run's bitwise and nothing is left behind. The collective parts are unit-tested in
tests/test_units_reliability.py; docs/reliability.md lists every promise and its test."""

from __future__ import annotations

import json
import math
import os
import random
import re
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import torch

from conftest import BIN, DEBUG, REPO, STANDARD, debug_overrides, env, lmforge, losses

pytestmark = pytest.mark.slow


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _finite_checkpoint(step_dir: Path) -> bool:
    states = [torch.load(f, map_location="cpu", weights_only=False) for f in step_dir.glob("*optim_states.pt")]
    tensors = []

    def walk(x):
        if torch.is_tensor(x) and x.is_floating_point():
            tensors.append(x)
        elif isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                walk(v)
    walk(states)
    return bool(tensors) and all(bool(torch.isfinite(t).all()) for t in tensors)


def test_divergence_exits_76_naming_the_step_and_publishes_nothing(tmp_path, data_cache):
    """The issue's case: train.lr=1e10. Before: NaN to the end, non-finite step_15/step_20, exit 0."""
    run_dir = tmp_path / "run"
    proc = lmforge("train", DEBUG, "--nproc", "2", *debug_overrides(run_dir, data_cache, "train.lr=1e10",
                                                                    "checkpoint.interval=1"), check=False)
    assert proc.returncode == 76, proc.stderr[-3000:]
    failure = json.loads((run_dir / "failure.json").read_text())
    assert failure["code"] == 76 and failure["reason"].startswith("step ")
    assert f"exit 76" in proc.stderr and "non-finite" in proc.stderr
    # every checkpoint that was published holds finite weights and optimizer state
    published = sorted((run_dir / "checkpoints").glob("step_*")) if (run_dir / "checkpoints").is_dir() else []
    assert all(_finite_checkpoint(p) for p in published)
    bad = [m for m in _metrics(run_dir) if "train/bad_steps" in m]
    assert bad and max(m["train/bad_steps"] for m in bad) >= 3
    assert all(math.isfinite(m["train/loss"]) for m in _metrics(run_dir) if "train/loss" in m)
    status = lmforge("status", run_dir, "--json", check=False)  # exit 1: an unhealthy run
    st = json.loads(status.stdout)[0]
    assert status.returncode == 1 and st["health"] == "diverged" and st["cause"].startswith("exit 76 (rank ")


def test_rollback_skips_the_bad_window_and_finishes(tmp_path, data_cache):
    run_dir = tmp_path / "run"
    proc = lmforge("train", DEBUG, "--nproc", "2", *debug_overrides(run_dir, data_cache, "train.steps=16",
                                                                    "checkpoint.interval=10", "eval.interval=0"),
                   check=False, env_extra={"LMFORGE_FAULT_NONFINITE": "13,14,15"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = _metrics(run_dir)
    assert [m["train/rollbacks"] for m in records if "train/rollbacks" in m] == [1]
    assert max(m.get("train/bad_steps", 0) for m in records) == 3
    trained = [(m["step"], m["train/loss"]) for m in records if "train/loss" in m]
    steps = [s for s, _ in trained]
    assert steps == list(range(1, 13)) + list(range(11, 17))  # steps 11-12 trained, rolled back, trained again
    first, again = dict(trained[:12]), dict(trained[12:])
    assert first[11] != again[11]  # ... on the data after the skipped window, not the same batches
    assert all(math.isfinite(l) for _, l in trained)
    assert _finite_checkpoint(run_dir / "checkpoints" / "step_16")
    assert "rolled back to" in proc.stderr and "steps 11-15 are skipped" in proc.stderr


def test_a_hang_ends_with_every_ranks_stacks_and_exit_77(tmp_path, data_cache):
    run_dir = tmp_path / "run"
    t0 = time.monotonic()
    proc = lmforge("train", DEBUG, "--nproc", "2", *debug_overrides(run_dir, data_cache, "train.steps=10",
                                                                    "dist.hang_timeout_s=6", "dist.timeout_s=300"),
                   check=False, env_extra={"LMFORGE_FAULT_HANG": "1:3"})
    assert proc.returncode == 77, proc.stderr[-3000:]
    assert time.monotonic() - t0 < 150  # not the 300 s collective timeout
    (hang,) = run_dir.glob("hang-*")
    stacks = {p.name: p.read_text() for p in hang.iterdir()}
    assert sorted(stacks) == ["rank_0.txt", "rank_1.txt"]
    assert "maybe_hang" in stacks["rank_1.txt"]               # where rank 1 stopped
    assert "in run" in stacks["rank_0.txt"] and "training step 3" in stacks["rank_0.txt"]
    assert json.loads((run_dir / "failure.json").read_text())["code"] == 77


# --------------------------------------------------------------------------- the chaos drill

def _job(run_dir: Path, data_cache: Path, extra_env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([str(BIN / "lmforge"), "train", str(DEBUG), "--nproc", "2",
                             *debug_overrides(run_dir, data_cache, *STANDARD)],
                            cwd=REPO, env={**env(), **(extra_env or {})}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)


def _ranks(proc: subprocess.Popen) -> list[psutil.Process]:
    try:
        return [p for p in psutil.Process(proc.pid).children(recursive=True)
                if "-m lmforge.training.train" in " ".join(p.cmdline())]
    except psutil.Error:
        return []


def _wait_gone(procs: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    return alive


def test_chaos_kills_at_random_moments_resume_bitwise_and_leave_nothing(tmp_path, data_cache, debug_run):
    reference, _ = debug_run("adamw", 3, 2)
    run_dir = tmp_path / "run"
    rng = random.Random(16)
    # What is killed, and when: from outside, after a random number of steps past the resume point;
    # or a rank SIGKILLs itself inside the next save (training/faults.py), a moment that no outside
    # poller hits reliably on a loaded machine.
    # (every victim and both moments at least once; each start costs ~10 s of the suite)
    plan = [("job", "steps"), ("rank", "save"), ("launcher", "steps"), ("rank", "steps"), ("rank", "save")]
    kills, ports = [], set()
    for victim, moment in plan:
        done = max(losses(run_dir), default=0) if (run_dir / "metrics.jsonl").exists() else 0
        resumed_at = done // 10 * 10  # checkpoint.interval=10; a save cut short resumes earlier
        extra = {"LMFORGE_FAULT_KILL_IN_SAVE": f"{rng.randint(0, 1)}:{resumed_at + 10}"} if moment == "save" else {}
        if resumed_at + 10 > 40 and extra:
            continue
        proc = _job(run_dir, data_cache, extra)
        target = resumed_at + rng.randint(1, 15)
        fired, ranks = False, []
        deadline = time.monotonic() + 240
        while proc.poll() is None and time.monotonic() < deadline:
            if len(ranks) < 2:  # once per start
                ranks = _ranks(proc)
            done = max(losses(run_dir), default=0) if (run_dir / "metrics.jsonl").exists() else 0
            if moment == "steps" and len(ranks) == 2 and done >= target:
                everyone = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
                chosen = {"job": everyone, "launcher": everyone[:1], "rank": [rng.choice(ranks)]}[victim]
                for p in chosen:
                    p.kill()
                fired = True
                assert not _wait_gone(everyone, 30), f"processes left after killing the {victim}"
                kills.append((victim, done, False))
                break
            time.sleep(0.005)
        proc.wait(timeout=60)
        err = proc.stderr.read().decode()
        # the port each start's shm segments would carry (the launcher logs its rendezvous)
        ports.update(re.findall(r"started 2 ranks.*rendezvous 127\.0\.0\.1:(\d+)", err))
        if moment == "save":  # the rank killed itself mid-save; the launcher ended the other one
            assert proc.returncode != 0 and any((run_dir / "checkpoints").glob(".tmp_step_*"))
            assert not _wait_gone(ranks, 30)
            kills.append((victim, int(extra["LMFORGE_FAULT_KILL_IN_SAVE"].split(":")[1]), True))
        elif not fired:  # the job finished before the moment came
            assert proc.returncode == 0, err[-3000:]
            break
    final = _job(run_dir, data_cache)
    assert final.wait(timeout=300) == 0, final.stderr.read().decode()[-3000:]

    print(f"chaos: {len(kills)} kills survived: " + ", ".join(f"{v} at step {d}{' during its save' if sv else ''}"
                                                          for v, d, sv in kills))
    assert len(kills) >= 4 and sum(1 for k in kills if k[2]) == 2, kills
    assert losses(run_dir) == losses(reference)  # every step's last logged loss, bitwise
    leftovers = [p for p in psutil.process_iter(["cmdline"]) if str(run_dir) in " ".join(p.info["cmdline"] or [])]
    assert not leftovers
    assert not list((run_dir / "checkpoints").glob(".tmp_*"))
    assert not (run_dir / "lmforge.lock").exists()
    shm = [f for f in os.listdir("/dev/shm") if any(f"_{port}_" in f for port in ports if port)]
    assert not shm, shm
