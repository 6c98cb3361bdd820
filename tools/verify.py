"""`lmforge verify`: check checkpoints against their manifests, every file's size and content hash
(xxh3_64, recorded by the ranks at save time), e.g. after copying a run or before resuming one.

    lmforge verify runs/debug/checkpoints/step_20     # one checkpoint
    lmforge verify runs/debug                         # every step_N checkpoint of the run, newest first

A run directory (or its checkpoints/) means all its step_N checkpoints, not only the newest: a
resume falls back to the older ones when the newest is broken, so they are checked too (derived
step_N_universal/_hf directories only when named). One line per checkpoint:
`OK <path> (N files, SIZE, T s)` or `FAILED <path>: <problem>`; exit 0 when all are OK, else 1.
A checkpoint written before hashes were recorded is checked by size only.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from lmforge.training import checkpoint


def checkpoints(arg: str) -> list[Path]:
    """What one argument names: a checkpoint (a directory with a manifest or named step_N), else the
    step_N checkpoints of a run directory or its checkpoints/, newest first; [] if none."""
    p = Path(arg).expanduser()
    if (p / "manifest.json").is_file() or p.name.startswith("step_"):
        return [p]
    return checkpoint.steps(p / "checkpoints" if (p / "checkpoints").is_dir() else p)


def verify_one(path: Path) -> str:
    """The line for one checkpoint, with a progress bar by bytes on a terminal's stderr."""
    from tqdm import tqdm

    start = time.monotonic()
    try:
        files = checkpoint.read_manifest(path)["files"]
        total = sum(e["size"] for e in files.values())
    except Exception:  # noqa: BLE001 - verify names what is wrong with the manifest
        files, total = {}, 0
    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=path.name, leave=False,
              file=sys.stderr, disable=None) as bar:
        problem = checkpoint.verify(path, contents=True, progress=bar.update)
    if problem:
        return f"FAILED {path}: {problem}"
    return f"OK {path} ({len(files)} files, {checkpoint.human_bytes(total)}, {time.monotonic() - start:.1f} s)"


def verify_checkpoints(args: list[str]) -> int:
    """Every checkpoint the arguments name, one line each; 0 if all are intact, else 1."""
    ok = True
    for arg in args:
        found = checkpoints(arg)
        if not found:
            print(f"FAILED {arg}: not a checkpoint, nor a run directory with step_N checkpoints", flush=True)
            ok = False
        for path in found:
            line = verify_one(path)
            print(line, flush=True)
            ok = ok and line.startswith("OK ")
    return 0 if ok else 1
