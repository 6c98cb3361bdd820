"""bitsandbytes 8-bit optimizers as DeepSpeed's client optimizer under ZeRO 1/2/3 (2 gloo ranks,
real bitsandbytes): the loss falls, the state really is ~2 (Lion ~1) bytes per parameter, a killed
run resumes bitwise; activation checkpointing changes memory, not losses; refused combinations."""

from __future__ import annotations

import re

import pytest

from conftest import DEBUG, STANDARD as COMMON, debug_overrides, kill_at_step, lmforge, losses

pytest.importorskip("bitsandbytes")
pytestmark = pytest.mark.slow

# every optimizer and every ZeRO stage once (each run is ~15 s, mostly process start-up); the
# runs are conftest's shared debug_run ones (test_universal compares against adamw_8bit on ZeRO-3)
LAYOUTS = [("adamw_8bit", 3), ("lion_8bit", 1), ("paged_adamw_8bit", 2)]


@pytest.mark.parametrize("optimizer, stage", LAYOUTS, ids=[f"{o}-zero{s}" for o, s in LAYOUTS])
def test_8bit_optimizer_trains_with_8bit_state(optimizer, stage, debug_run):
    run_dir, log = debug_run(optimizer, stage)
    ls = losses(run_dir)
    assert sorted(ls) == list(range(1, 41))
    first, last = sum(ls[s] for s in (1, 2, 3)) / 3, sum(ls[s] for s in (38, 39, 40)) / 3
    assert last < first - 0.5, f"loss did not fall: {first:.3f} -> {last:.3f}"
    per_param = float(re.search(r"optimizer state: ([\d.]+) bytes per parameter", log).group(1))
    assert per_param <= (1.1 if optimizer == "lion_8bit" else 2.1), per_param
    expected = {"adamw_8bit": "AdamW8bit", "lion_8bit": "Lion8bit", "paged_adamw_8bit": "AdamW8bit"}[optimizer]
    assert f"optimizer: {expected}, precision fp32" in log
    if optimizer == "paged_adamw_8bit":
        assert "paging needs CUDA unified memory; using adamw_8bit" in log


@pytest.mark.parametrize("optimizer, stage", [("adamw_8bit", 3)], ids=["adamw_8bit"])
def test_8bit_kill_then_resume_is_bitwise_equal(optimizer, stage, debug_run, tmp_path, data_cache):
    reference, _ = debug_run(optimizer, stage)
    run_dir = tmp_path / "run"
    args = debug_overrides(run_dir, data_cache, *COMMON, f"train.optimizer={optimizer}", f"parallel.zero_stage={stage}")
    kill_at_step([DEBUG, *args, "--nproc", "2"], run_dir, 15)
    resumed_proc = lmforge("train", DEBUG, *args, "--nproc", "2")
    resumed_from = int(re.search(r"resumed from \S+ at step (\d+)", resumed_proc.stderr).group(1))
    assert resumed_from >= 10
    ref, got = losses(reference), losses(run_dir)
    assert {s: got[s] for s in range(resumed_from + 1, 41)} == {s: ref[s] for s in range(resumed_from + 1, 41)}


def test_activation_checkpointing_gives_the_same_losses(debug_run, tmp_path, data_cache):
    plain, _ = debug_run("adamw_8bit", 3)
    ckpt = tmp_path / "ckpt"
    proc = lmforge("train", DEBUG, *debug_overrides(ckpt, data_cache, *COMMON, "train.optimizer=adamw_8bit",
                                                    "parallel.zero_stage=3", "train.activation_checkpointing=true"),
                   "--nproc", "2")
    assert "activation checkpointing on" in proc.stderr
    a, b = losses(plain), losses(ckpt)
    assert a.keys() == b.keys() and max(abs(a[s] - b[s]) for s in a) < 1e-5


def test_8bit_with_optimizer_offload_is_refused(tmp_path):
    proc = lmforge("config", DEBUG, "train.optimizer=adamw_8bit", "parallel.offload_optimizer=true", check=False)
    assert proc.returncode == 2
    assert "train.optimizer=adamw_8bit keeps its 8-bit state beside the parameters" in proc.stderr
