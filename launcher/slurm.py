"""Slurm launcher: render an sbatch script from the config, check it against the cluster, submit.

    lmforge launch --on slurm configs/pretrain_7b.yaml --nodes 4 --gpus-per-node 8 \\
        --partition gpu --time 24:00:00 --account myproj            # submit; prints job id, log, TensorBoard
    lmforge launch --on slurm configs/debug.yaml --nodes 2 --dry-run  # print the script only
    lmforge launch --on slurm configs/debug.yaml --nodes 2 --follow   # tail the log, exit with the job's status
    lmforge launch --on slurm configs/debug.yaml slurm.runner=ray     # Ray cluster inside the job

Flags are sugar for `slurm.*` keys (see `lmforge config`), so every value lives in the config tree.
The script is slurm/torchrun.sbatch or slurm/ray.sbatch (or `slurm.template`) with its {{…}}
filled in; it carries the resolved config, so the job runs exactly what was validated here. Before
submitting, the config and data are checked (preflight, as for every launcher) and the request is
checked against the partition (`scontrol show partition`), so an impossible job fails now with the
reason instead of pending forever. `sbatch` runs with the caller's environment (Slurm's default
--export=ALL); `slurm.setup` holds the `module load` / `source venv/bin/activate` lines a node needs.

Pre-emption and time limits: `#SBATCH --signal=B:USR1@<slurm.signal_before>` and `--requeue`;
the script turns USR1 into the run's STOP file, the ranks checkpoint and exit 75, the script
requeues the job and the requeued job resumes (see the templates for the details).
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from lmforge.launcher import LaunchError
from lmforge.launcher.ray import LOCAL_RAY_ENV
from lmforge.training.config import Config, ConfigError, slurm_time_seconds

# slurm/ sits beside launcher/ in a checkout and beside lmforge/launcher in a wheel.
TEMPLATE_DIR = Path(__file__).resolve().parents[1] / "slurm"
_PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")
# PREEMPTED is left out: a requeueable job passes through it on its way back to PENDING.
TERMINAL_STATES = {"COMPLETED", "FAILED", "TIMEOUT", "CANCELLED", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                   "DEADLINE", "SPECIAL_EXIT"}


def log_path(cfg: Config) -> str:
    return str(Path(cfg.run_dir) / "slurm-%j.out")


def world_size(cfg: Config) -> int:
    return cfg.slurm.nodes * cfg.slurm.ranks_per_node


def sbatch_options(cfg: Config) -> list[str]:
    s = cfg.slurm
    opts = [f"--job-name={s.job_name or Path(cfg.run_dir).name}", f"--nodes={s.nodes}", "--ntasks-per-node=1",
            f"--output={log_path(cfg)}", "--open-mode=append"]  # a requeued job appends to the same log
    if s.gpus_per_node:
        opts.append(f"--gpus-per-node={s.gpus_per_node}")
    if s.cpus_per_node:
        opts.append(f"--cpus-per-task={s.cpus_per_node}")
    for flag, value in (("partition", s.partition), ("account", s.account), ("time", s.time)):
        if value:
            opts.append(f"--{flag}={value}")
    if s.signal_before:
        opts.append(f"--signal=B:USR1@{s.signal_before}")
    opts.append("--requeue" if s.requeue else "--no-requeue")
    opts += s.sbatch_args
    return [f"#SBATCH {o}" for o in opts]


def render(cfg: Config) -> str:
    """The sbatch script for this config: the template with every {{name}} filled in."""
    s = cfg.slurm
    path = Path(s.template) if s.template else TEMPLATE_DIR / f"{s.runner}.sbatch"
    if not path.is_file():
        raise ConfigError(f"slurm.template: {path} does not exist")
    values = {
        "sbatch_options": "\n".join(sbatch_options(cfg)),
        "setup": s.setup.strip() or "# (slurm.setup: nothing to load)",
        "run_dir": shlex.quote(cfg.run_dir),
        "python": shlex.quote(s.python or sys.executable),
        "procs_per_node": str(s.ranks_per_node),
        "workers": str(world_size(cfg)),
        "gpus_per_node": str(s.gpus_per_node),
        "rdzv_port": str(s.rdzv_port),
        "ray_port": str(s.ray_port),
        "ray_auth": cfg.launch.ray_auth,
        "ray_env": "\n".join(f"export {k}={v}" for k, v in LOCAL_RAY_ENV.items()),
        "requeue": "1" if s.requeue else "0",
        "config_yaml": cfg.to_yaml().rstrip("\n"),
    }
    text = path.read_text()
    unknown = sorted(set(_PLACEHOLDER.findall(text)) - set(values))
    if unknown:
        raise ConfigError(f"slurm.template {path}: unknown placeholder(s) {', '.join(unknown)}; "
                          f"known: {', '.join(sorted(values))}")
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], text)


def resolve(cfg: Config) -> Config:
    """The config the job runs: absolute paths (the job may start elsewhere) and launch.workers
    set from the allocation, so the Ray runner asks for exactly the ranks Slurm gives."""
    ranks = world_size(cfg)
    if cfg.launch.workers is not None and cfg.launch.workers != ranks:
        raise ConfigError(f"launch.workers={cfg.launch.workers} but slurm.nodes x ranks per node = "
                          f"{cfg.slurm.nodes} x {cfg.slurm.ranks_per_node} = {ranks}; drop launch.workers")
    data = cfg.with_absolute_paths().to_dict()
    data["launch"].update(workers=ranks, gpus_per_worker=1 if cfg.slurm.gpus_per_node else cfg.launch.gpus_per_worker)
    return Config.model_validate(data)


def find_sbatch() -> str:
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        raise LaunchError(
            "sbatch is not on PATH. On a cluster, load Slurm's client first (e.g. `module load slurm`); "
            "on Debian/Ubuntu install it with `apt-get install slurm-client` (and point SLURM_CONF at the "
            "cluster's slurm.conf). `--dry-run` prints the script without Slurm.")
    return sbatch


def _scontrol(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["scontrol", *args], capture_output=True, text=True)


def _fields(line: str) -> dict[str, str]:
    """`scontrol show … -o` output → {key: value} (values never contain spaces in these records)."""
    return dict(tok.split("=", 1) for tok in line.split() if "=" in tok)


def partitions() -> dict[str, dict[str, str]]:
    out = _scontrol("show", "partition", "-o")
    if out.returncode != 0:
        raise LaunchError(f"cannot query Slurm partitions: {out.stderr.strip() or out.stdout.strip()}")
    parts = {}
    for line in out.stdout.splitlines():
        f = _fields(line)
        if "PartitionName" in f:
            parts[f["PartitionName"]] = f
    return parts


def check_request(cfg: Config) -> None:
    """Refuse what the partition can never run, with the partition's own numbers. (sbatch rejects
    these too where the cluster sets EnforcePartLimits; elsewhere the job would pend forever.)"""
    s = cfg.slurm
    parts = partitions()
    if s.partition:
        if s.partition not in parts:
            raise LaunchError(f"unknown Slurm partition {s.partition!r}; this cluster has: {', '.join(parts) or 'none'}")
        name = s.partition
    else:
        default = [n for n, f in parts.items() if f.get("Default") == "YES"]
        if not default:
            raise LaunchError(f"the cluster has no default partition; pass --partition (one of: {', '.join(parts)})")
        name = default[0]
    part = parts[name]
    problems = []
    total = int(part.get("TotalNodes", "0"))
    max_nodes = part.get("MaxNodes", "UNLIMITED")
    limit = total if max_nodes == "UNLIMITED" else min(total, int(max_nodes))
    if s.nodes > limit:
        problems.append(f"asked for {s.nodes} node(s), partition {name!r} has {total} (MaxNodes={max_nodes})")
    if part.get("State", "UP") != "UP":
        problems.append(f"partition {name!r} is {part['State']}")
    max_time = part.get("MaxTime", "UNLIMITED")
    if s.time and max_time not in ("UNLIMITED", "INFINITE"):
        if slurm_time_seconds(s.time) > slurm_time_seconds(max_time):
            problems.append(f"time limit {s.time} exceeds the MaxTime of partition {name!r} ({max_time})")
    if problems:
        raise LaunchError("; ".join(problems))


def submit(script: str) -> str:
    """sbatch the script (from stdin, so a refused job leaves no file behind); the job id."""
    out = subprocess.run([find_sbatch(), "--parsable"], input=script, capture_output=True, text=True)
    if out.returncode != 0:
        lines = (out.stderr.strip() or out.stdout.strip()).splitlines()
        reason = "; ".join(ln.removeprefix("sbatch: error: ").strip() for ln in lines if ln.strip())
        raise LaunchError(f"sbatch refused the job: {reason}")
    return out.stdout.strip().split(";")[0]


def job_state(job_id: str) -> dict[str, str] | None:
    """scontrol's record of the job, or None once Slurm has forgotten it (MinJobAge after the end)."""
    out = _scontrol("show", "job", "-o", job_id)
    if out.returncode != 0 or not out.stdout.strip():
        return None
    return _fields(out.stdout.splitlines()[0])


