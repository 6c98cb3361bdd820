"""End-to-end training on 2 real gloo ranks with real DeepSpeed: ZeRO stages, the three launchers,
SIGKILL + resume, checkpoint verification, TensorBoard event files, export of a ZeRO-3 run. Every run
here starts `lmforge train` (10-20 s of process start-up each), so runs are shared wherever the
assertions allow: conftest's debug_run reference runs, read-only; a test that changes one works on a
copy. The pieces (checkpoint save/load/verify, stop agreement) have in-process unit tests on 2 ranks
in tests/test_units_*.py."""

from __future__ import annotations

import json
import logging
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import BIN, DEBUG, REPO, STANDARD as COMMON, debug_overrides, env, lmforge, losses, run

pytestmark = pytest.mark.slow  # every test trains, or reads a run that did
LOG = logging.getLogger("test_train")

def falls(run_dir: Path) -> None:
    ls = losses(run_dir)
    assert sorted(ls) == list(range(1, 41))
    first, last = sum(ls[s] for s in (1, 2, 3)) / 3, sum(ls[s] for s in (38, 39, 40)) / 3
    assert last < first - 0.5, f"loss did not fall: {first:.3f} -> {last:.3f}"


@pytest.fixture(scope="module")
def zero3(debug_run) -> Path:
    """The reference run: `lmforge train` with 2 ranks, ZeRO-3 (shared with the other files)."""
    run_dir, stderr = debug_run()
    assert "held-out perplexity" in stderr and "tensorboard --logdir" in stderr
    return run_dir


def test_zero3_trains_and_publishes_checkpoints(zero3):
    falls(zero3)
    ckpts = zero3 / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir() if p.name.startswith("step_")) == ["step_30", "step_40"]
    assert (ckpts / "latest").read_text() == "step_40"
    files = {p.name for p in (ckpts / "step_40").iterdir()}
    # both ranks' ZeRO-3 shards, both ranks' RNG, our metadata
    assert {"zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt",
            "rng_rank0.pt", "rng_rank1.pt", "client.json", "config.yaml", "manifest.json"} <= files
    assert not list(ckpts.glob(".tmp_*"))


def test_startup_line_names_every_phase_from_the_command_to_the_first_step(debug_run):
    """training/startup.py: rank 0 continues the timeline the launcher handed to the forked ranks."""
    run_dir, stderr = debug_run()
    m = re.search(r"first step ([\d.]+) s after the command \((.*)\)", stderr)
    assert m, stderr[-3000:]
    assert [p.rsplit(" ", 1)[0] for p in m.group(2).split(", ")] == [
        "driver imports", "forkserver", "driver preflight", "rank start", "process group", "rank preflight", "model",
        "engine", "setup", "eval before", "first step"]
    row = next(json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if "startup/" in line)
    phases = {k: v for k, v in row.items() if k.startswith("startup/") and k != "startup/to_first_step_s"}
    assert row["step"] == 1 and len(phases) == 11 and all(v >= 0 for v in phases.values())
    assert sum(phases.values()) == pytest.approx(row["startup/to_first_step_s"], abs=1e-3)
    assert row["startup/to_first_step_s"] == pytest.approx(float(m.group(1)), abs=0.05)


@pytest.mark.parametrize("stage", [1, 2])
def test_zero_stage_trains(stage, debug_run):
    """ZeRO-1 and ZeRO-2: conftest's shared STANDARD runs (tests/test_parallel.py's data-parallel twins)."""
    run_dir, stderr = debug_run("adamw", stage)
    falls(run_dir)
    assert (run_dir / "checkpoints" / "step_40" / "manifest.json").is_file()
    assert "optimizer: AdamW (fused), precision fp32" in stderr and f"ZeRO-{stage}, 2 rank(s)" in stderr


def test_zero3_offload_trains(tmp_path, data_cache):
    run_dir = tmp_path / "run"
    proc = lmforge("train", DEBUG, *debug_overrides(run_dir, data_cache, *COMMON, "parallel.offload_optimizer=true",
                                                    "parallel.offload_params=true"), "--nproc", "2")
    falls(run_dir)
    assert (run_dir / "checkpoints" / "step_40" / "manifest.json").is_file()
    assert "optimizer: DeepSpeedCPUAdam, precision fp32" in proc.stderr


def test_torchrun_gives_identical_losses(zero3, tmp_path, data_cache):
    run_dir = tmp_path / "run"
    run([str(BIN / "torchrun"), "--nproc_per_node=2", "--master_addr=127.0.0.1", f"--master_port={_port()}",
         "-m", "lmforge.training.train", str(DEBUG), *debug_overrides(run_dir, data_cache, *COMMON)])
    assert losses(run_dir) == losses(zero3)


