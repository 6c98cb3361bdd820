"""Resume on another layout through DeepSpeed's universal checkpoint (training/checkpoint/universal.py): real
runs on 2 and 1 gloo ranks. World size 2 → 1 after a SIGKILL (ZeRO-3, AdamW); chains of resumes, each
on another layout, against one uninterrupted run: world size 2 → 1 → 2 with ZeRO stage 3 → 2 and
Ulysses SP 1 → 2 → 1 (AdamW); world size 2 → 1 → 2 with ZeRO stage 3 → 2 → 3 (bitsandbytes
AdamW8bit); AutoTP 1 → 2 → 1 on ZeRO-1; and the refusal of what DeepSpeed cannot convert (a
ZeRO-3 x TP checkpoint), before any rank starts.

    pytest tests/test_universal.py -m slow -v     # ~6 min on 2 cores (the layout chains ~4 of them)
    pytest tests/test_universal.py -m "not slow"  # unit tests: layout_change, refusals, bnb round trip

Every resumed run is compared with an uninterrupted run: AdamW within 1e-5 (measured: within
1e-6), the 8-bit optimizer within a tenth of the gap between the 8-bit and the fp32 optimizer's
losses (re-quantizing the moments on the new partitions is 8-bit noise)."""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import pytest
import torch

from conftest import DEBUG, STANDARD as COMMON, debug_overrides, lmforge, losses


def _has_8bit() -> bool:
    try:
        import bitsandbytes  # noqa: F401

        from lmforge.training.config import TrainConfig
    except ImportError:
        return False
    return "adamw_8bit" in str(TrainConfig.model_fields["optimizer"].annotation)


HAS_8BIT = _has_8bit()
needs_8bit = pytest.mark.skipif(not HAS_8BIT, reason="adamw_8bit not available")


def _max_diff(a: dict[int, float], b: dict[int, float], steps) -> float:
    return max(abs(a[s] - b[s]) for s in steps)


def _assert_converted(stderr: str, run_dir: Path, step: int) -> None:
    universal = run_dir / "checkpoints" / f"step_{step}_universal"
    assert "resuming through a universal checkpoint" in stderr
    assert f"converted {run_dir / 'checkpoints' / f'step_{step}'} to DeepSpeed's universal format" in stderr
    if (run_dir / "checkpoints" / f"step_{step}").is_dir():
        assert (universal / "manifest.json").is_file() and (universal / "zero" / "optimizer_state.pt").is_file()
    else:  # checkpoint.keep pruned the step after the resumed run saved newer ones: with its conversion
        assert not universal.exists()
    assert not list((run_dir / "checkpoints").glob(".tmp_*"))


@pytest.mark.slow
def test_two_ranks_killed_then_resumed_on_one(debug_run, killed_run, tmp_path, data_cache):
    """A real SIGKILL of the driver and both ranks mid-run (conftest's killed_run, also resumed
    on 2 ranks by test_train); the same command on 1 rank continues the uninterrupted 2-rank run
    (conftest's ZeRO-3 reference) within 1e-5."""
    ref = debug_run("adamw", 3, 2)[0]
    run_dir = tmp_path / "run"
    shutil.copytree(killed_run[0], run_dir, symlinks=True)
    assert not (run_dir / "checkpoints" / "step_40").exists()
    proc = lmforge("train", DEBUG, *debug_overrides(run_dir, data_cache, *COMMON), "--nproc", "1")
    resumed_from = int(re.search(r"resumed from \S+ at step (\d+)", proc.stderr).group(1))
    assert resumed_from in (20, 30)
    _assert_converted(proc.stderr, run_dir, resumed_from)
    assert "world_size=1" in proc.stderr
    steps = range(resumed_from + 1, 41)
    resumed = losses(run_dir)
    assert set(steps) <= set(resumed)
    diff = _max_diff(resumed, losses(ref), steps)
    assert diff <= 1e-5, f"AdamW resumed on another world size drifts by {diff:.3g}"
    print(f"adamw: resumed from step {resumed_from}, max |loss - uninterrupted| = {diff:.3g}")


