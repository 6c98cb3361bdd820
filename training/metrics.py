"""Metrics: rank 0 sends every logged step's scalars to the backends of logging.backends
(TensorBoard and metrics.jsonl by default; Weights & Biases, MLflow), other ranks get `NullMetrics`,
which does nothing; and the throughput/MFU arithmetic.

    tensorboard --logdir runs/debug/tensorboard       # Scalars, Custom Scalars (a dashboard), HParams
    lmforge train configs/debug.yaml 'logging.backends=[tensorboard,jsonl,wandb,mlflow]'

Scalars: train/loss, train/lr, train/grad_norm, perf/tokens_per_s (global), perf/step_time_s,
perf/tflops_per_device, perf/mfu (only with a known peak), mem/peak_gib (CUDA peak allocated, else
process RSS), eval/loss, eval/ppl; the resolved config is stored as text.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import time
from pathlib import Path
from typing import Callable

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


class TensorBoard:
    """Event files under logging.dir: the scalars, the resolved config as text and, for a run that
    starts fresh, the custom-scalars dashboard and the HParams session (config keys -> the eval
    metrics, which the HParams tab reads from the same run's scalars: a sweep's trials compare there)."""

    def __init__(self, cfg, fresh: bool, eval_metrics: list[str]):
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        self.writer = SummaryWriter(log_dir=str(cfg.tensorboard_dir), flush_secs=10)
        self.writer.add_text("config", "```\n" + cfg.to_yaml() + "\n```", 0)
        if fresh:
            self.writer.add_custom_scalars(DASHBOARD)
            for summary in hparams(flat_config(cfg), {name: math.nan for name in eval_metrics}):
                self.writer.file_writer.add_summary(summary)

    def log(self, step: int, scalars: dict[str, float]) -> None:
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, step)

    def summary(self, values: dict[str, float]) -> None:
        pass  # every value is already a scalar here

    def close(self) -> None:
        self.writer.close()


# TensorBoard's Custom Scalars tab: one chart per row, each a regex over the scalar tags.
DASHBOARD = {
    "loss & eval": {"loss (train and held-out)": ["Multiline", ["train/loss", "eval/loss"]],
                    "held-out metrics": ["Multiline", ["eval/(?!loss).*"]]},
    "throughput & MFU": {"tokens/s": ["Multiline", ["perf/tokens_per_s"]],
                         "MFU and TFLOP/s per device": ["Multiline", ["perf/mfu", "perf/tflops_per_device"]],
                         "step time (s)": ["Multiline", ["perf/step_time_s"]]},
    "memory": {"peak memory (GiB)": ["Multiline", ["mem/peak_gib"]]},
    "optimizer": {"learning rate": ["Multiline", ["train/lr"]], "grad norm": ["Multiline", ["train/grad_norm"]]},
}


class Jsonl:
    """<run_dir>/metrics.jsonl: one line per logged step ({"step", "time", scalars...})."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(path, "a", buffering=1)

    def log(self, step: int, scalars: dict[str, float]) -> None:
        self.file.write(json.dumps({"step": step, "time": time.time(), **scalars}) + "\n")

    def summary(self, values: dict[str, float]) -> None:
        pass

    def close(self) -> None:
        self.file.close()


class Wandb:
    """A Weights & Biases run, as wandb's environment configures it (WANDB_MODE=offline needs no network)."""

    def __init__(self, cfg, run_id: str):
        import wandb

        self.run = wandb.init(project=cfg.logging.project, name=Path(cfg.run_dir).name, id=run_id, resume="allow",
                              dir=str(cfg.run_dir), config=flat_config(cfg))

    def log(self, step: int, scalars: dict[str, float]) -> None:
        self.run.log(scalars, step=step)

    def summary(self, values: dict[str, float]) -> None:
        self.run.summary.update(values)

    def close(self) -> None:
        self.run.finish()


