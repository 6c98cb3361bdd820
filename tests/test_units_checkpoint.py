"""Checkpoints on 2 in-process gloo ranks under real DeepSpeed ZeRO (tests/harness.py), in seconds:
checkpoint.save publishes a verified directory, a fresh engine that checkpoint.load's it continues
with bitwise the same parameters and losses (model, optimizer, scheduler and RNG restored), and
verify/find_latest reject a truncated, a missing or an unlisted file. The same guarantees end to end
(SIGKILL + resume through the CLI) are in tests/test_train.py."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch

from conftest import DEBUG
from harness import run_ranks
# every lmforge name this file uses (one place to follow a rename)
from lmforge.training import checkpoint, dist, engine as engine_lib
from lmforge.training.config import build_ds_config, load_config

LOG = logging.getLogger("test_units_checkpoint")
SAVE_AT, STEPS = 3, 6


class Tiny(torch.nn.Module):
    """Two matrices and two vectors: both of the optimizer's weight-decay groups."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(16, 32)
        self.b = torch.nn.Linear(32, 16)

    def forward(self, x, y):
        return torch.nn.functional.mse_loss(self.b(torch.tanh(self.a(x))), y)


def _engine(cfg, seed: int):
    torch.manual_seed(seed)  # a fresh engine starts from other weights than the one that saved
    ds_config = build_ds_config(cfg, torch.distributed.get_world_size(), "fp32")
    return engine_lib.initialize(cfg, Tiny(), ds_config, total_steps=STEPS, log=LOG)


def _params(engine) -> dict[str, torch.Tensor]:
    """Full parameters (ZeRO-3 gathers its partitions), the same on every rank."""
    import deepspeed

    params = dict(engine.module.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values()), enabled=engine.zero_optimization_stage() == 3):
        return {n: p.detach().clone() for n, p in params.items()}


def _step(engine) -> float:
    """One optimizer step on a batch drawn from this rank's torch RNG (so a restored RNG matters)."""
    x, y = torch.randn(4, 16), torch.randn(4, 16)
    loss = engine(x, y)
    engine.backward(loss)
    engine.step()
    return loss.item()


def save_train_load(run_dir: str, stage: int) -> dict:
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    dist.setup(dist.select_runtime())  # lmforge's own path: DeepSpeed on the group the harness made
    cfg = load_config(DEBUG, [f"run_dir={run_dir}", f"parallel.zero_stage={stage}", "checkpoint.keep=2",
                              f"train.steps={STEPS}"])
    first = _engine(cfg, seed=0)
    torch.manual_seed(100 + rank)
    losses, saved, params = {}, {}, {}
    for step in range(1, STEPS + 1):
        losses[step] = _step(first)
        if step in (1, SAVE_AT, STEPS):  # three saves, keep=2: step_1 is pruned
            client = {"tokens": 64 * step, "sampler": {"consumed": 8 * step}}
            saved[step] = str(checkpoint.save(first, cfg, step, client, rank, world, LOG))
            params[step] = _params(first)

    torch.manual_seed(12345)  # an RNG state the load must replace
    second = _engine(cfg, seed=1)
    fresh = _params(second)
    client = checkpoint.load(second, Path(saved[SAVE_AT]), rank)
    loaded = _params(second)
    resumed = {step: _step(second) for step in range(SAVE_AT + 1, STEPS + 1)}
    return {"losses": losses, "resumed": resumed, "saved": saved, "client": client, "params": params,
            "fresh": fresh, "loaded": loaded, "final": _params(second), "lr": (first.get_lr(), second.get_lr())}


@pytest.fixture(scope="module", params=[2, 3], ids=["zero2", "zero3"])
def saved_run(request, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp(f"ckpt-z{request.param}") / "run"
    return run_dir, run_ranks(save_train_load, 2, str(run_dir), request.param)


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_load_resumes_bitwise(saved_run):
    run_dir, ranks = saved_run
    for r in ranks:
        assert not _equal(r["fresh"], r["params"][SAVE_AT])  # the fresh engine really started elsewhere
        assert _equal(r["loaded"], r["params"][SAVE_AT])      # ... and load restored the saved weights
        # model, Adam moments, LR schedule and this rank's RNG: the continuation is the same, bitwise
        assert r["resumed"] == {s: r["losses"][s] for s in range(SAVE_AT + 1, STEPS + 1)}
        assert _equal(r["final"], r["params"][STEPS])
        assert r["lr"][0] == r["lr"][1]
        assert r["client"]["step"] == SAVE_AT and r["client"]["world_size"] == 2
        assert r["client"]["sampler"] == {"consumed": 8 * SAVE_AT} and r["client"]["tokens"] == 64 * SAVE_AT
    assert ranks[0]["losses"] != ranks[1]["losses"]  # each rank drew its own batches


def test_save_publishes_complete_verified_directories(saved_run):
    run_dir, ranks = saved_run
    root = run_dir / "checkpoints"
    assert ranks[0]["saved"] == ranks[1]["saved"] == {s: str(root / f"step_{s}") for s in (1, SAVE_AT, STEPS)}
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == [f"step_{SAVE_AT}", f"step_{STEPS}"]  # keep=2
    assert not list(root.glob(".tmp_*"))
    assert (root / "latest").read_text() == f"step_{STEPS}"
    step = root / f"step_{STEPS}"
    manifest = json.loads((step / "manifest.json").read_text())
    assert manifest["step"] == STEPS
    assert {"rng_rank0.pt", "rng_rank1.pt", "client.json", "config.yaml"} <= set(manifest["files"])
    assert sum(1 for f in manifest["files"] if f.endswith("model_states.pt")) >= 1
    assert {str(p.relative_to(step)) for p in step.rglob("*") if p.is_file()} == set(manifest["files"]) | {"manifest.json"}
    assert checkpoint.verify(step) is None and checkpoint.find_latest(root, LOG) == step


def test_verify_and_find_latest_skip_broken_checkpoints(saved_run, tmp_path, caplog):
    run_dir, _ = saved_run
    root = tmp_path / "checkpoints"
    shutil.copytree(run_dir / "checkpoints", root)
    newest, older = root / f"step_{STEPS}", root / f"step_{SAVE_AT}"

    shard = sorted(newest.glob("*optim_states.pt"))[-1]
    size = shard.stat().st_size
    with open(shard, "r+b") as f:  # a copy cut short
        f.truncate(size // 2)
    assert checkpoint.verify(newest) == f"{shard.name} has {size // 2} bytes, the manifest says {size}"
    with caplog.at_level(logging.WARNING, logger=LOG.name):
        assert checkpoint.find_latest(root, LOG) == older
    assert any(str(newest) in r.getMessage() for r in caplog.records)

    (older / "rng_rank1.pt").unlink()  # a file lost
    assert checkpoint.verify(older) == "rng_rank1.pt is missing"
    assert checkpoint.find_latest(root, LOG) is None

    (older / "manifest.json").unlink()  # a save that never finished
    assert checkpoint.verify(older) == "no manifest.json (incomplete save)"
    (older / "manifest.json").write_text("{not json")
    assert checkpoint.verify(older).startswith("unreadable manifest.json")