@pytest.mark.slow
def test_conversion_is_reused_and_redone_when_the_checkpoint_changes(debug_run, tmp_path):
    from lmforge.training.checkpoint import universal

    ckpt_dir = tmp_path / "checkpoints"
    shutil.copytree(debug_run("adamw", 3, 2)[0] / "checkpoints" / "step_30", ckpt_dir / "step_30")
    ckpt, log = ckpt_dir / "step_30", logging.getLogger("test_universal")
    out = universal.convert(ckpt, log)
    assert out == ckpt_dir / "step_30_universal" and universal.is_converted(ckpt)
    assert json.loads((out / "universal.json").read_text())["source_world_size"] == 2
    stamp = (out / "manifest.json").stat().st_mtime_ns
    assert universal.convert(ckpt, log) == out and (out / "manifest.json").stat().st_mtime_ns == stamp
    manifest = json.loads((ckpt / "manifest.json").read_text())  # as if step_30 were saved again
    (ckpt / "manifest.json").write_text(json.dumps(manifest, indent=2))
    assert not universal.is_converted(ckpt)
    universal.convert(ckpt, log)
    assert universal.is_converted(ckpt) and (out / "manifest.json").stat().st_mtime_ns != stamp
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["latest_universal", "step_30", "step_30_universal"]


@needs_8bit
def test_bnb_state_dequantize_requantize_round_trip():
    """8-bit moments → fp32 (what the universal checkpoint holds) → bnb state again on the same
    partition: the very same codes and scales, for 8-bit and for bnb's 32-bit (small tensor) state."""
    import bitsandbytes as bnb

    from lmforge.training.checkpoint import universal

    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(5000 + 17)), torch.nn.Parameter(torch.randn(300))]
    opt = bnb.optim.AdamW8bit([{"params": params[:1]}, {"params": params[1:], "weight_decay": 0.0}], lr=1e-3)
    for _ in range(5):
        for p in params:
            p.grad = torch.randn_like(p) * (1 + torch.arange(p.numel()) / p.numel())
        opt.step()
    saved = opt.state_dict()["state"]  # as DeepSpeed writes it (bnb nests the quantization state)
    fresh = bnb.optim.AdamW8bit([{"params": params[:1]}, {"params": params[1:], "weight_decay": 0.0}], lr=1e-3)
    for i, p in enumerate(params):
        assert universal.is_bnb_state(saved[i])
        fresh.state[p].update(universal.dequantize_bnb_entry(saved[i]))  # what DeepSpeed's universal load leaves
    assert universal.requantize_bnb_state(fresh) == 2
    for p in params:
        a, b = opt.state[p], fresh.state[p]
        assert set(a) == set(b) and a["step"] == b["step"] == 5
        for key in ("state1", "state2", "absmax1", "absmax2"):
            if key in a:
                assert torch.equal(a[key], b[key]), key
    assert opt.state[params[0]]["state1"].dtype == torch.uint8 and opt.state[params[1]]["state1"].dtype == torch.float32


# --------------------------------------------------------------------------- ZeRO stage, SP and TP degree

# A constant LR after warmup (train.schedule=constant), so that a run of N steps resumed up to
# M > N steps trains exactly like one uninterrupted M-step run: a chain of resumes, each on another
# layout, is compared with ONE uninterrupted 2-rank ZeRO-3 run. The layouts themselves agree within 5e-7
# (tests/test_parallel.py), a resume that lost its Adam moments drifts by ~1e-1.
HOP = 10  # steps per resumed run: one checkpoint interval
LONGEST = 4  # hops of the longest chain: the reference runs as far, and keeps every checkpoint (step_10 too)
CHAIN = ["train.schedule=constant", f"checkpoint.interval={HOP}", f"checkpoint.keep={LONGEST + 1}", "eval.interval=0"]


def _chain_args(run_dir: Path, cache: Path, optimizer: str, steps: int, *layout: str) -> list[str]:
    return [DEBUG, *debug_overrides(run_dir, cache, *CHAIN, f"train.steps={steps}", f"train.optimizer={optimizer}",
                                    *layout)]


@pytest.fixture(scope="module")
def constant_reference(tmp_path_factory, data_cache):
    """Uninterrupted runs, 2 ranks, ZeRO-3, made on first use: optimizer → run_dir."""
    runs: dict[str, Path] = {}

    def get(optimizer: str) -> Path:
        if optimizer not in runs:
            run_dir = tmp_path_factory.mktemp(f"const-{optimizer}") / "run"
            lmforge("train", *_chain_args(run_dir, data_cache, optimizer, 10 + LONGEST * HOP), "--nproc", "2")
            runs[optimizer] = run_dir
        return runs[optimizer]

    return get


