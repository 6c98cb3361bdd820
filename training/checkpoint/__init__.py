"""Checkpoint storage: atomic, verified, sharded checkpoints on top of DeepSpeed's own save/load.

    lmforge train configs/debug.yaml checkpoint.interval=5    # writes runs/debug/checkpoints/step_5, …

One checkpoint, `<checkpoint_dir>/step_N/`:
  DeepSpeed's sharded files (model + optimizer partitions of every rank),
  rng_rank<R>.pt   the RNG state of every rank,
  client.json      step, tokens seen, sampler position, config hash,
  config.yaml      the resolved run config that wrote it,
  hf/              the model's Hugging Face config and the tokenizer (for export / init_from),
  adapter/         peft runs: the adapter as peft writes it (the DeepSpeed files then hold only
                   the trainable parameters: the frozen base comes from model.init_from),
  manifest.json    every file's size and content hash (xxh3_64); written last, so its presence
                   means "complete".
Beside the steps: `latest` (DeepSpeed's pointer file, so its zero_to_fp32.py works on the
directory), `best.json` (the checkpoint with the best eval.early_stopping.metric, never pruned) and
the directories derived from a step (DERIVED: `step_N_universal`, `step_N_hf`), which are stale
when their step is saved again and pruned with it.

Publishing: everything is written into `.tmp_<name>` (temp_dir), then the manifest, fsync, one
rename, and the pointer file moves last (publish). A reader never sees half a checkpoint; one whose
files do not match its manifest (truncated copy, crash mid-write) is skipped with a warning.
The ranks hash their shares of the files right after writing them (while in page cache);
verify(contents=True) / verify_contents_collective / `lmforge verify` check the hashes. A disk
that fills up during a save ends every rank with DiskFull, the temporary directory removed.

DeepSpeed's *_model_states.pt / *_optim_states.pt are pickles (DeepSpeed loads them with
weights_only=False): a checkpoint is trusted input. lmforge's own files are JSON/YAML and
rng_rank<R>.pt, which loads with torch.load(weights_only=True).

Submodules: universal.py (resume on another SavedLayout through DeepSpeed's universal format),
consolidate.py (a checkpoint → a Hugging Face model directory), background.py (checkpoint.async:
save() returns after a host copy; the same files are written and published by a thread per rank).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import pickle
import random
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import xxhash

from ..config import Config, ConfigError, config_hash, incompatible_keys, yaml_load
from . import background

_STEP_DIR = re.compile(r"^step_(\d+)$")


def tag(step: int) -> str:
    """The name of step N's checkpoint directory (and of best.json's tag)."""
    return f"step_{step}"

# Directories derived from a checkpoint step_N, written beside it as step_N<suffix>: the one place
# their names are declared. save() drops them when step_N is written again, prune() with step_N.
DERIVED = {
    "universal": "_universal",  # universal.py: DeepSpeed's universal format, for a resume on another layout
    "hf": "_hf",                # consolidate.py: a Hugging Face copy, for model.init_from
}


def derived_dir(ckpt: Path, kind: str) -> Path:
    """Where the `kind` (a DERIVED key) of checkpoint `ckpt` lives: step_N → step_N<suffix>."""
    return ckpt.with_name(ckpt.name + DERIVED[kind])


def drop_derived(ckpt: Path) -> None:
    for kind in DERIVED:
        shutil.rmtree(derived_dir(ckpt, kind), ignore_errors=True)


def temp_dir(final: Path) -> Path:
    """Where `final` is written before publish(): `.tmp_<name>` beside it (never read as a checkpoint)."""
    return final.with_name(".tmp_" + final.name)


def source_id(ckpt: Path) -> str:
    """Identifies one save of `ckpt` (its manifest's hash): a derived directory stamped with it is current."""
    return hashlib.sha256((ckpt / "manifest.json").read_bytes()).hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


CHUNK = 8 << 20  # bytes read at a time when hashing


def file_hash(path: Path, progress=None) -> str:
    """xxh3_64 of a file's contents (hex), read in CHUNKs; progress(nbytes) after each."""
    h = xxhash.xxh3_64()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
            if progress is not None:
                progress(len(chunk))
    return h.hexdigest()


def shares(sizes: dict[str, int], n: int) -> list[list[str]]:
    """The files `sizes` (name → bytes) split into n shares of about equal bytes (largest first,
    each to the lightest share): the same split wherever it is computed from the same sizes."""
    parts: list[list[str]] = [[] for _ in range(n)]
    load = [0] * n
    for name in sorted(sizes, key=lambda k: (-sizes[k], k)):
        i = min(range(n), key=lambda j: (load[j], j))
        parts[i].append(name)
        load[i] += sizes[name]
    return parts


def hash_files(root: Path, names: list[str]) -> dict[str, str]:
    return {name: file_hash(root / name) for name in names}


def write_manifest(tmp: Path, step: int | None, hashes: dict[str, str] | None = None, **extra) -> None:
    """manifest.json in `tmp`: every file's size and xxh3 (what verify checks), `extra` keys before
    them. `hashes`: those already computed (by the ranks, in save); the rest are hashed here."""
    hashes = hashes or {}
    files = {}
    for p in sorted(tmp.rglob("*")):
        if p.is_file():
            name = str(p.relative_to(tmp))
            files[name] = {"size": p.stat().st_size, "xxh3": hashes.get(name) or file_hash(p)}
    _write_atomic(tmp / "manifest.json", json.dumps({"step": step, **extra, "files": files}, indent=1))


def read_manifest(path: Path) -> dict:
    """Checkpoint `path`'s manifest, its files as {name: {"size": N, "xxh3": hex}} ("xxh3" absent
    in a manifest written before hashes: {name: size}). Raises OSError, ValueError or KeyError."""
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["files"] = {name: (entry if isinstance(entry, dict) else {"size": entry})
                         for name, entry in manifest["files"].items()}
    return manifest


def checkpoint_size(path: Path) -> int | None:
    """Bytes in checkpoint `path` by its manifest; None without a readable one."""
    try:
        return sum(e["size"] for e in read_manifest(path)["files"].values())
    except (OSError, ValueError, KeyError, TypeError):
        return None


def publish(tmp: Path, final: Path, pointer: str) -> None:
    """Make the complete directory `tmp` (manifest written) visible as `final`, replacing an earlier
    one, then point the file `pointer` beside it at it: the pointer moves last."""
    _fsync_dir(tmp)
    if final.exists():  # re-saving (e.g. a resumed run reaching the same step again): replace whole
        shutil.rmtree(final)
    os.replace(tmp, final)
    _write_atomic(final.parent / pointer, final.name)
    _fsync_dir(final.parent)


def rng_state() -> dict:
    """This process's RNG states as tensors and plain numbers, so rng_rank<R>.pt loads with
    torch.load(weights_only=True) (no pickled numpy objects)."""
    version, internal, gauss_next = random.getstate()
    kind, key, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state = {"python": {"version": version, "state": torch.tensor(internal, dtype=torch.int64), "gauss_next": gauss_next},
             "numpy": {"kind": kind, "key": torch.from_numpy(key.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    """Restore rng_state()'s states, or those of a checkpoint written before it (python's and
    numpy's own state tuples)."""
    py, npy = state["python"], state["numpy"]
    if isinstance(py, dict):
        py = (py["version"], tuple(py["state"].tolist()), py["gauss_next"])
    if isinstance(npy, dict):
        npy = (npy["kind"], npy["key"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"], npy["cached_gaussian"])
    random.setstate(py)
    np.random.set_state(npy)
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_rng(path: Path, state: dict | None = None) -> None:
    """This rank's RNG state (rng_state(), or one taken earlier) to `path`, loadable weights_only."""
    torch.save(rng_state() if state is None else state, path)


def _numpy_rng_globals() -> list:
    """What an rng_rank<R>.pt written before rng_state() held tensors needs beyond torch's
    weights_only allowlist: numpy's state array (ndarray, rebuilt by _reconstruct, of dtype uint32),
    under numpy 1's and 2's module names."""
    reconstruct = np.zeros(1).__reduce__()[0]  # numpy.core (1.x) / numpy._core (2.x) .multiarray._reconstruct
    return [reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32)),
            (reconstruct, "numpy.core.multiarray._reconstruct"), (reconstruct, "numpy._core.multiarray._reconstruct")]


def load_rng(path: Path) -> dict:
    """rng_rank<R>.pt as set_rng_state takes it; always weights_only (never unpickles code)."""
    try:
        return torch.load(path, weights_only=True)
    except pickle.UnpicklingError:  # the old format: numpy's state as an ndarray
        with torch.serialization.safe_globals(_numpy_rng_globals()):
            return torch.load(path, weights_only=True)


def _has_frozen(engine) -> bool:
    """An adapter run: its checkpoints hold only the trainable parameters (save and load agree)."""
    return any(not p.requires_grad for p in engine.module.parameters())


class DiskFull(OSError):
    """The disk filled up during a checkpoint save (errno ENOSPC). Every rank raises it; the
    temporary directory is removed, earlier checkpoints are untouched."""

    def __init__(self, *args):
        # DiskFull(message) or OSError's (errno, message[, filename]), which unpickling passes
        super().__init__(*((errno.ENOSPC, *args) if len(args) == 1 else args))

    def __str__(self) -> str:
        return self.strerror or super().__str__()


def human_bytes(n: float) -> str:
    for unit, scale, digits in (("GiB", 1 << 30, 2), ("MiB", 1 << 20, 1), ("KiB", 1 << 10, 1)):
        if n >= scale:
            return f"{n / scale:.{digits}f} {unit}"
    return f"{int(n)} B"


def _mount_point(path: Path) -> Path:
    p = path.resolve()
    while not os.path.ismount(p):
        p = p.parent
    return p


def _disk_errors(e: BaseException) -> bool:
    """ENOSPC/EDQUOT anywhere in e's chain of causes."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return False


MIN_FREE = 1 << 20  # an error while less than this is free is taken for a full disk


@dataclass
class _Saving:
    """One save in progress, as every rank sees it; settle() is its collective error check."""
    final: Path
    rank: int
    world_size: int
    previous: int | None  # bytes of the newest published checkpoint (what this one will need)

    @property
    def tmp(self) -> Path:
        return temp_dir(self.final)

    def free(self) -> int:
        return shutil.disk_usage(self.final.parent).free

    def short_of_space(self) -> str:
        return (f"{human_bytes(self.free())} free on {_mount_point(self.final.parent)}, "
                + (f"the previous checkpoint took {human_bytes(self.previous)}" if self.previous
                   else "no previous checkpoint to compare with"))

    def disk_full(self, e: BaseException) -> bool:
        """Whether `e`, raised while writing the checkpoint, is the disk filling up: ENOSPC/EDQUOT,
        or, as torch's writer reports a full disk without an errno (`basic_ios::clear: iostream
        error`), any error while almost nothing is free or while what is free plus what this save
        already wrote falls short of the previous checkpoint."""
        if _disk_errors(e):
            return True
        try:
            free = self.free()
            written = sum(f.stat().st_size for f in self.tmp.rglob("*") if f.is_file()) if self.tmp.is_dir() else 0
        except OSError:  # no answer: not evidence of a full disk
            return False
        return free < MIN_FREE or (self.previous is not None and free + written < self.previous)

    def settle(self, errors: list[BaseException], payload=None) -> list:
        """Collective, after each phase of the save: every rank learns whether any rank's phase
        failed (`errors`: its own, first is the cause). If one did, rank 0 removes the temporary
        directory and every rank raises the same exception: DiskFull if a rank ran out of space,
        else a RuntimeError naming the rank and its error. Otherwise returns every rank's payload."""
        mine = None
        if errors:
            e = errors[0]
            mine = ("disk" if self.disk_full(e) else "error", f"{type(e).__name__}: {e}")
        got = [None] * self.world_size
        torch.distributed.all_gather_object(got, (mine, payload))
        failed = [(r, f) for r, (f, _) in enumerate(got) if f is not None]
        if not failed:
            return [p for _, p in got]
        disk = [r for r, (kind, _) in failed if kind == "disk"]
        message = [None]
        if self.rank == 0:  # all ranks are past their writes: nothing lands in it any more
            shutil.rmtree(self.tmp, ignore_errors=True)
            try:
                space = self.short_of_space()
            except OSError as e:  # the others wait in the broadcast below
                space = f"free space unknown ({e})"
            message[0] = (f"disk full while saving checkpoint {self.final}: {space}" if disk else
                          f"saving checkpoint {self.final} failed on rank {failed[0][0]}: {failed[0][1][1]}")
        torch.distributed.broadcast_object_list(message, src=0)
        cause = errors[0] if errors else None
        if disk:
            raise DiskFull(errno.ENOSPC, message[0], str(self.final)) from cause
        raise RuntimeError(message[0]) from cause


@contextlib.contextmanager
def _recorded(errors: list):
    """Run the block; an exception is appended to `errors` instead of raised (settled later)."""
    try:
        yield
    except Exception as e:  # noqa: BLE001 - every rank must reach settle(), whatever failed
        errors.append(e)


@contextlib.contextmanager
def _deepspeed_writes_recorded(engine, errors: list, pending: list | None = None,
                               live: Callable[[str], bool] = lambda path: False, slow_write_s: float = 0.0):
    """DeepSpeed's save_checkpoint runs collectives between its writes (ZeRO-3 gathers, a final
    barrier): a rank whose torch.save raised would leave the others waiting in them. Its writes go
    through engine.checkpoint_engine.save; a failed one is recorded instead, so every rank completes
    the same collectives and settle() decides (docs/deepspeed_workarounds.md#failed-writes).
    `pending` (checkpoint.async): each write becomes (the state, path, live), written later: the
    state a host copy, or for `live(path)` files the same tensors (background.LIVE_FILES)."""
    ce = engine.checkpoint_engine
    own = "save" in vars(ce)
    original = ce.save

    def save(state_dict, path):
        with _recorded(errors):
            if pending is None:
                time.sleep(slow_write_s)  # LMFORGE_FAULT_SLOW_WRITE
                original(state_dict, path)
            else:
                is_live = live(path)
                pending.append((background.snapshot(state_dict, live=is_live), path, is_live))

    ce.save = save
    try:
        yield
    finally:
        if own:
            ce.save = original
        else:
            del ce.save


def save(engine, cfg: Config, step: int, client: dict, rank: int, world_size: int, log,
         write_extra=None, fault=None, in_background: "background.Background | None" = None,
         slow_write_s: float = 0.0) -> Path:
    """Collective: every rank calls it. Returns the published directory. `write_extra(tmp_dir)`
    is called on every rank after DeepSpeed's save (it may gather; rank 0 writes) and may return
    a function doing the rest of its writes, which needs no collective (async: the writer thread
    runs it, with the RNG state's file); `fault()` once
    DeepSpeed's files are written (training/faults.py). Raises DiskFull on every rank if the disk
    fills up (the temporary directory removed), RuntimeError on every rank for another failure of
    any rank. `in_background` (checkpoint.async): returns once the state is copied to host memory;
    the checkpoint is published by the ranks' threads, and in_background.wait() reports the outcome.
    `slow_write_s` (LMFORGE_FAULT_SLOW_WRITE): each of DeepSpeed's files takes that much longer to write."""
    if in_background is not None:
        in_background.wait()  # at most one save in flight
    root = cfg.checkpoint_dir
    root.mkdir(parents=True, exist_ok=True)
    final = root / tag(step)
    previous = next((s for s in map(checkpoint_size, steps(root)) if s is not None), None)
    saving = _Saving(final, rank, world_size, previous)
    tmp = saving.tmp
    if rank == 0:
        if tmp.exists():
            shutil.rmtree(tmp)  # left by a crash mid-save
        if previous is not None and saving.free() < previous:
            log.warning(f"checkpoint {final} may not fit: {saving.short_of_space()}")
    torch.distributed.barrier()
    client = dict(client, step=step, world_size=world_size, config_hash=config_hash(cfg))

    # 1. every rank writes its files (or, in the background, copies what it would write); failures
    # are settled together, after DeepSpeed's collectives
    errors: list[BaseException] = []
    pending = [] if in_background is not None else None
    live = in_background.live if in_background is not None else (lambda path: False)
    with _recorded(errors), _deepspeed_writes_recorded(engine, errors, pending, live, slow_write_s):
        # An adapter run saves only what trains; the frozen base is rebuilt from model.init_from.
        engine.save_checkpoint(str(root), tag=tmp.name, client_state={"lmforge": client}, save_latest=False,
                               exclude_frozen_parameters=_has_frozen(engine))
    rng = rng_state()
    later = [lambda: save_rng(tmp / f"rng_rank{rank}.pt", rng)]  # this rank's writes that need no collective
    if write_extra is not None:
        with _recorded(errors):
            later.append(write_extra(tmp) or (lambda: None))
    if pending is None:
        with _recorded(errors):
            for write in later:
                write()
    saving.settle(errors)
    if pending is not None:
        in_background.start(saving, lambda: _write_and_publish(engine.checkpoint_engine.save, pending, later, saving,
                                                               cfg, client, fault, in_background, log, slow_write_s))
        return final
    if fault is not None:
        fault()

    # 2. rank 0 lists what was written (one listing for all: a shared filesystem's directory
    # cache may lag on other nodes)
    sizes = None
    if rank == 0:
        with _recorded(errors):
            sizes = _written(tmp, world_size)
    sizes = saving.settle(errors, sizes)[0]

    # 3. each rank hashes a share, while the files are in page cache: rank 0 alone would read it all
    mine = {}
    with _recorded(errors):
        mine = hash_files(tmp, shares(sizes, world_size)[rank])
    hashes = {name: h for part in saving.settle(errors, mine) for name, h in part.items()}

    # 4. rank 0 completes and publishes it
    if rank == 0:
        with _recorded(errors):
            _complete(tmp, final, step, client, cfg, hashes, log)
    saving.settle(errors)
    return final


def _written(tmp: Path, world_size: int) -> dict[str, int]:
    """Every file of the save in `tmp` and its size; RuntimeError if a rank's files are missing."""
    missing = [f"rng_rank{r}.pt" for r in range(world_size) if not (tmp / f"rng_rank{r}.pt").is_file()]
    if missing or not any(tmp.glob("*model_states.pt")):
        raise RuntimeError(f"checkpoint {tmp} is incomplete after save (missing {missing or 'model states'})")
    return {str(p.relative_to(tmp)): p.stat().st_size for p in tmp.rglob("*") if p.is_file()}


def _complete(tmp: Path, final: Path, step: int, client: dict, cfg: Config, hashes: dict[str, str], log) -> None:
    """Rank 0: lmforge's files and the manifest, then publish, then prune."""
    (tmp / "client.json").write_text(json.dumps(client, indent=1))
    (tmp / "config.yaml").write_text(cfg.to_yaml())
    write_manifest(tmp, step, hashes)
    supersede_abandoned(final.parent, cfg, log)  # after a rollback: the abandoned newer ones move aside first
    drop_derived(final)  # converted from the save of this step being replaced: stale
    publish(tmp, final, "latest")
    prune(final.parent, cfg.checkpoint.keep)
    log.info(f"checkpoint saved: {final}")


def _write_and_publish(write, pending: list, later: list, saving: "_Saving", cfg: Config, client: dict, fault,
                       in_background: "background.Background", log, slow_write_s: float = 0.0) -> None:
    """A rank's background thread (checkpoint.async): write the live tensors (the next optimizer
    step waits for them), then the copies and the `later` writes (RNG state, Hugging Face files),
    hash them, leave the marker; rank 0 then waits for every rank's marker and completes and
    publishes the checkpoint."""
    tmp, error, hashes = saving.tmp, None, None
    own = sorted({str(Path(path).relative_to(tmp)) for _, path, _ in pending} | {f"rng_rank{saving.rank}.pt"})
    try:
        for only_live in (True, False):
            for state, path, is_live in pending:
                if is_live == only_live:
                    time.sleep(slow_write_s)  # LMFORGE_FAULT_SLOW_WRITE
                    write(state, path)
            if only_live:
                in_background.live_written()
        pending.clear()  # the host copies go as soon as they are on disk
        for write_rest in later:
            write_rest()
        if fault is not None:
            fault()
        hashes = hash_files(tmp, own)  # while in page cache; rank 0's manifest hashes the rest
    except Exception as e:  # noqa: BLE001 - rank 0 learns it from the marker, every rank from wait()
        error = e
    background.write_marker(tmp, saving.rank, hashes, error)
    if error is not None:
        raise error
    if saving.rank == 0:
        hashes = background.collect_markers(tmp, saving.world_size, in_background.timeout_s)
        _written(tmp, saving.world_size)
        _complete(tmp, saving.final, int(client["step"]), client, cfg, hashes, log)


def prune(root: Path, keep: int) -> None:
    """Keep the newest `keep` checkpoints (and the early-stopping best); the rest go with their derived dirs."""
    best = (read_best(root) or {}).get("tag")
    for old in steps(root)[keep:]:
        if old.name == best:
            continue  # the early-stopping best is kept beyond checkpoint.keep
        shutil.rmtree(old, ignore_errors=True)
        drop_derived(old)


def mark_best(root: Path, tag: str, metric: str, value: float, step: int) -> None:
    """Rank 0: record `tag` as the best checkpoint (best.json, written atomically)."""
    _write_atomic(root / "best.json", json.dumps({"tag": tag, "metric": metric, "value": value, "step": step}))


def read_best(root: Path) -> dict | None:
    try:
        return json.loads((root / "best.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _step_dirs(root: Path) -> list[Path]:
    """The step_N directories under root (published or not; derived and temporary ones excluded)."""
    return [p for p in root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name)] if root.is_dir() else []


def steps(root: Path) -> list[Path]:
    """The step_N directories under root, newest first (complete or not: see verify)."""
    return sorted(_step_dirs(root), key=lambda p: -int(_STEP_DIR.match(p.name).group(1)))


def verify(path: Path, contents: bool = False, part: tuple[int, int] | None = None, progress=None) -> str | None:
    """None if the checkpoint matches its manifest, else the reason it does not (never raises).
    Sizes only by default (cheap: what find_latest checks); contents=True also hashes the files
    (a manifest written before hashes has sizes only). part=(i, n): only the i-th of n shares of
    the files, so n ranks verify one checkpoint together (verify_contents_collective).
    progress(nbytes) is called as files are read."""
    if not (path / "manifest.json").is_file():
        return "no manifest.json (incomplete save)"
    try:
        files = read_manifest(path)["files"]
        sizes = {name: int(entry["size"]) for name, entry in files.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        return f"unreadable manifest.json ({type(e).__name__}: {e})"
    names = list(files)
    if part is not None:
        share = set(shares(sizes, part[1])[part[0]])
        names = [n for n in names if n in share]
    for name in names:
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != sizes[name]:
            return f"{name} has {f.stat().st_size} bytes, the manifest says {sizes[name]}"
    if contents:
        for name in names:
            expected = files[name].get("xxh3")
            if expected is None:
                continue
            try:
                actual = file_hash(path / name, progress)
            except OSError as e:
                return f"{name} could not be read ({e})"
            if actual != expected:
                return f"{name} does not match its content hash (xxh3 {actual}, the manifest says {expected})"
    return None


def verify_contents_collective(path: Path, rank: int, world_size: int) -> str | None:
    """Collective: every rank checks sizes and hashes of its share of checkpoint `path`'s files;
    every rank returns the same answer, the first problem found (by rank) or None."""
    try:
        problem = verify(Path(path), contents=True, part=(rank, world_size))
    except Exception as e:  # noqa: BLE001 - the others are waiting in the gather below
        problem = f"verifying on rank {rank} failed: {type(e).__name__}: {e}"
    got = [None] * world_size
    torch.distributed.all_gather_object(got, problem)
    return next((p for p in got if p is not None), None)


def find_latest(root: Path, log, older_than: Path | None = None) -> Path | None:
    """Newest complete checkpoint under root (by sizes), or the newest older than `older_than` (a
    checkpoint found broken later, e.g. by its hashes); broken ones are skipped with a warning."""
    candidates = steps(root)
    if older_than is not None:
        names = [p.name for p in candidates]
        candidates = candidates[names.index(older_than.name) + 1:] if older_than.name in names else []
    for path in candidates:
        problem = verify(path)
        if problem is None:
            return path
        log.warning(f"skipping checkpoint {path}: {problem}")
    return None


# --------------------------------------------------------------------------- rolling back on purpose

ROLLBACK_FILE = "rollback.json"  # beside the steps: the rollback this run did (checkpoint.resume=step_N)


def chosen(cfg: Config) -> Path | None:
    """checkpoint.resume as a directory when it names one (step_N under checkpoint.dir, or a path)."""
    r = cfg.checkpoint.resume
    if r in ("auto", "never"):
        return None
    return Path(cfg.checkpoint_dir) / r if _STEP_DIR.match(r) else Path(r).expanduser()


def _step_of(path: Path) -> int:
    m = _STEP_DIR.match(path.name)
    return int(m.group(1)) if m else int(read_manifest(path)["step"])


def _newer(root: Path, target: Path) -> list[Path]:
    """The checkpoints of `root` of a later step than `target`."""
    k = _step_of(target)
    return [p for p in steps(root) if _step_of(p) > k]


def _done_rollback(root: Path, target: Path) -> dict | None:
    """The record of the rollback to `target` if this run directory already published after it."""
    try:
        rec = json.loads((root / ROLLBACK_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return rec if rec.get("to") == str(target.resolve()) else None


def resume_choice(cfg: Config, log) -> Path | None:
    """The checkpoint this start resumes from, per checkpoint.resume: auto, the newest complete one;
    never, none; step_N or a path, that one (a ConfigError if it is not complete). Once a rollback
    has published its first checkpoint, the same setting continues that new timeline (a restart, a
    requeue or the same command again continue, not repeat, the rollback)."""
    root, r = Path(cfg.checkpoint_dir), cfg.checkpoint.resume
    if r == "never":
        return None
    target = chosen(cfg)
    if target is None:
        return find_latest(root, log)
    done = _done_rollback(root, target)
    if done is not None:
        latest = find_latest(root, log)
        log.info(f"checkpoint.resume={r}: rolled back to it at {done['time']} (abandoned checkpoints in "
                 f"{done['superseded'] or 'none'}); continuing this timeline from {latest}")
        return latest
    problem = verify(target) if target.is_dir() else "does not exist"
    if problem is not None:
        have = ", ".join(p.name for p in steps(root) if verify(p) is None) or "none"
        raise ConfigError(f"checkpoint.resume={r}: {target}: {problem} (complete checkpoints in {root}: {have})")
    newer = [p.name for p in _newer(root, target)]
    if newer:
        log.warning(f"checkpoint.resume={r}: rolling back to {target}; the newer {', '.join(newer)} stay untouched "
                    f"until this run publishes its first checkpoint, then move to {root}/superseded-<time>/")
    return target


def supersede_abandoned(root: Path, cfg: Config, log) -> None:
    """Rank 0, before this run publishes a checkpoint: after a rollback (checkpoint.resume=step_N or
    a path), the first publish moves the checkpoints newer than the one rolled back to (with their
    derived dirs, and best.json if it names one of them) into superseded-<time>/, where neither a
    resume nor checkpoint.keep's pruning looks, and records the rollback in rollback.json."""
    target = chosen(cfg)
    if target is None or _done_rollback(root, target) is not None:
        return
    newer = _newer(root, target)
    now = time.strftime("%Y%m%d-%H%M%S")
    dest = None
    if newer:
        dest = root / f"superseded-{now}"
        dest.mkdir()
        best = read_best(root)
        for p in newer:
            for d in (p, *(derived_dir(p, kind) for kind in DERIVED)):
                if d.exists():
                    os.replace(d, dest / d.name)
            if best and best.get("tag") == p.name:
                os.replace(root / "best.json", dest / "best.json")
        _fsync_dir(root)
        log.warning(f"checkpoint.resume={cfg.checkpoint.resume}: this run publishes its first checkpoint after "
                    f"rolling back to {target.name}; the abandoned {', '.join(p.name for p in newer)} moved to {dest}")
    _write_atomic(root / ROLLBACK_FILE, json.dumps({"to": str(target.resolve()), "step": _step_of(target),
                                                   "time": now, "superseded": str(dest) if dest else None}))


def check_compatible(path: Path, cfg: Config, world_size: int) -> None:
    """Refuse to resume a checkpoint written by an incompatible config, naming why. Another layout
    (world size, ZeRO stage, TP or SP degree) is no reason: see layout_change."""
    saved = yaml_load((path / "config.yaml").read_text(), path / "config.yaml")
    diff = incompatible_keys(saved, cfg.to_dict())
    if diff and not cfg.checkpoint.allow_config_change:
        keys = "; ".join(f"{k}: {a!r} in the checkpoint, {b!r} now" for k, (a, b) in diff.items())
        raise IncompatibleCheckpoint(
            f"{path} was written by a different config ({keys}). Use a new run_dir, or pass "
            "checkpoint.allow_config_change=true to resume anyway")


class IncompatibleCheckpoint(ValueError):
    pass


@dataclass(frozen=True)
class SavedLayout:
    """How a run's ranks hold the model and optimizer state: what DeepSpeed's sharded checkpoint
    files depend on besides the config (the config's keys for it are no incompatibility)."""
    world_size: int
    zero_stage: int
    tensor: int = 1
    sequence: int = 1

    @classmethod
    def of(cls, cfg: Config, world_size: int) -> "SavedLayout":
        """The layout a run of `cfg` on `world_size` ranks saves with."""
        p = cfg.parallel
        return cls(world_size, p.zero_stage, p.tensor, p.sequence)

    @classmethod
    def read(cls, path: Path) -> "SavedLayout":
        """The layout that wrote checkpoint `path` (client.json: ranks; config.yaml: the rest)."""
        p = yaml_load((path / "config.yaml").read_text(), path / "config.yaml").get("parallel", {})
        return cls(json.loads((path / "client.json").read_text())["world_size"], p.get("zero_stage", 3),
                   p.get("tensor", 1), p.get("sequence", 1))

    def __str__(self) -> str:
        return (f"{self.world_size} rank(s), ZeRO-{self.zero_stage}"
                + (f", TP={self.tensor}" if self.tensor > 1 else "") + (f", SP={self.sequence}" if self.sequence > 1 else ""))

    def overrides(self) -> str:
        return (f"--nproc {self.world_size} parallel.zero_stage={self.zero_stage} "
                f"parallel.tensor={self.tensor} parallel.sequence={self.sequence}")


@dataclass(frozen=True)
class LayoutChange:
    saved: SavedLayout
    now: SavedLayout

    def __str__(self) -> str:
        return f"{self.saved}; this run: {self.now}"


def layout_change(path: Path, cfg: Config, world_size: int) -> LayoutChange | None:
    """How the layout that wrote `path` differs from this run's; None: the same. DeepSpeed loads
    its sharded files only on the layout that wrote them (docs/deepspeed_workarounds.md#same-layout-only);
    another one resumes through universal.load, after universal.unsupported in preflight."""
    saved, now = SavedLayout.read(path), SavedLayout.of(cfg, world_size)
    return None if saved == now else LayoutChange(saved, now)


def load(engine, path: Path, rank: int) -> dict:
    """Collective: restore engine (model, optimizer, scheduler) and this rank's RNG; returns client state."""
    client = json.loads((path / "client.json").read_text())
    load_path, _ = engine.load_checkpoint(str(path.parent), tag=path.name, load_optimizer_states=True,
                                          load_lr_scheduler_states=True, load_module_strict=not _has_frozen(engine))
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load {path}")
    set_rng_state(load_rng(path / f"rng_rank{rank}.pt"))
    return client
