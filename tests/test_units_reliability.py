"""The reliability guards' collective parts on 2 in-process gloo ranks under real DeepSpeed
(tests/harness.py), in seconds: a non-finite step updates nothing under ZeRO-1/2/3, a non-finite state
is seen by every rank (so it is never published), the guard's decisions, and the one resume decision
(ranks follow rank 0's checkpoint; a rank that cannot see it fails the job on every rank). The same
end to end (exit codes, rollback, hang stacks, chaos) is in tests/test_reliability.py."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch

from conftest import DEBUG
from harness import run_ranks
from test_units_checkpoint import Tiny, _engine, _params, _step
# every lmforge name this file uses (one place to follow a rename)
from lmforge.training import checkpoint, dist, engine as engine_lib, resume
from lmforge.training.guard import NonFiniteGuard
from lmforge.training.preflight import Prepared
from lmforge.training.config import load_config

LOG = logging.getLogger("test_units_reliability")


def _poisoned_step(engine) -> float:
    x, y = torch.randn(4, 16), torch.randn(4, 16)
    loss = engine(x, y) * float("nan")  # what training/faults.py does to a step
    engine.backward(loss)
    engine.step()
    return loss.item()


def nonfinite_steps(run_dir: str) -> dict:
    dist.setup(dist.select_runtime())
    out = {}
    for stage in (1, 2, 3):
        cfg = load_config(DEBUG, [f"run_dir={run_dir}", f"parallel.zero_stage={stage}", "train.steps=6"])
        engine = _engine(cfg, seed=0)
        _step(engine)
        before, lr = _params(engine), engine.get_lr()
        _poisoned_step(engine)
        after_bad = _params(engine)
        norm = engine.get_global_grad_norm()
        finite_after_bad = engine_lib.state_is_finite(engine)
        _step(engine)
        moved = _params(engine)
        with torch.no_grad():  # finite weights whose sum overflows fp32: the fast check's sum is inf
            p = next(engine.module.parameters())
            flat = (p.ds_tensor if hasattr(p, "ds_tensor") else p).view(-1)
            kept = flat[:2].clone()
            flat[:2] = 3e38
        finite_huge = engine_lib.state_is_finite(engine)
        with torch.no_grad():
            flat[:2] = kept
        with torch.no_grad():  # a diverged weight on rank 1's partition only
            if torch.distributed.get_rank() == 1:
                p = next(engine.module.parameters())
                (p.ds_tensor if hasattr(p, "ds_tensor") else p).view(-1)[0] = float("inf")
        out[stage] = {"unchanged": all(torch.equal(before[k], after_bad[k]) for k in before),
                      "moved": any(not torch.equal(after_bad[k], moved[k]) for k in moved),
                      "norm": float(norm), "lr_held": lr == engine.get_lr() or None,
                      "finite_after_bad": finite_after_bad, "finite_huge": finite_huge, "finite_after_inf": engine_lib.state_is_finite(engine)}
    return out


def test_a_nonfinite_step_updates_nothing_and_a_nonfinite_state_is_seen_by_every_rank(tmp_path):
    ranks = run_ranks(nonfinite_steps, 2, str(tmp_path / "run"))
    for r in ranks:
        for stage, s in r.items():
            assert s["unchanged"], f"ZeRO-{stage}: a NaN step changed the weights"
            assert s["moved"], f"ZeRO-{stage}: the next good step did not train"
            assert s["norm"] != s["norm"] or s["norm"] in (float("inf"), -1.0), (stage, s["norm"])
            assert s["finite_after_bad"] is True and s["finite_huge"] is True
            assert s["finite_after_inf"] is False  # rank 0 too: the check is collective


def test_the_guard_acts_after_max_nonfinite_in_a_row():
    nan = float("nan")
    g = NonFiniteGuard("rollback", 3, None)
    assert [g.check(l, 1.0)[1] for l in (2.0, nan, nan, 2.0, nan, nan)] == [None] * 6  # never 3 in a row
    assert g.check(nan, 1.0) == ("non-finite loss (nan)", "rollback") and g.total == 5
    g = NonFiniteGuard("skip", 2, None)
    assert [g.check(2.0, x)[1] for x in (float("inf"),) * 4] == [None, None, None, "stop"]
    g = NonFiniteGuard("stop", 1, 3.0)
    for _ in range(10):
        assert g.check(2.0, 1.0) == (None, None)
    problem, action = g.check(7.0, 1.0)  # 3.5 x the median
    assert problem.startswith("loss spike") and action == "stop"


def agreement(run_dir: str) -> dict:
    """Rank 0 chose step_6; rank 1 saw the storage a moment earlier (step_3), then not at all, then a
    different step_6."""
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    dist.setup(dist.select_runtime())
    cfg = load_config(DEBUG, [f"run_dir={run_dir}", "parallel.zero_stage=2", "train.steps=6"])
    engine = _engine(cfg, seed=0)
    root = cfg.checkpoint_dir
    for step in range(1, 7):
        _step(engine)
        if step in (3, 6):
            checkpoint.save(engine, cfg, step, {"tokens": step, "sampler": {}}, rank, world, LOG)
    plan = Prepared(dist.select_runtime(), None, None, {}, root / ("step_6" if rank == 0 else "step_3"))
    followed = resume.agree(cfg, plan, rank, world, LOG)
    out = {"followed": str(followed.resume_from), "change": followed.layout_change}

    elsewhere = Path(run_dir + "-rank1-view")  # what rank 1 sees: its own copy of the storage
    if rank == 1:
        shutil.copytree(root, elsewhere / "checkpoints")
        shutil.rmtree(elsewhere / "checkpoints" / "step_6")
    torch.distributed.barrier()
    view = load_config(DEBUG, [f"run_dir={run_dir if rank == 0 else elsewhere}", "parallel.zero_stage=2",
                               "train.steps=6"])
    plan = Prepared(dist.select_runtime(), None, None, {}, view.checkpoint_dir / ("step_6" if rank == 0 else "step_3"))
    for case in ("missing", "other manifest"):
        if case == "other manifest" and rank == 1:
            shutil.copytree(root / "step_6", elsewhere / "checkpoints" / "step_6")
            manifest = json.loads((elsewhere / "checkpoints" / "step_6" / "manifest.json").read_text())
            (elsewhere / "checkpoints" / "step_6" / "manifest.json").write_text(json.dumps({**manifest, "step": 7}))
        torch.distributed.barrier()
        try:
            resume.agree(view, plan, rank, world, LOG)
            out[case] = None
        except resume.SplitResume as e:
            out[case] = str(e)

    # a same-size corruption of the newest checkpoint (a flipped byte): every rank skips it for step_3
    if rank == 0:
        shard = sorted((root / "step_6").glob("*optim_states.pt"))[-1]
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0xFF
        shard.write_bytes(bytes(data))
    torch.distributed.barrier()
    plan = Prepared(dist.select_runtime(), None, None, {}, root / "step_6")
    out["corrupt"] = str(resume.agree(cfg, plan, rank, world, LOG).resume_from)
    return out


def test_ranks_follow_rank_0s_checkpoint_or_all_fail_naming_the_rank(tmp_path):
    ranks = run_ranks(agreement, 2, str(tmp_path / "run"))
    step_6 = tmp_path / "run" / "checkpoints" / "step_6"
    assert [r["followed"] for r in ranks] == [str(step_6)] * 2 and ranks[1]["change"] is None
    for r in ranks:  # every rank fails, with the same message: none waits in a collective
        assert r["missing"] == ranks[0]["missing"] and r["other manifest"] == ranks[0]["other manifest"]
    assert f"rank 0 resumes from {step_6}" in ranks[0]["missing"]
    assert "rank 1 cannot:" in ranks[0]["missing"] and "does not exist" in ranks[0]["missing"]
    assert "rank 1 cannot:" in ranks[0]["other manifest"] and "manifest.json differs" in ranks[0]["other manifest"]
    assert [r["corrupt"] for r in ranks] == [str(step_6.with_name("step_3"))] * 2