def test_deepspeed_cli_gives_identical_losses(zero3, tmp_path, data_cache):
    run_dir = tmp_path / "run"
    run([str(BIN / "deepspeed"), "--num_gpus=2", f"--master_port={_port()}", "--module",
         "lmforge.training.train", str(DEBUG), *debug_overrides(run_dir, data_cache, *COMMON)])
    assert losses(run_dir) == losses(zero3)


def _preflight(run_dir: Path, cache: Path, nproc: int, *extra: str):
    """The launcher's preflight (also every rank's first step), in this process: where a run would resume."""
    from lmforge.training.config import load_config
    from lmforge.training.train import preflight

    return preflight(load_config(DEBUG, debug_overrides(run_dir, cache, *COMMON, *extra)), nproc, LOG)


def test_truncated_checkpoint_is_skipped(zero3, tmp_path, data_cache, caplog):
    """A truncated shard in the newest checkpoint: preflight resumes from the one before, saying why.
    (That a resume from a checkpoint continues bitwise: test_sigkill_then_resume_is_bitwise_equal;
    verify/find_latest on every kind of damage: tests/test_units_checkpoint.py.)"""
    run_dir = tmp_path / "run"
    shutil.copytree(zero3, run_dir, symlinks=True)
    shard = run_dir / "checkpoints" / "step_40" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size // 2)
    with caplog.at_level(logging.WARNING, logger=LOG.name):
        plan = _preflight(run_dir, data_cache, 2)
    assert plan.resume_from == run_dir / "checkpoints" / "step_30" and plan.layout_change is None
    skipped = [r.getMessage() for r in caplog.records if "skipping checkpoint" in r.getMessage()]
    assert len(skipped) == 1 and "step_40" in skipped[0] and "bytes, the manifest says" in skipped[0]


def test_rollback_by_checkpoint_resume_leaves_newer_ones_until_it_publishes(zero3, tmp_path, data_cache):
    """After a loss spike: rerun with checkpoint.resume=step_30 (and a lower lr) over a copy of the
    40-step run. Until the new step_40 publishes, the old step_40 is untouched; then it sits in
    superseded-<time>/ byte for byte, the new one in its place. Steps 1-31 keep their losses (step 31
    is computed by the weights of step_30, before the new lr's first update), 32-40 differ."""
    run_dir = tmp_path / "run"
    shutil.copytree(zero3, run_dir, symlinks=True)
    ckpts = run_dir / "checkpoints"
    old_manifest = (ckpts / "step_40" / "manifest.json").read_bytes()
    logged = len((run_dir / "metrics.jsonl").read_text().splitlines())
    proc = subprocess.Popen([str(BIN / "lmforge"), "train", str(DEBUG), "--nproc", "2",
                             *debug_overrides(run_dir, data_cache, *COMMON, "checkpoint.resume=step_30", "train.lr=1e-3")],
                            cwd=REPO, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seen_mid_run = None
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and seen_mid_run is None:
        new = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()[logged:]]
        if any(r.get("step", 0) >= 35 for r in new):  # the new timeline is past step 35, before its step_40
            seen_mid_run = ((ckpts / "step_40" / "manifest.json").read_bytes(),
                            sorted(p.name for p in ckpts.iterdir() if p.name.startswith(("step_", "superseded-"))))
        time.sleep(0.05)
    stderr = proc.communicate(timeout=300)[1]
    assert proc.returncode == 0, stderr[-4000:]
    assert seen_mid_run == (old_manifest, ["step_30", "step_40"]), seen_mid_run
    aside = list(ckpts.glob("superseded-*"))
    assert len(aside) == 1 and (aside[0] / "step_40" / "manifest.json").read_bytes() == old_manifest
    assert (ckpts / "step_40" / "manifest.json").read_bytes() != old_manifest
    assert sorted(p.name for p in ckpts.iterdir() if p.name.startswith("step_")) == ["step_30", "step_40"]
    assert f"resumed from {ckpts / 'step_30'} at step 30" in stderr and f"moved to {aside[0]}" in stderr
    before, after = losses(zero3), losses(run_dir)
    assert {s: after[s] for s in range(1, 32)} == {s: before[s] for s in range(1, 32)}
    assert all(after[s] != before[s] for s in range(32, 41))


