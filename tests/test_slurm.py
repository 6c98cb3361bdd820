"""`lmforge launch --on slurm` against a real Slurm (slurmctld + 2 slurmd + munge on this machine,
started by tests/slurm_cluster.py): torchrun.sbatch and ray.sbatch across 2 nodes, pre-emption
with USR1 → checkpoint → requeue → identical losses, a time limit, and requests Slurm cannot run.

    pytest -m slurm tests/test_slurm.py
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from conftest import BIN, DEBUG, REPO, debug_overrides, env, lmforge, losses
from lmforge.launcher.slurm import wait_for_end
from slurm_cluster import LocalSlurm, SlurmUnavailable

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

# ~0.1 s a step on 2 fake nodes; a checkpoint only at the end unless a stop asks for one.
STEPS = 120
COMMON = [f"train.steps={STEPS}", "checkpoint.interval=1000", "eval.interval=1000", "logging.interval=1"]


@pytest.fixture(scope="module")
def slurm():
    root = Path(f"/tmp/lmforge-test-slurm-{os.getpid()}")
    cluster = LocalSlurm(root)
    try:
        cluster.start()
    except SlurmUnavailable as e:
        cluster.stop()
        pytest.skip(f"no local Slurm: {e}")
    saved = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(cluster.conf)  # for the lmforge/sbatch/scontrol subprocesses
    try:
        yield cluster
    finally:
        cluster.stop()
        if saved is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = saved
        shutil.rmtree(root, ignore_errors=True)


def wait_job(job: str, timeout: float = 300) -> dict[str, str]:
    """Until the job ends (the launcher's own wait, which sees through a requeue's passing states).
    A requeued job waits out the test cluster's cred_expire (10 s) before it starts again."""
    deadline = time.time() + timeout

    def check_deadline(state):
        if time.time() > deadline:
            raise AssertionError(f"job {job} did not end in {timeout} s: {state}")

    return wait_for_end(job, on_poll=check_deadline)


def submit(*args, env_extra: dict | None = None) -> tuple[str, subprocess.CompletedProcess]:
    proc = lmforge("launch", "--on", "slurm", DEBUG, *args, env_extra=env_extra)
    return re.search(r"submitted Slurm job (\d+)", proc.stdout).group(1), proc


