"""Metrics: TensorBoard scalars + a metrics.jsonl line per logged step, written by rank 0 only
(other ranks get `NullMetrics`, which does nothing), and the throughput/MFU arithmetic.

    tensorboard --logdir runs/debug/tensorboard

Scalars: train/loss, train/lr, train/grad_norm, perf/tokens_per_s (global), perf/step_time_s,
perf/tflops_per_device, perf/mfu (only with a known peak), mem/peak_gib (CUDA peak allocated, else
process RSS), eval/loss, eval/ppl; the resolved config is stored as text.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import psutil
import torch

from .arithmetic import gpu_spec


def peak_tflops(configured: float | None) -> float | None:
    """Configured peak, else the device table on CUDA; None on CPU (no honest default exists)."""
    if configured:
        return configured
    if torch.cuda.is_available():
        spec = gpu_spec(torch.cuda.get_device_name())
        return spec[1] if spec else None
    return None


def memory_gib() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return psutil.Process().memory_info().rss / 2**30


class Throughput:
    """Tokens/s, achieved TFLOP/s per device and MFU for one optimizer step."""

    def __init__(self, tokens_per_step: int, flops_per_token: float, world_size: int, peak: float | None):
        self.tokens_per_step, self.flops_per_token = tokens_per_step, flops_per_token
        self.world_size, self.peak = world_size, peak

    def __call__(self, step_time: float) -> dict[str, float]:
        tps = self.tokens_per_step / step_time
        tflops = tps * self.flops_per_token / self.world_size / 1e12
        out = {"perf/tokens_per_s": tps, "perf/step_time_s": step_time, "perf/tflops_per_device": tflops}
        if self.peak:
            out["perf/mfu"] = tflops / self.peak
        return out


class Metrics:
    def __init__(self, tb_dir: Path, jsonl: Path, config_text: str):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(tb_dir), flush_secs=10)
        self.writer.add_text("config", "```\n" + config_text + "\n```", 0)
        jsonl.parent.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(jsonl, "a", buffering=1)

    def log(self, step: int, scalars: dict[str, float]) -> None:
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, step)
        self.jsonl.write(json.dumps({"step": step, "time": time.time(), **scalars}) + "\n")

    def close(self) -> None:
        self.writer.close()
        self.jsonl.close()


class NullMetrics:
    def log(self, step: int, scalars: dict[str, float]) -> None:
        pass

    def close(self) -> None:
        pass


def make_metrics(rank: int, tb_dir: Path, jsonl: Path, config_text: str) -> Metrics | NullMetrics:
    return Metrics(tb_dir, jsonl, config_text) if rank == 0 else NullMetrics()
