"""Watching a run for real, through one run directory's life: `lmforge status` while it runs (with an
ETA), when a rank hangs (stalled), after the whole job is SIGKILLed (failed, no record), after a STOP
(stopped) and at the end (finished); and logging.backends with TensorBoard, metrics.jsonl, Weights &
Biases (offline) and MLflow (a local sqlite store) from the restart on, each read back with its own
tools (`wandb leet inspect`, mlflow.MlflowClient, TensorBoard's event loader). The diverged and the
launcher-recorded failures are asserted where those runs happen (tests/test_reliability.py,
tests/test_async_checkpoint.py).

    .venv/bin/python -m pytest tests/test_status.py
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest

from conftest import BIN, DEBUG, REPO, debug_overrides, env, lmforge

pytestmark = pytest.mark.slow
TRACKED = "logging.backends=[tensorboard,jsonl,wandb,mlflow]"


def status(run_dir, *flags) -> tuple[int, dict, str]:
    js = lmforge("status", run_dir, "--json", *flags, check=False)
    text = lmforge("status", run_dir, *flags, check=False)
    assert js.returncode == text.returncode in (0, 1), js.stderr
    return js.returncode, json.loads(js.stdout)[0], text.stdout


@pytest.fixture(scope="module")
def life(tmp_path_factory, data_cache) -> dict:
    """The run's phases and what status said in each: {phase: (exit, json, text)}, plus run_dir, the
    job's pid and the MLflow URI. 12 steps, a checkpoint every 2; rank 0 hangs before step 6 in the
    first start; the second start (STOP waiting) and the third add the trackers."""
    root = tmp_path_factory.mktemp("life")
    run_dir, uri = root / "run", f"sqlite:///{root}/mlflow.db"
    args = ["train", DEBUG, "--nproc", "1", *debug_overrides(run_dir, data_cache, "train.steps=12", "checkpoint.interval=2",
                                                             "eval.interval=4", "dist.hang_timeout_s=600")]
    seen: dict = {"run_dir": run_dir, "uri": uri, "not started": status(root)}
    job = subprocess.Popen([str(BIN / "lmforge"), *map(str, args)], cwd=REPO, start_new_session=True,
                           env={**env(), "LMFORGE_FAULT_HANG": "0:6"}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seen["pid"] = job.pid
    try:
        deadline = time.time() + 180
        while time.time() < deadline:
            if (run_dir / "run.json").is_file():
                seen["running"] = status(run_dir)
                if seen["running"][1]["step"] == 5:
                    break
            time.sleep(0.2)
        time.sleep(2)
        seen["stalled"] = status(run_dir, "--stall-factor", "3", "--stall-min-s", "1.5")
    finally:
        os.killpg(job.pid, signal.SIGKILL)  # the whole job, driver included: nobody records anything
        job.wait()
    time.sleep(0.5)
    seen["killed"] = status(run_dir)
    tracked = [*args, TRACKED, f"logging.mlflow_tracking_uri={uri}"]
    trackers_env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    (run_dir / "STOP").write_text("test\n")
    assert lmforge(*tracked, check=False, env_extra=trackers_env).returncode == 75
    seen["stopped"] = status(run_dir)
    lmforge(*tracked, env_extra=trackers_env)
    seen["finished"] = status(run_dir)
    return seen


def test_status_through_a_runs_life(life):
    run_dir = life["run_dir"]
    assert life["not started"][1]["health"] == "not started"
    rc, st, text = life["running"]
    assert (rc, st["health"], st["step"], st["total_steps"]) == (0, "running", 5, 12), text
    assert st["eta_s"] > 0 and st["tokens_per_s"] > 0 and st["checkpoint"]["tag"] in ("step_2", "step_4"), text
    assert f"pid {life['pid']} on host" in st["holder"] and "ETA " in text and "step 5/12 (42%)" in text
    rc, st, text = life["stalled"]
    assert (rc, st["health"]) == (1, "stalled") and st["cause"].startswith("no step for "), text
    assert text.startswith(f"{run_dir}: stalled (no step for ")
    rc, st, text = life["killed"]
    assert (rc, st["health"]) == (1, "failed") and "ended without a record" in st["cause"], text
    assert st["checkpoint"]["tag"] == "step_4" and st["holder"] is None
    rc, st, text = life["stopped"]
    assert (rc, st["health"], st["step"], st["checkpoint"]["tag"]) == (0, "stopped", 5, "step_5"), text
    rc, st, text = life["finished"]
    assert (rc, st["health"], st["step"], st["checkpoint"]["tag"]) == (0, "finished", 12, "step_12"), text
    assert st["eta_s"] is None and st["eval"]["metric"] == "eval/ppl" and st["eval"]["step"] == 12
    assert text.splitlines()[0] == f"{run_dir}: finished"


def test_wandb_offline_run_is_one_run_across_the_restart(life):
    run_dir = life["run_dir"]
    run_id = json.loads((run_dir / "trackers.json").read_text())["wandb"]
    segments = sorted((run_dir / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(segments) == 2, list((run_dir / "wandb").iterdir())  # the stopped start and the resumed one
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
    assert sorted(s for s, item in history.items() if "train/loss" in item) == list(range(5, 13))
    assert {8, 12} <= {s for s, item in history.items() if "eval/ppl" in item}
    assert config["train.lr"] == 3e-3 and config["parallel.zero_stage"] == 3  # the resolved config
    assert summary["summary/step"] == 12 and summary["summary/after"] == pytest.approx(history[12]["eval/ppl"])


def test_mlflow_run_has_params_metrics_and_summary(life):
    import mlflow

    run_dir, client = life["run_dir"], mlflow.MlflowClient(life["uri"])
    run_id = json.loads((run_dir / "trackers.json").read_text())["mlflow"]
    runs = client.search_runs([client.get_experiment_by_name("lmforge").experiment_id])
    assert [r.info.run_id for r in runs] == [run_id]  # the restart continued it, no second run
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert run.data.params["train.lr"] == "0.003" and run.data.params["task"] == "pretrain"
    assert sorted({m.step for m in client.get_metric_history(run_id, "train/loss")}) == list(range(5, 13))
    ppl = {m.step: m.value for m in client.get_metric_history(run_id, "eval/ppl")}
    assert {8, 12} <= set(ppl)
    assert run.data.metrics["summary/after"] == pytest.approx(ppl[12]) and run.data.metrics["summary/step"] == 12


def test_tensorboard_dashboard_and_hparams_read_back(life):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.custom_scalar import layout_pb2
    from tensorboard.plugins.hparams import plugin_data_pb2

    ea = EventAccumulator(str(life["run_dir"] / "tensorboard"), size_guidance={"tensors": 0, "scalars": 0})
    ea.Reload()
    assert {e.step for e in ea.Scalars("train/loss")} == set(range(1, 13))
    assert len(ea.Tensors("custom_scalars__config__")) == 1  # written once, by the fresh start: not by the restarts
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


def test_a_tracker_that_is_not_installed_is_refused_before_any_rank(tmp_path, monkeypatch):
    import importlib.util

    from lmforge.training import preflight
    from lmforge.training.config import ConfigError, load_config

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    cfg = load_config(DEBUG, [f"run_dir={tmp_path}", "logging.backends=[tensorboard,mlflow]"])
    with pytest.raises(ConfigError, match=r"logging.backends: mlflow is not installed .*pip install -e '.\[track\]'"):
        preflight.check_trackers(cfg)