class MLflow:
    """An MLflow run in experiment logging.project at logging.mlflow_tracking_uri (else $MLFLOW_TRACKING_URI)."""

    def __init__(self, cfg, run_id: str | None, fresh_run: Callable[[str], None]):
        import mlflow

        uri = cfg.logging.mlflow_tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        if uri and (uri.startswith("file:") or "://" not in uri):
            # MLflow 3 refuses its file store unless asked; a file store named here is asked for
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = mlflow.MlflowClient(uri)  # None: MLflow's own default
        if run_id is None:
            experiment = self.client.get_experiment_by_name(cfg.logging.project)
            experiment_id = (experiment.experiment_id if experiment is not None
                             else self.client.create_experiment(cfg.logging.project))
            run_id = self.client.create_run(experiment_id, run_name=Path(cfg.run_dir).name).info.run_id
            fresh_run(run_id)
            params = flat_config(cfg)
            # MLflow takes at most 100 params per batch and 6000 characters per value
            items = [mlflow.entities.Param(k, str(v)[:6000]) for k, v in params.items()]
            for i in range(0, len(items), 100):
                self.client.log_batch(run_id, params=items[i:i + 100])
        else:
            self.client.update_run(run_id, status="RUNNING")
        self.run_id = run_id

    def log(self, step: int, scalars: dict[str, float]) -> None:
        import mlflow

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[mlflow.entities.Metric(k, float(v), now, step)
                                                    for k, v in scalars.items()])

    def summary(self, values: dict[str, float]) -> None:
        self.log(int(values.get("summary/step", 0)), values)

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


class Metrics:
    """Rank 0's metrics: every scalar to every backend of logging.backends."""

    def __init__(self, backends: list):
        self.backends = backends

    def log(self, step: int, scalars: dict[str, float]) -> None:
        for backend in self.backends:
            backend.log(step, scalars)

    def summary(self, values: dict[str, float]) -> None:
        """The run's end: its final numbers (the trackers' run summary)."""
        for backend in self.backends:
            backend.summary(values)

    def close(self) -> None:
        for backend in self.backends:
            backend.close()


class NullMetrics:
    def log(self, step: int, scalars: dict[str, float]) -> None:
        pass

    def summary(self, values: dict[str, float]) -> None:
        pass

    def close(self) -> None:
        pass


def flat_config(cfg) -> dict[str, int | float | str | bool]:
    """The resolved config as dotted keys -> scalars (run parameters, HParams): lists as text, None dropped."""
    out: dict[str, int | float | str | bool] = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif isinstance(value, (bool, int, float, str)):
            out[prefix] = value
        elif value is not None:
            out[prefix] = json.dumps(value)

    walk("", cfg.model_dump(mode="json", by_alias=True))
    return out


TRACKERS = "trackers.json"  # <run_dir>/trackers.json: the tracker run ids a restart resumes into


def make_metrics(rank: int, cfg, fresh: bool, eval_metrics: list[str]) -> Metrics | NullMetrics:
    """Rank 0: the backends of logging.backends (a restarted run continues its W&B and MLflow runs);
    other ranks: NullMetrics, which does nothing."""
    if rank != 0:
        return NullMetrics()
    path = Path(cfg.run_dir) / TRACKERS
    # a resumed run continues its tracker runs; a fresh start (nothing to resume) is a new run
    ids = json.loads(path.read_text()) if path.is_file() and not fresh else {}

    def remember(name: str, run_id: str) -> None:
        ids[name] = run_id
        tmp = path.with_name(f".{TRACKERS}.tmp")
        tmp.write_text(json.dumps(ids, indent=1))
        os.replace(tmp, path)

    backends = []
    for name in cfg.logging.backends:
        if name == "tensorboard":
            backends.append(TensorBoard(cfg, fresh, eval_metrics))
        elif name == "jsonl":
            backends.append(Jsonl(Path(cfg.run_dir) / "metrics.jsonl"))
        elif name == "wandb":
            if "wandb" not in ids:
                remember("wandb", secrets.token_hex(8))  # W&B run ids: letters and digits
            backends.append(Wandb(cfg, ids["wandb"]))
        elif name == "mlflow":
            backends.append(MLflow(cfg, ids.get("mlflow"), lambda run_id: remember("mlflow", run_id)))
    return Metrics(backends)