def exit_status(state: dict[str, str]) -> int:
    code, _, sig = state.get("ExitCode", "0:0").partition(":")
    if state.get("JobState") == "COMPLETED":
        return int(code)
    return int(code) or (128 + int(sig) if sig and int(sig) else 1)


def wait_for_end(job_id: str, on_poll=None, poll_s: float = 1.0, confirm: int = 3) -> dict[str, str]:
    """Poll scontrol until the job has really ended; its last record. A requeue passes through
    states that look final for a moment (the old allocation is cancelled "due to job requeue"),
    and scontrol can fail while slurmctld is busy, so an end state must be seen `confirm` polls in
    a row, and a missing record `5 * confirm` times, before it counts."""
    last, final, missing = None, 0, 0
    while True:
        state = job_state(job_id)
        if on_poll is not None:
            on_poll(state)
        if state is None:
            missing += 1
            if missing >= 5 * confirm:
                if last is None:
                    raise LaunchError(f"Slurm has no record of job {job_id}")
                return last  # forgotten (MinJobAge) right after it ended
        else:
            missing, last = 0, state
            final = final + 1 if state.get("JobState") in TERMINAL_STATES else 0
            if final >= confirm:
                return state
        time.sleep(poll_s)


def follow(job_id: str, log: Path, poll_s: float = 1.0) -> int:
    """Print the job's log as it grows until the job ends (through any requeues); its exit status."""
    offset = 0

    def drain(_state=None) -> None:
        nonlocal offset
        if log.is_file():
            with open(log, "rb") as f:
                f.seek(offset)
                chunk = f.read()
            offset += len(chunk)
            sys.stdout.write(chunk.decode(errors="replace"))
            sys.stdout.flush()

    state = wait_for_end(job_id, on_poll=drain, poll_s=poll_s)
    drain()
    print(f"lmforge: job {job_id} {state.get('JobState')} (exit code {state.get('ExitCode')})", flush=True)
    return exit_status(state)


