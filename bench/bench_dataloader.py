"""Data loader throughput against what training consumes (default: the demo config).

    .venv/bin/python bench/bench_dataloader.py --config configs/demo.yaml --seconds 5

Requirement: loader tokens/s >= 50 x training tokens/s (both per data-parallel rank).

The loader is exactly what a training rank runs before each forward pass (training.train.train_step):
sampler.next_step() of a ShardedSampler for rank 0 of --dp-size ranks (micro batch and gradient
accumulation from the config, cfg.grad_accum(dp_size)), then for each micro batch
PackedTokens.batch(indices) -> (inputs, targets) int64 tensors and .to(device) (CPU here), in a
loop for --seconds after a short warm-up. Tokens are counted like training counts them
(micro_batch_size x seq_len per micro batch).

Training consumption: --train-tokens-per-s (global, all ranks), by default the median
perf/tokens_per_s of the config's own <run_dir>/metrics.jsonl, else of the newest
runs/*/metrics.jsonl, else 3000 (the demo measured on this 2-core machine with 2 ranks). Each rank
loads only its own share, so the comparison is per rank: training tokens/s / dp_size. The ratio is
also the inverse of the fraction of a rank's step time that loading costs.

Only the markdown table goes to stdout; data preparation logs go to stderr.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_TRAIN_TOKENS_PER_S = 3000.0
MIN_RATIO = 50.0


def measured_training(run_dir: Path) -> tuple[float, str] | None:
    """Median perf/tokens_per_s of a run's metrics.jsonl (the config's own run first, else the newest)."""
    candidates = [run_dir / "metrics.jsonl"]
    newest = sorted((REPO / "runs").glob("*/metrics.jsonl"), key=lambda p: p.stat().st_mtime, reverse=True)
    candidates += newest[:1]
    for path in candidates:
        if not path.is_file():
            continue
        values = []
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "perf/tokens_per_s" in rec and rec.get("step", 0) > 1:  # step 1 includes warm-up costs
                values.append(float(rec["perf/tokens_per_s"]))
        if values:
            try:
                shown = path.relative_to(REPO)
            except ValueError:
                shown = path
            return statistics.median(values), f"median of {len(values)} steps in {shown}"
    return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/demo.yaml", help="lmforge run config (default configs/demo.yaml)")
    p.add_argument("--seconds", type=float, default=5.0, help="measurement time (default 5)")
    p.add_argument("--dp-size", type=int, default=2, help="data-parallel ranks the sampler shards for (default 2)")
    p.add_argument("--train-tokens-per-s", type=float, default=None,
                   help="training consumption, global tokens/s over all ranks (default: from runs/*/metrics.jsonl, else 3000)")
    args = p.parse_args(argv)

    import torch

    from lmforge.training import data
    from lmforge.training.config import load_config
    from lmforge.training.dist import get_logger

    cfg = load_config(args.config)
    # The first preparation trains a tokenizer, whose progress output goes to fd 1: keep stdout
    # for the table by pointing fd 1 at stderr meanwhile.
    sys.stdout.flush()
    saved_stdout = os.dup(1)
    os.dup2(2, 1)
    try:
        prepared = data.prepare(cfg.data, get_logger(0))
    finally:
        os.dup2(saved_stdout, 1)
        os.close(saved_stdout)
    seq_len, micro = cfg.data.seq_len, cfg.train.micro_batch_size
    accum = cfg.grad_accum(args.dp_size)
    train_data = data.PackedTokens(prepared.train_tokens, seq_len)
    sampler = data.ShardedSampler(len(train_data), cfg.train.seed, 0, args.dp_size, micro, accum)
    device = torch.device("cpu")

    def load_step() -> int:
        n = 0
        for indices in sampler.next_step():
            inputs, targets = train_data.batch(indices)
            inputs, targets = inputs.to(device), targets.to(device)
            n += inputs.numel()
        return n

    for _ in range(10):  # warm-up: imports, first page faults of the memory-mapped token file
        load_step()
    tokens, steps = 0, 0
    t0 = time.perf_counter()
    while (elapsed := time.perf_counter() - t0) < args.seconds:
        tokens += load_step()
        steps += 1
    loader_tps = tokens / elapsed

    if args.train_tokens_per_s is not None:
        train_global, source = args.train_tokens_per_s, "--train-tokens-per-s"
    else:
        found = measured_training(Path(cfg.run_dir) if Path(cfg.run_dir).is_absolute() else REPO / cfg.run_dir)
        train_global, source = found if found else (DEFAULT_TRAIN_TOKENS_PER_S,
                                                    "default (demo measured ~3000 tokens/s on 2 ranks)")
    train_rank = train_global / args.dp_size
    ratio = loader_tps / train_rank
    ok = ratio >= MIN_RATIO
    date = _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")

    print(f"## data loader throughput vs training consumption ({args.config})\n")
    print("| loader tokens/s | training tokens/s | ratio |")
    print("|---:|---:|---:|")
    print(f"| {loader_tps:,.0f} | {train_rank:,.0f} | {ratio:,.0f} |")
    print()
    print(f"ratio (per rank): **{ratio:,.0f}** (requirement >= {MIN_RATIO:.0f}: {'PASS' if ok else 'FAIL'}); "
          f"loader of one rank vs all-rank training {train_global:,.0f} tokens/s: {loader_tps / train_global:,.0f}")
    print()
    print(f"- loader: rank 0 of {args.dp_size}, {steps} optimizer steps x {accum} micro batch(es) x {micro} "
          f"sequences x {seq_len} tokens in {elapsed:.2f} s ({len(train_data):,} packed sequences, "
          f"{prepared.meta.get('train_tokens', 0):,} training tokens)")
    print(f"- training: {train_global:,.0f} tokens/s over {args.dp_size} ranks = {train_rank:,.0f} per rank; "
          f"source: {source}")
    print(f"- {date}; {platform.platform()}, {os.cpu_count()} CPUs; python {platform.python_version()}, "
          f"torch {torch.__version__}; config {args.config}")
    print(f"- command: `python {shlex.join(sys.argv)}`")
    return 0


if __name__ == "__main__":
    sys.exit(main())
