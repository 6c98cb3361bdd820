"""End-to-end training on 2 real gloo ranks with real DeepSpeed: ZeRO stages, the three launchers,
SIGKILL + resume, checkpoint verification, TensorBoard event files."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import BIN, DEBUG, REPO, STANDARD as COMMON, debug_overrides, env, kill_at_step, lmforge, losses, run


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


@pytest.mark.parametrize("layout", [["parallel.zero_stage=1"], ["parallel.zero_stage=2"],
                                    ["parallel.offload_optimizer=true", "parallel.offload_params=true"]],
                         ids=["zero1", "zero2", "zero3-offload"])
def test_zero_stage_trains(layout, tmp_path, data_cache):
    run_dir = tmp_path / "run"
    proc = lmforge("train", DEBUG, *debug_overrides(run_dir, data_cache, *COMMON, *layout), "--nproc", "2")
    falls(run_dir)
    assert (run_dir / "checkpoints" / "step_40" / "manifest.json").is_file()
    expected = "DeepSpeedCPUAdam" if "offload" in layout[0] else "AdamW"
    assert f"optimizer: {expected}, precision fp32" in proc.stderr


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


def test_sigkill_then_resume_is_bitwise_equal(zero3, tmp_path, data_cache):
    run_dir = tmp_path / "run"
    killed_at = kill_at_step([DEBUG, *debug_overrides(run_dir, data_cache, *COMMON), "--nproc", "2"], run_dir, 15)
    assert 15 <= killed_at < 40
    assert not (run_dir / "checkpoints" / "step_40").exists()

    proc = lmforge("train", DEBUG, *debug_overrides(run_dir, data_cache, *COMMON), "--nproc", "2")
    resumed_from = int(re.search(r"resumed from \S+ at step (\d+)", proc.stderr).group(1))
    assert 10 <= resumed_from <= killed_at
    reference, resumed = losses(zero3), losses(run_dir)
    assert sorted(resumed) == list(range(1, 41))
    # every step after the kill point (and the replayed ones since the checkpoint) bitwise equal
    assert {s: resumed[s] for s in range(resumed_from + 1, 41)} == {s: reference[s] for s in range(resumed_from + 1, 41)}


def test_truncated_checkpoint_is_skipped(zero3, tmp_path, data_cache):
    run_dir = tmp_path / "run"
    shutil.copytree(zero3, run_dir, symlinks=True)
    (run_dir / "metrics.jsonl").unlink()
    shard = run_dir / "checkpoints" / "step_40" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size // 2)
    proc = lmforge("train", DEBUG, *debug_overrides(run_dir, data_cache, *COMMON), "--nproc", "2")
    assert "skipping checkpoint" in proc.stderr and "step_40" in proc.stderr and "bytes" in proc.stderr
    assert "resumed from " + str(run_dir / "checkpoints" / "step_30") in proc.stderr
    # steps 31..40 recomputed from step_30 equal the original run's
    assert losses(run_dir) == {s: v for s, v in losses(zero3).items() if s > 30}


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
    # another world size is not a reason to refuse: it resumes through a universal checkpoint
    # (tests/test_universal.py checks the losses)
    proc = lmforge("train", DEBUG, *debug_overrides(run_dir, data_cache, *COMMON, "train.steps=41"), "--nproc", "1")
    assert "was written by 2 rank(s), ZeRO-3; this run: 1 rank(s), ZeRO-3: resuming through a universal checkpoint" in proc.stderr


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
    """model.path: a GPT-2 (not a Llama) saved with save_pretrained; its weights are loaded, so the
    held-out perplexity before training does not depend on the seed, and training lowers it."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from lmforge.training import data
    from lmforge.training.config import load_config

    prepared = data.prepare(load_config(DEBUG, [f"data.cache_dir={data_cache}"]).data)
    model_dir = tmp_path / "gpt2-tiny"
    GPT2LMHeadModel(GPT2Config(vocab_size=prepared.vocab_size, n_positions=128, n_embd=64, n_layer=2,
                               n_head=2)).save_pretrained(model_dir)

    def train(seed):
        proc = lmforge("train", DEBUG, *debug_overrides(tmp_path / f"run{seed}", data_cache, f"model.path={model_dir}",
                                                        f"data.tokenizer={prepared.tokenizer_dir}", f"train.seed={seed}",
                                                        "train.steps=20", "checkpoint.interval=0"), "--nproc", "1")
        before, after = re.search(r"held-out perplexity: ([\d.]+) before -> ([\d.]+) after", proc.stderr).groups()
        assert "model: gpt2" in proc.stderr
        return float(before), float(after)

    (b1, a1), (b2, _) = train(1), train(2)
    assert b1 == b2 and a1 < b1 / 2


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