def _layout(nproc: int, *overrides: str):
    from lmforge.training.checkpoint import SavedLayout

    p = dict(o.removeprefix("parallel.").split("=") for o in overrides)
    return SavedLayout(nproc, int(p.get("zero_stage", 3)), int(p.get("tensor", 1)), int(p.get("sequence", 1)))


def _resume_chain(ref: Path, run_dir: Path, cache: Path, optimizer: str, hops) -> None:
    """The reference's step_10 (2 ranks, ZeRO-3) resumed HOP steps on hops[0]'s layout, that run's
    last checkpoint HOP more on hops[1]'s, …; each hop converts once, continues the losses and writes
    a plain checkpoint of its own layout."""
    shutil.copytree(ref, run_dir, symlinks=True)
    for ckpt in (run_dir / "checkpoints").glob("step_*"):
        if ckpt.name != "step_10":
            shutil.rmtree(ckpt)
    (run_dir / "checkpoints" / "latest").write_text("step_10")
    (run_dir / "metrics.jsonl").unlink()
    before = _layout(2)
    assert len(hops) <= LONGEST
    for start, (nproc, *overrides) in zip(range(10, 10 + HOP * len(hops), HOP), hops):
        proc = lmforge("train", *_chain_args(run_dir, cache, optimizer, start + HOP, *overrides), "--nproc", str(nproc))
        after = _layout(nproc, *overrides)
        ckpt = run_dir / "checkpoints" / f"step_{start}"
        assert f"{ckpt} was written by {before}; this run: {after}: resuming through a universal checkpoint" in proc.stderr
        assert f"resumed from {ckpt} at step {start}" in proc.stderr
        _assert_converted(proc.stderr, run_dir, start)
        if optimizer != "adamw":
            assert "bitsandbytes 8-bit states dequantized" in proc.stderr and "re-quantized" in proc.stderr
        if nproc == 1:
            assert "world_size=1" in proc.stderr
        saved = run_dir / "checkpoints" / f"step_{start + HOP}"
        assert json.loads((saved / "client.json").read_text())["world_size"] == nproc
        before = after


def _check_chain(run_dir: Path, ref: Path, optimizer: str, reference) -> float:
    resumed, uninterrupted = losses(run_dir), losses(ref)
    steps = range(11, max(resumed) + 1)
    assert sorted(resumed) == list(steps)
    diff = _max_diff(resumed, uninterrupted, steps)
    if optimizer == "adamw":
        assert diff <= 1e-5, f"AdamW resumed on other layouts drifts by {diff:.3g}"
    else:
        noise = _max_diff(uninterrupted, losses(reference("adamw")), steps)  # 8-bit vs fp32 state
        assert diff <= min(1e-3, 0.1 * noise), f"8-bit resume drifts by {diff:.3g} (8-bit vs fp32: {noise:.3g})"
    print(f"{optimizer}: max |loss - uninterrupted| over steps 11-{steps[-1]} = {diff:.3g}")
    return diff


@pytest.mark.slow
def test_world_size_zero_stage_and_sequence_parallel_changes_resume(constant_reference, tmp_path, data_cache):
    """2 ranks → 1 rank (ZeRO-3) → 2 ranks on ZeRO-2 (DeepSpeed alone fails a plain load across stages,
    in check_ckpt_list) → ZeRO-3 with Ulysses SP=2 → SP=1: both world-size directions, both stage
    directions and both SP directions, in four resumes (each a process start, the bulk of a run's time)."""
    ref = constant_reference("adamw")
    _resume_chain(ref, tmp_path / "run", data_cache, "adamw",
                  [(1, "parallel.zero_stage=3"), (2, "parallel.zero_stage=2"), (2, "parallel.sequence=2"),
                   (2, "parallel.sequence=1")])
    _check_chain(tmp_path / "run", ref, "adamw", constant_reference)


@pytest.mark.slow
@needs_8bit
def test_world_size_and_zero_stage_changes_resume_8bit(constant_reference, tmp_path, data_cache):
    """bitsandbytes AdamW8bit, 2 ranks → 1 rank → 2 ranks on ZeRO-2 → ZeRO-3: dequantized for each
    conversion, re-quantized on the new partitions."""
    ref = constant_reference("adamw_8bit")
    _resume_chain(ref, tmp_path / "run", data_cache, "adamw_8bit",
                  [(1, "parallel.zero_stage=3"), (2, "parallel.zero_stage=2"), (2, "parallel.zero_stage=3")])
    _check_chain(tmp_path / "run", ref, "adamw_8bit", constant_reference)


