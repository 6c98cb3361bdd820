"""Time to first step: from the command to its first finished optimizer step (on a warm machine:
data cached, DeepSpeed ops built), with the breakdown every run logs (training/startup.py), for

    lmforge train configs/debug.yaml --nproc 2
    lmforge launch --on ray configs/debug.yaml --address HOST:PORT --workers 2   # a running local Ray

The Ray cluster is started by this script (`ray start --head`, token authentication as
lmforge's default expects) and kept for all rounds. Optionally another checkout runs alternately with
this one (--baseline: a PYTHONPATH that puts its lmforge first). Also prints the CPU seconds of the
whole process tree of each local run where a CPU-accounting cgroup can be made (root).

    .venv/bin/python bench/bench_startup.py --rounds 3 [--baseline /work/wt-old/.pkg] [--no-ray]

Each run: train.steps=2, logging.interval=1, otherwise configs/debug.yaml as it is (the held-out
evaluation before training included). "to first step" is measured here, from just before the
command starts to the time metrics.jsonl records for step 1, so the baseline needs no instrumentation.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import socket
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


def one_run(how: str, pythonpath: str | None, workdir: Path, cg, ray: dict | None) -> dict:
    run_dir = workdir / f"run-{time.time_ns()}"
    common = [str(REPO / "configs" / "debug.yaml"), f"run_dir={run_dir}", "train.steps=2", "logging.interval=1",
              "logging.progress=false"]
    env = dict(os.environ)
    lmforge = [sys.executable, "-m", "lmforge.launcher.cli"]  # `lmforge`, also for a baseline checkout's cli
    if how == "local":
        cmd = [*lmforge, "train", *common, "--nproc", "2"]
    else:
        cmd = [*lmforge, "launch", "--on", "ray", *common, "--address", ray["address"], "--workers", "2"]
        env.update(ray["env"])
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    group = None
    if cg is not None and how == "local":
        group = cg[0] / f"lmforge-bench-{os.getpid()}-{time.time_ns()}"
        group.mkdir()
    # the child joins the group before it execs, so everything it starts is counted
    pre = (lambda: (group / "cgroup.procs" if cg[1].name == "cpu.stat" else group / "tasks").write_text(str(os.getpid()))) \
        if group is not None else None
    start = time.time()
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, preexec_fn=pre)
    wall = time.time() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    cpu = None
    if group is not None:
        deadline = time.time() + 30  # the forkserver finishes its own exit after the launcher's
        while (group / ("cgroup.procs" if cg[1].name == "cpu.stat" else "tasks")).read_text().strip() and time.time() < deadline:
            time.sleep(0.2)
        cpu = _cpu_seconds(group, cg[1])
        group.rmdir()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    first = next(r for r in rows if r["step"] == 1 and "train/loss" in r)
    phases = {k[len("startup/"):-2]: v for r in rows for k, v in r.items()
              if k.startswith("startup/") and k != "startup/to_first_step_s"}
    return {"first": first["time"] - start, "wall": wall, "cpu": cpu, "phases": phases}


def start_ray(workdir: Path) -> tuple[dict, subprocess.Popen]:
    from lmforge.launcher.ray_auth import new_token_file
    from lmforge.training.dist import free_port

    token = new_token_file()
    port = free_port()
    env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token), "RAY_USAGE_STATS_ENABLED": "0"}
    head = subprocess.Popen([str(BIN / "ray"), "start", "--head", "--block", "--disable-usage-stats",
                             "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=2", "--include-dashboard=false"],
                            env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                break
        except OSError:
            time.sleep(0.5)
    return {"address": f"127.0.0.1:{port}", "env": env, "token": token}, head


def stop_ray(ray: dict, head: subprocess.Popen) -> None:
    import signal

    from lmforge.launcher.ray_auth import remove_token_file

    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(head.pid, sig)
            head.wait(timeout=15)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
    remove_token_file(ray["token"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--baseline", default=None, help="PYTHONPATH that puts another checkout's lmforge first")
    ap.add_argument("--no-ray", action="store_true", help="only the local launcher")
    a = ap.parse_args()
    cg = _cgroup()
    codes = {"this checkout": None, **({"baseline": a.baseline} if a.baseline else {})}
    hows = ["local"] + ([] if a.no_ray else ["ray"])
    got: dict[tuple[str, str], list[dict]] = {(h, c): [] for h in hows for c in codes}
    with tempfile.TemporaryDirectory(prefix="lmforge-bench-startup-") as tmp:
        ray, head = start_ray(Path(tmp)) if "ray" in hows else (None, None)
        try:
            for how in hows:
                one_run(how, None, Path(tmp), None, ray)  # warm: data cache, page cache, Ray's worker pool
            for _ in range(a.rounds):
                for how in hows:
                    for name, pp in codes.items():
                        got[how, name].append(one_run(how, pp, Path(tmp), cg, ray))
        finally:
            if head is not None:
                stop_ray(ray, head)
    print(f"{dt.date.today()}  {platform.node()}  {os.cpu_count()} CPUs  python {platform.python_version()}")
    print("| command | code | to first step s (median) | runs | wall s | CPU s |\n|---|---|---:|---:|---:|---:|")
    for (how, name), runs in got.items():
        cpu = [r["cpu"] for r in runs if r["cpu"] is not None]
        print(f"| {how} | {name} | {statistics.median(r['first'] for r in runs):.2f} "
              f"({min(r['first'] for r in runs):.2f}-{max(r['first'] for r in runs):.2f}) | {len(runs)} | "
              f"{statistics.median(r['wall'] for r in runs):.2f} | {f'{statistics.median(cpu):.2f}' if cpu else 'n/a'} |")
    for (how, name), runs in got.items():
        if not runs[0]["phases"]:
            continue  # a checkout without training/startup.py
        names = list(runs[0]["phases"])
        print(f"\nbreakdown, {how}, {name} (median s per phase, as the runs logged them):")
        print("| " + " | ".join(names) + " |\n|" + "---:|" * len(names))
        print("| " + " | ".join(f"{statistics.median(r['phases'].get(n, 0.0) for r in runs):.2f}" for n in names) + " |")


if __name__ == "__main__":
    main()
