"""Atomic, verified, sharded checkpoints on top of DeepSpeed's own save/load.

    lmforge train configs/debug.yaml checkpoint.interval=5    # writes runs/debug/checkpoints/step_5, …

Layout of one checkpoint directory (`<checkpoint_dir>/step_N/`):
  DeepSpeed's sharded files (model + optimizer partitions of every rank),
  rng_rank<R>.pt   the RNG state of every rank,
  client.json      step, tokens seen, sampler position, config hash,
  config.yaml      the resolved run config that wrote it,
  hf/              the model's Hugging Face config and the tokenizer (for export / init_from),
  adapter/         peft runs: the adapter as peft writes it (the DeepSpeed files then hold only
                   the trainable parameters: the frozen base comes from model.init_from),
  manifest.json    every file's size; written last, so its presence means "complete".

`best.json` (beside `latest`) names the checkpoint with the best eval.early_stopping.metric;
pruning never removes it.

Every rank writes into `.tmp_step_N`; after a barrier rank 0 verifies the files, writes the
manifest and publishes the directory by rename; `latest` (DeepSpeed's pointer file, so its
zero_to_fp32.py works on the directory) moves last. A reader never sees half a checkpoint, and a
directory whose files do not match its manifest (truncated copy, crash mid-write) is skipped with a
warning in favour of the previous one.

DeepSpeed loads these sharded files only on the layout that wrote them: the same world size, ZeRO
stage, tensor-parallel and sequence-parallel degree (across ZeRO stages it fails with a bare
AssertionError in check_ckpt_list). `layout_change` says how a checkpoint's layout (client.json's
world size, config.yaml's parallel section) differs from this run's; such a checkpoint is resumed
through DeepSpeed's universal format: training/universal.py converts `step_N` once into
`step_N_universal` beside it (pruned with it), or refuses in preflight what DeepSpeed cannot load.
The layout keys are therefore not config incompatibilities (config.COMPAT_KEYS).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .config import Config, config_hash, incompatible_keys, yaml_load

_STEP_DIR = re.compile(r"^step_(\d+)$")


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
    tmp_tag, tag = f".tmp_step_{step}", f"step_{step}"
    tmp = root / tmp_tag
    if rank == 0 and tmp.exists():
        shutil.rmtree(tmp)  # left by a crash mid-save
    torch.distributed.barrier()
    client = dict(client, step=step, world_size=world_size, config_hash=config_hash(cfg))
    # An adapter run saves only what trains; the frozen base is rebuilt from model.init_from.
    engine.save_checkpoint(str(root), tag=tmp_tag, client_state={"lmforge": client}, save_latest=False,
                           exclude_frozen_parameters=_has_frozen(engine))
    torch.save(rng_state(), tmp / f"rng_rank{rank}.pt")
    if write_extra is not None:
        write_extra(tmp)
    torch.distributed.barrier()
    final = root / tag
    if rank == 0:
        missing = [f"rng_rank{r}.pt" for r in range(world_size) if not (tmp / f"rng_rank{r}.pt").is_file()]
        if missing or not any(tmp.glob("*model_states.pt")):
            raise RuntimeError(f"checkpoint {tmp} is incomplete after save (missing {missing or 'model states'})")
        (tmp / "client.json").write_text(json.dumps(client, indent=1))
        (tmp / "config.yaml").write_text(cfg.to_yaml())
        files = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
        _write_atomic(tmp / "manifest.json", json.dumps({"step": step, "files": files}, indent=1))
        _fsync_dir(tmp)
        if final.exists():  # re-saving a step (e.g. resumed run reaching it again): replace whole
            shutil.rmtree(final)
        # a universal conversion of the step being replaced (universal.py) would be stale
        shutil.rmtree(root / f"{tag}_universal", ignore_errors=True)
        shutil.rmtree(root / f"{tag}_hf", ignore_errors=True)  # consolidate.py's copy for init_from
        os.replace(tmp, final)
        _write_atomic(root / "latest", tag)
        _fsync_dir(root)
        _prune(root, cfg.checkpoint.keep)
        log.info(f"checkpoint saved: {final}")
    torch.distributed.barrier()
    return final


def _prune(root: Path, keep: int) -> None:
    steps = sorted(_step_dirs(root), key=lambda p: int(_STEP_DIR.match(p.name).group(1)))
    best = (read_best(root) or {}).get("tag")
    for old in steps[:-keep]:
        if old.name == best:
            continue  # the early-stopping best is kept beyond checkpoint.keep
        shutil.rmtree(old, ignore_errors=True)
        shutil.rmtree(old.with_name(old.name + "_universal"), ignore_errors=True)  # universal.py's conversion
        shutil.rmtree(old.with_name(old.name + "_hf"), ignore_errors=True)  # consolidate.py's


def mark_best(root: Path, tag: str, metric: str, value: float, step: int) -> None:
    """Rank 0: record `tag` as the best checkpoint (best.json, written atomically)."""
    _write_atomic(root / "best.json", json.dumps({"tag": tag, "metric": metric, "value": value, "step": step}))


def read_best(root: Path) -> dict | None:
    try:
        return json.loads((root / "best.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _step_dirs(root: Path) -> list[Path]:
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
    saved = yaml_load((path / "config.yaml").read_text())
    diff = incompatible_keys(saved, cfg.to_dict())
    if diff and not cfg.checkpoint.allow_config_change:
        keys = "; ".join(f"{k}: {a!r} in the checkpoint, {b!r} now" for k, (a, b) in diff.items())
        raise IncompatibleCheckpoint(
            f"{path} was written by a different config ({keys}). Use a new run_dir, or pass "
            "checkpoint.allow_config_change=true to resume anyway")


class IncompatibleCheckpoint(ValueError):
    pass


@dataclass(frozen=True)
class Layout:
    """How a run's ranks hold the model and optimizer state: what DeepSpeed's sharded checkpoint
    files depend on besides the config."""
    world_size: int
    zero_stage: int
    tensor: int = 1
    sequence: int = 1

    @classmethod
    def of(cls, cfg: Config, world_size: int) -> "Layout":
        p = cfg.parallel
        return cls(world_size, p.zero_stage, p.tensor, p.sequence)

    @classmethod
    def saved(cls, path: Path) -> "Layout":
        """The layout that wrote checkpoint `path` (client.json: ranks; config.yaml: the rest)."""
        p = yaml_load((path / "config.yaml").read_text()).get("parallel", {})
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
    saved: Layout
    now: Layout

    def __str__(self) -> str:
        return f"{self.saved}; this run: {self.now}"


def layout_change(path: Path, cfg: Config, world_size: int) -> LayoutChange | None:
    """How the layout (world size, ZeRO stage, TP and SP degree) that wrote `path` differs from this
    run's; None: the same. DeepSpeed loads its sharded files only on the layout that wrote them
    (across ZeRO stages it fails with a bare AssertionError in check_ckpt_list); another one
    resumes through the universal format (training/universal.py), which refuses what DeepSpeed
    cannot load (universal.unsupported)."""
    saved, now = Layout.saved(path), Layout.of(cfg, world_size)
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
