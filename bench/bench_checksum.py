"""What checkpoint integrity costs: content hashing (xxh3-64, what manifest.json records and a resume
verifies) per GiB, from the page cache (right after a save, as lmforge hashes) and, as root, from
disk after dropping the caches; sha256 beside it for scale; and `lmforge verify` of a real checkpoint.

    .venv/bin/python bench/bench_checksum.py                 # 1 GiB file in $TMPDIR
    .venv/bin/python bench/bench_checksum.py --gib 4 --checkpoint runs/demo-…/checkpoints/step_300

Prints a markdown table (seconds per GiB, GiB/s) for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lmforge.training.checkpoint import file_hash


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    return h.hexdigest()


def _drop_caches() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def _timed(fn, path: Path) -> float:
    t0 = time.perf_counter()
    fn(path)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gib", type=float, default=1.0)
    ap.add_argument("--checkpoint", type=Path, default=None, help="also time `lmforge verify` on it")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "blob.bin"
        with open(path, "wb") as f:  # incompressible, as optimizer state is
            for _ in range(int(args.gib * 1024)):
                f.write(os.urandom(1 << 20))
        gib = path.stat().st_size / 2**30
        for name, fn in (("xxh3-64 (lmforge)", file_hash), ("sha256", _sha256)):
            hot = min(_timed(fn, path) for _ in range(3))
            rows.append((name, "page cache", hot / gib, gib / hot))
            if _drop_caches():
                cold = _timed(fn, path)
                rows.append((name, "disk (caches dropped)", cold / gib, gib / cold))
    print(f"# bench_checksum {_dt.date.today()} on {platform.node()} ({os.cpu_count()} CPUs), {gib:.2f} GiB file\n")
    print("| hash | read from | s per GiB | GiB/s |\n|---|---|---|---|")
    for name, where, spg, gps in rows:
        print(f"| {name} | {where} | {spg:.3f} | {gps:.2f} |")
    if args.checkpoint is not None:
        t0 = time.perf_counter()
        rc = subprocess.run([str(Path(sys.executable).parent / "lmforge"), "verify", str(args.checkpoint)]).returncode
        print(f"\n`lmforge verify {args.checkpoint}`: exit {rc} in {time.perf_counter() - t0:.2f} s")


if __name__ == "__main__":
    main()
