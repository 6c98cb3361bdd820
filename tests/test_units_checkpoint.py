"""Checkpoints on 2 in-process gloo ranks under real DeepSpeed ZeRO (tests/harness.py), in seconds:
checkpoint.save publishes a verified directory, a fresh engine that checkpoint.load's it continues
with bitwise the same parameters and losses (model, optimizer, scheduler and RNG restored), and
verify/find_latest reject a truncated, a missing or an unlisted file, verify(contents=True), the
ranks' verify_contents_collective and `lmforge verify` a flipped byte; the RNG files load with
weights_only and restore bitwise (the old pickled format too); a disk that fills up mid-save (a real
tmpfs) ends both ranks with DiskFull. The same guarantees end to end (SIGKILL + resume through the
CLI) are in tests/test_train.py."""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import subprocess
from pathlib import Path

import numpy as np

import pytest
import torch

from conftest import BIN, DEBUG
from harness import run_ranks
# every lmforge name this file uses (one place to follow a rename)
from lmforge.launcher import cli
from lmforge.training import checkpoint, dist, engine as engine_lib
from lmforge.training.config import ConfigError, build_ds_config, load_config

LOG = logging.getLogger("test_units_checkpoint")
SAVE_AT, STEPS = 3, 6


class Tiny(torch.nn.Module):
    """Two matrices and two vectors: both of the optimizer's weight-decay groups."""

    def __init__(self, width: int = 32):
        super().__init__()
        self.a = torch.nn.Linear(16, width)
        self.b = torch.nn.Linear(width, 16)

    def forward(self, x, y):
        return torch.nn.functional.mse_loss(self.b(torch.tanh(self.a(x))), y)


def _engine(cfg, seed: int, width: int = 32):
    torch.manual_seed(seed)  # a fresh engine starts from other weights than the one that saved
    ds_config = build_ds_config(cfg, torch.distributed.get_world_size(), "fp32")
    return engine_lib.initialize(cfg, Tiny(width), ds_config, total_steps=STEPS, log=LOG)


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
            "fresh": fresh, "loaded": loaded, "final": _params(second), "lr": (first.get_lr(), second.get_lr()),
            "collective": _verify_collectively(Path(saved[STEPS]), rank, world)}


def _flip_byte(f: Path) -> None:
    """One byte of `f` changed, its size the same (what a size check cannot see)."""
    with open(f, "r+b") as fh:
        fh.seek(f.stat().st_size // 2)
        b = fh.read(1)
        fh.seek(-1, os.SEEK_CUR)
        fh.write(bytes([b[0] ^ 0xFF]))


def _verify_collectively(ckpt: Path, rank: int, world: int) -> dict:
    """verify_contents_collective on `ckpt` and on a copy with a byte flipped in a DeepSpeed shard
    that is rank 1's share to hash (so rank 0 learns of it through the gather)."""
    broken = ckpt.with_name("corrupted")
    sizes = {n: e["size"] for n, e in checkpoint.read_manifest(ckpt)["files"].items()}
    shard = next(n for n in checkpoint.shares(sizes, world)[1] if n.endswith("_states.pt"))
    if rank == 0:
        shutil.copytree(ckpt, broken)
        _flip_byte(broken / shard)
    torch.distributed.barrier()
    out = {"intact": checkpoint.verify_contents_collective(ckpt, rank, world),
           "corrupted": checkpoint.verify_contents_collective(broken, rank, world), "shard": shard}
    torch.distributed.barrier()
    if rank == 0:
        shutil.rmtree(broken)
    return out


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
    assert all(set(e) == {"size", "xxh3"} and len(e["xxh3"]) == 16 for e in manifest["files"].values())
    assert sum(1 for f in manifest["files"] if f.endswith("model_states.pt")) >= 1
    assert {str(p.relative_to(step)) for p in step.rglob("*") if p.is_file()} == set(manifest["files"]) | {"manifest.json"}
    assert checkpoint.verify(step) is None and checkpoint.find_latest(root, LOG) == step
    assert checkpoint.verify(step, contents=True) is None
    # rng_rank<R>.pt holds tensors and plain numbers only
    assert set(torch.load(step / "rng_rank1.pt", weights_only=True)) == {"python", "numpy", "torch"}


def test_contents_verified_collectively(saved_run):
    """verify_contents_collective: each rank hashes its share; both learn of the flipped byte."""
    _, ranks = saved_run
    shard = ranks[0]["collective"]["shard"]
    for r in ranks:
        assert r["collective"]["intact"] is None
        assert r["collective"]["corrupted"].startswith(f"{shard} does not match its content hash")


def test_verify_and_find_latest_skip_broken_checkpoints(saved_run, tmp_path, caplog, capsys):
    run_dir, _ = saved_run
    root = tmp_path / "checkpoints"
    shutil.copytree(run_dir / "checkpoints", root)
    newest, older = root / f"step_{STEPS}", root / f"step_{SAVE_AT}"

    shard = sorted(newest.glob("*optim_states.pt"))[-1]
    _flip_byte(shard)  # one byte flipped: the size still matches
    assert checkpoint.verify(newest) is None
    assert checkpoint.verify(newest, contents=True).startswith(f"{shard.name} does not match its content hash")
    half = checkpoint.verify(newest, contents=True, part=(0, 2)), checkpoint.verify(newest, contents=True, part=(1, 2))
    assert sorted(map(bool, half)) == [False, True]  # the shard is in exactly one of the two shares
    assert cli.main(["verify", str(root)]) == 1  # every step_N of the run: the newest fails, the older is OK
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"FAILED {newest}: {shard.name} does not match") and out[1].startswith(f"OK {older} (")

    # a manifest from before content hashes ({name: size}) still verifies, by size
    manifest = json.loads((older / "manifest.json").read_text())
    manifest["files"] = {n: e["size"] for n, e in manifest["files"].items()}
    (older / "manifest.json").write_text(json.dumps(manifest))
    assert checkpoint.verify(older) is None and checkpoint.verify(older, contents=True) is None
    assert checkpoint.find_latest(root, LOG) == newest  # sizes only: the flipped byte is not its business

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


