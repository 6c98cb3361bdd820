"""Per-step time and launch overhead: Ray Train vs torchrun on the same 2-rank config, side by side.

    .venv/bin/python bench/bench_launch.py --config configs/demo.yaml --steps 60 --rounds 3 [--baseline PYTHONPATH]

Each round runs the same job with every launcher, in an order that rotates from round to round:
`lmforge train --nproc 2` (torchrun on this box) and `lmforge launch --on ray` (Ray Train workers on a
local Ray that the command starts itself, 1 CPU each, token authentication); with --baseline also
`lmforge launch --on ray` of another checkout (a PYTHONPATH that puts its lmforge first). From each
run's metrics.jsonl: the time from the command's start to the first finished step (launch + setup,
including the pre-training evaluation) and the median step time over the last two thirds of the steps
(Ray's control-plane actors are still importing and registering during the first seconds). While the
steady part runs, it samples for --sample-s seconds the CPU share of the two ranks, their niceness,
and the CPU of every other process (Ray's daemons and actors): on a box whose cores the ranks fill,
that CPU is taken from the ranks. Prints a markdown table, the medians over the rounds, and the
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
RANK_MARKS = ("lmforge.training.train", "ray::RayTrainWorker")  # a torchrun rank's cmdline, a Ray rank's title
TICK = os.sysconf("SC_CLK_TCK")


def _processes() -> dict[int, tuple[float, str, int]]:
    """{pid: (CPU seconds so far, command line, niceness of its main thread)} of every process."""
    out = {}
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            stat = Path(f"/proc/{p}/stat").read_text()
            cmd = Path(f"/proc/{p}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        out[int(p)] = ((int(fields[11]) + int(fields[12])) / TICK, cmd, int(fields[16]))
    return out


def sample_cpu(seconds: float) -> dict:
    """CPU over `seconds`, in cores: the ranks', everything else's (this script excluded), and the ranks' niceness."""
    before, t0 = _processes(), time.time()
    time.sleep(seconds)
    after, span = _processes(), time.time() - t0
    ranks, other, nice = 0.0, 0.0, set()
    for pid, (cpu, cmd, ni) in after.items():
        used = (cpu - before.get(pid, (0.0,))[0]) / span
        if pid == os.getpid():
            continue
        if any(m in cmd for m in RANK_MARKS):
            ranks += used
            nice.add(ni)
        else:
            other += used
    return {"ranks_cpu": ranks, "other_cpu": other, "niceness": ",".join(map(str, sorted(nice)))}


def command(variant: str, config: str, run_dir: Path, steps: int) -> tuple[list[str], dict]:
    """The 2-rank job under `variant` ("torchrun" or "ray": a local Ray the command starts), no evaluation
    or checkpoint, and its environment (no Ray address or worker niceness inherited from the caller)."""
    common = [config, f"run_dir={run_dir}", f"train.steps={steps}", "checkpoint.interval=0",
              "eval.interval=0", "eval.batches=1", "logging.progress=false"]
    lmforge = [sys.executable, "-m", "lmforge.launcher.cli"]  # `lmforge`, also for a baseline checkout's cli
    cmd = ([*lmforge, "train", *common, "--nproc", "2"] if variant == "torchrun" else
           [*lmforge, "launch", "--on", "ray", *common, "launch.workers=2"])
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0")
    for k in ("RAY_ADDRESS", "RAY_worker_niceness"):
        env.pop(k, None)
    return cmd, env


def one_run(variant: str, pythonpath: str | None, config: str, steps: int, sample_s: float, workdir: Path) -> dict:
    run_dir = workdir / f"{variant}-{time.time_ns()}"
    cmd, env = command(variant, config, run_dir, steps)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    start = time.time()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics, cpu = run_dir / "metrics.jsonl", None
    while proc.poll() is None:
        if cpu is None and metrics.is_file() and metrics.read_text().count("perf/step_time_s") >= steps // 3:
            cpu = sample_cpu(sample_s)
        time.sleep(0.2)
    err = proc.stderr.read()
    if proc.returncode != 0:
        raise SystemExit(f"{variant} run failed ({proc.returncode}):\n{err[-4000:]}")
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    steps_rec = [r for r in records if "perf/step_time_s" in r]
    steady = steps_rec[len(steps_rec) // 3:]  # after the launcher's own start-up work has settled
    return {"first_step_s": steps_rec[0]["time"] - start,
            "step_s": statistics.median(r["perf/step_time_s"] for r in steady),
            "tokens_per_s": statistics.median(r["perf/tokens_per_s"] for r in steady),
            **(cpu or {"ranks_cpu": float("nan"), "other_cpu": float("nan"), "niceness": "?"})}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sample-s", type=float, default=10.0, help="CPU sampling window in the steady part")
    parser.add_argument("--baseline", default=None, help="PYTHONPATH that puts another checkout's lmforge first; "
                                                         "adds its Ray launch as 'ray (baseline)'")
    args = parser.parse_args()
    variants = {"torchrun": None, "ray": None, **({"ray (baseline)": args.baseline} if args.baseline else {})}
    names = list(variants)
    results: dict[str, list[dict]] = {k: [] for k in names}
    with tempfile.TemporaryDirectory(prefix="lmforge-bench-launch-") as tmp:
        for r in range(args.rounds):
            order = names[r % len(names):] + names[:r % len(names)]
            for v in order:
                run = one_run("torchrun" if v == "torchrun" else "ray", variants[v], args.config, args.steps,
                              args.sample_s, Path(tmp))
                results[v].append(run)
                print(f"round {r + 1} {v}: step {run['step_s']:.4f} s, first step {run['first_step_s']:.1f} s, "
                      f"ranks {run['ranks_cpu']:.2f} cores (niceness {run['niceness']}), "
                      f"other processes {run['other_cpu']:.2f}", file=sys.stderr, flush=True)
    print(f"## Ray Train vs torchrun: step time ({args.config}, 2 ranks)\n")
    print("| launcher | median step s | per round | tokens/s | ranks' CPU (cores) | ranks' niceness | "
          "other processes' CPU (cores) | command → first step s |")
    print("|---|---:|---|---:|---:|---|---:|---:|")
    med = {}
    for v in names:
        runs = results[v]
        med[v] = statistics.median(x["step_s"] for x in runs)
        print(f"| {v} | {med[v]:.4f} | {', '.join(format(x['step_s'], '.3f') for x in runs)} | "
              f"{statistics.median(x['tokens_per_s'] for x in runs):.0f} | "
              f"{statistics.median(x['ranks_cpu'] for x in runs):.2f} | {runs[0]['niceness']} | "
              f"{statistics.median(x['other_cpu'] for x in runs):.2f} | "
              f"{statistics.median(x['first_step_s'] for x in runs):.1f} |")
    print()
    for v in names[1:]:
        ratio = med[v] / med["torchrun"]
        print(f"per-step ratio {v}/torchrun: **{ratio:.3f}** (target <= 1.05: {'met' if ratio <= 1.05 else 'not met'})")
    print(f"\n- medians over {args.rounds} round(s), the order rotating each round; {args.steps} steps per run, "
          f"first third excluded; CPU sampled for {args.sample_s:g} s in the steady part")
    print(f"- {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC; {platform.platform()}, {os.cpu_count()} CPUs")
    print(f"- command: `python bench/bench_launch.py --config {args.config} --steps {args.steps} --rounds {args.rounds}"
          f"{' --baseline ' + args.baseline if args.baseline else ''}`")
    return 0


if __name__ == "__main__":
    sys.exit(main())
