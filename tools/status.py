"""`lmforge status`: how a run is doing, from its run directory alone (any machine that sees the
shared storage, while the run goes or after): step / total, tokens, the latest loss and evaluation,
tokens/s, ETA, the last checkpoint and its age, and its health.

    lmforge status runs/debug runs/sweep/trials/*        # one block per run
    lmforge status runs/debug --json                     # the same as JSON, one object per run

Health, from what the run directory holds (run.json: rank 0's start and end records; failure.json:
what a failed rank or the launcher recorded; lmforge.lock: whether a live job holds the directory;
metrics.jsonl: the steps and their times):

  running    a live job holds the directory and steps keep coming
  stalled    a live job, but no step for --stall-factor x the median time between steps (and at least
             --stall-min-s): a hang the watchdog has not yet ended, a stuck filesystem, a paused node
  diverged   the latest logged loss is not finite, or the run ended with exit 76
  finished / early_stopped / stopped (a STOP request, a signal or a pre-emption; rerun to resume)
  failed     with the exit cause: what a rank or the launcher recorded, else "ended without a record"
             (SIGKILL, OOM, a lost node); for a Slurm job also its state from squeue/sacct
  starting   a live job that has not finished a step yet;  not started: nothing ran here yet;
  unknown    steps logged but no run.json (written since lmforge status exists)

Exit status: 1 when any run is stalled, diverged or failed, else 0 (for scripts and cron).
Imports no torch: it answers in a fraction of a second.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import subprocess
import time
from pathlib import Path

from lmforge.training import runlock, runstate
from lmforge.training.config import ConfigError

RECENT = 20  # steps the rates are taken over
UNHEALTHY = ("stalled", "diverged", "failed")


def _records(run_dir: Path) -> list[dict]:
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        try:
            out.append(json.loads(line))
        except ValueError:
            pass  # a line being written
    return out


def _latest(records: list[dict], key: str) -> tuple[int, float] | None:
    for rec in reversed(records):
        if key in rec:
            return rec["step"], rec[key]
    return None


def _step_times(records: list[dict]) -> list[float]:
    """Seconds per step between consecutive logged training steps (evaluations and saves included:
    what the run takes per step, and what a stall is measured against)."""
    steps = [(r["step"], r["time"]) for r in records if "train/loss" in r]
    return [(t1 - t0) / (s1 - s0) for (s0, t0), (s1, t1) in zip(steps, steps[1:]) if s1 > s0 and t1 >= t0]


def _checkpoint(run_dir: Path, cfg: dict) -> tuple[str, float] | None:
    """The checkpoint the `latest` pointer names (it moves only after a complete publish) and its age."""
    root = Path(cfg.get("checkpoint", {}).get("dir") or run_dir / "checkpoints")
    try:
        tag = (root / "latest").read_text().strip()
        return tag, time.time() - (root / tag / "manifest.json").stat().st_mtime
    except OSError:
        return None


def _slurm_state(job: str | None) -> str | None:
    """The job's state as slurmctld holds it (scontrol, what the launcher polls), else from
    accounting (sacct) once Slurm has forgotten it; None without Slurm."""
    if not job or shutil.which("scontrol") is None:
        return None
    from lmforge.launcher.slurm import job_state

    state = job_state(job)
    if state is not None:
        return state.get("JobState")
    if shutil.which("sacct") is None:
        return None
    try:
        out = subprocess.run(["sacct", "-n", "-X", "-P", "-j", job, "-o", "State"], capture_output=True, text=True,
                             timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.splitlines()[0] if out else None


def _config(run_dir: Path) -> dict:
    import yaml

    try:
        return yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return {}


def status(run_dir: str | Path, stall_factor: float = 10.0, stall_min_s: float = 60.0) -> dict:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ConfigError(f"{run_dir}: no such run directory")
    cfg, now = _config(run_dir), time.time()
    run, records = runstate.read(run_dir) or {}, _records(run_dir)
    started = run.get("started", 0.0)
    failure = runstate.read_failure(run_dir, since=started)  # not an earlier start's
    held = runlock.read(run_dir)
    stale_s = float(cfg.get("dist", {}).get("lock_stale_s") or 120)
    live = held is not None and runlock.verdict(*held, stale_s) == "refuse"
    job = run.get("slurm_job") or (held[0].get("job") if held else None)

    loss = _latest(records, "train/loss")
    headline = run.get("headline", "eval/loss")
    evaluation = _latest(records, headline) or _latest(records, "eval/loss")
    tokens = _latest(records, "train/tokens")
    rates = [r["perf/tokens_per_s"] for r in records if "perf/tokens_per_s" in r][-RECENT:]
    per_step = _step_times(records)[-RECENT:]
    step = loss[0] if loss else run.get("start_step", 0)
    total = run.get("total_steps") or cfg.get("train", {}).get("steps")
    last_step_time = next((r["time"] for r in reversed(records) if "train/loss" in r), None)
    since_step = now - last_step_time if last_step_time is not None and last_step_time >= started else None
    median_step = statistics.median(per_step) if per_step else None

    cause = None
    if loss is not None and not math.isfinite(loss[1]):
        health, cause = "diverged", f"loss {loss[1]} at step {loss[0]}"
    elif live:
        if since_step is None:
            health = "starting"
        elif median_step and since_step > max(stall_factor * median_step, stall_min_s):
            health = "stalled"
            cause = f"no step for {since_step:.0f} s (median {median_step:.2f} s per step)"
        else:
            health = "running"
    elif failure is not None:
        health = "diverged" if failure.get("code") == 76 else "failed"
        who = "the launcher" if failure.get("rank") == -1 else f"rank {failure.get('rank')}"
        cause = f"exit {failure.get('code')} ({who} on {failure.get('host')}): {failure.get('reason')}"
    elif run.get("state") in ("finished", "stopped", "early_stopped"):
        health = run["state"]
    elif run:
        health = "failed"
        cause = "ended without a record: killed (SIGKILL, the OOM killer) or its node was lost"
    elif records:
        health, cause = "unknown", "no run.json (a run from an lmforge before `lmforge status`)"
    else:
        health = "not started"
    slurm = _slurm_state(job)
    if slurm and health == "failed" and cause and cause.startswith("ended without"):
        cause = f"Slurm job {job}: {slurm}"
    ckpt = _checkpoint(run_dir, cfg)
    eta = (total - step) * median_step if health == "running" and total and median_step else None
    return {
        "run_dir": str(run_dir), "health": health, "cause": cause, "step": step, "total_steps": total,
        "tokens": tokens[1] if tokens else None, "loss": loss[1] if loss else None,
        "eval": {"metric": headline, "value": evaluation[1], "step": evaluation[0]} if evaluation else None,
        "tokens_per_s": statistics.median(rates) if rates else None, "seconds_per_step": median_step,
        "eta_s": eta, "last_step_age_s": since_step,
        "checkpoint": {"tag": ckpt[0], "age_s": ckpt[1]} if ckpt else None,
        "holder": runlock.describe(*held) if live else None,
        "slurm": {"job": job, "state": slurm} if job else None,
        "started": started or None, "ended": run.get("ended"),
    }


def _duration(s: float) -> str:
    s = int(round(s))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60} s"
    return f"{s // 3600} h {s % 3600 // 60} min" if s < 86400 else f"{s // 86400} d {s % 86400 // 3600} h"


def format_status(st: dict) -> str:
    total = st["total_steps"]
    progress = f"step {st['step']}/{total} ({100 * st['step'] / total:.0f}%)" if total else f"step {st['step']}"
    head = f"{st['run_dir']}: {st['health']}" + (f" ({st['cause']})" if st["cause"] else "")
    line1 = [progress]
    if st["tokens"] is not None:
        line1.append(f"tokens {int(st['tokens']):,}")
    if st["loss"] is not None:
        line1.append(f"loss {st['loss']:.4f}")
    if st["eval"]:
        e = st["eval"]
        line1.append(f"{e['metric']} {e['value']:.4f} at step {e['step']}")
    line2 = []
    if st["tokens_per_s"] is not None:
        line2.append(f"{st['tokens_per_s']:,.0f} tokens/s")
    if st["seconds_per_step"] is not None:
        line2.append(f"{st['seconds_per_step']:.2f} s/step")
    if st["eta_s"] is not None:
        line2.append(f"ETA {_duration(st['eta_s'])}")
    if st["last_step_age_s"] is not None and st["health"] in ("running", "stalled"):
        line2.append(f"last step {_duration(st['last_step_age_s'])} ago")
    line3 = []
    if st["checkpoint"]:
        line3.append(f"last checkpoint {st['checkpoint']['tag']} ({_duration(st['checkpoint']['age_s'])} ago)")
    else:
        line3.append("no checkpoint yet")
    if st["holder"]:
        line3.append(f"held by {st['holder']}")
    if st["slurm"]:
        line3.append(f"Slurm job {st['slurm']['job']}" + (f" {st['slurm']['state']}" if st["slurm"]["state"] else ""))
    return "\n".join([head, "  " + ", ".join(line1)] + ["  " + ", ".join(x) for x in (line2, line3) if x])


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories (their run_dir)")
    p.add_argument("--json", action="store_true", help="one JSON object per run, in a list")
    p.add_argument("--stall-factor", type=float, default=10.0,
                   help="stalled: no step for this many times the median time between steps (default 10)")
    p.add_argument("--stall-min-s", type=float, default=60.0,
                   help="... and for at least this many seconds (default 60)")
    p.set_defaults(overrides=[])


def main(args) -> int:
    results = [status(d, args.stall_factor, args.stall_min_s) for d in args.run_dirs]
    if args.json:
        print(json.dumps(results, indent=1))
    else:
        print("\n".join(format_status(st) for st in results))
    return 1 if any(st["health"] in UNHEALTHY for st in results) else 0
