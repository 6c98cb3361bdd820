"""checkpoint.async: a save costs the training loop only a copy of its model states in host memory
(and DeepSpeed's own collectives); a thread on each rank writes the files, and rank 0's thread then
completes and publishes the checkpoint exactly as a synchronous save does (manifest, atomic rename,
`latest`, prune).

The optimizer-state files (LIVE_FILES: the fp32 master partition and Adam's moments, most of a
checkpoint) are not copied: only the optimizer step changes those tensors, and forward and backward
run on the parameters and gradients. The thread writes them first, and the next optimizer step
waits until they are on disk (Background's step pre-hook on the torch optimizer ZeRO steps);
that wait is logged as checkpoint/wait_s (ZeRO-2 and ZeRO-3 checked byte for byte against a
synchronous save on a slow disk; tests/test_async_checkpoint.py runs ZeRO-3).

    lmforge train configs/demo.yaml --nproc 2 checkpoint.async=true   # checkpoint/stall_s in metrics.jsonl: the copy

The ranks' threads run no collectives (the loop's own collectives go on meanwhile): each rank leaves
a marker in the temporary directory with its files' hashes (or its error), and rank 0's thread waits
for every marker before it publishes. At most one save is in flight: the next save, a stop, the
end of the run, early stopping's best and a rollback wait for it, collectively, so a failure on any
rank is raised on every rank as a synchronous save raises it. A crash or kill during the write
leaves the temporary directory unpublished: the previous checkpoint stays the newest complete one.

DeepSpeed's own decoupled and fast checkpoint engines write through its async_io op (libaio); on a
machine without libaio (this project's CPU boxes) they cannot be built, so lmforge snapshots the
state dicts DeepSpeed's save hands to its checkpoint engine and writes them with that engine.
"""

from __future__ import annotations

import copy
import json
import os
import re
import threading
import time
from pathlib import Path
from typing import Callable

import torch

MARKER = ".written_rank{}.json"
# DeepSpeed's optimizer-state files (zero_pp_rank_R_mp_rank_00_optim_states.pt, bf16_… too): written
# from the live tensors; everything else (model states, whose ZeRO-3 parameters forward re-gathers) is copied.
LIVE_FILES = re.compile(r"optim_states\.pt$")


def snapshot(obj, memo: dict | None = None, live: bool = False):
    """A copy of a state dict in host memory that training can no longer change, pickled by
    torch.save to the same bytes as the original: every tensor storage copied once (views keep
    sharing it), a tensor's attributes kept, an object reached twice copied once (as pickle's memo
    and copy.deepcopy see it), other leaves deep-copied. `live`: the tensors are not copied (only
    the containers and other leaves are): they must stay unchanged until written (LIVE_FILES)."""
    memo = {} if memo is None else memo
    if id(obj) in memo:
        return memo[id(obj)]
    if live and isinstance(obj, torch.Tensor):
        return obj
    if isinstance(obj, torch.Tensor) and type(obj) in (torch.Tensor, torch.nn.Parameter):
        storage = obj.untyped_storage()
        key = ("storage", storage.device, storage.data_ptr(), storage.nbytes()) if storage.data_ptr() else id(storage)
        if key not in memo:
            copied = torch.UntypedStorage(storage.nbytes(), device="cpu")
            copied.copy_(storage)
            memo[key] = copied
        out = torch.empty(0, dtype=obj.dtype).set_(memo[key], obj.storage_offset(), obj.size(), obj.stride())
        if isinstance(obj, torch.nn.Parameter):
            out = torch.nn.Parameter(out, requires_grad=obj.requires_grad)
        else:
            out.requires_grad_(obj.requires_grad)
        for name, value in vars(obj).items():  # attributes a library set on the tensor; pickled with it
            setattr(out, name, snapshot(value, memo))
    elif isinstance(obj, dict):
        out = copy.copy(obj)  # keeps the type (OrderedDict, defaultdict)
        memo[id(obj)] = out
        for k, v in obj.items():
            out[k] = snapshot(v, memo, live)
    elif isinstance(obj, list):
        out = []
        memo[id(obj)] = out
        out.extend(snapshot(v, memo, live) for v in obj)
    elif isinstance(obj, tuple):
        items = [snapshot(v, memo, live) for v in obj]
        out = type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)
    elif obj is None or isinstance(obj, (int, float, str, bytes, bool)):
        return obj
    else:
        out = copy.deepcopy(obj, memo)
    memo[id(obj)] = out
    return out


