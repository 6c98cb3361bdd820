"""The graceful-stop agreement on 2 in-process gloo ranks (tests/harness.py): a signal that reaches one
rank, or the STOP file, makes every rank agree to stop after the same step; the request is consumed
and the signal handlers are put back. End to end (SIGTERM to `lmforge train`, torchrun forwarding it,
the STOP file of a one-process run, exit 75, resume) in tests/test_train.py."""

from __future__ import annotations

import os
import signal

import pytest
import torch

from harness import run_ranks
# every lmforge name this file uses (one place to follow a rename)
from lmforge.training.dist import EXIT_STOPPED, STOP_SIGNALS, StopRequest, request_stop, stop_file

STEPS = 8


def _loop(stop: StopRequest, act) -> tuple[int, str] | None:
    """The training loop's use: one agreed() per step; act(step) runs before the step's check."""
    for step in range(1, STEPS + 1):
        act(step)
        reason = stop.agreed("cpu")
        if reason is not None:
            return step, reason
    return None


def agree(run_dir: str, how: str, at: int) -> dict:
    rank = torch.distributed.get_rank()
    before = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    stop = StopRequest(run_dir, is_main=rank == 0)
    installed = all(signal.getsignal(s) == stop._on_signal for s in STOP_SIGNALS)

    def act(step: int) -> None:
        if step != at:
            return
        if how in ("SIGTERM", "SIGUSR1", "SIGUSR1+file") and rank == 1:  # only the non-main rank is signalled
            signal.raise_signal(signal.SIGUSR1 if how == "SIGUSR1+file" else getattr(signal, how))
        if how in ("file", "SIGUSR1+file"):
            if rank == 1:  # any process may write it (launchers, sbatch scripts, a user)
                request_stop(run_dir, "pre-empted")
            torch.distributed.barrier()  # the file exists before this step's check

    stopped = _loop(stop, act)
    stop.clear()
    torch.distributed.barrier()
    file_left = stop_file(run_dir).exists()
    again = _loop(StopRequest(run_dir, is_main=rank == 0), lambda step: None)  # the resumed run goes on
    stop.close()
    restored = all(signal.getsignal(s) == before[s] for s in STOP_SIGNALS)
    return {"stopped": stopped, "installed": installed, "file_left": file_left, "again": again, "restored": restored}


# "SIGUSR1+file": an sbatch script writes STOP on the signal that also reaches a rank (Slurm's --full)
SCENARIOS = {"SIGTERM": 3, "SIGUSR1": 3, "file": 5, "SIGUSR1+file": 4, "none": 0}  # how the stop is asked for: at which step


def agree_in_every_scenario(root: str) -> dict:
    return {how: agree(f"{root}/{how}", how, at) for how, at in SCENARIOS.items()}


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    root = tmp_path_factory.mktemp("stop")
    return root, run_ranks(agree_in_every_scenario, 2, str(root))


@pytest.mark.parametrize("how", SCENARIOS)
def test_every_rank_stops_after_the_same_step(how, outcomes):
    root, ranks = outcomes
    run_dir = root / how
    r0, r1 = (r[how] for r in ranks)
    for r in (r0, r1):
        assert r["installed"] and r["restored"]
        assert not r["file_left"] and r["again"] is None
    if how == "none":
        assert r0["stopped"] is r1["stopped"] is None
        return
    (step0, reason0), (step1, reason1) = r0["stopped"], r1["stopped"]
    assert step0 == step1 == SCENARIOS[how]
    if how == "file":  # the main rank reads the file (the other may find it already consumed)
        assert reason0 == f"{stop_file(run_dir)} (pre-empted)"
        assert reason1 in (reason0, "the run's STOP file")
    else:  # every rank names the signal, whichever rank got it and whether the file came too
        assert reason0 == reason1 == how.removesuffix("+file")
    assert not stop_file(run_dir).exists()


def test_exit_status_of_a_stopped_rank_means_try_again():
    assert EXIT_STOPPED == os.EX_TEMPFAIL == 75
