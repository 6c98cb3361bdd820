"""checkpoint.async's pieces in process: the host snapshot that a background thread writes
(torch.save gives the same bytes as for the original, and training can no longer change it), and
the markers through which rank 0's thread learns that every rank's files are written. End to end
(2 ranks, byte-identical checkpoints, SIGKILL during the write, resume): tests/test_async_checkpoint.py."""

from __future__ import annotations

import io
import threading
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

from lmforge.training.checkpoint.background import (OtherRankFailed, collect_markers, snapshot, write_marker)


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
