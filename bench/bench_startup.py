"""What a short 2-rank run costs from the command to its exit: CPU seconds of the whole process tree
(launcher, forkserver, ranks; a cgroup of its own, so root and cgroup v1 `cpuacct` or v2 are needed,
else only wall time is printed) and wall seconds. Optionally against another checkout (e.g. the
commit before the forked ranks), alternating the two.

    sudo .venv/bin/python bench/bench_startup.py --rounds 3
    sudo .venv/bin/python bench/bench_startup.py --rounds 3 --baseline /work/wt-old/.pkg   # PYTHONPATH of a checkout

The run: configs/debug.yaml, 2 ranks, 2 steps, one evaluation and one checkpoint (the imports, the
rendezvous, DeepSpeed's initialisation and the first step dominate).
"""

from __future__ import annotations

import argparse
import datetime as dt
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


def _cgroup() -> tuple[Path, Path] | None:
    """(directory to create groups in, the usage file name) where this process may make a CPU-accounting group."""
    for root, usage in ((Path("/sys/fs/cgroup/cpuacct"), "cpuacct.usage"), (Path("/sys/fs/cgroup"), "cpu.stat")):
        if (root / ("cpuacct.usage" if usage == "cpuacct.usage" else "cgroup.controllers")).exists() and os.access(root, os.W_OK):
            return root, Path(usage)
    return None


def _cpu_seconds(group: Path, usage: Path) -> float:
    text = (group / usage).read_text()
    if usage.name == "cpuacct.usage":
        return int(text) / 1e9
    return int(dict(line.split() for line in text.splitlines())["usage_usec"]) / 1e6


def one_run(pythonpath: str | None, workdir: Path, cg) -> tuple[float | None, float]:
    run_dir = workdir / f"run-{time.time_ns()}"
    cmd = [str(BIN / "lmforge"), "train", str(REPO / "configs" / "debug.yaml"), "--nproc", "2", f"run_dir={run_dir}",
           "train.steps=2", "checkpoint.interval=2", "eval.interval=2", "logging.progress=false"]
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    group = None
    if cg is not None:
        group = cg[0] / f"lmforge-bench-{os.getpid()}-{time.time_ns()}"
        group.mkdir()
    start = time.time()
    # the child joins the group before it execs, so everything it starts is counted
    pre = (lambda: (group / "cgroup.procs" if cg[1].name == "cpu.stat" else group / "tasks").write_text(str(os.getpid()))) \
        if group is not None else None
    subprocess.run(cmd, env=env, cwd=REPO, check=True, capture_output=True, preexec_fn=pre)
    wall = time.time() - start
    cpu = None
    if group is not None:
        deadline = time.time() + 30  # the forkserver finishes its own exit after the launcher's
        while (group / ("cgroup.procs" if cg[1].name == "cpu.stat" else "tasks")).read_text().strip() and time.time() < deadline:
            time.sleep(0.2)
        cpu = _cpu_seconds(group, cg[1])
        group.rmdir()
    return cpu, wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--baseline", default=None, help="PYTHONPATH that puts another checkout's lmforge first")
    a = ap.parse_args()
    cg = _cgroup()
    variants = {"this checkout": None, **({"baseline": a.baseline} if a.baseline else {})}
    got: dict[str, list[tuple[float | None, float]]] = {k: [] for k in variants}
    with tempfile.TemporaryDirectory(prefix="lmforge-bench-startup-") as tmp:
        one_run(None, Path(tmp), None)  # warm the data cache and the page cache
        for _ in range(a.rounds):
            for name, pp in variants.items():
                got[name].append(one_run(pp, Path(tmp), cg))
    print(f"{dt.date.today()}  {platform.node()}  {os.cpu_count()} CPUs  python {platform.python_version()}")
    print("| code | CPU s (median) | wall s (median) | runs |\n|---|---:|---:|---:|")
    for name, runs in got.items():
        cpu = [c for c, _ in runs if c is not None]
        print(f"| {name} | {statistics.median(cpu):.2f} | {statistics.median(w for _, w in runs):.2f} | {len(runs)} |"
              if cpu else f"| {name} | n/a | {statistics.median(w for _, w in runs):.2f} | {len(runs)} |")


if __name__ == "__main__":
    main()
