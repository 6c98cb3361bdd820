"""What a checkpoint save costs the training loop: checkpoint.async=false (the loop waits for the
whole write, hashing and publish) against checkpoint.async=true (it waits only for the copy of
the state to host memory, and its next optimizer step for the optimizer state written from the live
tensors), on the demo model (~5M) and a ~100M Llama, 2 CPU ranks, ZeRO-3.

    .venv/bin/python bench/bench_checkpoint.py --rounds 2

Each run: `lmforge train configs/demo.yaml --nproc 2` with a checkpoint every `interval` steps and
no evaluation; the runs of one model alternate the two modes. "stall" is the loop's time in a save
at an interval step (metrics.jsonl's checkpoint/stall_s; the final save, which a run always waits
for, is left out) plus, async, the wait of the optimizer steps before the next save for that save's
write (checkpoint/wait_s); "step" is the median step time over the run (the background write shares the
cores with training); "ckpt" is a checkpoint's size on disk.
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

MODELS = {
    "demo (~5M)": ["train.steps=24", "checkpoint.interval=4"],
    "~100M": ["model.overrides={hidden_size: 768, intermediate_size: 2048, num_hidden_layers: 12, "
              "num_attention_heads: 12, num_key_value_heads: 4}", "train.steps=9", "checkpoint.interval=3",
              "train.micro_batch_size=1", "train.global_batch_size=2"],
}


def interval(model: str) -> int:
    return int(next(a for a in MODELS[model] if a.startswith("checkpoint.interval=")).split("=")[1])


def one_run(model: str, mode: str, workdir: Path) -> dict:
    run_dir = workdir / f"run-{time.time_ns()}"
    cmd = [sys.executable, "-m", "lmforge.launcher.cli", "train", str(REPO / "configs" / "demo.yaml"), "--nproc", "2",
           f"run_dir={run_dir}", "eval.interval=0", "eval.batches=1", "checkpoint.keep=2", "logging.interval=1",
           "logging.progress=false", f"checkpoint.async={'true' if mode == 'async' else 'false'}", *MODELS[model]]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last = max(r["step"] for r in rows)
    saves = [(r["step"], r["checkpoint/stall_s"]) for r in rows if "checkpoint/stall_s" in r and r["step"] != last]
    waits = [(r["step"], r["checkpoint/wait_s"]) for r in rows if "checkpoint/wait_s" in r]
    # async: the next optimizer step may wait for the save's write (checkpoint/wait_s): part of its stall
    stalls = [s + sum(w for ws, w in waits if step < ws <= step + interval(model)) for step, s in saves]
    steps = [r["perf/step_time_s"] for r in rows if "perf/step_time_s" in r]
    ckpt = run_dir / "checkpoints" / f"step_{last}"
    size = sum(p.stat().st_size for p in ckpt.rglob("*") if p.is_file())
    return {"stalls": stalls, "step": statistics.median(steps), "size": size}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    a = ap.parse_args()
    got: dict[tuple[str, str], list[dict]] = {(m, mode): [] for m in a.models for mode in ("sync", "async")}
    with tempfile.TemporaryDirectory(prefix="lmforge-bench-checkpoint-", dir=os.environ.get("BENCH_TMP")) as tmp:
        for model in a.models:
            for r in range(a.rounds):
                for mode in (("sync", "async") if r % 2 == 0 else ("async", "sync")):
                    got[model, mode].append(one_run(model, mode, Path(tmp)))
    print(f"{dt.date.today()}  {platform.node()}  {os.cpu_count()} CPUs  python {platform.python_version()}")
    print("| model | mode | saves | stall s (median) | stall / sync | step s (median) | ckpt MB |\n"
          "|---|---|---:|---:|---:|---:|---:|")
    for model in a.models:
        sync = statistics.median(s for run in got[model, "sync"] for s in run["stalls"])
        for mode in ("sync", "async"):
            runs = got[model, mode]
            stalls = [s for run in runs for s in run["stalls"]]
            stall = statistics.median(stalls)
            print(f"| {model} | {mode} | {len(stalls)} | {stall:.3f} | {stall / sync:.2f} | "
                  f"{statistics.median(r['step'] for r in runs):.3f} | {runs[0]['size'] / 2**20:.0f} |")


if __name__ == "__main__":
    main()
