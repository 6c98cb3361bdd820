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
  manifest.json    every file's size; written last, so its presence means "complete".
Beside the steps: `latest` (DeepSpeed's pointer file, so its zero_to_fp32.py works on the
directory), `best.json` (the checkpoint with the best eval.early_stopping.metric, never pruned) and
the directories derived from a step (DERIVED: `step_N_universal`, `step_N_hf`), which are stale
when their step is saved again and pruned with it.

Publishing: everything is written into `.tmp_<name>` (temp_dir), then the manifest, fsync, one
rename, and the pointer file moves last (publish). A reader never sees half a checkpoint; one whose
files do not match its manifest (truncated copy, crash mid-write) is skipped with a warning.

Submodules: universal.py (resume on another SavedLayout through DeepSpeed's universal format),
consolidate.py (a checkpoint → a Hugging Face model directory).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..config import Config, config_hash, incompatible_keys, yaml_load

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


def write_manifest(tmp: Path, step: int | None, **extra) -> None:
    """manifest.json in `tmp`: every file's size (what verify checks), `extra` keys before them."""
    files = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
    _write_atomic(tmp / "manifest.json", json.dumps({"step": step, **extra, "files": files}, indent=1))


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
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _has_frozen(engine) -> bool:
    """An adapter run: its checkpoints hold only the trainable parameters (save and load agree)."""
    return any(not p.requires_grad for p in engine.module.parameters())


def save(engine, cfg: Config, step: int, client: dict, rank: int, world_size: int, log,
         write_extra=None) -> Path:
    """Collective: every rank calls it. Returns the published directory. `write_extra(tmp_dir)`
    is called on every rank after DeepSpeed's save (it may gather; rank 0 writes)."""
    root = cfg.checkpoint_dir
    root.mkdir(parents=True, exist_ok=True)
    final = root / tag(step)
    tmp = temp_dir(final)
    if rank == 0 and tmp.exists():
        shutil.rmtree(tmp)  # left by a crash mid-save
    torch.distributed.barrier()
    client = dict(client, step=step, world_size=world_size, config_hash=config_hash(cfg))
    # An adapter run saves only what trains; the frozen base is rebuilt from model.init_from.
    engine.save_checkpoint(str(root), tag=tmp.name, client_state={"lmforge": client}, save_latest=False,
                           exclude_frozen_parameters=_has_frozen(engine))
    torch.save(rng_state(), tmp / f"rng_rank{rank}.pt")
    if write_extra is not None:
        write_extra(tmp)
    torch.distributed.barrier()
    if rank == 0:
        missing = [f"rng_rank{r}.pt" for r in range(world_size) if not (tmp / f"rng_rank{r}.pt").is_file()]
        if missing or not any(tmp.glob("*model_states.pt")):
            raise RuntimeError(f"checkpoint {tmp} is incomplete after save (missing {missing or 'model states'})")
        (tmp / "client.json").write_text(json.dumps(client, indent=1))
        (tmp / "config.yaml").write_text(cfg.to_yaml())
        write_manifest(tmp, step)
        drop_derived(final)  # converted from the save of this step being replaced: stale
        publish(tmp, final, "latest")
        prune(root, cfg.checkpoint.keep)
        log.info(f"checkpoint saved: {final}")
    torch.distributed.barrier()
    return final


def prune(root: Path, keep: int) -> None:
    """Keep the newest `keep` checkpoints (and the early-stopping best); the rest go with their derived dirs."""
    steps = sorted(_step_dirs(root), key=lambda p: int(_STEP_DIR.match(p.name).group(1)))
    best = (read_best(root) or {}).get("tag")
    for old in steps[:-keep]:
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


def verify(path: Path) -> str | None:
    """None if the checkpoint matches its manifest, else the reason it does not."""
    manifest = path / "manifest.json"
    if not manifest.is_file():
        return "no manifest.json (incomplete save)"
    try:
        files = json.loads(manifest.read_text())["files"]
    except (json.JSONDecodeError, KeyError) as e:
        return f"unreadable manifest.json ({e})"
    for name, size in files.items():
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != size:
            return f"{name} has {f.stat().st_size} bytes, the manifest says {size}"
    return None


def find_latest(root: Path, log) -> Path | None:
    """Newest complete checkpoint under root; broken ones are skipped with a warning."""
    for path in sorted(_step_dirs(root), key=lambda p: -int(_STEP_DIR.match(p.name).group(1))):
        problem = verify(path)
        if problem is None:
            return path
        log.warning(f"skipping checkpoint {path}: {problem}")
    return None


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
    set_rng_state(torch.load(path / f"rng_rank{rank}.pt", weights_only=False))
    return client
