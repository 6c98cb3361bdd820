"""Resume on another world size through DeepSpeed's universal checkpoint (training/universal.py):
real runs on 2 and 1 gloo ranks, ZeRO-3, torch AdamW and bitsandbytes AdamW8bit.

    pytest tests/test_universal.py -m slow -v     # ~5 min on 2 cores

Every resumed run is compared with the uninterrupted run of its source world size: AdamW within
1e-5 (it is bitwise here), the 8-bit optimizer within a tenth of the gap between the 8-bit and the
fp32 optimizer's losses (re-quantizing the moments on the new partitions is 8-bit noise)."""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import pytest
import torch

from conftest import DEBUG, debug_overrides, kill_at_step, lmforge, losses

# 40 steps, checkpoints at 10/20/30/40 (keep 2), eval every 20: ~20 s a run on 2 cores.
COMMON = ["train.steps=40", "checkpoint.interval=10", "eval.interval=20"]


def _has_8bit() -> bool:
    try:
        import bitsandbytes  # noqa: F401

        from lmforge.training.config import TrainConfig
    except ImportError:
        return False
    return "adamw_8bit" in str(TrainConfig.model_fields["optimizer"].annotation)


HAS_8BIT = _has_8bit()
needs_8bit = pytest.mark.skipif(not HAS_8BIT, reason="adamw_8bit not available")
OPTIMIZERS = ["adamw", pytest.param("adamw_8bit", marks=needs_8bit)]


def _args(run_dir: Path, cache: Path, optimizer: str) -> list[str]:
    return [DEBUG, *debug_overrides(run_dir, cache, *COMMON, f"train.optimizer={optimizer}")]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_cache):
    """Uninterrupted runs, made on first use: (optimizer, nproc) → run_dir."""
    runs: dict[tuple[str, int], Path] = {}

    def get(optimizer: str, nproc: int) -> Path:
        if (optimizer, nproc) not in runs:
            run_dir = tmp_path_factory.mktemp(f"ref-{optimizer}-{nproc}") / "run"
            lmforge("train", *_args(run_dir, data_cache, optimizer), "--nproc", str(nproc))
            runs[optimizer, nproc] = run_dir
        return runs[optimizer, nproc]

    return get


def _interrupted_copy(source: Path, dest: Path) -> Path:
    """The run directory as a crash after step 30's checkpoint leaves it (step_40 never written)."""
    shutil.copytree(source, dest, symlinks=True)
    shutil.rmtree(dest / "checkpoints" / "step_40")
    (dest / "checkpoints" / "latest").write_text("step_30")
    (dest / "metrics.jsonl").unlink()
    return dest


def _max_diff(a: dict[int, float], b: dict[int, float], steps) -> float:
    return max(abs(a[s] - b[s]) for s in steps)


def _check_continues(resumed_dir: Path, reference_dir: Path, resumed_from: int, optimizer: str, reference) -> float:
    resumed, ref = losses(resumed_dir), losses(reference_dir)
    steps = range(resumed_from + 1, 41)
    assert set(steps) <= set(resumed)
    diff = _max_diff(resumed, ref, steps)
    if optimizer == "adamw":
        assert diff <= 1e-5, f"AdamW resumed on another world size drifts by {diff:.3g}"
    else:
        fp32 = losses(reference("adamw", 2))
        noise = _max_diff(ref, fp32, steps)  # how far 8-bit state already moves the losses
        assert diff <= min(1e-3, 0.1 * noise), f"8-bit resume drifts by {diff:.3g} (8-bit vs fp32: {noise:.3g})"
    print(f"{optimizer}: resumed from step {resumed_from}, max |loss - uninterrupted| = {diff:.3g}")
    return diff


def _assert_converted(stderr: str, run_dir: Path, step: int, optimizer: str) -> None:
    universal = run_dir / "checkpoints" / f"step_{step}_universal"
    assert "resuming through a universal checkpoint" in stderr
    assert f"converted {run_dir / 'checkpoints' / f'step_{step}'} to DeepSpeed's universal format" in stderr
    if (run_dir / "checkpoints" / f"step_{step}").is_dir():
        assert (universal / "manifest.json").is_file() and (universal / "zero" / "optimizer_state.pt").is_file()
    else:  # checkpoint.keep pruned the step after the resumed run saved newer ones: with its conversion
        assert not universal.exists()
    assert not list((run_dir / "checkpoints").glob(".tmp_*"))
    if optimizer != "adamw":
        assert "bitsandbytes 8-bit states dequantized" in stderr and "re-quantized" in stderr


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_two_ranks_killed_then_resumed_on_one(optimizer, reference, tmp_path, data_cache):
    ref = reference(optimizer, 2)
    run_dir = tmp_path / "run"
    if optimizer == "adamw":  # a real SIGKILL of the driver, torchrun and both ranks mid-run
        kill_at_step([*_args(run_dir, data_cache, optimizer), "--nproc", "2"], run_dir, 25)
        assert not (run_dir / "checkpoints" / "step_40").exists()
    else:  # the same state on disk, without waiting for a kill window
        _interrupted_copy(ref, run_dir)
    proc = lmforge("train", *_args(run_dir, data_cache, optimizer), "--nproc", "1")
    resumed_from = int(re.search(r"resumed from \S+ at step (\d+)", proc.stderr).group(1))
    assert resumed_from in (20, 30)
    _assert_converted(proc.stderr, run_dir, resumed_from, optimizer)
    assert "world_size=1" in proc.stderr
    _check_continues(run_dir, ref, resumed_from, optimizer, reference)


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_one_rank_resumed_on_two(optimizer, reference, tmp_path, data_cache):
    ref = reference(optimizer, 1)
    run_dir = _interrupted_copy(ref, tmp_path / "run")
    proc = lmforge("train", *_args(run_dir, data_cache, optimizer), "--nproc", "2")
    assert f"resumed from {run_dir / 'checkpoints' / 'step_30'} at step 30" in proc.stderr
    _assert_converted(proc.stderr, run_dir, 30, optimizer)
    _check_continues(run_dir, ref, 30, optimizer, reference)
    # the run continues on 2 ranks: its own checkpoint is a plain 2-rank one
    assert json.loads((run_dir / "checkpoints" / "step_40" / "client.json").read_text())["world_size"] == 2


@pytest.mark.slow
def test_conversion_is_reused_and_redone_when_the_checkpoint_changes(reference, tmp_path):
    from lmforge.training import universal

    ckpt_dir = tmp_path / "checkpoints"
    shutil.copytree(reference("adamw", 2) / "checkpoints" / "step_30", ckpt_dir / "step_30")
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

    from lmforge.training import universal

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
