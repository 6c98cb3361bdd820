"""Data preparation throughput: the single-node path vs `lmforge prepare --on ray` on 1 and 2 nodes.

    .venv/bin/python bench/bench_prepare.py --config configs/debug.yaml --paths '{stdlib}/*.py' --rounds 2

The tokenizer is trained once (not timed); every measurement then prepares the same corpus with
that tokenizer into a fresh cache: documents loaded, split, encoded, written. It times
training/data.py's prepare, the only difference being `write_tokens`: datasets.map on this machine
(local), or Ray Data map_batches (launcher/ray_prepare.py) on a Ray cluster of 1 node (head on
127.0.0.2, 1 CPU) or 2 nodes (+ a worker node on 127.0.0.3, 1 CPU), started here with token
authentication as tests/test_ray.py starts its cluster. Connecting to Ray is not timed. Prints a
markdown table of tokens/s (best of --rounds) and checks that every mode wrote the same bytes.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import logging
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(args: list[str], env: dict) -> subprocess.Popen:
    return subprocess.Popen([str(BIN / "ray"), "start", "--block", "--disable-usage-stats", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def _stop(proc: subprocess.Popen) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=10)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass


def cluster(nodes: int, env: dict) -> tuple[str, list[subprocess.Popen]]:
    import ray

    port = _free_port()
    procs = [_start(["--head", "--node-ip-address=127.0.0.2", f"--port={port}", "--num-cpus=1",
                     "--include-dashboard=false"], env)]
    address = f"127.0.0.2:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.2", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.5)
    if nodes == 2:
        procs.append(_start([f"--address={address}", "--node-ip-address=127.0.0.3", "--num-cpus=1"], env))
    ray.init(address=address, _node_ip_address="127.0.0.2", logging_level="ERROR")
    try:
        while sum(n["Alive"] for n in ray.nodes()) < nodes and time.time() < deadline:
            time.sleep(1)
    finally:
        ray.shutdown()
    return address, procs


def measure(mode: str, base_overrides: list[str], work: Path, log) -> tuple[float, int, str]:
    """(seconds, tokens, sha256 of train.npy + val.npy) of one preparation into a fresh cache."""
    from lmforge.launcher import ray as ray_launcher, ray_prepare
    from lmforge.training import data
    from lmforge.training.config import load_config

    cache = work / f"cache-{mode}-{time.time_ns()}"
    cfg = load_config(base_overrides[0], [*base_overrides[1:], f"data.cache_dir={cache}"])
    if mode == "local":
        t0 = time.perf_counter()
        prepared = data.prepare(cfg.data, log)
        dt_s = time.perf_counter() - t0
    else:
        with ray_launcher.session(cfg, log) as nodes:
            cpus = int(sum(n["Resources"].get("CPU", 0) for n in nodes))
            t0 = time.perf_counter()
            prepared = data.prepare(cfg.data, log, write_tokens=ray_prepare.ray_write_tokens(log, cpus))
            dt_s = time.perf_counter() - t0
    h = hashlib.sha256(prepared.train_tokens.read_bytes() + prepared.val_tokens.read_bytes()).hexdigest()[:16]
    return dt_s, prepared.meta["train_tokens"] + prepared.meta["val_tokens"], h


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--config", default="configs/debug.yaml")
    p.add_argument("--paths", default="{stdlib}/*.py", help="data.paths for the corpus (a glob)")
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    from lmforge.launcher.ray_auth import new_token_file, remove_token_file
    from lmforge.training import data
    from lmforge.training.config import load_config
    from lmforge.training.dist import get_logger

    log = get_logger(0)
    log.setLevel(logging.WARNING)
    work = Path(tempfile.mkdtemp(prefix="bench-prepare-"))
    overrides = [args.config, f"data.paths=[{args.paths!r}]", "data.on_bad_file=skip"]
    tok = data.prepare(load_config(args.config, [*overrides[1:], f"data.cache_dir={work / 'tok'}"]).data).tokenizer_dir
    overrides.append(f"data.tokenizer={tok}")
    token = new_token_file()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    env.update(RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token))
    os.environ.update({k: v for k, v in env.items() if k.startswith("RAY_")})
    rows = {}
    try:
        rows["local (datasets.map, 1 process)"] = [measure("local", overrides, work, log) for _ in range(args.rounds)]
        for nodes in (1, 2):
            address, procs = cluster(nodes, env)
            try:
                ray_overrides = [*overrides, f"launch.address={address}"]
                rows[f"Ray Data, {nodes} node(s) x 1 CPU"] = [measure("ray", ray_overrides, work, log)
                                                               for _ in range(args.rounds)]
            finally:
                for proc in reversed(procs):
                    _stop(proc)
    finally:
        remove_token_file(token)
        shutil.rmtree(work, ignore_errors=True)
    hashes = {r[2] for runs in rows.values() for r in runs}
    print(f"# bench_prepare {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.node()}, "
          f"{os.cpu_count()} CPU(s), corpus data.paths={args.paths}, {rows['local (datasets.map, 1 process)'][0][1]:,} "
          f"tokens, best of {args.rounds}; identical token files: {len(hashes) == 1} ({', '.join(sorted(hashes))})")
    print("| mode | seconds | tokens/s |")
    print("|---|---|---|")
    for mode, runs in rows.items():
        best = min(runs)
        print(f"| {mode} | {best[0]:.2f} | {best[1] / best[0]:,.0f} |")


if __name__ == "__main__":
    main()