class OtherRankFailed(RuntimeError):
    """Rank 0's thread saw another rank's error marker: that rank reports the cause."""


class Background:
    """This rank's in-flight save, if any (train.py's Checkpointer holds one per run)."""

    def __init__(self, timeout_s: float, optimizer: torch.optim.Optimizer):
        """optimizer: the torch optimizer inside ZeRO's, which alone changes the live tensors: each
        of its steps waits until the save in flight has written them."""
        self.timeout_s = timeout_s  # rank 0's wait for the other ranks' markers (dist.timeout_s)
        self.saving = None  # the checkpoint._Saving of the save in flight (its rank and world size)
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._live_written = threading.Event()  # the live tensors (LIVE_FILES) are on disk
        self._live_written.set()
        self.waited_s = 0.0  # the optimizer steps' wait for live_written, since take_waited()
        optimizer.register_step_pre_hook(self._before_step)

    def live(self, path: str) -> bool:
        """Whether the file at `path` is written from the live tensors instead of a copy."""
        return bool(LIVE_FILES.search(str(path)))

    def _before_step(self, *_) -> None:
        if not self._live_written.is_set():
            t0 = time.perf_counter()
            self._live_written.wait()
            self.waited_s += time.perf_counter() - t0

    def take_waited(self) -> float:
        """The optimizer steps' wait for a save's live tensors since the last call (checkpoint/wait_s)."""
        waited, self.waited_s = self.waited_s, 0.0
        return waited

    def live_written(self) -> None:
        """The writer thread has written the live tensors (or failed): the optimizer may step."""
        self._live_written.set()

    def start(self, saving, job: Callable[[], None]) -> None:
        self.saving, self._error = saving, None
        self._live_written.clear()

        def run() -> None:
            try:
                job()
            except BaseException as e:  # noqa: BLE001 - reported by wait(), on every rank
                self._error = e
            finally:
                self._live_written.set()  # a failed write must not leave the next step waiting

        self._thread = threading.Thread(target=run, name=f"lmforge-checkpoint-{saving.final.name}", daemon=True)
        self._thread.start()

    def wait(self) -> None:
        """Collective (every rank calls it at the same point of the loop): the save in flight has
        been published, or every rank raises what failed (checkpoint._Saving.settle)."""
        if self._thread is None:
            return
        self._thread.join()
        self._thread = None
        error = self._error
        # OtherRankFailed: the rank that failed reports its own error in settle()
        self.saving.settle([error] if error is not None and not isinstance(error, OtherRankFailed) else [])
        if isinstance(error, OtherRankFailed):  # settle found nothing: the other rank's marker was all we had
            raise RuntimeError(str(error))


def write_marker(tmp: Path, rank: int, hashes: dict[str, str] | None, error: BaseException | None) -> None:
    """Atomically (rank 0 polls for the file: it must never see it half written)."""
    path = tmp / MARKER.format(rank)
    part = path.with_name(path.name + ".part")
    part.write_text(json.dumps({"hashes": hashes, "error": None if error is None else f"{type(error).__name__}: {error}"}))
    os.replace(part, path)


def collect_markers(tmp: Path, world_size: int, timeout_s: float) -> dict[str, str]:
    """Rank 0's thread: every rank's hashes once all markers are there (then removed); raises
    OtherRankFailed naming the first rank that recorded an error."""
    deadline = time.monotonic() + timeout_s
    paths = [tmp / MARKER.format(r) for r in range(world_size)]
    while not all(p.is_file() for p in paths):
        if time.monotonic() > deadline:
            missing = [r for r, p in enumerate(paths) if not p.is_file()]
            raise TimeoutError(f"ranks {missing} did not finish writing {tmp} within {timeout_s:g} s (dist.timeout_s)")
        time.sleep(0.02)
    hashes: dict[str, str] = {}
    for r, p in enumerate(paths):
        got = json.loads(p.read_text())
        if got["error"] is not None:
            raise OtherRankFailed(f"saving checkpoint {tmp.name.removeprefix('.tmp_')} failed on rank {r}: {got['error']}")
        hashes.update(got["hashes"])
    for p in paths:
        p.unlink()
    return hashes
