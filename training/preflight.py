"""Preflight: every check that bad config or bad data can fail, before any rank or GPU starts.
The launchers run it on the driver (the only training module they import besides config); each
rank runs it again, cheaply (data are cached), for starts without lmforge's launcher (torchrun, srun).

    lmforge prepare configs/sft.yaml        # the data part alone: tokenize and cache, print the rows
    lmforge train configs/debug.yaml data.seq_len=100000    # "config error: data.seq_len … exceeds …", exit 2

It also re-exports what a driver needs of the rank side's conventions (the stop file, exit 75,
the rank-0 logger, a free port, the run-directory lock, a child that dies with its parent), so that
a launcher imports nothing else of training/.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from . import arithmetic, checkpoint, distill as distill_lib, dist, hub, model as model_lib, parallel, tasks as tasks_lib
from .config import Config, ConfigError, build_ds_config
from .dist import (EXIT_DIVERGED, EXIT_HUNG, EXIT_STOPPED, STOP_SIGNALS, free_port, get_logger,  # noqa: F401 (driver API)
                   request_stop, stop_file)
from .runstate import read_failure, record_failure  # noqa: F401 (driver API)
from .leftovers import die_with_parent  # noqa: F401 (driver API)
from .hub import resolve_ids  # noqa: F401 (driver API: `lmforge prepare` reads the models a config names)
from .runlock import ENV as RUN_LOCK_ENV, RunDirInUse, check_free as check_run_dir_free, hold as hold_run_dir  # noqa: F401

__all__ = ["EXIT_DIVERGED", "EXIT_HUNG", "EXIT_STOPPED", "RUN_LOCK_ENV", "STOP_SIGNALS", "Prepared", "RunDirInUse",
           "check_run_dir_free", "die_with_parent", "find_latest", "free_port", "get_logger", "hold_run_dir", "preflight",
           "prepare_data", "read_failure", "record_failure", "resolve_ids", "request_stop", "resume_point", "select_runtime", "stop_file"]
find_latest = checkpoint.find_latest  # the newest complete checkpoint: what a restarted job resumes from


@dataclass
class Prepared:
    """What preflight established: everything a rank needs that could have failed on bad input."""
    runtime: dist.Runtime
    data: tasks_lib.TaskData             # the task's tokenizer and train/eval examples (tasks.prepare)
    hf_config: object
    ds_config: dict
    resume_from: Path | None
    layout_change: checkpoint.LayoutChange | None = None  # resume_from's layout differs: universal resume
    cfg: Config | None = None      # the config with Hub ids replaced by their snapshot directories (hub.py)
    pinned: Config | None = None   # the config with Hub ids pinned to the commits resolved: for the ranks


def select_runtime(cfg: Config) -> dist.Runtime:
    """The device, backend, precision and attention this machine runs the config with."""
    try:
        return dist.select_runtime(cfg.train.precision, cfg.model.attention)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def prepare_data(cfg: Config, log) -> tuple[tasks_lib.TaskData, Path | None]:
    """The task's data, tokenized and cached (`lmforge prepare`), and model.init_from's config and
    tokenizer directory (its weights are consolidated later, in the ranks)."""
    meta = None
    if cfg.model.init_from:
        from .checkpoint.consolidate import source_meta

        meta = source_meta(cfg.model.init_from)
    return tasks_lib.prepare(cfg, meta, log), meta


def preflight(cfg: Config, world_size: int, log) -> Prepared:
    """Every check that bad config or bad data can fail, run before any rank starts (by the
    launcher) and again, cheaply, inside each rank (for torchrun/srun starts): Hub ids resolved,
    data prepared and cached, the model config resolved, the DeepSpeed config built, the resume point chosen."""
    runtime = select_runtime(cfg)
    ds_config = build_ds_config(cfg, world_size, runtime.precision)
    check_trackers(cfg)
    cfg, pinned = hub.resolve_ids(cfg)  # Hub ids → snapshot directories, before anything reads them
    prepared, meta = prepare_data(cfg, log)
    conf = model_lib.hf_config(cfg.model, prepared.vocab_size, prepared.eos_id, meta, prepared.labels)
    model_lib.check_finetune(conf, cfg.task, cfg.finetune, cfg.model.trust_remote_code)
    if cfg.distill.teacher:
        distill_lib.check_teacher(cfg.distill, conf, prepared.tokenizer)
    parallel.check_model(cfg, conf)
    max_pos = arithmetic.max_positions(conf)
    if max_pos is not None and cfg.data.seq_len > max_pos:
        raise ConfigError(f"data.seq_len ({cfg.data.seq_len}) exceeds the model's max positions ({max_pos})")
    resume = checkpoint.resume_choice(cfg, log)
    change, ds_config = resume_point(cfg, world_size, resume, ds_config, log)
    return Prepared(runtime, prepared, conf, ds_config, resume, change, cfg, pinned)


def check_trackers(cfg: Config) -> None:
    """A tracker in logging.backends must be installed (the `track` extra), found before any rank starts."""
    import importlib.util

    for name, module in (("wandb", "wandb"), ("mlflow", "mlflow")):
        if name in cfg.logging.backends and importlib.util.find_spec(module) is None:
            raise ConfigError(f"logging.backends: {name} is not installed in this environment; "
                              f"pip install -e '.[track]' (or drop {name} from logging.backends)")


def resume_point(cfg: Config, world_size: int, resume: Path | None, ds_config: dict,
                 log) -> tuple[checkpoint.LayoutChange | None, dict]:
    """Whether checkpoint `resume` can be resumed by this run (else ConfigError naming why), how its
    layout differs, and the DeepSpeed config to load it with."""
    if resume is None:
        return None, ds_config
    try:
        checkpoint.check_compatible(resume, cfg, world_size)
    except checkpoint.IncompatibleCheckpoint as e:
        raise ConfigError(str(e)) from None
    change = checkpoint.layout_change(resume, cfg, world_size)
    if change is not None:
        from .checkpoint import universal  # imports no DeepSpeed: the launcher's driver runs this too

        problem = universal.unsupported(change)
        if problem is None and cfg.finetune.method != "full":
            problem = (f"finetune.method={cfg.finetune.method} checkpoints hold only adapter weights, which "
                       "the universal conversion does not cover: resume on the layout that wrote it")
        if problem is not None:
            raise ConfigError(f"{resume} was written by {change.saved}; this run: {change.now}. {problem}")
        # Resumed through DeepSpeed's universal format (universal.load converts it once).
        # DeepSpeed reads this flag from the engine's config when it loads; a copy, so
        # the run config's own DeepSpeed dict is untouched.
        log.info(f"{resume} was written by {change}: resuming through a universal checkpoint")
        ds_config = {**ds_config, "checkpoint": {**ds_config.get("checkpoint", {}), "load_universal": True}}
    return change, ds_config