def test_incompatible_checkpoint_is_refused_with_the_keys(zero3, tmp_path, data_cache):
    run_dir = tmp_path / "run"
    shutil.copytree(zero3, run_dir, symlinks=True)
    proc = lmforge("train", DEBUG, *debug_overrides(run_dir, data_cache, *COMMON, "train.global_batch_size=16",
                                                    "model.overrides.num_hidden_layers=3"),
                   "--nproc", "2", check=False)
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()[-1]
    assert err.startswith("lmforge: config error:") and "was written by a different config" in err
    assert "train.global_batch_size: 8 in the checkpoint, 16 now" in err
    assert "model.overrides" in err and "checkpoint.allow_config_change=true" in err
    # another world size is not a reason to refuse: preflight plans a resume through a universal
    # checkpoint (tests/test_universal.py runs such resumes and checks the losses)
    plan = _preflight(run_dir, data_cache, 1, "train.steps=41")
    assert plan.resume_from == run_dir / "checkpoints" / "step_40"
    assert str(plan.layout_change) == "2 rank(s), ZeRO-3; this run: 1 rank(s), ZeRO-3"
    assert plan.ds_config["checkpoint"]["load_universal"] is True


def test_tensorboard_scalars_read_back(zero3):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(zero3 / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/grad_norm", "perf/tokens_per_s", "perf/step_time_s",
            "perf/tflops_per_device", "mem/peak_gib", "eval/loss", "eval/ppl"} <= tags
    assert "perf/mfu" not in tags  # CPU, no configured peak: omitted rather than invented
    tb_loss = {e.step: e.value for e in acc.Scalars("train/loss")}
    assert tb_loss == pytest.approx(losses(zero3), rel=1e-6)
    assert [e.step for e in acc.Scalars("eval/ppl")] == [0, 20, 40]
    lrs = [e.value for e in acc.Scalars("train/lr")]
    assert lrs[0] < lrs[3] and lrs[-1] < max(lrs)  # warmup then decay
    assert all(e.value > 0 for e in acc.Scalars("train/grad_norm"))
    assert any("config" in t for t in acc.Tags()["tensors"])


def _port() -> int:
    from lmforge.training.dist import free_port

    return free_port()


