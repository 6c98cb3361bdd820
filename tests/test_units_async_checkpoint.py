"""checkpoint.async's pieces in process: the host snapshot that a background thread writes
(torch.save gives the same bytes as for the original, and training can no longer change it), and
the markers through which rank 0's thread learns that every rank's files are written. End to end
(2 ranks, byte-identical checkpoints, SIGKILL during the write, resume): tests/test_async_checkpoint.py."""

from __future__ import annotations

import io
import threading
import time
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

from lmforge.training.checkpoint.background import (Background, OtherRankFailed, collect_markers, snapshot,
                                                     write_marker)


def _state() -> dict:
    flat = torch.arange(12, dtype=torch.float32)
    flat.requires_grad_(True)
    flat.partition_id = 3  # DeepSpeed sets attributes like this on its flat groups
    views = [flat.detach()[:4], flat.detach()[4:].view(2, 4)]  # share flat's storage
    betas = (0.9, 0.95)
    return {"flat": flat, "views": views, "param": torch.nn.Parameter(torch.ones(3)),
            "groups": [{"betas": betas, "lr": 1e-3}, {"betas": betas, "lr": 2e-3}],  # one tuple, reached twice
            "ordered": OrderedDict(step=torch.tensor(7)), "scale": torch.Size([2, 4]), "name": "adamw", "none": None}


def _bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def test_the_snapshot_pickles_to_the_same_bytes():
    state = _state()
    assert _bytes(snapshot(state)) == _bytes(state)


def test_training_cannot_change_the_snapshot():
    state = _state()
    copy = snapshot(state)
    expected = _bytes(copy)
    with torch.no_grad():
        state["flat"].add_(100.0)  # the optimizer's in-place update after the save returned
        state["param"].mul_(5.0)
    state["ordered"]["step"] += 1
    assert _bytes(copy) == expected
    assert copy["views"][1].untyped_storage().data_ptr() == copy["flat"].untyped_storage().data_ptr()
    assert copy["flat"].partition_id == 3 and copy["flat"].requires_grad
    assert isinstance(copy["param"], torch.nn.Parameter) and type(copy["ordered"]) is OrderedDict


def test_a_live_snapshot_shares_the_tensors_and_copies_the_rest():
    state = _state()
    live = snapshot(state, live=True)
    assert _bytes(live) == _bytes(state)
    assert live["flat"] is state["flat"] and live["views"][0] is state["views"][0]
    state["groups"][0]["lr"] = 9.0  # a scheduler's change to the optimizer's param groups
    assert live["groups"][0]["lr"] == 1e-3 and live["groups"] is not state["groups"]


def test_the_optimizer_step_waits_for_the_live_write():
    """A held optimizer's step blocks until the writer thread has written the live tensors; the
    wait is counted (checkpoint/wait_s); a failed write releases it too."""
    param = torch.nn.Parameter(torch.ones(4))
    opt = torch.optim.AdamW([param], lr=0.1)
    bg = Background(timeout_s=30, optimizer=opt)
    assert bg.live("ckpt/zero_pp_rank_0_mp_rank_00_optim_states.pt")
    assert not bg.live("ckpt/zero_pp_rank_0_mp_rank_00_model_states.pt")
    written = threading.Event()
    seen = {}

    class Saving:  # what Background.wait() settles: nothing failed
        final = Path("step_1")

        def settle(self, errors):
            assert errors == []

    def job():
        time.sleep(0.3)
        seen["param"] = param.detach().clone()  # "written": the step has not changed it yet
        bg.live_written()
        written.set()

    param.grad = torch.ones(4)
    bg.start(Saving(), job)
    opt.step()
    assert written.is_set() and torch.equal(seen["param"], torch.ones(4)) and not torch.equal(param, torch.ones(4))
    assert 0.1 < bg.take_waited() < 10 and bg.take_waited() == 0.0
    bg.wait()

    def failing():
        raise OSError("disk gone")

    class Failed(Saving):
        def settle(self, errors):
            raise RuntimeError(f"save failed: {errors[0]}")

    bg.start(Failed(), failing)
    opt.step()  # released by the failure, not left waiting
    with pytest.raises(RuntimeError, match="disk gone"):
        bg.wait()


def test_rank0_waits_for_every_marker_then_takes_their_hashes(tmp_path):
    got = {}
    t = threading.Thread(target=lambda: got.update(collect_markers(tmp_path, 2, timeout_s=30)))
    write_marker(tmp_path, 0, {"a.pt": "01"}, None)
    t.start()
    t.join(0.3)
    assert t.is_alive()  # rank 1 has not written yet
    write_marker(tmp_path, 1, {"b.pt": "02"}, None)
    t.join(30)
    assert got == {"a.pt": "01", "b.pt": "02"}
    assert not list(tmp_path.iterdir())  # the markers are not part of the checkpoint


def test_a_rank_that_failed_is_named_and_a_missing_one_times_out(tmp_path: Path):
    write_marker(tmp_path, 0, {"a.pt": "01"}, None)
    write_marker(tmp_path, 1, None, OSError(28, "No space left on device"))
    with pytest.raises(OtherRankFailed, match=r"failed on rank 1: OSError: \[Errno 28\] No space left on device"):
        collect_markers(tmp_path, 2, timeout_s=5)
    with pytest.raises(TimeoutError, match=r"ranks \[2\] did not finish writing"):
        collect_markers(tmp_path, 3, timeout_s=0.2)
