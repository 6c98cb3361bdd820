"""The preference recipes against their targets: the recipe chain (a base model, then the SFT model
the pairs start from) once, then `lmforge train configs/{dpo,orpo,reward}.yaml --nproc 2` each, as a
user runs them. Prints per run: wall time (command start to exit), the cached reference pass, one
training epoch at the run's median step time, and held-out accuracy before -> after (best).

    .venv/bin/python bench/bench_preference.py                       # chain + dpo, orpo, reward
    .venv/bin/python bench/bench_preference.py --work /tmp/bp --skip-chain --tasks dpo

Targets (issue: preference training): DPO and reward >= 0.90 held-out accuracy, ORPO >= 0.85, each
run under 3 minutes, the reference pass cheaper than one epoch.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LMFORGE = Path(sys.executable).parent / "lmforge"
# The chain the recipes' headers give: the base model, then the SFT model (runs/sft) they start from.
CHAIN = (("base", ["configs/demo.yaml"]), ("sft", ["configs/sft_pref.yaml"]))
TARGET = {"dpo": 0.90, "orpo": 0.85, "reward": 0.90}


def train(args: list[str], work: Path, log: Path) -> float:
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        # a cache of its own: the reference pass is measured, not read from an earlier run's cache
        proc = subprocess.run([str(LMFORGE), "train", *[str(REPO / a) if a.startswith("configs/") else a for a in args],
                               "--nproc", "2", "logging.progress=false", f"data.cache_dir={work / 'cache'}"],
                              cwd=work, stdout=fh, stderr=subprocess.STDOUT)
    if proc.returncode:
        sys.exit(f"{' '.join(args)} exited {proc.returncode}: see {log}")
    return time.perf_counter() - t0


def measure(task: str, work: Path) -> dict:
    log = work / f"{task}.log"
    wall = train([f"configs/{task}.yaml"], work, log)
    text = log.read_text()
    before, after = map(float, re.search(r"held-out accuracy: ([\d.]+) before -> ([\d.]+) after", text).groups())
    ref = re.search(r"reference log-probs of \d+ pairs computed in ([\d.]+) s", text)
    pairs = int(re.search(r"(\d+) training pairs", text).group(1))
    batch = int(re.search(r"= global batch (\d+)", text).group(1))
    records = [json.loads(x) for x in (work / "runs" / task / "metrics.jsonl").read_text().splitlines()]
    step = statistics.median(r["perf/step_time_s"] for r in records if "perf/step_time_s" in r)
    best = max(r["eval/accuracy"] for r in records if "eval/accuracy" in r)
    return {"task": task, "wall_s": wall, "reference_s": float(ref.group(1)) if ref else None,
            "epoch_s": pairs / batch * step, "before": before, "after": after, "best": best}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, default=Path("/tmp/bench-preference"), help="scratch directory (runs/ under it)")
    p.add_argument("--tasks", nargs="+", default=list(TARGET), choices=list(TARGET))
    p.add_argument("--skip-chain", action="store_true", help="reuse WORK/runs/demo and runs/sft_pref from an earlier call")
    args = p.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    print(f"# {dt.date.today()} {platform.node()} {platform.processor() or platform.machine()}, 2 ranks")
    if not args.skip_chain:
        for name, cmd in CHAIN:
            print(f"chain: {name}: lmforge train {' '.join(cmd)} --nproc 2: {train(cmd, args.work, args.work / f'{name}.log'):.0f} s",
                  flush=True)
    for task in args.tasks:  # a fresh run each (an old run directory would be resumed)
        shutil.rmtree(args.work / "runs" / task, ignore_errors=True)
    shutil.rmtree(args.work / "cache" / "reference_logps", ignore_errors=True)
    rows = [measure(t, args.work) for t in args.tasks]
    print("| run | wall | reference pass | one epoch | held-out accuracy before -> after (best) | target |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        ref = f"{r['reference_s']:.1f} s" if r["reference_s"] is not None else "none"
        met = "met" if r["after"] >= TARGET[r["task"]] and r["wall_s"] < 180 else "NOT met"
        print(f"| {r['task']} | {r['wall_s']:.0f} s | {ref} | {r['epoch_s']:.0f} s | {r['before']:.3f} -> "
              f"{r['after']:.3f} ({r['best']:.3f}) | >= {TARGET[r['task']]:.2f}, < 180 s: {met} |")


if __name__ == "__main__":
    main()
