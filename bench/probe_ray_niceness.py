"""Does the ranks' niceness explain Ray's per-step overhead? One Ray run whose workers' niceness is switched
in windows of 20 steps (15, 0, 15, 0), and one torchrun run of the same job for the same windows.

    .venv/bin/python bench/probe_ray_niceness.py [--config configs/demo.yaml]     # ~3 min on 2 cores

The Ray run is `lmforge launch --on ray` on a local Ray it starts itself, started with
RAY_worker_niceness=15 (Ray's default, which lmforge's own local Ray replaces with 0); at steps 40, 60 and
80 this script renices every thread of both Ray Train workers (renice needs root, or a rlimit that allows
going back down to 0). Prints the median step time of each window.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_launch import command  # this directory is on sys.path when run as a script

REPO = Path(__file__).resolve().parents[1]
WINDOWS = ((20, 15), (40, 0), (60, 15), (80, 0))  # (first step, the Ray workers' niceness from there)


def _steps(metrics: Path) -> list[float]:
    if not metrics.is_file():
        return []
    return [json.loads(line)["perf/step_time_s"] for line in metrics.read_text().splitlines() if "perf/step_time_s" in line]


def _renice_workers(niceness: int) -> int:
    threads = 0
    for pid in os.listdir("/proc"):
        try:
            if pid.isdigit() and "RayTrainWorker" in Path(f"/proc/{pid}/cmdline").read_text():
                for tid in os.listdir(f"/proc/{pid}/task"):
                    os.setpriority(os.PRIO_PROCESS, int(tid), niceness)
                    threads += 1
        except (OSError, ProcessLookupError):
            continue
    return threads


def run(launcher: str, config: str, workdir: Path) -> list[float]:
    run_dir = workdir / launcher
    cmd, env = command(launcher, config, run_dir, 100)
    env["RAY_worker_niceness"] = "15"  # Ray's default, in place of lmforge's 0 for its own local Ray
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    switches = list(WINDOWS[1:]) if launcher == "ray" else []
    while proc.poll() is None:
        done = len(_steps(run_dir / "metrics.jsonl"))
        while switches and done >= switches[0][0]:
            step, niceness = switches.pop(0)
            print(f"{launcher}: step {done}: {_renice_workers(niceness)} worker threads to niceness {niceness}",
                  file=sys.stderr, flush=True)
        time.sleep(0.1)
    if proc.returncode != 0:
        raise SystemExit(f"{launcher} failed ({proc.returncode}):\n{proc.stderr.read()[-3000:]}")
    return _steps(run_dir / "metrics.jsonl")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/demo.yaml")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="lmforge-probe-nice-") as tmp:
        got = {k: run(k, a.config, Path(tmp)) for k in ("ray", "torchrun")}
    # the first step after a switch is left out: it ran partly at the old niceness
    print(f"| run | {' | '.join(f'steps {s + 2}-{s + 20}' for s, _ in WINDOWS)} |")
    print("|---|" + "---:|" * len(WINDOWS))
    for k, steps in got.items():
        cells = [f"{statistics.median(steps[s + 1:s + 20]):.4f}" + (f" (niceness {n})" if k == "ray" else "")
                 for s, n in WINDOWS]
        print(f"| {k} | {' | '.join(cells)} |")
    print(f"\ncommand: `python bench/probe_ray_niceness.py --config {a.config}`")
    return 0


if __name__ == "__main__":
    sys.exit(main())