def test_lmforge_verify_exit_codes(tmp_path):
    """The CLI: exit 1 naming the file whose content changed, 0 when all are intact."""
    ckpt = tmp_path / "step_7"
    ckpt.mkdir()
    (ckpt / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(os.urandom(3 << 20))
    (ckpt / "client.json").write_text("{}")
    checkpoint.write_manifest(ckpt, 7)
    good = tmp_path / "good" / "step_7"
    shutil.copytree(ckpt, good)
    _flip_byte(ckpt / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    run = subprocess.run([str(BIN / "lmforge"), "verify", str(ckpt), str(good)], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 1, run.stderr
    assert run.stdout.splitlines()[0].startswith(f"FAILED {ckpt}: zero_pp_rank_0_mp_rank_00_optim_states.pt does not match")
    assert run.stdout.splitlines()[1].startswith(f"OK {good} (2 files, 3.0 MiB, ")
    assert cli.main(["verify", str(good.parent)]) == 0
    assert cli.main(["verify", str(tmp_path / "nothing")]) == 1


def _draws() -> tuple:
    return random.random(), random.gauss(0, 1), np.random.normal(size=3).tolist(), torch.rand(3).tolist()


def test_rng_files_load_weights_only_and_restore_bitwise(tmp_path):
    random.gauss(0, 1), np.random.normal()  # cached Gaussians are part of the state too
    checkpoint.save_rng(tmp_path / "rng.pt")
    expected = _draws()
    _draws()
    checkpoint.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert _draws() == expected

    # a file written before (python's and numpy's state objects pickled): still loads weights_only
    legacy = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    torch.save(legacy, tmp_path / "old.pt")
    expected = _draws()
    with pytest.raises(Exception, match="Unsupported global"):
        torch.load(tmp_path / "old.pt", weights_only=True)
    checkpoint.set_rng_state(checkpoint.load_rng(tmp_path / "old.pt"))
    assert _draws() == expected


WIDE = 8192  # Tiny(WIDE): ~270k parameters, a checkpoint of a few MiB


def _remount(mnt: str, size: int) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", mnt], check=True)


def save_until_disk_full(mnt: str) -> dict:
    """step_1 saved on a tmpfs, which rank 0 then shrinks to leave half a checkpoint free: saving
    step_2 must fail with DiskFull on both ranks; with the space back, step_3 saves."""
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    dist.setup(dist.select_runtime())
    cfg = load_config(DEBUG, [f"run_dir={mnt}/run", "parallel.zero_stage=2", "checkpoint.keep=5", f"train.steps={STEPS}"])
    engine = _engine(cfg, seed=0, width=WIDE)
    warnings = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: warnings.append(record.getMessage())
    LOG.addHandler(handler)
    _step(engine)
    first = checkpoint.save(engine, cfg, 1, {}, rank, world, LOG)
    size = checkpoint.checkpoint_size(first)
    if rank == 0:
        _remount(mnt, shutil.disk_usage(mnt).used + size // 2)
    torch.distributed.barrier()
    _step(engine)
    error = None
    try:
        checkpoint.save(engine, cfg, 2, {}, rank, world, LOG)
    except checkpoint.DiskFull as e:
        error = {"message": str(e), "errno": e.errno, "cause": repr(e.__cause__)[:300]}
    out = {"error": error, "warnings": list(warnings), "size": size,
           "tmp_left": checkpoint.temp_dir(first.with_name("step_2")).exists(), "step_2": first.with_name("step_2").exists(),
           "first": checkpoint.verify(first, contents=True), "latest": (first.parent / "latest").read_text()}
    torch.distributed.barrier()
    if rank == 0:
        _remount(mnt, 64 << 20)
    torch.distributed.barrier()
    _step(engine)
    third = checkpoint.save(engine, cfg, 3, {}, rank, world, LOG)
    out["third"] = checkpoint.verify(third, contents=True)
    return out


def test_disk_full_mid_save_fails_every_rank_cleanly(tmp_path):
    mnt = tmp_path / "disk"
    mnt.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if mounted.returncode != 0:
        reason = f"cannot mount a tmpfs (root needed): {mounted.stderr.strip()}"
        print(reason)
        pytest.skip(reason)
    try:
        ranks = run_ranks(save_until_disk_full, 2, str(mnt))
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)
    step_2 = mnt / "run" / "checkpoints" / "step_2"
    print(f"checkpoint {ranks[0]['size']} bytes; the save's cause: {ranks[0]['error'] and ranks[0]['error']['cause']}")
    for r in ranks:  # both ranks raised, with the same message
        assert r["error"] is not None and r["error"]["errno"] == 28
        assert r["error"]["message"] == ranks[0]["error"]["message"]
        assert r["error"]["message"].startswith(f"disk full while saving checkpoint {step_2}: ")
        assert f"free on {mnt}, the previous checkpoint took " in r["error"]["message"]
        assert not r["tmp_left"] and not r["step_2"]
        assert r["first"] is None and r["latest"] == "step_1"  # the earlier checkpoint untouched
        assert r["third"] is None  # the engine saves again once there is room
    assert any(f"checkpoint {step_2} may not fit: " in w and "previous checkpoint took" in w for w in ranks[0]["warnings"])


def _fake_checkpoints(root: Path, *steps_: int) -> None:
    for s in steps_:
        ckpt = root / checkpoint.tag(s)
        ckpt.mkdir(parents=True)
        (ckpt / "client.json").write_text(json.dumps({"step": s}))
        checkpoint.write_manifest(ckpt, s)


def test_rollback_keeps_newer_checkpoints_until_the_first_publish_then_moves_them_aside(tmp_path, caplog):
    """checkpoint.resume=step_10 over step_10..30: chosen without touching step_20/30; the first
    publish of the new timeline (what save calls before publish) moves them, their derived dir and
    best.json to superseded-<time>/, so no later resume or prune finds them; the same setting then
    continues the new timeline; pruning after it never reaches step_10 through the old ones."""
    root = tmp_path / "run" / "checkpoints"
    _fake_checkpoints(root, 10, 20, 30)
    (root / "step_20_universal").mkdir()
    checkpoint.mark_best(root, "step_30", "eval/loss", 1.0, 30)
    before = {p.name: (p / "manifest.json").read_bytes() for p in checkpoint.steps(root)}
    cfg = load_config(DEBUG, [f"run_dir={tmp_path / 'run'}", "checkpoint.resume=step_10", "checkpoint.keep=2"])
    with caplog.at_level(logging.INFO):
        assert checkpoint.resume_choice(cfg, LOG) == root / "step_10"
    assert "rolling back to" in caplog.text and "step_30, step_20 stay untouched" in caplog.text
    assert {p.name: (p / "manifest.json").read_bytes() for p in checkpoint.steps(root)} == before  # untouched

    checkpoint.supersede_abandoned(root, cfg, LOG)  # the new run's first save, then its publish of step_20:
    _fake_checkpoints(root, 20)
    checkpoint.prune(root, cfg.checkpoint.keep)
    assert [p.name for p in checkpoint.steps(root)] == ["step_20", "step_10"]
    aside = next(root.glob("superseded-*"))
    assert sorted(p.name for p in aside.iterdir()) == ["best.json", "step_20", "step_20_universal", "step_30"]
    assert {n: (aside / n / "manifest.json").read_bytes() for n in ("step_20", "step_30")} == {
        n: before[n] for n in ("step_20", "step_30")}
    assert checkpoint.read_best(root) is None
    # a restart with the same setting continues the new timeline, and a later save moves nothing
    assert checkpoint.resume_choice(cfg, LOG) == root / "step_20"
    checkpoint.supersede_abandoned(root, cfg, LOG)
    assert [p.name for p in checkpoint.steps(root)] == ["step_20", "step_10"] and len(list(root.glob("superseded-*"))) == 1
    # a path works as step_N does; a missing or incomplete one is refused naming what exists
    by_path = cfg.model_copy(update={"checkpoint": cfg.checkpoint.model_copy(update={"resume": str(aside / "step_30")})})
    assert checkpoint.resume_choice(by_path, LOG) == aside / "step_30"
    with pytest.raises(ConfigError, match=r"checkpoint.resume=step_40: .*step_40: does not exist \(complete "
                                          r"checkpoints in .*: step_20, step_10\)"):
        checkpoint.resume_choice(load_config(DEBUG, [f"run_dir={tmp_path / 'run'}", "checkpoint.resume=step_40"]), LOG)


@pytest.mark.parametrize("value", ["latest", "step10", "checkpoints"])
def test_checkpoint_resume_value_is_checked(value):
    with pytest.raises(ConfigError, match="give auto, never, step_N"):
        load_config(DEBUG, [f"checkpoint.resume={value}"])
