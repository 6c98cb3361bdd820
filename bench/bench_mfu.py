"""Model FLOPs utilisation of a real training run: the GPU benchmark, runnable on CPU.

    .venv/bin/python bench/bench_mfu.py                     # CUDA: ~1B Llama, seq 4096, bf16, flash-attn, ZeRO-3
    .venv/bin/python bench/bench_mfu.py --steps 20          # CPU: a tiny Llama, same code path

On CUDA it trains configs/pretrain_1b.yaml's model (preset llama-1b) at seq_len 4096 in bf16 with
flash-attention (when installed; sdpa otherwise) under ZeRO-3 on every visible GPU (goal: >= 50%
MFU on H100), with the peak from lmforge's GPU table. On CPU there is no published peak, so the
denominator is measured here: the best fp32 matmul TFLOP/s of this process's threads on a
2048x2048 GEMM, measured before and after the run (the higher counts: another process busy at
that moment must not shrink the denominator; run it on an idle machine); the model is a 2.6M
Llama so that a run takes a minute. MFU = achieved model
TFLOP/s per device (6·N + attention FLOPs per token, see training/model.py) / peak; the median
over the steps after warm-up. Only the markdown table goes to stdout.
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
import time
from pathlib import Path

WARMUP = 3


def cpu_matmul_peak_tflops(threads: int, n: int = 2048, reps: int = 5) -> float:
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e12


def main() -> int:
    import torch

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=None, help="default 30 on CUDA, 20 on CPU")
    p.add_argument("--nproc", type=int, default=None, help="default: every GPU, else 2 CPU ranks")
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--micro-batch", type=int, default=None)
    args = p.parse_args()
    cuda = torch.cuda.is_available()
    if cuda:
        nproc = args.nproc or torch.cuda.device_count()
        config, seq, mb, steps = "configs/pretrain_1b.yaml", args.seq_len or 4096, args.micro_batch or 1, args.steps or 30
        extra = ["train.precision=bf16", "model.attention=auto"]
        peak = None  # lmforge's table for the device
    else:
        nproc = args.nproc or 2
        config, seq, mb, steps = "configs/debug.yaml", args.seq_len or 256, args.micro_batch or 4, args.steps or 20
        threads = max(1, (os.cpu_count() or 1) // nproc)
        peak = cpu_matmul_peak_tflops(threads)
        extra = [f"logging.peak_tflops={peak}", "model.overrides.hidden_size=256",
                 "model.overrides.intermediate_size=704", "model.overrides.num_hidden_layers=4",
                 "model.overrides.max_position_embeddings=1024"]
    with tempfile.TemporaryDirectory(prefix="lmforge-bench-mfu-") as tmp:
        cmd = [str(Path(sys.executable).parent / "lmforge"), "train", config, "--nproc", str(nproc),
               f"run_dir={tmp}/run", f"train.steps={steps}", f"data.seq_len={seq}", f"train.micro_batch_size={mb}",
               f"train.global_batch_size={mb * nproc}", "parallel.zero_stage=3", "checkpoint.interval=0",
               "eval.interval=0", "eval.batches=1", "logging.interval=1", "logging.progress=false",
               "checkpoint.resume=never", *extra]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if not cuda:  # the best of before and after: a busy moment must not shrink the denominator
            peak = max(peak, cpu_matmul_peak_tflops(threads))
        if proc.returncode != 0:
            raise SystemExit(f"{shlex.join(cmd)} failed:\n{proc.stderr[-4000:]}")
        rows = [json.loads(line) for line in Path(tmp, "run", "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "perf/step_time_s" in r and r["step"] > WARMUP]
    # On CPU the run logged MFU against the first peak measurement; rescale to the best one.
    mfu = [r["perf/tflops_per_device"] / peak if peak else r["perf/mfu"] for r in rows if "perf/mfu" in r]
    tflops = statistics.median(r["perf/tflops_per_device"] for r in rows)
    step = statistics.median(r["perf/step_time_s"] for r in rows)
    tok = statistics.median(r["perf/tokens_per_s"] for r in rows)
    model = [ln for ln in proc.stderr.splitlines() if "] model: " in ln]
    runtime = [ln for ln in proc.stderr.splitlines() if "] runtime: " in ln]
    device = torch.cuda.get_device_name(0) if cuda else f"{platform.processor() or platform.machine()} CPU"
    print(f"\n{_dt.date.today()} · {platform.node()} · {device} · `{shlex.join(['python', 'bench/bench_mfu.py', *sys.argv[1:]])}`\n")
    print(f"- {model[0].split('] ')[1] if model else 'model: ?'}")
    print(f"- {runtime[0].split('] ')[1] if runtime else 'runtime: ?'}")
    print(f"- peak per device: {'lmforge GPU table' if peak is None else f'{peak:.3f} TFLOP/s (measured fp32 GEMM)'}\n")
    print("| ranks | seq len | micro batch | median step (s) | tokens/s | TFLOP/s per device | MFU |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    mfu_text = f"{statistics.median(mfu) * 100:.1f}%" if mfu else "n/a (no peak known)"
    print(f"| {nproc} | {seq} | {mb} | {step:.3f} | {tok:,.0f} | {tflops:.3f} | {mfu_text} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
