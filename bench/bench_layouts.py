"""Step time of each optimizer and parallel layout on the same model, in one invocation.

    .venv/bin/python bench/bench_layouts.py --config configs/demo.yaml --steps 30 --nproc 2 --rounds 2
    .venv/bin/python bench/bench_layouts.py --config configs/demo.yaml --layout "zero3 8bit=parallel.zero_stage=3 train.optimizer=adamw_8bit"

Each layout is a name and the dotted overrides that make it (the default set: AdamW / AdamW8bit /
Lion8bit under ZeRO 1, 2, 3, AdamW with CPU offload, ZeRO-3 with activation checkpointing). Every
layout runs as a real `lmforge train` (same config, seed and data; checkpoints and evaluation off)
for --steps steps; the rounds interleave the layouts (A B C … A B C …) so that machine noise hits
all of them alike. Reported per layout: median step time over the steps after the first 3 of every
round (warm-up), tokens/s, its ratio to the first layout, the optimizer state bytes per parameter
the run measured, and the peak memory it logged. Only the markdown table goes to stdout.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

WARMUP = 3
DEFAULT_LAYOUTS = [
    ("zero1 adamw", "parallel.zero_stage=1"),
    ("zero1 adamw_8bit", "parallel.zero_stage=1 train.optimizer=adamw_8bit"),
    ("zero2 adamw", "parallel.zero_stage=2"),
    ("zero2 adamw_8bit", "parallel.zero_stage=2 train.optimizer=adamw_8bit"),
    ("zero3 adamw", "parallel.zero_stage=3"),
    ("zero3 adamw_8bit", "parallel.zero_stage=3 train.optimizer=adamw_8bit"),
    ("zero3 lion_8bit", "parallel.zero_stage=3 train.optimizer=lion_8bit"),
    ("zero3 adamw + offload", "parallel.zero_stage=3 parallel.offload_optimizer=true"),
    ("zero3 adamw + act. ckpt", "parallel.zero_stage=3 train.activation_checkpointing=true"),
]


def run_layout(config: str, overrides: list[str], steps: int, nproc: int, run_dir: Path) -> dict:
    cmd = [str(Path(sys.executable).parent / "lmforge"), "train", config, "--nproc", str(nproc),
           f"run_dir={run_dir}", f"train.steps={steps}", "checkpoint.interval=0", "eval.interval=0",
           "eval.batches=1", "logging.interval=1", "logging.progress=false", "checkpoint.resume=never", *overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{shlex.join(cmd)} failed:\n{proc.stderr[-4000:]}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    times = [r["perf/step_time_s"] for r in rows if "perf/step_time_s" in r and r["step"] > WARMUP]
    state = next((r["mem/optimizer_state_bytes_per_param"] for r in rows if "mem/optimizer_state_bytes_per_param" in r), None)
    peak = max((r["mem/peak_gib"] for r in rows if "mem/peak_gib" in r), default=float("nan"))
    tokens = next(r["train/tokens"] for r in rows if "train/tokens" in r)  # tokens per step after step 1
    return {"times": times, "state": state, "peak": peak, "tokens_per_step": tokens}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/demo.yaml")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--layout", action="append", default=[], metavar="NAME=OVERRIDES",
                   help="replace the default set; repeatable")
    args = p.parse_args()
    layouts = [tuple(s.split("=", 1)) for s in args.layout] or DEFAULT_LAYOUTS
    results: dict[str, dict] = {name: {"times": []} for name, _ in layouts}
    with tempfile.TemporaryDirectory(prefix="lmforge-bench-layouts-") as tmp:
        for r in range(args.rounds):
            for i, (name, overrides) in enumerate(layouts):
                print(f"round {r + 1}/{args.rounds}: {name}", file=sys.stderr, flush=True)
                out = run_layout(args.config, overrides.split(), args.steps, args.nproc, Path(tmp) / f"r{r}-{i}")
                results[name]["times"] += out["times"]
                results[name].update(state=out["state"], peak=out["peak"], tokens_per_step=out["tokens_per_step"])
    base = statistics.median(results[layouts[0][0]]["times"])
    print(f"\n{_dt.date.today()} · {platform.node()} · {os.cpu_count()} CPU(s) · "
          f"`{shlex.join(['python', 'bench/bench_layouts.py', *sys.argv[1:]])}`\n")
    print("| layout | median step (s) | tokens/s | vs first | optimizer state (B/param) | peak mem (GiB) |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, _ in layouts:
        res = results[name]
        med = statistics.median(res["times"])
        state = f"{res['state']:.2f}" if res["state"] is not None else "n/a"
        print(f"| {name} | {med:.4f} | {res['tokens_per_step'] / med:,.0f} | {med / base:.2f} | {state} | "
              f"{res['peak']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
