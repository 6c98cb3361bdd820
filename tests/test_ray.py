"""Ray launcher on a real two-node Ray cluster on this machine (head 127.0.0.2, worker 127.0.0.3,
one CPU each, token authentication): placement across nodes, equal losses to torchrun, SIGKILL of a
worker with restart and exact resume, Ray Jobs submission, a Tune sweep, clients without the token
refused, and the refusals."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import yaml

from conftest import BIN, DEBUG, REPO, debug_overrides, env, losses, run

pytest.importorskip("ray")
pytestmark = pytest.mark.slow

COMMON = ["train.steps=40", "checkpoint.interval=10", "eval.interval=20", "launch.workers=2"]


_TOKEN: list[Path] = []


def _token_file() -> Path:
    """The test cluster's token: what `ray start` users hand their cluster (0600, private dir)."""
    if not _TOKEN:
        from lmforge.launcher.ray_auth import new_token_file

        _TOKEN.append(new_token_file())
    return _TOKEN[0]


def _ray_env(token: bool = True) -> dict:
    """Head, worker node and drivers with the cluster's token (token=False: a client without one)."""
    e = {k: v for k, v in env().items() if not k.startswith("RAY_AUTH")}
    e.update(RAY_USAGE_STATS_ENABLED="0", RAY_TRAIN_V2_ENABLED="1")
    if token:
        e.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(_token_file()))
    return e


def _secret() -> str:
    return _token_file().read_text().strip()


def _no_token_in(run_dir: Path, *outputs: str) -> None:
    assert not any(_secret() in o for o in outputs)
    for f in run_dir.rglob("*"):
        if f.is_file():
            assert _secret().encode() not in f.read_bytes(), f


def _free_port() -> int:
    from lmforge.training.dist import free_port

    return free_port()


