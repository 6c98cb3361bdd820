"""One resume decision for all ranks: rank 0 chooses the checkpoint, every rank checks that it sees
that same complete directory (the same manifest), and a rank that does not fails the job at once,
naming the path and the rank — never a split resume (rank 0 at step 300, rank 1 at step 400, both
waiting in different collectives forever). Runs inside the ranks, right after their preflight.

    lmforge train configs/debug.yaml --nproc 2      # a second start resumes where rank 0 says
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from . import checkpoint
from .config import Config, build_ds_config
from .preflight import Prepared, resume_point


class SplitResume(RuntimeError):
    """Ranks do not see the checkpoint rank 0 chose: the job fails at once on every rank."""


def _manifest_id(path: Path) -> str | None:
    try:
        return checkpoint.source_id(path)
    except OSError:
        return None


def _seen_by_this_rank(root: Path, name: str, manifest: str) -> str | None:
    """None if this rank sees checkpoint `name` complete and with rank 0's manifest, else what it sees."""
    path = root / name
    if not path.is_dir():
        return f"{path} does not exist"
    if _manifest_id(path) != manifest:
        return f"{path}/manifest.json differs from the one rank 0 read"
    return checkpoint.verify(path)


def agree(cfg: Config, plan: Prepared, rank: int, world_size: int, log) -> Prepared:
    """Collective: the plan with rank 0's resume point on every rank, or SplitResume everywhere.
    The chosen checkpoint's contents are verified against its manifest's hashes by all ranks, each
    reading a share; a corrupt one is skipped for the next older one, as a truncated one is."""
    # checkpoint.resume may name a checkpoint outside this run's directory (a path)
    root = plan.resume_from.parent if plan.resume_from is not None else Path(cfg.checkpoint_dir)
    mine = plan.resume_from.name if plan.resume_from is not None else None
    candidate = plan.resume_from
    while True:
        name, chosen = _agree_on(candidate, root, rank, world_size)
        problem = checkpoint.verify_contents_collective(root / name, rank, world_size) if name else None
        if problem is None:
            break
        if candidate is not None and candidate == checkpoint.chosen(cfg):  # asked for by name: no other one
            raise RuntimeError(f"checkpoint.resume={cfg.checkpoint.resume}: {chosen} is broken: {problem}")
        log.warning(f"skipping checkpoint {chosen}: {problem}")
        candidate = checkpoint.find_latest(root, log, older_than=root / name)  # rank 0's is the one used
    others = {r: m for r, m in enumerate(_all(mine, world_size)) if m != name}
    if others:  # e.g. storage that showed ranks different moments: they follow rank 0
        log.warning("resume: " + ", ".join(f"rank {r} found {m or 'no checkpoint'}" for r, m in others.items())
                    + f"; all ranks resume from rank 0's choice, {name or 'none (a fresh start)'}")
    if name == mine:
        return plan
    resume = root / name if name is not None else None
    base = build_ds_config(cfg, world_size, plan.runtime.precision)
    change, ds_config = resume_point(cfg, world_size, resume, base, log)
    return replace(plan, resume_from=resume, layout_change=change, ds_config=ds_config)


def _all(value, world_size: int) -> list:
    out: list = [None] * world_size
    torch.distributed.all_gather_object(out, value)
    return out


def _agree_on(candidate: Path | None, root: Path, rank: int, world_size: int) -> tuple[str | None, str]:
    """Rank 0's `candidate` on every rank (its name and rank 0's path), once every rank has checked
    that it sees the same complete directory; else SplitResume on every rank."""
    choice = [candidate.name if candidate is not None else None,
              _manifest_id(candidate) if candidate is not None else None, str(candidate)]
    torch.distributed.broadcast_object_list(choice, src=0)
    name, manifest, chosen = choice  # chosen: rank 0's path, for messages
    problem = _seen_by_this_rank(root, name, manifest) if name is not None else None
    bad = {r: p for r, p in enumerate(_all(problem, world_size)) if p is not None}
    if bad:
        raise SplitResume(f"rank 0 resumes from {chosen}, but " + "; ".join(
            f"rank {r} cannot: {p}" for r, p in sorted(bad.items())) + ". Every rank must see the same checkpoint "
            "directory (shared storage, one run per run_dir); not resuming rather than splitting the job")
    return name, chosen