def wait_step(run_dir: Path, step: int, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if (run_dir / "metrics.jsonl").is_file() and max(losses(run_dir), default=0) >= step:
            return
        time.sleep(0.2)
    raise AssertionError(f"{run_dir} never reached step {step}")


@pytest.fixture(scope="module")
def reference(slurm, tmp_path_factory, data_cache) -> Path:
    """torchrun.sbatch, 2 nodes x 1 rank, ZeRO-3, uninterrupted; followed to the end."""
    run_dir = tmp_path_factory.mktemp("slurm-ref") / "run"
    proc = lmforge("launch", "--on", "slurm", DEBUG, "--nodes", "2", "--follow",
                   *debug_overrides(run_dir, data_cache, *COMMON, "parallel.zero_stage=3"))
    job = re.search(r"submitted Slurm job (\d+)", proc.stdout).group(1)
    assert f"job {job} COMPLETED" in proc.stdout
    return run_dir


def test_torchrun_sbatch_trains_zero3_across_two_nodes(reference):
    log = next(reference.glob("slurm-*.out")).read_text()
    assert "on lmf-node[1-2], 2 node(s) x 1 rank(s), rendezvous lmf-node1:29500" in log
    assert "world_size=2" in log and "ZeRO-3, 2 rank(s)" in log
    ls = losses(reference)
    assert sorted(ls) == list(range(1, STEPS + 1))
    first, last = sum(ls[s] for s in (1, 2, 3)) / 3, sum(ls[s] for s in range(STEPS - 2, STEPS + 1)) / 3
    assert last < first - 0.5, f"loss did not fall: {first:.3f} -> {last:.3f}"
    assert (reference / "checkpoints" / f"step_{STEPS}" / "manifest.json").is_file()
    script = (reference / "job.sbatch").read_text()
    assert "#SBATCH --signal=B:USR1@120" in script and "#SBATCH --requeue" in script
    # lmforge status of a Slurm run: the job and its state, from any machine that sees the run directory
    st = json.loads(lmforge("status", reference, "--json").stdout)[0]
    job = next(reference.glob("slurm-*.out")).name.removeprefix("slurm-").removesuffix(".out")
    assert st["health"] == "finished" and st["step"] == STEPS and st["slurm"] == {"job": job, "state": "COMPLETED"}, st


def test_usr1_checkpoints_requeues_and_resumes_identically(reference, tmp_path, data_cache):
    run_dir = tmp_path / "run"
    cmd = [str(BIN / "lmforge"), "launch", "--on", "slurm", str(DEBUG), "--nodes", "2", "--follow",
           *debug_overrides(run_dir, data_cache, *COMMON, "parallel.zero_stage=3")]
    follower = subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_step(run_dir, 30)
        job = re.search(r"slurm-(\d+)\.out", " ".join(p.name for p in run_dir.glob("slurm-*.out"))).group(1)
        subprocess.run(["scancel", "--signal=USR1", "--full", job], check=True, env=env())
        state = wait_job(job)
        out, err = follower.communicate(timeout=120)
    finally:
        follower.kill()
    assert follower.returncode == 0, err[-3000:]
    assert state["JobState"] == "COMPLETED" and state["Restarts"] == "1", state
    log = (run_dir / f"slurm-{job}.out").read_text()
    # the ranks get USR1 too (--full signals the job step); whichever the main rank sees first, the
    # signal or the STOP file the script wrote from it, names the stop
    stopped_at = int(re.search(rf"stop requested \((SIGUSR1|{re.escape(str(run_dir))}/STOP \(USR1 to Slurm job {job}\))\) "
                               r"after step (\d+)", log).group(2))
    assert 30 <= stopped_at < STEPS
    assert "requeueing job" in log and f"(start 2)" in log
    assert f"resumed from {run_dir / 'checkpoints' / f'step_{stopped_at}'} at step {stopped_at}" in log
    assert "requeueing job" in out and f"job {job} COMPLETED" in out  # --follow saw both starts
    assert not (run_dir / "STOP").exists()
    assert losses(run_dir) == losses(reference)  # every step, before and after the requeue


def test_time_limit_leaves_a_checkpoint(slurm, tmp_path, data_cache):
    """No warning signal: Slurm's SIGTERM at the limit is enough for the ranks to save."""
    run_dir = tmp_path / "run"
    # a minute of steps at a slow pace (LMFORGE_FAULT_SLOW): the other tests keep the cores
    job, _ = submit("--nodes", "2", "--time", "1", *debug_overrides(
        run_dir, data_cache, "train.steps=100000", "checkpoint.interval=0", "eval.interval=0",
        "slurm.signal_before=0"), env_extra={"LMFORGE_FAULT_SLOW": "0.5"})
    state = wait_job(job, timeout=240)
    assert state["JobState"] == "TIMEOUT", state
    log = (run_dir / f"slurm-{job}.out").read_text()
    assert "stop requested (SIGTERM)" in log, log[-3000:]
    ckpts = [p for p in (run_dir / "checkpoints").glob("step_*")]
    assert len(ckpts) == 1 and (ckpts[0] / "manifest.json").is_file(), ckpts
    assert 0 < int(ckpts[0].name.split("_")[1]) < 100000


def _refused(*args) -> str:
    proc = lmforge("launch", "--on", "slurm", DEBUG, *args, "run_dir=/tmp/lmforge-never", check=False)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert not Path("/tmp/lmforge-never/job.sbatch").exists()
    return proc.stderr


def test_impossible_requests_are_refused_at_submission(slurm):
    assert "unknown Slurm partition 'gpu-nope'; this cluster has: debug, short" in _refused("--partition", "gpu-nope")
    assert "asked for 2 node(s), partition 'short' has 1" in _refused("--partition", "short", "--nodes", "2")
    assert "time limit 10 exceeds the MaxTime of partition 'short' (00:05:00)" in _refused("--partition", "short", "--time", "10")
    assert "asked for 3 node(s), partition 'debug' has 2" in _refused("--nodes", "3")
    # what only sbatch knows: its own words are shown
    err = _refused("slurm.sbatch_args=[--mem=9999999]")
    assert "sbatch refused the job: " in err and "Requested node configuration is not available" in err
    assert "lmforge-never" not in subprocess.run(["squeue", "-h", "-o", "%j"], capture_output=True, text=True,
                                                 env=env()).stdout


def _tokenless_client(address: str, seconds: float) -> subprocess.Popen:
    """A Ray client without a token (RAY_AUTH_MODE=disabled, no token set) calling the GCS at
    `address` until it gets an answer other than "not up yet", or `seconds` pass; prints the
    answer. The head comes up a few seconds into the job and lives only as long as the job."""
    e = {k: v for k, v in env().items() if not k.startswith("RAY_AUTH")}
    code = ("import sys, time\n"
            "from lmforge.launcher.ray_auth import gcs_status\n"
            "deadline, answer = time.time() + float(sys.argv[2]), None\n"
            "while time.time() < deadline:\n"
            "    answer = gcs_status(sys.argv[1], timeout_s=5, wait_for_ready=True)\n"
            "    if answer[0] not in ('UNAVAILABLE', 'DEADLINE_EXCEEDED'):\n"
            "        break\n"
            "print(*answer)\n")
    return subprocess.Popen([str(BIN / "python"), "-c", code, address, str(seconds)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=dict(e, RAY_AUTH_MODE="disabled"))


def test_ray_sbatch_runs_a_job_across_two_nodes(slurm, tmp_path, data_cache, request):
    """The job's Ray cluster uses a fresh token: 0600 in a 0700 node-local directory (TMPDIR), a
    client without it is refused by the head, the job's own driver and workers run, and the token
    is in no file of the run directory (the job's log included) and gone after the job."""
    run_dir = tmp_path / "run"
    # the nodes' TMPDIR, short: Ray puts its session sockets under it (AF_UNIX paths ≤ 107 bytes)
    node_tmp = Path(tempfile.mkdtemp(prefix="lmf-", dir="/tmp"))
    request.addfinalizer(lambda: shutil.rmtree(node_tmp, ignore_errors=True))
    proc = subprocess.Popen([str(BIN / "lmforge"), "launch", "--on", "slurm", str(DEBUG), "--nodes", "2", "--follow",
                             "slurm.runner=ray", "launch.strategy=STRICT_SPREAD",
                             *debug_overrides(run_dir, data_cache, "train.steps=20", "eval.interval=10")],
                            cwd=REPO, env=dict(env(), TMPDIR=str(node_tmp)), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    seen = None
    deadline = time.time() + 400
    while seen is None and proc.poll() is None and time.time() < deadline:
        for token_file in node_tmp.glob("lmforge-ray-*/token"):
            if token_file.stat().st_size:
                seen = {"file": oct(token_file.stat().st_mode & 0o777), "dir": oct(token_file.parent.stat().st_mode & 0o777),
                        "token": token_file.read_text().strip(), "path": token_file}
        time.sleep(0.1)
    assert seen is not None, "the job never placed its Ray token"
    assert (seen["file"], seen["dir"]) == ("0o600", "0o700")
    # the head (lmf-node1 = 127.0.0.2, slurm.ray_port 6379) refuses a client without the token
    client = _tokenless_client("127.0.0.2:6379", seconds=240)
    answer = client.communicate(timeout=300)[0]
    assert answer.startswith("UNAUTHENTICATED"), answer[-2000:]
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0 and "COMPLETED" in out, out[-4000:]
    placement = json.loads((run_dir / "placement.json").read_text())
    assert sorted(p["ip"] for p in placement) == ["127.0.0.2", "127.0.0.3"]  # one worker per Slurm node
    assert [p["niceness"] for p in placement] == [0, 0]  # the job's own Ray: ranks at niceness 0
    assert (run_dir / "checkpoints" / "step_20" / "manifest.json").is_file()
    assert "stopping the Ray cluster" in out
    assert not seen["path"].parent.exists()  # removed with the cluster
    assert seen["token"] not in out
    for f in run_dir.rglob("*"):
        if f.is_file():
            assert seen["token"].encode() not in f.read_bytes(), f
    time.sleep(2)
    left = subprocess.run(["pgrep", "-f", "raylet|gcs_server"], capture_output=True, text=True).stdout.split()
    assert not left, f"Ray processes left after the job: {left}"


def test_dry_run_prints_a_valid_script_and_submits_nothing(tmp_path):
    run_dir = tmp_path / "run"
    for runner in ("torchrun", "ray"):
        proc = lmforge("launch", "--on", "slurm", DEBUG, "--nodes", "4", "--gpus-per-node", "8", "--partition", "gpu",
                       "--time", "4:00:00", "--account", "proj", "--dry-run", f"slurm.runner={runner}",
                       f"run_dir={run_dir}")
        script = proc.stdout
        for line in ("--nodes=4", "--gpus-per-node=8", "--partition=gpu", "--time=4:00:00", "--account=proj",
                     "--signal=B:USR1@120", "--requeue", f"--output={run_dir}/slurm-%j.out"):
            assert f"#SBATCH {line}\n" in script
        assert not re.search(r"\{\{\w+\}\}", script)  # every placeholder filled
        if runner == "ray":  # a fresh token per job, by path; never a value in the script
            assert "RAY_AUTH=token\n" in script and "--input=all" in script and "RAY_AUTH_MODE=${" not in script
        subprocess.run(["bash", "-n"], input=script, text=True, check=True)  # valid shell
        embedded = yaml.safe_load(script.split("<<'LMFORGE_CONFIG'\n")[1].split("\nLMFORGE_CONFIG\n")[0])
        assert embedded["run_dir"] == str(run_dir) and embedded["slurm"]["nodes"] == 4
        assert embedded["launch"]["workers"] == 32  # 4 nodes x 8 GPUs, one rank each
        assert not run_dir.exists()


def test_ray_auth_disabled_is_explicit_and_warned(tmp_path):
    script = lmforge("launch", "--on", "slurm", DEBUG, "--nodes", "2", "--dry-run", "slurm.runner=ray",
                     "launch.ray_auth=disabled", f"run_dir={tmp_path}/run").stdout
    assert "RAY_AUTH=disabled\n" in script and "WARNING: launch.ray_auth=disabled" in script
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)


def test_missing_sbatch_says_how_to_get_it(tmp_path):
    path = ":".join(p for p in os.environ["PATH"].split(":") if not (Path(p) / "sbatch").exists())
    proc = subprocess.run([str(BIN / "lmforge"), "launch", "--on", "slurm", str(DEBUG), f"run_dir={tmp_path}/run"],
                          capture_output=True, text=True, env=dict(env(), PATH=path), cwd=REPO)
    assert proc.returncode == 2
    assert "sbatch is not on PATH" in proc.stderr and "apt-get install slurm-client" in proc.stderr
