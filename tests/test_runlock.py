"""The run-directory lock (training/runlock.py) and no leftovers after kills (training/leftovers.py).

In process: a second acquire refused naming the holder; a dead holder on this host (or a reused pid),
a foreign holder that stopped renewing, and our own Slurm job's lock taken over; release deleting only
our own lock; the heartbeat; stale /dev/shm segments removed but never a mapped or young one; a child
that dies with its parent; a torchrun rank that exits when orphaned. Through the CLI (slow): a second
`lmforge train` on a busy run_dir exits 2 naming the pid, kill -9 of the launcher leaves no rank and a
third start takes the lock over; kill -9 of torchrun alone ends its ranks; no DeepSpeed segment of
a finished or a killed run stays in /dev/shm.

    pytest tests/test_runlock.py -m 'not slow'     # ~5 s
"""

from __future__ import annotations

import json
import logging
import mmap
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import BIN, DEBUG, REPO, debug_overrides, env, losses, rendezvous_port
# every lmforge name this file uses (one place to follow a rename)
from lmforge.training import leftovers, runlock
from lmforge.training.runlock import RunDirInUse, RunLock, check_free, for_rank, lock_path


@pytest.fixture
def log():
    return logging.getLogger("test-runlock")  # propagates: caplog sees it


def write_lock(run_dir: Path, age_s: float = 0.0, **fields) -> dict:
    record = {"host": socket.gethostname(), "boot": runlock._boot_id(), "pid": os.getpid(), "pid_start": None,
              "start": "2026-12-06T03:00:00Z", "token": secrets.token_hex(4), "job": None, **fields}
    run_dir.mkdir(parents=True, exist_ok=True)
    lock_path(run_dir).write_text(json.dumps(record))
    if age_s:
        t = time.time() - age_s
        os.utime(lock_path(run_dir), (t, t))
    return record


def holder(run_dir: Path) -> dict:
    return json.loads(lock_path(run_dir).read_text())


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_second_acquire_refused_naming_holder(tmp_path, log):
    run_dir = tmp_path / "run"
    with RunLock(run_dir, 300, log) as lock:
        record = holder(run_dir)
        assert record["token"] == lock.token and record["pid"] == os.getpid()
        with pytest.raises(RunDirInUse) as e:
            RunLock(run_dir, 300, log).acquire()
        msg = str(e.value)
        assert f"run_dir {run_dir} is in use by pid {os.getpid()} on host {socket.gethostname()}" in msg
        assert f"started {record['start']}" in msg and "lock renewed 0 s ago" in msg
        assert msg.endswith("wait for it, or use another run_dir") and "\n" not in msg
        with pytest.raises(RunDirInUse):  # the Slurm driver's check refuses too
            check_free(run_dir, 300)
        assert holder(run_dir)["token"] == lock.token  # the refused start changed nothing
    assert not lock_path(run_dir).exists()


@pytest.mark.parametrize("how", ["dead pid", "reused pid"])
def test_dead_holder_on_this_host_taken_over(tmp_path, log, caplog, how):
    run_dir = tmp_path / "run"
    # a reused pid: alive (ours), but started at another time than the holder recorded
    old = write_lock(run_dir, pid=dead_pid()) if how == "dead pid" else write_lock(run_dir, pid_start=1)
    check_free(run_dir, 300)  # the Slurm driver would submit
    with caplog.at_level(logging.INFO, "test-runlock"), RunLock(run_dir, 300, log) as lock:
        assert holder(run_dir)["token"] == lock.token
    warning = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warning) == 1 and f"taking over the lock of pid {old['pid']}" in warning[0].message
    assert "that process is gone" in warning[0].message
    assert not lock_path(run_dir).exists()


def test_foreign_holder_taken_over_only_when_stale(tmp_path, log, caplog):
    run_dir = tmp_path / "run"
    write_lock(run_dir, host="other-host", pid=1234, age_s=5)
    with pytest.raises(RunDirInUse, match=r"in use by pid 1234 on host other-host \(.*lock renewed 5 s ago\)"):
        RunLock(run_dir, 300, log).acquire()
    write_lock(run_dir, host="other-host", pid=1234, age_s=400)
    with caplog.at_level(logging.INFO, "test-runlock"), RunLock(run_dir, 300, log) as lock:
        assert holder(run_dir)["token"] == lock.token
    assert any(r.levelno == logging.WARNING and "not renewed for more than dist.lock_stale_s=300 s" in r.message
               for r in caplog.records)