def launch(cfg: Config, dry_run: bool = False, follow_log: bool = False) -> int:
    if dry_run:
        print(render(resolve(cfg)), end="")
        return 0
    from lmforge.launcher.base import prepare
    from lmforge.training.preflight import check_run_dir_free, get_logger

    find_sbatch()
    # Only a check: this command submits and exits; the job's rank 0 takes the lock when it starts
    # (and a requeued start, same SLURM_JOB_ID, takes its own lock back).
    check_run_dir_free(cfg.run_dir, cfg.dist.lock_stale_s)
    check_request(cfg)
    # bad config or data fail here, not on the nodes; the job script writes config.yaml when it starts
    cfg = resolve(prepare(cfg, world_size(cfg), get_logger(0), absolute=False, dump=False))
    run_dir = Path(cfg.run_dir)
    text = render(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)  # Slurm opens the job's log there before the script runs
    job_id = submit(text)
    script = run_dir / "job.sbatch"  # what was submitted, for the record and for resubmitting by hand
    script.write_text(text)
    log = Path(log_path(cfg).replace("%j", job_id))
    print(f"lmforge: submitted Slurm job {job_id} ({cfg.slurm.nodes} node(s) x {cfg.slurm.ranks_per_node} "
          f"rank(s), runner {cfg.slurm.runner})\n  script:      {script}\n  log:         {log}\n"
          f"  tensorboard: tensorboard --logdir {cfg.tensorboard_dir}\n"
          f"  stop:        scancel --signal=USR1 --full {job_id}   (checkpoint, then requeue)", flush=True)
    return follow(job_id, log) if follow_log else 0