def _start_node(args: list[str]) -> subprocess.Popen:
    # --block keeps `ray start` in the foreground as the parent of the node's processes, so the
    # fixture tears down exactly what it started by its own process group.
    return subprocess.Popen([str(BIN / "ray"), "start", "--block", "--disable-usage-stats", *args],
                            env=_ray_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


def _stop(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _alive_nodes(address: str) -> int:
    code = ("import ray; ray.init(address=%r, _node_ip_address='127.0.0.2', logging_level='ERROR');"
            "print(sum(n['Alive'] for n in ray.nodes()))" % address)
    proc = subprocess.run([str(BIN / "python"), "-c", code], capture_output=True, text=True, env=_ray_env(),
                          timeout=120)
    return int(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 and proc.stdout.strip() else 0


@pytest.fixture(scope="module")
def cluster():
    port, dash = _free_port(), _free_port()
    head = _start_node(["--head", "--node-ip-address=127.0.0.2", f"--port={port}", "--num-cpus=1",
                        "--include-dashboard=true", "--dashboard-host=127.0.0.2", f"--dashboard-port={dash}"])
    address = f"127.0.0.2:{port}"
    worker = None
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                with socket.create_connection(("127.0.0.2", port), timeout=1):
                    break
            except OSError:
                time.sleep(0.5)
        worker = _start_node([f"--address={address}", "--node-ip-address=127.0.0.3", "--num-cpus=1"])
        while time.time() < deadline and _alive_nodes(address) < 2:
            time.sleep(1)
        assert _alive_nodes(address) == 2, "two-node Ray cluster did not come up"
        yield {"address": address, "dashboard": f"http://127.0.0.2:{dash}"}
    finally:
        if worker is not None:
            _stop(worker)
        _stop(head)
        from lmforge.launcher.ray_auth import remove_token_file

        remove_token_file(_token_file())


@pytest.fixture(scope="module")
def torchrun_reference(tmp_path_factory, data_cache) -> Path:
    run_dir = tmp_path_factory.mktemp("torchrun") / "run"
    run([str(BIN / "torchrun"), "--nproc_per_node=2", "--master_addr=127.0.0.1", f"--master_port={_free_port()}",
         "-m", "lmforge.training.train", str(DEBUG), *debug_overrides(run_dir, data_cache, *COMMON)])
    return run_dir


def _launch(cluster, run_dir, data_cache, *extra):
    return subprocess.run([str(BIN / "lmforge"), "launch", "--on", "ray", str(DEBUG), "--address", cluster["address"],
                           *debug_overrides(run_dir, data_cache, *COMMON, *extra)],
                          capture_output=True, text=True, env=_ray_env(), cwd=REPO, timeout=600)


def _ok(proc):
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}"
    return proc


def test_local_ray_started_by_the_command_matches_torchrun(cluster, torchrun_reference, tmp_path, data_cache):
    """No address: lmforge starts a local Ray of its own, even while another cluster (the fixture's)
    is the one Ray last remembers on this machine, with a fresh token: 0600 while it runs, gone after."""
    run_dir = tmp_path / "run"
    e = _ray_env()
    e.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen([str(BIN / "lmforge"), "launch", "--on", "ray", str(DEBUG),
                             *debug_overrides(run_dir, data_cache, *COMMON)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=e, cwd=REPO)
    head = []
    for line in proc.stdout:
        head.append(line)
        found = re.search(r"a fresh token for this run in (\S+) \(0600\)", line)
        if found:
            token = Path(found.group(1))
            modes = (oct(token.stat().st_mode & 0o777), oct(token.parent.stat().st_mode & 0o777))
            break
    out = "".join(head) + proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, out[-6000:]
    assert modes == ("0o600", "0o700") and not token.parent.exists()
    assert cluster["address"] not in out.split("node(s)")[0]  # its own cluster, not the fixture's
    assert losses(run_dir) == losses(torchrun_reference)
    # its ranks at niceness 0, not Ray's default 15 (launcher/ray.py, LOCAL_RAY_ENV)
    assert [p["niceness"] for p in json.loads((run_dir / "placement.json").read_text())] == [0, 0], out[-3000:]


def test_spread_across_two_nodes_sigkill_restarts_and_resumes_exactly(cluster, torchrun_reference, tmp_path, data_cache):
    run_dir = tmp_path / "run"
    cmd = [str(BIN / "lmforge"), "launch", "--on", "ray", str(DEBUG), "--address", cluster["address"],
           *debug_overrides(run_dir, data_cache, *COMMON, "launch.max_failures=1")]
    proc = subprocess.Popen(cmd, cwd=REPO, env=_ray_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    killed = None
    deadline = time.time() + 400
    while time.time() < deadline and proc.poll() is None and killed is None:
        if (run_dir / "metrics.jsonl").is_file() and max(losses(run_dir), default=0) >= 15:
            pid = json.loads((run_dir / "placement.json").read_text())[1]["pid"]
            psutil.Process(pid).kill()
            killed = max(losses(run_dir))
        time.sleep(0.02)
    out, _ = proc.communicate(timeout=600)
    assert killed is not None and killed < 40, out[-4000:]
    assert proc.returncode == 0, out[-6000:]
    assert re.search(r"resumed from \S+step_(10|20|30) at step", out), out[-4000:]
    _no_token_in(run_dir, out)
    placement = json.loads((run_dir / "placement.json").read_text())  # the restarted group's
    assert len({p["node_id"] for p in placement}) == 2  # SPREAD: one worker per node
    assert {p["ip"] for p in placement} == {"127.0.0.2", "127.0.0.3"}
    assert {p["niceness"] for p in placement} == {15}  # a cluster lmforge did not start keeps Ray's default
    assert "2 node(s)" in out and "tensorboard --logdir" in out
    ls = losses(run_dir)
    assert ls == losses(torchrun_reference)  # same seed, same losses, bitwise, across the restart
    assert ls[40] < ls[1] - 0.5


def test_beyond_max_failures_names_cause_and_last_checkpoint(cluster, tmp_path, data_cache):
    run_dir = tmp_path / "run"
    cmd = [str(BIN / "lmforge"), "launch", "--on", "ray", str(DEBUG), "--address", cluster["address"],
           *debug_overrides(run_dir, data_cache, *COMMON, "launch.max_failures=0")]
    proc = subprocess.Popen(cmd, cwd=REPO, env=_ray_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 400
    while time.time() < deadline and proc.poll() is None:
        if (run_dir / "metrics.jsonl").is_file() and max(losses(run_dir), default=0) >= 15:
            psutil.Process(json.loads((run_dir / "placement.json").read_text())[0]["pid"]).kill()
            break
        time.sleep(0.02)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 1, out[-4000:]
    assert "training failed after 0 restart(s)" in out and "last good checkpoint: " + str(run_dir) in out


def test_ray_job_submission_logs_progress(cluster, tmp_path, data_cache):
    run_dir = tmp_path / "run"
    entry = [str(BIN / "lmforge"), "launch", "--on", "ray", str(DEBUG), *debug_overrides(run_dir, data_cache, *COMMON)]
    proc = subprocess.run([str(BIN / "ray"), "job", "submit", "--address", cluster["dashboard"], "--", *entry],
                          capture_output=True, text=True, env=_ray_env(), cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert "succeeded" in proc.stdout
    assert re.search(r"step 40: eval loss [\d.]+ ppl", proc.stdout)  # progress and the final loss
    assert re.search(r"held-out perplexity: [\d.]+ before -> [\d.]+ after", proc.stdout)
    assert losses(run_dir)[40] < losses(run_dir)[1]
    st = json.loads(_ok(subprocess.run([str(BIN / "lmforge"), "status", str(run_dir), "--json"], capture_output=True,
                                       text=True, cwd=REPO)).stdout)[0]
    assert (st["health"], st["step"], st["checkpoint"]["tag"]) == ("finished", 40, "step_40"), st


def test_sweep_runs_trials_and_writes_table(cluster, tmp_path, data_cache):
    out_dir = tmp_path / "sweep"
    proc = subprocess.run([str(BIN / "lmforge"), "sweep", str(DEBUG), "--address", cluster["address"],
                           "--param", "train.lr=loguniform:1e-3:1e-2", "--param", "train.warmup=choice:2,5",
                           "--trials", "2", *debug_overrides(out_dir, data_cache, "train.steps=20", "eval.interval=5",
                                                             "checkpoint.interval=0")],
                          capture_output=True, text=True, env=_ray_env(), cwd=REPO, timeout=900)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-6000:]
    table = (out_dir / "sweep_results.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and "eval/loss" not in line]
    assert len(rows) == 2
    losses_col = [float(r.split("|")[2]) for r in rows]
    assert losses_col == sorted(losses_col)
    best = yaml.safe_load((out_dir / "best_config.yaml").read_text())
    assert 1e-3 <= best["train"]["lr"] <= 1e-2 and best["train"]["warmup"] in (2, 5)
    # every trial is an HParams session in TensorBoard: the sweep compares in its HParams tab
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer
    from tensorboard.plugins.hparams import plugin_data_pb2

    mux = EventMultiplexer()
    mux.AddRunsFromDirectory(str(out_dir / "trials"))
    mux.Reload()
    lrs = []
    for run, content in mux.PluginRunToTagToContent("hparams").items():
        start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
        lrs.append(start.session_start_info.hparams["train.lr"].number_value)
    assert len(lrs) == 2 and all(1e-3 <= lr <= 1e-2 for lr in lrs), lrs


def test_prepare_on_ray_writes_the_single_node_token_files_byte_for_byte(cluster, tmp_path, data_cache):
    """`lmforge prepare --on ray` encodes with Ray Data on both nodes; its cache equals the one the
    single-node path builds (data_cache: built in process here, or already by the reference runs)."""
    from lmforge.training import data
    from lmforge.training.config import load_config

    local = data.prepare(load_config(DEBUG, debug_overrides(tmp_path / "unused", data_cache)).data)
    proc = _ok(subprocess.run([str(BIN / "lmforge"), "prepare", str(DEBUG), "--on", "ray", "--address",
                               cluster["address"], *debug_overrides(tmp_path / "r", tmp_path / "ray-cache")],
                              capture_output=True, text=True, env=_ray_env(), cwd=REPO, timeout=300))
    summary = json.loads(proc.stdout)
    assert Path(summary["train"]).is_relative_to(tmp_path / "ray-cache")
    assert Path(summary["train"]).parent.name == local.train_tokens.parent.name  # the same fingerprint
    for name in ("train.npy", "val.npy", "tokenizer/tokenizer.json", "meta.json"):
        assert (Path(summary["train"]).parent / name).read_bytes() == (local.train_tokens.parent / name).read_bytes(), name
    assert re.search(r"ray prepare train: \d+ documents, \d+ tokens in [\d.]+ s \([\d,]+ tokens/s\) on 2 node\(s\)",
                     proc.stderr), proc.stderr[-3000:]
    _no_token_in(tmp_path / "ray-cache", proc.stdout, proc.stderr)


def test_prepare_on_ray_refuses_a_record_task_before_connecting():
    import logging

    from lmforge.launcher import ray_prepare
    from lmforge.training.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="task sft prepares its records on one machine: drop --on ray"):
        ray_prepare.prepare(load_config(REPO / "configs" / "sft.yaml", ["launch.address=127.0.0.5:1"]),
                            logging.getLogger("test"))


def test_unreachable_address_fails_fast(tmp_path, data_cache):
    port = _free_port()  # nobody listens here
    t0 = time.time()
    proc = subprocess.run([str(BIN / "lmforge"), "launch", "--on", "ray", str(DEBUG), "--address", f"127.0.0.5:{port}",
                           *debug_overrides(tmp_path / "r", data_cache)], capture_output=True, text=True,
                          env=_ray_env(), cwd=REPO, timeout=120)
    assert time.time() - t0 < 30
    assert proc.returncode == 2 and f"cannot reach the Ray cluster at 127.0.0.5:{port}" in proc.stderr


def test_request_larger_than_cluster_is_refused(cluster, tmp_path, data_cache):
    proc = _launch(cluster, tmp_path / "r", data_cache, "launch.workers=4", "train.global_batch_size=16")
    assert proc.returncode == 2
    assert "asked for 4 worker(s) x (CPU 1, GPU 0) with SPREAD; the cluster can fit at most 2" in proc.stderr
    assert "127.0.0.3: CPU 1" in proc.stderr


@pytest.mark.parametrize("param,expected", [
    ("train.lrr=uniform:1e-4:1e-3", "unknown key train.lrr; did you mean train.lr?"),
    ("train.lr=gauss:1:2", "unknown distribution 'gauss'; allowed: loguniform, uniform, randint, choice"),
    ("train.lr", "is not KEY=DIST:ARGS"),
])
def test_sweep_bad_param_is_refused_before_any_trial(param, expected, tmp_path, data_cache):
    proc = subprocess.run([str(BIN / "lmforge"), "sweep", str(DEBUG), "--param", param,
                           *debug_overrides(tmp_path / "s", data_cache)], capture_output=True, text=True,
                          env=_ray_env(), cwd=REPO, timeout=120)
    assert proc.returncode == 2 and expected in proc.stderr, proc.stderr[-2000:]


def test_strict_pack_that_no_node_can_hold_is_refused(cluster, tmp_path, data_cache):
    proc = _launch(cluster, tmp_path / "r", data_cache, "launch.strategy=STRICT_PACK")
    assert proc.returncode == 2
    assert "asked for 2 worker(s) x (CPU 1, GPU 0) with STRICT_PACK; the cluster can fit at most 1" in proc.stderr


def test_sigterm_to_the_driver_checkpoints_and_exits_75(cluster, torchrun_reference, tmp_path, data_cache):
    """Ray Train runs the loop off the main thread, so the driver turns SIGTERM into RUN_DIR/STOP;
    the workers save at their next step and the driver exits 75 (that a rerun resumes exactly is
    the same code path as after a kill, tested above)."""
    run_dir = tmp_path / "run"
    cmd = [str(BIN / "lmforge"), "launch", "--on", "ray", str(DEBUG), "--address", cluster["address"],
           *debug_overrides(run_dir, data_cache, *COMMON)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=_ray_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 400
    while time.time() < deadline and proc.poll() is None:
        if (run_dir / "metrics.jsonl").is_file() and max(losses(run_dir), default=0) >= 13:
            proc.send_signal(signal.SIGTERM)
            break
        time.sleep(0.05)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 75, out[-6000:]
    stopped_at = int(re.search(r"stopped at step (\d+) of 40", out).group(1))
    assert (run_dir / "checkpoints" / f"step_{stopped_at}" / "manifest.json").is_file()
    assert not (run_dir / "STOP").exists()
    assert losses(run_dir) == {s: v for s, v in losses(torchrun_reference).items() if s <= stopped_at}


def test_a_client_without_the_token_is_refused_by_the_cluster(cluster):
    """Plain Ray, as anyone on the network would connect: no token, auth mode off."""
    code = ("import ray; ray.init(address=%r, _node_ip_address='127.0.0.2', logging_level='ERROR'); "
            "print('connected')" % cluster["address"])
    proc = subprocess.run([str(BIN / "python"), "-c", code], capture_output=True, text=True,
                          env=dict(_ray_env(token=False), RAY_AUTH_MODE="disabled"), timeout=180)
    assert proc.returncode != 0 and "connected" not in proc.stdout
    assert "Authentication token is missing or incorrect" in proc.stderr, proc.stderr[-3000:]


@pytest.mark.parametrize("case,expected", [
    ("no token", "needs its authentication token (launch.ray_auth=token), and none was found: set RAY_AUTH_TOKEN_PATH"),
    ("wrong token", "refused the token from $RAY_AUTH_TOKEN (InvalidAuthToken"),
    ("ray_auth disabled", "uses token authentication, and launch.ray_auth=disabled sends no token"),
    ("env disables", "RAY_AUTH_MODE=disabled is set in the environment, but launch.ray_auth is token"),
])
def test_launch_without_the_right_token_fails_fast_and_says_why(cluster, tmp_path, data_cache, case, expected):
    e = _ray_env(token=False)
    e["HOME"] = str(tmp_path)  # no ~/.ray/auth_token either
    extra = []
    if case == "wrong token":
        e.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="0" * 64)
    elif case == "ray_auth disabled":
        extra = ["launch.ray_auth=disabled"]
    elif case == "env disables":
        e.update(RAY_AUTH_MODE="disabled", RAY_AUTH_TOKEN_PATH=str(_token_file()))
    t0 = time.time()
    proc = (subprocess.run([str(BIN / "lmforge"), "launch", "--on", "ray", str(DEBUG), "--address", cluster["address"],
                                  *debug_overrides(tmp_path / "r", data_cache, *extra)],
                                 capture_output=True, text=True, env=e, cwd=REPO, timeout=120))
    assert time.time() - t0 < 30
    assert proc.returncode == 2 and expected in proc.stderr, proc.stderr[-3000:]
    if case == "ray_auth disabled":
        assert "WARNING: launch.ray_auth=disabled" in proc.stderr
    assert not (tmp_path / "r").exists()  # refused before anything was written
