"""Served for real: the fp32 export and its W8A8 and W4A16 compressions, each served by vLLM's
OpenAI-compatible server (CPU, its own environment) on 127.0.0.1, score the run's held-out tokens to
the perplexity `lmforge report` measured in transformers; greedy tokens from the fp32 server equal
transformers' greedy tokens.

    make vllm-env && make test-serve          # = pytest -m serve tests/test_serve.py

The served tests are marked `serve` (out of the default `make test`; ~3 min on 2 cores, most of it the
shared model fixture, compression and three ~30 s server starts) and skip when the vLLM environment is
missing; W4A16 also skips on CPUs without AVX-512, where vLLM has no CPU kernel for it. The bad-input
checks at the end need no vLLM and run always.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from conftest import lmforge
from lmforge.tools import artifact, serve
from lmforge.training.config import ConfigError

VLLM_PYTHON = Path(os.environ.get(serve.VLLM_PYTHON_ENV) or serve.DEFAULT_VLLM_PYTHON)


def served(test):
    """Marked `serve` (deselected by the default run) and skipped, before any fixture is built, when
    the vLLM environment is missing."""
    return pytest.mark.serve(pytest.mark.skipif(
        not VLLM_PYTHON.is_file(), reason=f"no vLLM environment at {VLLM_PYTHON}: `make vllm-env`, then "
                                          "`make test-serve`")(test))


# Served perplexity vs the report's (transformers, fp32), relative. Measured on the 2-core AVX2 box:
# fp32 4.4e-8 (the same math in another kernel order); W8A8 served in fp32 7.9e-4 (vLLM runs real int8
# GEMMs with dynamic per-token activation scales, transformers fake-quantizes in fp32). W4A16 is served
# in bf16 (vLLM's CPU wNa16 kernel has no fp32 path) while the report runs it in fp32; it could not be
# measured there (no AVX-512, see serve.check_runnable): bf16 serving moved the dense model's ppl by
# 6.4e-5 and W8A8's by 6.7e-4, so 5e-3 leaves room for bf16 group scales, unverified.
TOLERANCE = {"fp32": 1e-5, "w8a8": 1e-3, "w4a16": 5e-3}
THREADS = 1  # the test machine's cores are shared; a 0.5M-parameter model needs no more
GREEDY_PROMPT, GREEDY_NEW = 16, 12


@pytest.fixture(scope="module")
def artifacts(lm_hf, tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("serve")
    found = {"fp32": lm_hf}
    for recipe in ("w8a8", "w4a16"):
        found[recipe] = out / recipe
        lmforge("compress", lm_hf, "--recipe", recipe, "--out", found[recipe], "--calibration-samples", "32",
                timeout=900)
    return found


@pytest.fixture(scope="module")
def report_ppl(artifacts, tmp_path_factory) -> dict[str, float]:
    """The perplexities `lmforge report` writes to report.json, by artifact."""
    out = tmp_path_factory.mktemp("serve-report") / "report"
    lmforge("report", artifacts["w8a8"], artifacts["w4a16"], "--baseline", artifacts["fp32"], "--out", out,
            "--threads", str(THREADS), timeout=900)
    rep = json.loads((out / "report.json").read_text())
    by_path = {Path(r["artifact"]).resolve(): r["ppl"] for r in [rep["baseline"], *rep["rows"]]}
    return {name: by_path[Path(p).resolve()] for name, p in artifacts.items()}


def _check_ppl(name: str, url: str, model_dir: Path, want: float, started: float) -> None:
    tokens = artifact.heldout_tokens(artifact.run_config(model_dir))
    ppl = serve.served_perplexity(url, serve.served_model(url), tokens)
    diff = abs(ppl / want - 1)
    print(f"{name}: {serve.default_dtype(model_dir)}, server ready in {started:.1f} s, served ppl {ppl:.6f}, "
          f"report {want:.6f}, relative diff {diff:.2e}")
    assert diff <= TOLERANCE[name], (name, ppl, want)


def _transformers_greedy(model_dir: Path, prompts) -> list[list[int]]:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    # Like the server's ignore_eos: EOS is an ordinary token that does not stop generation (min_new_tokens
    # would instead forbid it, changing the argmax wherever EOS ranks first).
    model.generation_config.eos_token_id = None
    with torch.inference_mode():  # rows of equal length: one batch, no padding
        out = model.generate(prompts, max_new_tokens=GREEDY_NEW, do_sample=False)
    return out[:, prompts.shape[1]:].tolist()


@served
def test_fp32_served_perplexity_and_greedy_tokens(artifacts, report_ppl, tmp_path):
    model_dir = artifacts["fp32"]
    prompts = artifact.heldout_tokens(artifact.run_config(model_dir), 3)[:, :GREEDY_PROMPT]
    t0 = time.perf_counter()
    with serve.vllm_server(model_dir, threads=THREADS, log=tmp_path / "vllm.log") as url:
        started = time.perf_counter() - t0
        _check_ppl("fp32", url, model_dir, report_ppl["fp32"], started)
        got = [serve.generate(url, serve.served_model(url), p, GREEDY_NEW) for p in prompts.tolist()]
    want = _transformers_greedy(model_dir, prompts)
    print(f"greedy: served {got}, transformers {want}")
    assert all(len(w) == GREEDY_NEW for w in want) and got == want


def _avx512() -> bool:
    import torch

    return torch.cpu._is_avx512_supported()  # what vLLM's CPU platform checks to load its AVX-512 build


@served
@pytest.mark.parametrize("name", ["w8a8", pytest.param("w4a16", marks=pytest.mark.skipif(
    not _avx512(), reason="vLLM serves W4A16 on CPU only with its AVX-512 build (no cpu_gemm_wna16 in the AVX2 "
                          "one); this CPU has no AVX-512"))])
def test_compressed_served_perplexity(name, artifacts, report_ppl, tmp_path):
    model_dir = artifacts[name]
    t0 = time.perf_counter()
    with serve.vllm_server(model_dir, threads=THREADS, log=tmp_path / "vllm.log") as url:
        _check_ppl(name, url, model_dir, report_ppl[name], time.perf_counter() - t0)


# --------------------------------------------------------------------------- bad input (no vLLM needed)

def test_serve_refuses_what_vllm_cannot_serve(tmp_path):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    with pytest.raises(ConfigError, match="Hugging Face directory with config.json"):
        serve.check_artifact(gguf)
    with pytest.raises(ConfigError, match="make vllm-env"):
        serve.vllm_python(tmp_path / "no-such-venv" / "bin" / "python")


def test_default_dtype_follows_the_quantization(tmp_path):
    def dtype_of(q):
        (tmp_path / "config.json").write_text(json.dumps({"quantization_config": q} if q else {}))
        return serve.default_dtype(tmp_path)

    group = {"targets": ["Linear"], "weights": {"num_bits": 4}}
    assert dtype_of(None) == "float32"
    assert dtype_of({"quant_method": "compressed-tensors", "config_groups": {"group_0": group}}) == "bfloat16"
    w8a8 = group | {"weights": {"num_bits": 8}, "input_activations": {"num_bits": 8, "dynamic": True}}
    assert dtype_of({"quant_method": "compressed-tensors", "config_groups": {"group_0": w8a8}}) == "float32"


def test_weight_only_int4_is_refused_where_vllm_cannot_run_it(tmp_path):
    int4 = {"targets": ["Linear"], "weights": {"num_bits": 4, "group_size": 128}, "input_activations": None}
    (tmp_path / "config.json").write_text(json.dumps(
        {"quantization_config": {"quant_method": "compressed-tensors", "config_groups": {"group_0": int4}}}))
    with pytest.raises(ConfigError, match="--dtype float32.*bfloat16 only"):
        serve.vllm_server(tmp_path, dtype="float32", python=tmp_path / "unused").__enter__()
    if not _avx512():
        with pytest.raises(ConfigError, match="AVX-512"):
            serve.check_runnable(tmp_path, "bfloat16")
    else:
        serve.check_runnable(tmp_path, "bfloat16")
