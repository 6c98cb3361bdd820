"""In-process rank harness: `run_ranks(fn, 2, *args)` runs `fn(*args)` on 2 spawned worker processes
that form a real gloo process group (RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT set as
torchrun sets them), and returns each rank's return value, rank 0 first. The workers are forked from a
forkserver that imported torch, DeepSpeed and the rank code once per pytest process. A rank that raises makes
run_ranks raise with that rank's traceback (the other ranks are stopped).

`fn` must be a module-level function (it is pickled by name into the spawned workers) and so must
its arguments and return values; tensors come back by value. A start costs ~1 s on 2 cores
after the first (which pays the forkserver's imports), so a test of collectives runs in seconds
instead of the 10-20 s of a CLI run.

    def total(x):
        t = torch.tensor([x + torch.distributed.get_rank()])
        torch.distributed.all_reduce(t)
        return t.item()

    assert run_ranks(total, 2, 1) == [3, 3]
"""

from __future__ import annotations

import os
import pickle
import queue
import time
import traceback
from datetime import timedelta


def _free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def extensions_dir() -> str:
    """The persistent DeepSpeed op cache that lmforge's ranks use (training/dist.py), so a worker that
    initialises DeepSpeed loads the shared-memory op instead of JIT-building it (~1 min)."""
    from lmforge.training.dist import default_extensions_dir

    return os.environ.get("TORCH_EXTENSIONS_DIR") or default_extensions_dir()


def _worker(rank: int, world_size: int, port: int, env: dict, fn, args: tuple, results) -> None:
    os.environ.update(env)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    try:
        import torch

        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
        torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size,
                                             timeout=timedelta(seconds=120))
        try:
            out = ("ok", pickle.dumps(fn(*args)))
        finally:
            torch.distributed.destroy_process_group()
    except BaseException:  # noqa: BLE001 - reported to the parent, whatever it was
        out = ("error", traceback.format_exc())
    results.put((rank, *out))


def run_ranks(fn, world_size: int = 2, *args, timeout: float = 300, env: dict | None = None) -> list:
    """fn(*args) on `world_size` gloo ranks; each rank's return value, by rank. `env`: extra
    environment variables for the workers."""
    import torch.multiprocessing as mp

    # Forked from one server per pytest process that imported torch, DeepSpeed and the rank code once
    # (as the local launcher forks its ranks): a start costs ~1 s instead of every worker's imports.
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "deepspeed", "lmforge.training.train"])
    results = ctx.Queue()
    port = _free_port()
    worker_env = {"OMP_NUM_THREADS": "1", "TORCH_EXTENSIONS_DIR": extensions_dir(),
                  **(env or {})}
    # not daemonic: a rank may start processes of its own (DeepSpeed's universal conversion uses a pool)
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, worker_env, fn, args, results))
             for r in range(world_size)]
    for p in procs:
        p.start()
    got: dict[int, object] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(got) < world_size:
            try:
                rank, status, payload = results.get(timeout=0.2)
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if r not in got and p.exitcode is not None]
                if dead:  # give a dying rank's own report a moment to arrive first
                    try:
                        rank, status, payload = results.get(timeout=2)
                    except queue.Empty:
                        raise RuntimeError(f"rank {dead[0]} died with exit code {procs[dead[0]].exitcode} "
                                           "without reporting") from None
                elif time.monotonic() > deadline:
                    raise TimeoutError(f"ranks {sorted(set(range(world_size)) - set(got))} did not finish "
                                       f"{fn.__name__} within {timeout:.0f} s") from None
                else:
                    continue
            if status == "error":  # the first report is the cause; its peers then fail in a collective
                raise RuntimeError(f"rank {rank} of {world_size} failed in {fn.__name__}:\n{payload}")
            got[rank] = pickle.loads(payload)
    except BaseException:
        for p in procs:
            p.kill()
        raise
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
                p.join()
    return [got[r] for r in range(world_size)]