def test_same_slurm_job_takes_its_lock_back(tmp_path, log, caplog, monkeypatch):
    run_dir = tmp_path / "run"
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    write_lock(run_dir, host="node-7", pid=99, job="4242")  # fresh, foreign: refused but for the job id
    with caplog.at_level(logging.INFO, "test-runlock"), RunLock(run_dir, 300, log) as lock:
        assert holder(run_dir)["token"] == lock.token and holder(run_dir)["job"] == "4242"
    assert [r.levelno for r in caplog.records] == [logging.INFO]
    assert "taking back the lock of our own Slurm job 4242" in caplog.records[0].message
    monkeypatch.setenv("SLURM_JOB_ID", "4243")  # another job: refused
    write_lock(run_dir, host="node-7", pid=99, job="4242")
    with pytest.raises(RunDirInUse, match="job 4242"):
        RunLock(run_dir, 300, log).acquire()


def test_release_deletes_only_our_own_lock(tmp_path, log):
    run_dir = tmp_path / "run"
    lock = RunLock(run_dir, 300, log).acquire()
    taker = write_lock(run_dir, host="other-host")  # someone took it over (we looked stale)
    lock.release()
    assert holder(run_dir)["token"] == taker["token"]
    lock_path(run_dir).unlink()
    with RunLock(run_dir, 300, log):
        pass
    assert not lock_path(run_dir).exists()
    with pytest.raises(RuntimeError), RunLock(run_dir, 300, log):  # error paths release too
        raise RuntimeError("boom")
    assert not lock_path(run_dir).exists()


def test_heartbeat_renews_the_lock(tmp_path, log):
    run_dir = tmp_path / "run"
    with RunLock(run_dir, 10, log):  # renewed every 10/10 s
        t = time.time() - 100
        os.utime(lock_path(run_dir), (t, t))
        time.sleep(1.6)
        assert time.time() - lock_path(run_dir).stat().st_mtime < 2


def test_rank_side(tmp_path, monkeypatch):
    """train.main's hold: rank 0 without a launcher takes the lock; under a launcher holding it
    (its token in the environment), and on other ranks, nothing is taken."""
    from lmforge.training.config import load_config

    cfg = load_config(DEBUG, [f"run_dir={tmp_path / 'run'}"])
    monkeypatch.delenv(runlock.ENV, raising=False)
    monkeypatch.setenv("RANK", "0")
    with for_rank(cfg) as lock:
        assert holder(cfg.run_dir)["token"] == lock.token
        monkeypatch.setenv("RANK", "1")
        with for_rank(cfg) as other:
            assert other is None
        monkeypatch.setenv("RANK", "0")
        monkeypatch.setenv(runlock.ENV, lock.token)  # as a launcher's rank 0 sees it
        with for_rank(cfg) as inner:
            assert inner is None
        monkeypatch.setenv(runlock.ENV, "someone-elses")  # a stray token does not open the door
        with pytest.raises(RunDirInUse):
            with for_rank(cfg):
                pass
    assert not lock_path(cfg.run_dir).exists()


def test_stale_segments_removed_mapped_and_young_kept():
    name = f"deepspeed_lmforge_test_{os.getpid()}_{secrets.token_hex(3)}"
    stale, mapped, young = (leftovers.SHM_DIR / f"{name}_{k}" for k in ("stale", "mapped", "young"))
    for p in (stale, mapped, young):
        p.write_bytes(b"\0" * 4096)
    old = time.time() - 60
    os.utime(stale, (old, old))
    os.utime(mapped, (old, old))
    with open(mapped, "r+b") as f, mmap.mmap(f.fileno(), 4096):
        try:
            removed = leftovers.remove_stale_segments()
            assert stale.name in removed and not stale.exists()
            assert mapped.exists() and young.exists()
        finally:
            for p in (stale, mapped, young):
                p.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _wait_gone(pids, timeout: float = 10) -> list[int]:
    deadline = time.time() + timeout
    while time.time() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.1)
    return [p for p in pids if _alive(p)]


# A parent that starts a grandchild and prints its pid; the test SIGKILLs the parent alone.
_PARENT = """
import os, subprocess, sys, time
from lmforge.training import leftovers
how = sys.argv[1]
if how == "pdeathsig":
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], preexec_fn=leftovers.die_with_parent())
else:  # a torchrun rank: polls for its parent
    code = "import time; from lmforge.training import leftovers; leftovers.exit_when_orphaned(0.2); time.sleep(60)"
    child = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "TORCHELASTIC_RUN_ID": "test"},
                             start_new_session=True)
print(child.pid, flush=True)
time.sleep(60)
"""


@pytest.mark.parametrize("how", ["pdeathsig", "orphan watch"])
def test_child_dies_with_its_parent(how):
    parent = subprocess.Popen([sys.executable, "-c", _PARENT, how], stdout=subprocess.PIPE, text=True, env=env())
    child = int(parent.stdout.readline())
    time.sleep(1.5)  # the grandchild has imported lmforge and started its watch
    assert _alive(child)
    parent.kill()
    parent.wait()
    assert _wait_gone([child], 5) == []