def test_any_local_hf_model_directory(tmp_path, data_cache):
    """model.path: a GPT-2 (not a Llama) saved with save_pretrained; its weights are loaded (the held-out
    perplexity the run logs before training is the saved model's own, computed here in plain
    transformers on the same held-out batches), and training lowers it."""
    import math

    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from lmforge.training import data
    from lmforge.training.config import load_config
    from lmforge.training.evaluate import token_loss

    prepared = data.prepare(load_config(DEBUG, [f"data.cache_dir={data_cache}"]).data)
    model_dir = tmp_path / "gpt2-tiny"
    GPT2LMHeadModel(GPT2Config(vocab_size=prepared.vocab_size, n_positions=128, n_embd=64, n_layer=2,
                               n_head=2)).save_pretrained(model_dir)
    run_dir = tmp_path / "run"
    args = debug_overrides(run_dir, data_cache, f"model.path={model_dir}", f"data.tokenizer={prepared.tokenizer_dir}",
                           "train.steps=20", "checkpoint.interval=0")
    proc = lmforge("train", DEBUG, *args, "--nproc", "1")
    assert "model: gpt2" in proc.stderr
    evals = {r["step"]: r["eval/ppl"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
             if "eval/ppl" in r}
    cfg = load_config(DEBUG, args)
    val = data.PackedTokens(data.prepare(cfg.data).val_tokens, cfg.data.seq_len)
    model = GPT2LMHeadModel.from_pretrained(model_dir).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for indices in data.eval_indices(len(val), cfg.eval.batches, cfg.train.micro_batch_size, 0, 1):
            inputs, targets = val.batch(indices)
            total += token_loss(model(input_ids=inputs).logits, targets, reduction="sum").item()
            count += targets.numel()
    assert evals[0] == pytest.approx(math.exp(total / count), rel=1e-5)
    assert evals[20] < evals[0] / 2


@pytest.mark.gpu
def test_gpu_zero3_bf16_trains(tmp_path, data_cache):
    import torch

    run_dir = tmp_path / "run"
    proc = lmforge("train", DEBUG, *debug_overrides(run_dir, data_cache, *COMMON), "--nproc",
                   str(min(2, torch.cuda.device_count())))
    falls(run_dir)
    assert "backend=nccl" in proc.stderr and "precision bf16" in proc.stderr


def test_single_process_without_a_launcher(tmp_path, data_cache):
    """`python -m lmforge.training.train CONFIG`: no torchrun variables set; training sets them
    itself (DeepSpeed would otherwise try MPI discovery and fail on mpi4py)."""
    run_dir = tmp_path / "run"
    e = {k: v for k, v in env().items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    proc = subprocess.run([str(BIN / "python"), "-m", "lmforge.training.train", str(DEBUG),
                           *debug_overrides(run_dir, data_cache, "train.steps=20", "checkpoint.interval=0",
                                            "logging.peak_tflops=0.5")],
                          capture_output=True, text=True, env=e, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ls = losses(run_dir)
    assert sorted(ls) == list(range(1, 21)) and ls[20] < ls[1]
    assert "world_size=1" in proc.stderr and (run_dir / "checkpoints" / "step_20" / "manifest.json").is_file()
    rec = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if "perf/mfu" in line]
    assert rec and all(0 < r["perf/mfu"] == pytest.approx(r["perf/tflops_per_device"] / 0.5) for r in rec)


def _wait_for_step(proc: subprocess.Popen, run_dir: Path, step: int, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if (run_dir / "metrics.jsonl").is_file() and max(losses(run_dir), default=0) >= step:
            return
        time.sleep(0.05)
    raise AssertionError(f"never reached step {step}: exit {proc.poll()}")


def test_sigterm_checkpoints_exits_75_and_resume_is_bitwise_equal(zero3, tmp_path, data_cache):
    """Pre-emption without Slurm: SIGTERM to `lmforge train` → every rank finishes its step, one
    checkpoint at that step, exit 75; the same command resumes and the losses equal the reference."""
    run_dir = tmp_path / "run"
    cmd = [str(BIN / "lmforge"), "train", str(DEBUG), *debug_overrides(run_dir, data_cache, *COMMON), "--nproc", "2"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _wait_for_step(proc, run_dir, 13)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err[-3000:]
    stopped_at = int(re.search(r"stopped at step (\d+) of 40", err).group(1))
    assert 13 <= stopped_at < 40 and stopped_at % 10 != 0  # a save of its own, not an interval one
    assert (run_dir / "checkpoints" / f"step_{stopped_at}" / "manifest.json").is_file()
    assert (run_dir / "checkpoints" / "latest").read_text() == f"step_{stopped_at}"
    assert not (run_dir / "STOP").exists()
    assert max(losses(run_dir)) == stopped_at  # no step ran after the one it stopped at

    proc = lmforge("train", DEBUG, *debug_overrides(run_dir, data_cache, *COMMON), "--nproc", "2")
    assert f"resumed from {run_dir / 'checkpoints' / f'step_{stopped_at}'} at step {stopped_at}" in proc.stderr
    assert losses(run_dir) == losses(zero3)


def test_plain_torchrun_forwarded_sigterm_saves_a_checkpoint(tmp_path, data_cache):
    """torchrun run by hand: it forwards SIGTERM to the ranks, which save before it gives up on them."""
    run_dir = tmp_path / "run"
    cmd = [str(BIN / "torchrun"), "--nproc_per_node=2", "--master_addr=127.0.0.1", f"--master_port={_port()}",
           "-m", "lmforge.training.train", str(DEBUG),
           *debug_overrides(run_dir, data_cache, "train.steps=5000", "checkpoint.interval=0", "eval.interval=0")]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _wait_for_step(proc, run_dir, 5)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert "stop requested (SIGTERM)" in err, err[-3000:]
    stopped_at = int(re.search(r"stopped at step (\d+) of 5000", err).group(1))
    assert (run_dir / "checkpoints" / f"step_{stopped_at}" / "manifest.json").is_file()
    assert proc.returncode != 0  # torchrun reports the signal it got, not the ranks' 75


def test_stop_file_stops_a_single_process_run(tmp_path, data_cache):
    """`touch RUN_DIR/STOP`: the launcher-independent way (Slurm scripts and the Ray driver use it)."""
    run_dir = tmp_path / "run"
    cmd = [str(BIN / "python"), "-m", "lmforge.training.train", str(DEBUG),
           *debug_overrides(run_dir, data_cache, "train.steps=5000", "checkpoint.interval=0", "eval.interval=0")]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _wait_for_step(proc, run_dir, 5)
    (run_dir / "STOP").write_text("test\n")
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err[-3000:]
    assert f"stop requested ({run_dir / 'STOP'} (test))" in err
    stopped_at = int(re.search(r"stopped at step (\d+) of 5000", err).group(1))
    assert (run_dir / "checkpoints" / f"step_{stopped_at}" / "manifest.json").is_file()
    assert not (run_dir / "STOP").exists()  # consumed, so the resumed run does not stop at once


def test_export_from_zero3_and_sharded(zero3, tmp_path):
    """`lmforge export` of a 2-rank ZeRO-3 run, in shards: the exported model reproduces the engine's
    logged held-out loss on the same eval batches (tests/test_export.py does the same for ZeRO-2)."""
    from test_export import engine_eval_loss, export_eval_loss

    before = sorted(p.name for p in (zero3 / "checkpoints").iterdir())
    out = tmp_path / "hf"
    lmforge("export", zero3, "--out", out, "--max-shard-size", "200KB")
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 1 and (out / "model.safetensors.index.json").is_file()
    step, engine_loss = engine_eval_loss(zero3)
    assert step == 40 and abs(export_eval_loss(out, zero3, 2) - engine_loss) < 1e-5
    assert sorted(p.name for p in (zero3 / "checkpoints").iterdir()) == before  # the shared run is unchanged
