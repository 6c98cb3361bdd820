"""Ray launcher: the same training entry point on a Ray cluster, through Ray Train.

    lmforge launch --on ray configs/debug.yaml launch.workers=2                 # local Ray, started here
    lmforge launch --on ray configs/debug.yaml --address HEAD_IP:6379            # an existing cluster
    ray job submit --address http://HEAD_IP:8265 -- lmforge launch --on ray configs/debug.yaml

`ray.train.torch.TorchTrainer` places the workers (a placement group, SPREAD across nodes by
default), creates the process group and sets the torchrun variables (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT) in every worker, which then runs `lmforge.training.train.main` exactly as
under torchrun. The driver never imports DeepSpeed or builds the model.

Failures: with `launch.max_failures=N` Ray Train restarts the worker group after a worker or node
dies; the restarted ranks resume from the newest complete lmforge checkpoint (atomic layout under
run_dir/checkpoints, which must be on storage every node sees). Checkpoints are NOT also reported
to Ray: `ray.train.report` carries metrics only, so nothing is stored twice and there is one source
of truth for "newest complete checkpoint". Ray's own run state goes to RunConfig(storage_path =
run_dir's parent, name = run_dir's name), i.e. inside the run directory.

Graceful stop: SIGTERM or SIGUSR1 to this driver writes RUN_DIR/STOP; the workers (whose loop runs
outside the main thread, so they cannot take signals themselves) save a checkpoint at the next step
and the driver exits 75. slurm/ray.sbatch relies on this for pre-emption.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from lmforge.launcher import ray_auth
from lmforge.launcher import LaunchError
from lmforge.training import startup
from lmforge.training.config import Config, ConfigError

EXIT_FAILED = 1


def _quiet_ray_env() -> None:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")


# For a Ray this command (or slurm/ray.sbatch) starts, whose only job is this run. Ray starts its worker
# processes at niceness 15 so that its own daemons stay responsive; on a node whose cores the ranks fill
# (CPU training), every wake-up of a nice-0 process (raylet, GCS, Ray Train's controller and helper
# actors) can preempt a rank at once, and its peers wait for it at the next collective. On 2 cores the
# steps took 1.06x torchrun's at Ray's default and 1.03x at niceness 0 side by side (earlier runs 1.11-1.14x;
# the VM's own noise is of that size: BENCHMARKS.md, "Ray Train vs torchrun").
# On GPU nodes the daemons use idle host cores and this changes nothing. A cluster someone else started
# keeps its own setting (`RAY_worker_niceness=0 ray start ...`, docs/clusters/ray.md).
LOCAL_RAY_ENV = {"RAY_worker_niceness": "0"}


def check_reachable(address: str, timeout_s: float = 10.0) -> None:
    """Fail fast (seconds, not Ray's minutes of retries) on an address nobody listens on."""
    if address in ("auto", "local"):
        return
    host_port = address.split("://", 1)[-1].rstrip("/")
    host, _, port = host_port.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"launch.address {address!r} is not host:port (e.g. 10.0.0.1:6379), ray://host:port or auto")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            pass
    except OSError as e:
        raise LaunchError(f"cannot reach the Ray cluster at {address}: {e}") from None


def _node_ip_for(address: str | None) -> str | None:
    """The local IP on the route to the head: a driver on a cluster node must use the address the
    node registered with (e.g. 127.0.0.2 in tests), or Ray refuses to attach it."""
    if not address or address in ("auto", "local") or "://" in address:
        return None
    host = address.rpartition(":")[0]
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            try:
                s.bind((host, 0))  # the head runs on this machine under this address
                return host
            except OSError:
                s.connect((host, 9))  # else: our address on the route to the head
                return s.getsockname()[0]
    except OSError:
        return None


