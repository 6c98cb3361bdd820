"""logging.backends for real: one debug run with TensorBoard, metrics.jsonl, Weights & Biases (offline)
and MLflow (a local sqlite store), stopped after its first step and resumed; each tracker is read back
with its own tools (`wandb leet inspect`, mlflow.MlflowClient, TensorBoard's event loader).

    .venv/bin/python -m pytest tests/test_trackers.py
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from conftest import BIN, DEBUG, debug_overrides, lmforge

pytestmark = pytest.mark.slow
BACKENDS = "logging.backends=[tensorboard,jsonl,wandb,mlflow]"


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory, data_cache) -> tuple[Path, str]:
    """A run STOPped after step 1 (exit 75), then run again to its end (resumed from step_1)."""
    root = tmp_path_factory.mktemp("trackers")
    run_dir, uri = root / "run", f"sqlite:///{root}/mlflow.db"
    args = ("train", DEBUG, "--nproc", "2", *debug_overrides(run_dir, data_cache, BACKENDS, "train.steps=8",
                                                              "checkpoint.interval=4", "eval.interval=4",
                                                              f"logging.mlflow_tracking_uri={uri}"))
    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    run_dir.mkdir(parents=True)
    (run_dir / "STOP").write_text("test\n")
    first = lmforge(*args, check=False, env_extra=env)
    assert first.returncode == 75, first.stderr[-3000:]
    lmforge(*args, env_extra=env)
    return run_dir, uri


def test_wandb_offline_run_is_one_run_across_the_restart(tracked_run):
    run_dir, _ = tracked_run
    run_id = json.loads((run_dir / "trackers.json").read_text())["wandb"]
    segments = sorted((run_dir / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(segments) == 2, list((run_dir / "wandb").iterdir())  # the first start and the resumed one
    history, summary, config = {}, {}, {}
    for segment in segments:
        out = subprocess.run([str(BIN / "wandb"), "leet", "inspect", "--json", str(segment)], capture_output=True,
                             text=True, timeout=120, check=True).stdout
        for line in out.splitlines():
            rec = json.loads(line)
            if rec["type"] == "history":
                history[rec["history"]["step"]["num"]] = rec["history"]["item"]
            elif rec["type"] == "summary":
                summary.update(rec["summary"]["update"])
            elif rec["type"] == "run":
                assert rec["run"]["run_id"] == run_id and rec["run"]["project"] == "lmforge"
                config.update(rec["run"]["config"]["update"])
    assert sorted(s for s, item in history.items() if "train/loss" in item) == list(range(1, 9))
    assert {4, 8} <= {s for s, item in history.items() if "eval/ppl" in item}
    assert config["train.lr"] == 3e-3 and config["parallel.zero_stage"] == 3  # the resolved config
    assert summary["summary/step"] == 8 and summary["summary/after"] == pytest.approx(history[8]["eval/ppl"])


def test_mlflow_run_has_params_metrics_and_summary(tracked_run):
    import mlflow

    run_dir, uri = tracked_run
    client = mlflow.MlflowClient(uri)
    run_id = json.loads((run_dir / "trackers.json").read_text())["mlflow"]
    runs = client.search_runs([client.get_experiment_by_name("lmforge").experiment_id])
    assert [r.info.run_id for r in runs] == [run_id]  # the restart continued it, no second run
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert run.data.params["train.lr"] == "0.003" and run.data.params["task"] == "pretrain"
    losses = client.get_metric_history(run_id, "train/loss")
    assert sorted({m.step for m in losses}) == list(range(1, 9))
    ppl = {m.step: m.value for m in client.get_metric_history(run_id, "eval/ppl")}
    assert {0, 4, 8} <= set(ppl)
    assert run.data.metrics["summary/after"] == pytest.approx(ppl[8]) and run.data.metrics["summary/step"] == 8


def test_tensorboard_dashboard_and_hparams_read_back(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.custom_scalar import layout_pb2
    from tensorboard.plugins.hparams import plugin_data_pb2

    run_dir, _ = tracked_run
    ea = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"tensors": 0, "scalars": 0})
    ea.Reload()
    assert [e.step for e in ea.Scalars("train/loss")] == list(range(1, 9))

    layout = layout_pb2.Layout()
    layout.ParseFromString(ea.Tensors("custom_scalars__config__")[0].tensor_proto.string_val[0])
    charts = {c.title: list(c.multiline.tag) for cat in layout.category for c in cat.chart}
    assert [cat.title for cat in layout.category] == ["loss & eval", "throughput & MFU", "memory", "optimizer"]
    assert charts["loss (train and held-out)"] == ["train/loss", "eval/loss"] and charts["learning rate"] == ["train/lr"]

    content = ea.PluginTagToContent("hparams")
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    assert {"eval/loss", "eval/ppl"} == {m.name.tag for m in experiment.metric_infos}
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    assert start.hparams["train.lr"].number_value == pytest.approx(3e-3)
    assert start.hparams["model.preset"].string_value == "llama-debug"
    assert len(ea.Tensors("custom_scalars__config__")) == 1  # written once: the resumed start did not repeat it


def test_a_tracker_that_is_not_installed_is_refused_before_any_rank(tmp_path, monkeypatch):
    import importlib.util

    from lmforge.training import preflight
    from lmforge.training.config import ConfigError, load_config

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    cfg = load_config(DEBUG, [f"run_dir={tmp_path}", "logging.backends=[tensorboard,mlflow]"])
    with pytest.raises(ConfigError, match=r"logging.backends: mlflow is not installed .*pip install -e '.\[track\]'"):
        preflight.check_trackers(cfg)