@pytest.mark.slow
def test_tensor_parallel_change_resumes(constant_reference, tmp_path, data_cache):
    """ZeRO-3 → AutoTP=2 on ZeRO-1 (stage and TP degree at once) → TP=1 on ZeRO-1."""
    ref = constant_reference("adamw")
    _resume_chain(ref, tmp_path / "run", data_cache, "adamw",
                  [(2, "parallel.zero_stage=1", "parallel.tensor=2"), (2, "parallel.zero_stage=1", "parallel.tensor=1")])
    _check_chain(tmp_path / "run", ref, "adamw", constant_reference)


def _fake_checkpoint(run_dir: Path, cache: Path, nproc: int, *overrides: str) -> Path:
    """A complete-looking step_10 (client.json, config.yaml, manifest) as `overrides` on `nproc`
    ranks would write it: enough for preflight, which reads no DeepSpeed file."""
    from lmforge.training.config import load_config

    cfg = load_config(DEBUG, debug_overrides(run_dir, cache, *overrides))
    ckpt = run_dir / "checkpoints" / "step_10"
    ckpt.mkdir(parents=True)
    (ckpt / "client.json").write_text(json.dumps({"step": 10, "world_size": nproc, "tokens": 0}))
    (ckpt / "config.yaml").write_text(cfg.to_yaml())
    files = {p.name: p.stat().st_size for p in ckpt.iterdir()}
    (ckpt / "manifest.json").write_text(json.dumps({"step": 10, "files": files}))
    return ckpt


def test_layout_change_reports_world_size_zero_stage_tp_and_sp(tmp_path, data_cache):
    from lmforge.training.checkpoint import LayoutChange, SavedLayout, check_compatible, layout_change, universal
    from lmforge.training.config import load_config

    ckpt = _fake_checkpoint(tmp_path / "run", data_cache, 2, "parallel.zero_stage=3", "parallel.sequence=2")
    assert SavedLayout.read(ckpt) == SavedLayout(2, 3, 1, 2)

    def change(nproc: int, *overrides: str):
        cfg = load_config(DEBUG, debug_overrides(tmp_path / "run", data_cache, *overrides))
        check_compatible(ckpt, cfg, nproc)  # the layout keys are no longer config incompatibilities
        return layout_change(ckpt, cfg, nproc)

    assert change(2, "parallel.sequence=2") is None
    for nproc, overrides, now in [(1, [], "1 rank(s), ZeRO-3"),
                                  (2, ["parallel.zero_stage=2", "parallel.sequence=2"], "2 rank(s), ZeRO-2, SP=2"),
                                  (2, ["parallel.zero_stage=1", "parallel.tensor=2"], "2 rank(s), ZeRO-1, TP=2"),
                                  (2, [], "2 rank(s), ZeRO-3")]:
        c = change(nproc, *overrides)
        assert str(c) == f"2 rank(s), ZeRO-3, SP=2; this run: {now}"
        assert universal.unsupported(c) is None
    # a ZeRO-3 x TP source is what DeepSpeed's converter cannot read: refused, naming the way out
    zero3_tp = universal.unsupported(LayoutChange(SavedLayout(2, 3, 2, 1), SavedLayout(2, 1, 2, 1)))
    assert "ZeRO-3 x tensor-parallel" in zero3_tp
    assert "--nproc 2 parallel.zero_stage=3 parallel.tensor=2 parallel.sequence=1" in zero3_tp
    assert universal.unsupported(LayoutChange(SavedLayout(2, 1, 2, 1), SavedLayout(2, 3, 2, 1))) is None


def test_unconvertible_layout_is_refused_before_any_rank_starts(tmp_path, data_cache):
    run_dir = tmp_path / "run"
    _fake_checkpoint(run_dir, data_cache, 2, "parallel.zero_stage=3", "parallel.tensor=2")
    proc = lmforge("train", DEBUG, *debug_overrides(run_dir, data_cache, "parallel.zero_stage=1", "parallel.tensor=2"),
                   "--nproc", "2", check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    err = proc.stderr.strip().splitlines()[-1]
    assert err.startswith("lmforge: config error:")
    assert "step_10 was written by 2 rank(s), ZeRO-3, TP=2; this run: 2 rank(s), ZeRO-1, TP=2." in err
    assert "resumes only on the layout that wrote it: --nproc 2 parallel.zero_stage=3 parallel.tensor=2" in err
    assert "model:" not in proc.stderr  # refused in the launcher's preflight: no rank built a model