def check_fits(cfg: Config, workers: int, nodes: list[dict]) -> None:
    """Refuse a request the cluster can never satisfy, instead of waiting forever for resources."""
    want_cpu, want_gpu = cfg.launch.cpus_per_worker, cfg.launch.gpus_per_worker
    per_node = []
    for n in nodes:
        r = n["Resources"]
        k = int(r.get("CPU", 0) // want_cpu) if want_cpu else workers
        if want_gpu:
            k = min(k, int(r.get("GPU", 0) // want_gpu))
        per_node.append(k)
    fits = sum(per_node)
    if cfg.launch.strategy == "STRICT_SPREAD":  # at most one worker per node
        fits = sum(1 for k in per_node if k > 0)
    elif cfg.launch.strategy == "STRICT_PACK":  # all workers on one node
        fits = max(per_node, default=0)
    if fits < workers:
        have = "; ".join(f"{n['NodeManagerAddress']}: CPU {n['Resources'].get('CPU', 0):g}, "
                         f"GPU {n['Resources'].get('GPU', 0):g}" for n in nodes)
        raise LaunchError(
            f"asked for {workers} worker(s) x (CPU {want_cpu:g}, GPU {want_gpu:g}) with {cfg.launch.strategy}; "
            f"the cluster can fit at most {fits}: {have}")


def _describe(nodes: list[dict]) -> str:
    lines = [f"  node {n['NodeID'][:12]} {n['NodeManagerAddress']}: CPU {n['Resources'].get('CPU', 0):g}, "
             f"GPU {n['Resources'].get('GPU', 0):g}" for n in nodes]
    return "\n".join(lines)


@contextmanager
def session(cfg: Config, log) -> Iterator[list[dict]]:
    """ray.init on launch.address / $RAY_ADDRESS (or a new local Ray), with token authentication
    (launcher/ray_auth.py); yields the alive nodes; shuts Ray down and removes a run's token after."""
    _quiet_ray_env()
    address = cfg.launch.address or os.environ.get("RAY_ADDRESS")
    ray_auth.use_mode(cfg.launch.ray_auth, log)
    token = None
    if address:
        check_reachable(address)
        ray_auth.check_accepted(address, cfg.launch.ray_auth)
    else:
        for k, v in LOCAL_RAY_ENV.items():  # read by the raylet ray.init starts below
            os.environ.setdefault(k, v)
        if cfg.launch.ray_auth == "token":
            token = ray_auth.start_local(log)
    import ray

    try:
        # "local" starts a new single-node Ray; None would attach to whatever cluster was started on
        # this machine last (Ray remembers it in /tmp/ray), hanging for minutes if that one is gone.
        # A local Ray gets no dashboard: nothing here reads it, and its two processes take CPU from the ranks.
        ray.init(address=address or "local", _node_ip_address=_node_ip_for(address), log_to_driver=True,
                 include_dashboard=None if address else False,
                 runtime_env={"env_vars": {k: v for k, v in os.environ.items()
                                           if k in ("TORCH_EXTENSIONS_DIR", "LMFORGE_CACHE", "PYTHONPATH")}})
        nodes = [n for n in ray.nodes() if n["Alive"]]
        log.info(f"Ray cluster at {ray.get_runtime_context().gcs_address}: {len(nodes)} node(s), "
                 f"authentication: {cfg.launch.ray_auth}\n{_describe(nodes)}")
        yield nodes
    finally:
        ray.shutdown()
        if token is not None:
            ray_auth.remove_token_file(token)


def _worker_loop(loop_config: dict) -> None:
    """Runs in every Ray Train worker: record placement, then the same main() torchrun runs."""
    startup.adopt(loop_config.get("startup", {}), "ray workers")  # the driver's part of the startup line
    import ray
    import ray.train
    import torch.distributed as tdist

    from lmforge.training.config import Config
    from lmforge.training.preflight import RUN_LOCK_ENV
    from lmforge.training.train import main

    startup.mark("rank imports")
    cfg = Config.model_validate(loop_config["config"])
    if loop_config.get("run_lock"):  # the driver holds the run directory: rank 0 takes nothing
        os.environ[RUN_LOCK_ENV] = loop_config["run_lock"]
    ctx = ray.train.get_context()
    here = {"rank": ctx.get_world_rank(), "node_id": ray.get_runtime_context().get_node_id(),
            "ip": ray.util.get_node_ip_address(), "pid": os.getpid(), "hostname": socket.gethostname(),
            "niceness": os.getpriority(os.PRIO_PROCESS, 0)}  # of this thread, the training loop's
    placement = [None] * ctx.get_world_size()
    tdist.all_gather_object(placement, here)  # Ray Train has already created the process group
    if ctx.get_world_rank() == 0:
        path = Path(cfg.run_dir) / "placement.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(placement, indent=1))
        print("lmforge: placement\n" + "\n".join(
            f"  rank {p['rank']}: node {p['node_id'][:12]} ip {p['ip']} pid {p['pid']} niceness {p['niceness']}"
            for p in placement), flush=True)
    main(cfg, report=ray.train.report)


def launch(cfg: Config) -> int:
    from lmforge.launcher.base import prepared
    from lmforge.training.preflight import RUN_LOCK_ENV, get_logger

    log = get_logger(0)
    with session(cfg, log) as nodes:
        startup.mark("ray connect")
        workers = cfg.launch.workers
        if workers is None:
            gpus = sum(n["Resources"].get("GPU", 0) for n in nodes)
            workers = int(gpus // cfg.launch.gpus_per_worker) if cfg.launch.gpus_per_worker and gpus else 1
        check_fits(cfg, workers, nodes)
        # bad config/data fail here, before any worker starts; then this driver holds the run
        # directory for the whole job, Ray Train's restarts included (the workers get its token)
        with prepared(cfg, workers, log) as cfg:
            return _fit(cfg, workers, os.environ[RUN_LOCK_ENV], log)


def _fit(cfg: Config, workers: int, lock_token: str, log) -> int:
    """Ray Train over `workers` workers; the exit status (a divergence or hang keeps its own code)."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from lmforge.launcher.base import StopOnSignal
    from lmforge.training.preflight import find_latest

    run_dir = Path(cfg.run_dir)
    use_gpu = cfg.launch.gpus_per_worker > 0
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config={"config": cfg.to_dict(), "run_lock": lock_token, "startup": startup.TIMELINE.env()},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": cfg.launch.cpus_per_worker,
                                                           **({"GPU": cfg.launch.gpus_per_worker} if use_gpu else {})},
                                     placement_strategy=cfg.launch.strategy),
        run_config=RunConfig(name=run_dir.name, storage_path=str(run_dir.parent),
                             failure_config=FailureConfig(max_failures=cfg.launch.max_failures)),
    )
    log.info(f"{workers} worker(s), {cfg.launch.strategy}, max_failures={cfg.launch.max_failures}; "
             f"tensorboard --logdir {cfg.tensorboard_dir}")
    # SIGTERM/SIGUSR1 to this driver (Slurm's warning, `ray job stop`) become the STOP file:
    # the workers checkpoint and return, and this command exits 75 so the job can resume.
    stopper = StopOnSignal(run_dir)
    try:
        with stopper:
            trainer.fit()
        return stopper.outcome(0)
    except Exception as e:  # Ray wraps the worker's exception; say what failed and what is safe
        last = find_latest(cfg.checkpoint_dir, log)
        log.error(f"training failed after {cfg.launch.max_failures} restart(s): {type(e).__name__}: {e}\n"
                  f"last good checkpoint: {last or 'none'}")
        return stopper.outcome(EXIT_FAILED)  # a divergence or hang keeps its own exit code


def wait_for_nodes(address: str, count: int, timeout_s: float) -> int:
    """Block until `count` nodes are alive in the cluster at `address` (slurm/ray.sbatch starts
    the nodes, then calls this, so the placement group sees the whole allocation)."""
    import time

    _quiet_ray_env()
    import ray

    check_reachable(address, timeout_s=min(timeout_s, 60))
    ray_auth.check_accepted(address, os.environ.get(ray_auth.MODE, "disabled").lower())
    ray.init(address=address, _node_ip_address=_node_ip_for(address), log_to_driver=False)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            alive = sum(1 for n in ray.nodes() if n["Alive"])
            if alive >= count:
                print(f"lmforge: Ray cluster at {address} has {alive} node(s)", flush=True)
                return 0
            if time.monotonic() > deadline:
                print(f"lmforge: only {alive} of {count} Ray node(s) joined {address} within {timeout_s:g} s",
                      file=sys.stderr, flush=True)
                return EXIT_FAILED
            time.sleep(1)
    finally:
        ray.shutdown()


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(prog="python -m lmforge.launcher.ray")
    parser.add_argument("--wait-for-nodes", type=int, required=True, metavar="N")
    parser.add_argument("--address", required=True)
    parser.add_argument("--timeout", type=float, default=300)
    args = parser.parse_args()
    try:
        sys.exit(wait_for_nodes(args.address, args.wait_for_nodes, args.timeout))
    except LaunchError as e:
        print(f"lmforge: {e}", file=sys.stderr)
        sys.exit(EXIT_FAILED)
