"""Launch overhead and per-step time: Ray Train vs torchrun on the same 2-rank config, side by side.

    .venv/bin/python bench/bench_launch.py --config configs/demo.yaml --steps 20 --rounds 2

Each round runs the same job twice, alternating the launcher: `lmforge train --nproc 2`
(torchrun on this box) and `lmforge launch --on ray` (Ray Train workers on a local Ray that the
command starts itself, 1 CPU each). From each run's metrics.jsonl it takes the time from the
command's start to the first finished training step (launch + setup overhead, including the
pre-training evaluation) and the median step time over the last two thirds of the steps (Ray's
control-plane actors are still importing and registering during the first seconds of training). Prints a markdown table and the
per-step ratio ray/torchrun (target <= 1.05).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def one_run(launcher: str, config: str, steps: int, workdir: Path) -> dict:
    run_dir = workdir / f"{launcher}-{time.time_ns()}"
    common = [config, f"run_dir={run_dir}", f"train.steps={steps}", "checkpoint.interval=0",
              "eval.interval=0", "eval.batches=1", "logging.progress=false"]
    cmd = ([str(BIN / "lmforge"), "train", *common, "--nproc", "2"] if launcher == "torchrun" else
           [str(BIN / "lmforge"), "launch", "--on", "ray", *common, "launch.workers=2"])
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled")
    env.pop("RAY_ADDRESS", None)
    start = time.time()
    proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{launcher} run failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps_rec = [r for r in records if "perf/step_time_s" in r]
    steady = steps_rec[len(steps_rec) // 3:]  # after the launcher's own start-up work has settled
    return {"first_step_s": steps_rec[0]["time"] - start,
            "step_s": statistics.median(r["perf/step_time_s"] for r in steady),
            "tokens_per_s": statistics.median(r["perf/tokens_per_s"] for r in steady)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    results: dict[str, list[dict]] = {"torchrun": [], "ray": []}
    with tempfile.TemporaryDirectory(prefix="lmforge-bench-launch-") as tmp:
        for r in range(args.rounds):
            order = ("torchrun", "ray") if r % 2 == 0 else ("ray", "torchrun")
            for launcher in order:
                results[launcher].append(one_run(launcher, args.config, args.steps, Path(tmp)))
                print(f"round {r + 1} {launcher}: {results[launcher][-1]}", file=sys.stderr)
    rows = {k: {m: statistics.median(x[m] for x in v) for m in v[0]} for k, v in results.items()}
    ratio = rows["ray"]["step_s"] / rows["torchrun"]["step_s"]
    print(f"## launch overhead and step time: Ray Train vs torchrun ({args.config}, 2 ranks)\n")
    print("| launcher | command → first step s | median step s | tokens/s |")
    print("|---|---:|---:|---:|")
    for k, v in rows.items():
        print(f"| {k} | {v['first_step_s']:.1f} | {v['step_s']:.4f} | {v['tokens_per_s']:.0f} |")
    print(f"\nper-step ratio ray/torchrun: **{ratio:.3f}** (target <= 1.05: {'PASS' if ratio <= 1.05 else 'FAIL'})\n")
    print(f"- medians over {args.rounds} round(s) of alternating runs, {args.steps} steps each (first third excluded)")
    print(f"- {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC; {platform.platform()}, {os.cpu_count()} CPUs")
    print(f"- command: `python bench/bench_launch.py --config {args.config} --steps {args.steps} --rounds {args.rounds}`")
    return 0


if __name__ == "__main__":
    sys.exit(main())
