"""Every compression recipe and export format side by side on one model: wall time and peak memory
of the command that makes the artifact, then `lmforge report` for size, held-out perplexity and CPU
forward tokens/s of each in its own runtime.

    .venv/bin/python bench/bench_compress.py --model demo            # trains configs/demo.yaml first (~5 min)
    .venv/bin/python bench/bench_compress.py --model demo --run runs/demo-20261123-…   # reuse a finished run
    .venv/bin/python bench/bench_compress.py --model large           # ~107M-parameter Llama, 2 training steps
    .venv/bin/python bench/bench_compress.py --model large --only hf,w8a8,gguf-q8_0

"demo" is the embedded demo model (~5M parameters, trained); "large" has the demo's data and tokenizer
with hidden 768, 16 layers, MLP 2048 (≥100M parameters) and is trained for 2 steps only: its
perplexity is near random, so read its rows for time, memory, size and speed, not for quality.

Each artifact is made by the real CLI in a child process under GNU time (`/usr/bin/time -f`), so
"peak MB" is that command's maximum resident set (the largest process of its tree: the llm-compressor
worker for `compress`, the exporter for `export`). The markdown table goes to stdout; everything the
commands print goes to stderr.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LMFORGE = str(Path(sys.executable).parent / "lmforge")
LARGE = ["model.overrides.hidden_size=768", "model.overrides.intermediate_size=2048",
         "model.overrides.num_hidden_layers=16", "model.overrides.num_attention_heads=12",
         "model.overrides.num_key_value_heads=4", "train.steps=2", "train.warmup=1", "train.micro_batch_size=1",
         "train.global_batch_size=2", "eval.batches=1", "checkpoint.interval=2", "eval.interval=2"]


# name → (command after `lmforge`, with {hf} = the exported baseline and {out} = this artifact's path;
#         artifact path suffix)
STEPS = {
    "hf": (["export", "{run}", "--out", "{out}"], ""),
    # the same export in 100 MB shards: DeepSpeed's consolidation streams shard by shard, so the peak
    # memory of the export follows the shard size, not the model size
    "hf-shards-100MB": (["export", "{run}", "--out", "{out}", "--max-shard-size", "100MB"], ""),
    "w4a16": (["compress", "{hf}", "--recipe", "w4a16", "--out", "{out}"], ""),  # --group-size auto
    "w8a8": (["compress", "{hf}", "--recipe", "w8a8", "--out", "{out}"], ""),
    "w8a16": (["compress", "{hf}", "--recipe", "w8a16", "--out", "{out}"], ""),
    "sparse-2of4": (["compress", "{hf}", "--recipe", "sparse-2of4", "--out", "{out}"], ""),
    "wanda": (["compress", "{hf}", "--recipe", "wanda", "--out", "{out}"], ""),
    "int8-torchao": (["compress", "{hf}", "--recipe", "int8-torchao", "--out", "{out}"], ""),
    "pruned-mlp75": (["prune", "{hf}", "--mlp", "0.75", "--out", "{out}"], ""),
    "gguf-f16": (["export", "{hf}", "--format", "gguf", "--quant", "f16", "--out", "{out}"], ".gguf"),
    "gguf-q8_0": (["export", "{hf}", "--format", "gguf", "--quant", "q8_0", "--out", "{out}"], ".gguf"),
    "gguf-q4_k_m": (["export", "{hf}", "--format", "gguf", "--quant", "q4_k_m", "--out", "{out}"], ".gguf"),
    "onnx": (["export", "{hf}", "--format", "onnx", "--out", "{out}"], ""),
    "onnx-int8": (["export", "{hf}", "--format", "onnx", "--int8", "--out", "{out}"], ""),
}


def timed(cmd: list[str]) -> tuple[float, float, int]:
    """(wall seconds, peak RSS MB, exit code) of one command, its output passed to stderr."""
    fmt = "__bench__ %e %M"
    proc = subprocess.run(["/usr/bin/time", "-f", fmt, *cmd], cwd=REPO, stdout=sys.stderr, stderr=subprocess.PIPE,
                          text=True, env=dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1")))
    tail = [line for line in proc.stderr.splitlines() if line.startswith("__bench__")]
    sys.stderr.write(proc.stderr)
    wall, kb = tail[-1].split()[1:] if tail else ("nan", "0")
    return float(wall), int(kb) / 1024, proc.returncode


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=["demo", "large"], default="demo")
    ap.add_argument("--run", default=None, help="an existing lmforge run directory to start from (skips training)")
    ap.add_argument("--out", default=None, help="work directory (default runs/bench-compress-MODEL)")
    ap.add_argument("--only", default=None, help="comma-separated subset of: " + ", ".join(STEPS))
    ap.add_argument("--eval-seqs", type=int, default=32)
    args = ap.parse_args()

    out = Path(args.out or REPO / "runs" / f"bench-compress-{args.model}").resolve()
    out.mkdir(parents=True, exist_ok=True)
    run = Path(args.run).resolve() if args.run else out / "run"
    if not args.run and not (run / "checkpoints" / "latest").is_file():
        extra = LARGE if args.model == "large" else []
        wall, peak, rc = timed([LMFORGE, "train", "configs/demo.yaml", "--nproc", "2", f"run_dir={run}",
                                "logging.progress=false", *extra])
        if rc:
            print(f"training failed (exit {rc})", file=sys.stderr)
            return 1
        print(f"trained {run} in {wall:.0f} s", file=sys.stderr)

    wanted = args.only.split(",") if args.only else list(STEPS)
    if "hf" not in wanted:
        wanted.insert(0, "hf")
    rows, made = {}, []
    hf = out / "hf"
    for name in wanted:
        argv, suffix = STEPS[name]
        path = out / f"{name}{suffix}"
        if path.exists():
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        cmd = [LMFORGE, *[a.format(run=run, hf=hf, out=path) for a in argv]]
        print(f"== {name}: {' '.join(cmd)}", file=sys.stderr)
        wall, peak, rc = timed(cmd)
        rows[name] = dict(time=wall, peak=peak, rc=rc)
        if rc == 0 and name != "hf":
            made.append(str(path))

    report = out / "report"
    proc = subprocess.run([LMFORGE, "report", *made, "--baseline", str(hf), "--out", str(report),
                           "--eval-seqs", str(args.eval_seqs)], cwd=REPO, stdout=sys.stderr)
    measured = {}
    if proc.returncode in (0, 1):
        rep = json.loads((report / "report.json").read_text())
        for r in [rep["baseline"], *rep["rows"]]:
            measured[Path(r["artifact"]).name.removesuffix(".gguf")] = r
    base = measured.get("hf", {})

    print(f"Compression benchmark, {args.model} model — {_dt.date.today()}, {platform.node()} "
          f"({os.cpu_count()} CPUs), `python bench/bench_compress.py --model {args.model}"
          f"{' --only ' + args.only if args.only else ''}`\n")
    print("| artifact | make: s | make: peak MB | size MB | size ratio | runtime | ppl | Δppl | tokens/s | note |")
    print("|---|---:|---:|---:|---:|---|---:|---:|---:|---|")
    for name in wanted:
        r, m = rows[name], measured.get(name)
        if r["rc"] or m is None:
            print(f"| {name} | {r['time']:.1f} | {r['peak']:.0f} | | | | | | | failed (exit {r['rc']}) |")
            continue
        change = "" if name == "hf" else f"{100 * (m['ppl'] / base['ppl'] - 1):+.2f}%"
        print(f"| {name} | {r['time']:.1f} | {r['peak']:.0f} | {m['size'] / 1e6:.2f} | {m['size'] / base['size']:.3f} "
              f"| {m['runtime']} | {m['ppl']:.3f} | {change} | {m['tokens_per_s']:,.0f} | {m['notes']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