# --------------------------------------------------------------------------- through the CLI

def _start(*args, shm: bool = False, slow: bool = False) -> subprocess.Popen:
    """`lmforge train ARGS` in a session of its own. shm: with LOCAL_SIZE set, as DeepSpeed's own
    launcher sets it, which is what makes DeepSpeed's CPU comm op create its /dev/shm segments.
    slow: 0.2 s more per step, idle (training/faults.py), so the job outlives the test's checks."""
    e = {**env(), "LOCAL_SIZE": "2"} if shm else env()
    if slow:
        e["LMFORGE_FAULT_SLOW"] = "0.2"
    return subprocess.Popen([str(BIN / "lmforge"), "train", *map(str, args)], cwd=REPO, env=e,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)


def _ranks(launcher: subprocess.Popen, timeout: float = 60, seen: list | None = None):
    """The launcher's ranks (it starts them itself, forked from its forkserver on CPU) and their
    master port, from the launcher's "started 2 ranks ... rendezvous 127.0.0.1:PORT" line; the
    stderr lines read up to it go to `seen`."""
    import psutil

    port = rendezvous_port(launcher.stderr, timeout, seen)
    deadline = time.time() + timeout
    while time.time() < deadline:
        children = []
        for c in psutil.Process(launcher.pid).children(recursive=True):
            try:
                if "-m lmforge.training.train" in " ".join(c.cmdline()):
                    children.append(c)
            except psutil.Error:  # a short-lived helper already gone
                pass
        if len(children) == 2:
            return children, port
        time.sleep(0.1)
    raise AssertionError("no rank children")


def _wait_for(cond, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not cond():
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.time() < deadline, "timed out"
        time.sleep(0.1)


def _processes_of(run_dir: Path) -> list[int]:
    import psutil

    out = []
    for p in psutil.process_iter(["cmdline", "status"]):
        if p.info["status"] != psutil.STATUS_ZOMBIE and str(run_dir) in " ".join(p.info["cmdline"] or ()):
            out.append(p.pid)
    return out


def _segments(port: str) -> list[str]:
    return sorted(p.name for p in leftovers.SHM_DIR.glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_*"))


def _stepped(run_dir: Path) -> bool:
    return (run_dir / "metrics.jsonl").is_file() and max(losses(run_dir), default=0) >= 1


@pytest.mark.slow
def test_busy_run_dir_refused_then_taken_over_after_kill(tmp_path, data_cache):
    """A second `lmforge train` on a run_dir in use exits 2 naming the holder; kill -9 of the
    launcher alone leaves no rank; a third start takes the dead launcher's lock over; no segment of
    the killed run or of the finished one stays in /dev/shm."""
    run_dir = tmp_path / "run"
    args = [DEBUG, "--nproc", "2", *debug_overrides(run_dir, data_cache, "checkpoint.interval=1000")]
    first = _start(*args, "train.steps=100000", shm=True, slow=True)  # until the launcher is killed
    ranks, port = _ranks(first)
    # the ranks are in DeepSpeed's init (their orphan watch runs); also: the names we clean up are DeepSpeed's
    _wait_for(lambda: len(_segments(port)) == 2, first)

    second = subprocess.run([str(BIN / "lmforge"), "train", *map(str, args), "train.steps=2"], cwd=REPO, env=env(),
                            capture_output=True, text=True, timeout=120)
    assert second.returncode == 2, second.stderr[-3000:]
    assert f"run_dir {run_dir} is in use by pid {first.pid} on host {socket.gethostname()}" in second.stderr
    assert len(second.stderr.strip().splitlines()) == 1

    assert sorted(p for p in _processes_of(run_dir) if p != first.pid) == sorted(r.pid for r in ranks)
    os.kill(first.pid, signal.SIGKILL)  # the launcher alone
    first.wait()
    assert _wait_gone([r.pid for r in ranks], 10) == [], "ranks outlived the launcher"
    assert _processes_of(run_dir) == []
    assert holder(run_dir)["pid"] == first.pid  # left behind by the kill

    third = _start(*args, "train.steps=3", shm=True)
    head: list[str] = []
    _, third_port = _ranks(third, seen=head)
    _wait_for(lambda: len(_segments(third_port)) == 2, third)
    _, err = third.communicate(timeout=120)
    err = "".join(head) + err
    assert third.returncode == 0, err[-3000:]
    assert f"taking over the lock of pid {first.pid}" in err and "that process is gone" in err
    assert not lock_path(run_dir).exists()
    assert _segments(port) == [] and _segments(third_port) == []


# SIGKILL of one rank (the launcher ends the other and releases the lock): the chaos drill,
# tests/test_reliability.py.
