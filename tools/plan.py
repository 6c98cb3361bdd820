"""`lmforge plan`: how much memory each rank needs, how fast a run goes, and a layout (a
Candidate: ZeRO stage, offload, micro batch, activation checkpointing, TP/SP) that fits, from the
config alone (pure arithmetic, driver side: no weights, no DeepSpeed, no process group).

    lmforge plan configs/pretrain_7b.yaml --nodes 2 --gpus-per-node 8 --gpu-memory 80GiB
    lmforge plan configs/pretrain_7b.yaml --gpu-memory 80GiB --gpu H100 --json
    lmforge plan configs/debug.yaml parallel.zero_stage=1 --gpus-per-node 2     # CPU: process memory

Per-rank device memory is the sum of named terms (bytes):

  parameters         model-dtype weights; / world under ZeRO-3; 0 with parameter offload
  gradients          model-dtype gradients (full under ZeRO-1, the rank's partition under ZeRO-2/3)
                     + the flat fp32 gradient partition the ZeRO optimizer steps on
  optimizer state    fp32 master partition + the optimizer's state (AdamW 8 B/param, bnb 8-bit Adam
                     ~2.04, Lion 8-bit ~1.02), / world under every ZeRO stage; 0 with optimizer offload
  activations        what autograd saves for backward at micro batch x seq_len (/ SP / TP), with or
                     without activation checkpointing (both are reported), + the loss head
  communication      the ZeRO reduce bucket (and, for ZeRO-3, the gathered-parameter working set:
                     prefetch bucket + the largest module) sized from the DeepSpeed config that
                     build_ds_config produces
  allocator headroom slack the allocator holds beyond live tensors (CUDA caching allocator /
                     glibc malloc arenas), a fraction of the terms above
  training runtime   (CPU) the model-size-independent growth of a training rank: engine, hooks,
                     oneDNN/MKL workspaces, gloo buffers
  runtime overhead   the fixed cost of a rank before any model exists: CUDA context + NCCL on a GPU;
                     Python + torch + transformers + DeepSpeed + gloo on a CPU

On a CPU (no --gpu-memory) the "device" is the process: the terms are the RSS a rank grows by,
and the capacity a layout must fit is the host RAM divided by the ranks per node. The CPU
constants below were calibrated with bench/bench_plan_memory.py (2 gloo ranks, fp32, ZeRO 1/2/3,
three model sizes); the GPU ones are the usual published figures and have
not been measured by this project.

Throughput is the honest kind of estimate: tokens/s = ranks x peak TFLOP/s x assumed MFU /
training FLOPs per token (model.flops_per_token). Activation checkpointing recomputes the forward
pass (8N instead of 6N FLOPs per token), so at the same hardware utilisation it is 3/4 as fast.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from lmforge.training.arithmetic import GPUS, LLAMA_LIKE, flops_per_token, gpu_spec, max_positions, plain_config
from lmforge.training.config import MODEL_PRESETS, Config, ConfigError, build_ds_config

GIB = 2**30

# Optimizer state bytes per parameter of the rank's partition, excluding the fp32 master copy.
# AdamW: exp_avg + exp_avg_sq in fp32. bitsandbytes blockwise 8-bit: 1 byte per state value plus
# one fp32 absmax per 2048-value block (+ a small quantile map), measured 2.04 / 1.02 B/param.
OPTIMIZER_STATE_BYTES = {"adamw": 8.0, "adamw_8bit": 2.04, "paged_adamw_8bit": 2.04, "lion_8bit": 1.02}

# Model FLOPs utilisation assumed for tokens/s when the caller gives none: what a well-tuned dense
# bf16 Llama run on A100/H100 with ZeRO typically reaches (35-45%). A planning assumption.
DEFAULT_MFU = 0.40

# --- runtime overhead and allocator slack, per device kind -----------------------------------
# GPU: CUDA context (+ lazily loaded kernels), cuBLAS workspace and NCCL's channel buffers take
# roughly 0.5-1 GiB per rank outside torch's allocator. Published/observed figures, not measured
# here; override with --runtime-overhead.
GPU_RUNTIME_OVERHEAD = int(0.75 * GIB)
# The CUDA caching allocator rounds blocks and keeps freed ones cached; ~10% over live tensors.
GPU_ALLOCATOR_FRACTION = 0.10
# CPU: RSS of a rank right before the model is built (torch, transformers, DeepSpeed + its shm comm
# op, gloo process group, TensorBoard): 363 MiB on every rank of every run of
# bench/bench_plan_memory.py (torch 2.13, deepspeed 0.19.8, 2 ranks).
CPU_RUNTIME_OVERHEAD = int(0.355 * GIB)
# CPU: what a rank's RSS grows by for training itself, independent of model size (DeepSpeed engine
# objects and hooks, autograd/oneDNN/MKL workspaces and caches, gloo buffers, first-step lazy
# imports). The intercept of measured growth vs the model terms below over three model sizes x
# ZeRO-1/2/3 (bench/bench_plan_memory.py): 0.14 GiB when first fitted (2026-11-22); refitted to 0.20
# on 2026-12-06, when the same bench measured 0.02-0.11 GiB more growth in every cell (mean +0.057;
# the same on the code of that date's start, so the libraries' or the ranks' fixed cost grew, not a
# model term). The 0.2M-param llama-debug grows by less, so part of this is not truly fixed
# (per-layer caches); reported as its own term.
CPU_TRAINING_RUNTIME = int(0.20 * GIB)
# glibc malloc hands large blocks back to the kernel (mmap) and RSS counts only touched pages: the
# measured growth rises by 0.9x the model terms for ZeRO-1/2 (the terms already are an upper
# bound), so no slack is added on a CPU.
CPU_ALLOCATOR_FRACTION = 0.0

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?)b?\s*$", re.IGNORECASE)


def parse_memory(text: str | int | float | None) -> int | None:
    """'80GiB', '80G', '80GB' (GB = 10^9), '81920MiB', a plain byte count → bytes."""
    if text is None:
        return None
    if isinstance(text, (int, float)):
        return int(text)
    m = _SIZE.match(text)
    if not m:
        raise ConfigError(f"--gpu-memory: {text!r} is not a size (e.g. 80GiB, 40GB, 24G, 81920MiB)")
    number, prefix, binary = float(m.group(1)), m.group(2).lower(), m.group(3)
    power = "kmgt".index(prefix) + 1 if prefix else 0
    # A bare "80G" means GiB, as nvidia-smi and Slurm's --mem use it; "80GB" means 10^9.
    base = 1024 if (binary or not text.strip().lower().endswith("b")) else 1000
    value = int(number * base**power)
    if value <= 0:
        raise ConfigError(f"--gpu-memory: {text!r} must be positive")
    return value


# --------------------------------------------------------------------------- model shape

@dataclass(frozen=True)
class ModelShape:
    model_type: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool
    n_params: int       # all parameters (as model.count_params reports them)
    n_matmul: int       # parameters in matmuls (the tied embedding counted once, as the output head)
    largest_module: int  # parameters of the largest leaf module (ZeRO-3 gathers one at a time)


def model_config(cfg: Config, vocab_size: int, source=None):
    """The model's config as the arithmetic reads it: plain values for a Llama-family preset or
    local directory (no torch: the plan answers in under 2 s), else transformers' config class."""
    from pathlib import Path

    m = cfg.model
    path = source or (Path(m.path).expanduser() if m.path else None)
    conf = plain_config(MODEL_PRESETS, m.preset, path, m.overrides, vocab_size)
    if conf is None:
        from lmforge.training.model import hf_config

        conf = hf_config(m, vocab_size, 0, source)
    return conf


def model_shape(conf) -> ModelShape:
    """Parameter counts from the HF config by arithmetic for Llama-family models (exactly what
    model.count_params reports); other architectures are built on the meta device and counted."""
    h, layers = conf.hidden_size, conf.num_hidden_layers
    heads = conf.num_attention_heads
    kv = getattr(conf, "num_key_value_heads", None) or heads
    hd = getattr(conf, "head_dim", None) or h // heads
    inter = getattr(conf, "intermediate_size", None) or 4 * h
    vocab = conf.vocab_size
    tied = bool(getattr(conf, "tie_word_embeddings", False))
    if conf.model_type in LLAMA_LIKE:
        q, kvd = heads * hd, kv * hd
        attn = h * q + 2 * h * kvd + q * h
        if getattr(conf, "attention_bias", conf.model_type == "qwen2"):
            attn += q + 2 * kvd + (h if conf.model_type != "qwen2" else 0)  # qwen2: q/k/v biases only
        if conf.model_type == "qwen3":
            attn += 2 * hd  # per-head q_norm / k_norm
        mlp = 3 * h * inter + (2 * inter + h if getattr(conf, "mlp_bias", False) else 0)
        per_layer = attn + mlp + 2 * h
        emb = vocab * h
        total = emb + layers * per_layer + h + (0 if tied else vocab * h)
        largest = max(emb, h * inter)
        return ModelShape(conf.model_type, h, layers, heads, kv, hd, inter, vocab, tied, total,
                          total - (0 if tied else emb), largest)
    return _meta_shape(conf, h, layers, heads, kv, hd, inter, vocab, tied)


def _meta_shape(conf, h, layers, heads, kv, hd, inter, vocab, tied) -> ModelShape:
    import torch
    from transformers import AutoModelForCausalLM

    from lmforge.training.model import count_params

    with torch.device("meta"):  # shapes only: no memory is allocated
        model = AutoModelForCausalLM.from_config(conf)
    total, matmul = count_params(model)
    largest = max((sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()), default=0)
    return ModelShape(conf.model_type, h, layers, heads, kv, hd, inter, vocab, tied, total, matmul, largest)


def resolve_vocab(cfg: Config) -> tuple[int, str | None]:
    """The tokenizer's size without preparing data: a given tokenizer is read; a locally trained
    one has data.vocab_size entries (the BPE trainer reaches the target on any real corpus).
    A plan is often made before the tokenizer is on this machine: then data.vocab_size is used
    and a note says so (give --vocab-size)."""
    from pathlib import Path

    if cfg.data.tokenizer:
        path = Path(cfg.data.tokenizer).expanduser()
        if (path / "tokenizer.json").is_file():  # the fast tokenizer's file: its size without transformers
            from tokenizers import Tokenizer

            return Tokenizer.from_file(str(path / "tokenizer.json")).get_vocab_size(with_added_tokens=True), None
        if path.is_dir():
            from lmforge.training.data import load_tokenizer

            return len(load_tokenizer(path)), None
        return cfg.data.vocab_size, (f"data.tokenizer {path} is not on this machine: vocabulary taken as "
                                     f"data.vocab_size={cfg.data.vocab_size} (give --vocab-size)")
    return cfg.data.vocab_size, None


# --------------------------------------------------------------------------- candidate and hardware

@dataclass(frozen=True)
class Candidate:
    """One way to lay the run out on the ranks, as the planner weighs it."""
    zero_stage: int
    offload_optimizer: bool
    offload_params: bool
    micro_batch_size: int
    activation_checkpointing: bool
    tensor_parallel: int = 1
    sequence_parallel: int = 1

    def describe(self) -> str:
        off = "+".join(n for n, on in (("optimizer", self.offload_optimizer), ("params", self.offload_params)) if on)
        return (f"ZeRO-{self.zero_stage}, offload {off or 'none'}, micro batch {self.micro_batch_size}, "
                f"activation checkpointing {'on' if self.activation_checkpointing else 'off'}, "
                f"TP {self.tensor_parallel}, SP {self.sequence_parallel}")


@dataclass(frozen=True)
class Hardware:
    nodes: int
    ranks_per_node: int
    device: str                 # "cuda" or "cpu"
    precision: str              # resolved: fp32 / bf16 / fp16
    capacity: int | None        # bytes one rank may use (GPU memory, or host RAM / ranks per node)
    peak_tflops: float | None   # per device, dense bf16/fp16 (None: no throughput estimate)
    mfu: float
    runtime_overhead: int
    allocator_fraction: float
    training_runtime: int = 0

    @property
    def world_size(self) -> int:
        return self.nodes * self.ranks_per_node


def candidate_of(cfg: Config) -> Candidate:
    """The config's own layout."""
    p = cfg.parallel
    return Candidate(p.zero_stage, p.offload_optimizer, p.offload_params, cfg.train.micro_batch_size,
                     bool(getattr(cfg.train, "activation_checkpointing", False)),
                     int(getattr(p, "tensor", 1) or 1), int(getattr(p, "sequence", 1) or 1))


def hardware(cfg: Config, nodes: int = 1, gpus_per_node: int | None = None, gpu_memory: int | str | None = None,
             gpu: str | None = None, peak_tflops: float | None = None, mfu: float | None = None,
             runtime_overhead: int | str | None = None) -> Hardware:
    """A GPU named or its memory given → a CUDA plan (bf16 unless train.precision says otherwise),
    a named GPU implying its memory and peak (either given explicitly overrides it); neither → CPU
    ranks (fp32), the capacity being this host's RAM shared by its ranks."""
    if nodes < 1:
        raise ConfigError(f"--nodes must be >= 1 (got {nodes})")
    ranks = gpus_per_node if gpus_per_node is not None else (cfg.launch.workers or 1)
    if ranks < 1:
        raise ConfigError(f"--gpus-per-node must be >= 1 (got {ranks})")
    memory = parse_memory(gpu_memory)
    spec = None
    if gpu is not None:
        spec = gpu_spec(gpu)
        if spec is None:
            raise ConfigError(f"--gpu {gpu!r}: unknown; known: {', '.join(GPUS)} (or give --gpu-memory and --peak-tflops)")
        memory = memory if memory is not None else spec[2]
        peak_tflops = peak_tflops or spec[1]
    cuda = memory is not None
    precision = cfg.train.precision
    if precision == "auto":
        precision = "bf16" if cuda else "fp32"
    elif precision in ("bf16", "fp16") and not cuda:
        raise ConfigError(f"train.precision={precision} plans a GPU run: give --gpu-memory")
    peak_tflops = peak_tflops or cfg.logging.peak_tflops
    if mfu is not None and not 0 < mfu <= 1:
        raise ConfigError(f"--mfu must be in (0, 1] (got {mfu})")
    if cuda:
        capacity = memory
        overhead, fraction = GPU_RUNTIME_OVERHEAD, GPU_ALLOCATOR_FRACTION
    else:
        import psutil

        capacity = psutil.virtual_memory().total // ranks
        overhead, fraction = CPU_RUNTIME_OVERHEAD, CPU_ALLOCATOR_FRACTION
    if runtime_overhead is not None:
        overhead = parse_memory(runtime_overhead)
    return Hardware(nodes, ranks, "cuda" if cuda else "cpu", precision, capacity, peak_tflops,
                    mfu or DEFAULT_MFU, overhead, fraction, 0 if cuda else CPU_TRAINING_RUNTIME)


# --------------------------------------------------------------------------- the estimate

@dataclass
class Estimate:
    shape: ModelShape
    candidate: Candidate
    hardware: Hardware
    seq_len: int
    optimizer: str
    terms: dict[str, int]                 # per-rank device bytes, in report order
    host_terms: dict[str, int]            # per-rank host bytes for offloaded state
    activations_without_checkpointing: int
    activations_with_checkpointing: int
    flops_per_token: float
    tokens_per_s: float | None
    mfu: float | None
    notes: list[str] = field(default_factory=list)

    @property
    def n_params(self) -> int:
        return self.shape.n_params

    @property
    def device_total(self) -> int:
        return sum(self.terms.values())

    @property
    def fits(self) -> bool | None:
        cap = self.hardware.capacity
        return None if cap is None else self.device_total <= cap

    def to_dict(self) -> dict[str, Any]:
        hw = self.hardware
        return {
            "model": asdict(self.shape), "layout": asdict(self.candidate),  # `lmforge plan --json` output: key kept
            "hardware": {**asdict(hw), "world_size": hw.world_size},
            "seq_len": self.seq_len, "optimizer": self.optimizer,
            "memory_per_rank_bytes": dict(self.terms), "total_per_rank_bytes": self.device_total,
            "host_per_rank_bytes": dict(self.host_terms),
            "activations_bytes": {"without_checkpointing": self.activations_without_checkpointing,
                                  "with_checkpointing": self.activations_with_checkpointing},
            "capacity_bytes": hw.capacity, "fits": self.fits,
            "flops_per_token": self.flops_per_token, "tokens_per_s": self.tokens_per_s, "mfu": self.mfu,
            "notes": list(self.notes),
        }


def activation_bytes(s: ModelShape, tokens: int, w: int, checkpointing: bool, tp: int = 1) -> int:
    """Bytes autograd keeps for backward for `tokens` tokens on one rank (the peak, at the start of
    backward), for a Llama-style block with SDPA/flash attention (no seq x seq score matrix).

    Per layer and token: each RMSNorm saves its fp32 input and normalised value plus its output in
    the model dtype; attention saves q and k after RoPE, v, the attention output and o_proj's
    contiguous input (3q + 2kv); the SwiGLU MLP saves gate, up, silu(gate) and their product (4I).
    TP splits the attention heads and the MLP width. The head saves the logits, their fp32 copy
    for the loss (bf16 only), log_softmax's output, and backward's first gradient of the logits.
    With checkpointing a layer keeps only its input; one layer is recomputed at a time."""
    q, kv, inter = s.heads * s.head_dim // tp, s.kv_heads * s.head_dim // tp, s.intermediate // tp
    norm = 4 * s.hidden + 4 * s.hidden + w * s.hidden
    per_layer = 2 * norm + w * (3 * q + 2 * kv + 4 * inter)
    head = norm + (w + (4 if w < 4 else 0) + 4 + w) * s.vocab
    if checkpointing:
        body = s.layers * w * s.hidden + per_layer
    else:
        body = s.layers * per_layer
    return tokens * (body + head)


def estimate(cfg: Config, world_size: int | None = None, nodes: int = 1, gpus_per_node: int | None = None,
             gpu_memory: int | str | None = None, gpu: str | None = None, peak_tflops: float | None = None,
             mfu: float | None = None, runtime_overhead: int | str | None = None,
             candidate: Candidate | None = None, vocab_size: int | None = None, hw: Hardware | None = None) -> Estimate:
    """Per-rank memory and throughput of `cfg` on `nodes` x `gpus_per_node` ranks (world_size is a
    shortcut for one node with that many ranks), for `candidate` (default: the config's own)."""
    if hw is None:
        if world_size is not None:
            if gpus_per_node is not None and nodes * gpus_per_node != world_size:
                raise ConfigError(f"world size {world_size} != nodes {nodes} x gpus per node {gpus_per_node}")
            gpus_per_node = gpus_per_node or world_size // nodes
        hw = hardware(cfg, nodes, gpus_per_node, gpu_memory, gpu, peak_tflops, mfu, runtime_overhead)
    cand = candidate or candidate_of(cfg)
    notes: list[str] = []
    source = None
    if cfg.model.init_from:
        source = _init_from_meta(cfg.model.init_from)
        vocab_size = vocab_size or 0  # the model's own embedding size counts
    if vocab_size is None:
        vocab_size, note = resolve_vocab(cfg)
        if note and not cfg.model.path:  # a model.path brings its own vocabulary
            notes.append(note)
    conf = model_config(cfg, vocab_size, source)
    shape = model_shape(conf)
    seq = cfg.data.seq_len
    max_pos = max_positions(conf)
    if max_pos is not None and seq > max_pos:
        raise ConfigError(f"data.seq_len ({seq}) exceeds the model's max positions ({max_pos})")

    world, tp, sp = hw.world_size, cand.tensor_parallel, cand.sequence_parallel
    if world % (tp * sp):
        raise ConfigError(f"world size {world} is not divisible by TP {tp} x SP {sp}")
    w = 4 if hw.precision == "fp32" else 2
    n = shape.n_params / tp                 # this rank's model-parallel slice
    z = world // tp                         # ZeRO partitions over data (and sequence) parallel ranks
    stage = cand.zero_stage
    state_b = OPTIMIZER_STATE_BYTES.get(cfg.train.optimizer)
    if state_b is None:
        raise ConfigError(f"train.optimizer={cfg.train.optimizer}: no state size known to plan")
    zero = build_ds_config(cfg.model_copy(update={"parallel": cfg.parallel.model_copy(update=dict(
        zero_stage=stage, offload_optimizer=cand.offload_optimizer, offload_params=cand.offload_params))}),
        world, hw.precision)["zero_optimization"] if _ds_buildable(cfg, cand, world) else {}

    host: dict[str, int] = {}
    # Parameters: model dtype. ZeRO-3 keeps only this rank's 1/z shard resident.
    params = w * n / (z if stage == 3 else 1)
    if cand.offload_params:
        host["parameters"], params = int(params), 0
    # Gradients: the model-dtype gradients autograd produces (ZeRO-1 keeps them whole until the
    # boundary; ZeRO-2/3 reduce-scatter them into the rank's partition), plus the flat fp32
    # partition DeepSpeed builds for the optimizer to step on (a separate copy at every stage on
    # CPU fp32 runs too: stage 1/2 flatten `averaged_gradients`, stage 3 its grad partition buffer).
    grads = w * n / (1 if stage == 1 else z) + 4 * n / z
    # Optimizer: the fp32 master partition (DeepSpeed clones it even when training in fp32) and
    # the optimizer's own state, both partitioned by every ZeRO stage.
    opt = (4 + state_b) * n / z
    if cand.offload_optimizer:
        host["optimizer state"], opt = int(opt), 0
        host["gradients (fp32 partition)"] = int(4 * n / z)
        grads -= 4 * n / z

    tokens = cand.micro_batch_size * seq // sp
    act_off = activation_bytes(shape, tokens, w, False, tp)
    act_on = activation_bytes(shape, tokens, w, True, tp)
    acts = act_on if cand.activation_checkpointing else act_off

    # Communication: the ZeRO reduce bucket (gradients are copied into it before each
    # reduce/reduce-scatter). On a GPU the caching allocator reserves the full bucket; on a CPU only
    # the pages touched count, at most the model's own gradient size. ZeRO-3 also materialises
    # gathered parameters: the module being computed plus the prefetch bucket.
    bucket = float(zero.get("reduce_bucket_size", 5e8 if stage < 3 else 5e7))
    full_gather = hw.device == "cuda"
    comm = w * (bucket if full_gather else min(bucket, n))
    if stage == 3:
        prefetch = float(zero.get("stage3_prefetch_bucket_size", 5e7))
        live = float(zero.get("stage3_max_live_parameters", 1e9))
        gathered = min(live, shape.largest_module / tp + min(prefetch, n))
        comm += w * gathered
        if not full_gather:
            # gloo has no reduce-scatter: DeepSpeed's ZeRO-3 reduction all-reduces the bucket
            # through one flattened copy of it (measured: ZeRO-3 grows ~1x the gradient bytes
            # more than ZeRO-2 beyond the partitioned terms).
            comm += w * min(bucket, n)
    elif stage in (1, 2) and not full_gather:
        pass  # the allgather after the step writes in place into the flat parameter buffer
    else:
        comm += w * min(float(zero.get("allgather_bucket_size", 5e8)), n)

    terms = {"parameters": int(params), "gradients": int(grads), "optimizer state": int(opt),
             "activations": int(acts), "communication buffers": int(comm)}
    terms["allocator headroom"] = int(hw.allocator_fraction * sum(terms.values()))
    if hw.training_runtime:
        terms["training runtime (fixed)"] = int(hw.training_runtime)
    terms["runtime overhead"] = int(hw.runtime_overhead)

    fpt = flops_per_token(conf, shape.n_matmul, seq)
    tps = achieved = None
    if hw.peak_tflops:
        # Recompute spends a forward pass again: 8N instead of 6N hardware FLOPs per model FLOP.
        recompute = 4 / 3 if cand.activation_checkpointing else 1.0
        # Every rank's FLOPs count whatever the split (TP/SP ranks share each token's work).
        tps = world * hw.peak_tflops * 1e12 * hw.mfu / (fpt * recompute)
        achieved = hw.mfu / recompute
    else:
        notes.append("no peak TFLOP/s on this device: give --gpu NAME or --peak-tflops for tokens/s and MFU")
    if cand.offload_optimizer:
        notes.append("optimizer offload: the step runs on the host CPU (DeepSpeedCPUAdam); tokens/s assumes it overlaps")
    return Estimate(shape, cand, hw, seq, cfg.train.optimizer, terms, host, act_off, act_on, fpt, tps, achieved, notes)


def _init_from_meta(init_from: str):
    """model.init_from → the directory holding its config.json. Every checkpoint of a run has the
    same architecture, so the newest step_N/hf/ serves without verifying the checkpoint (which
    would import torch); only when none is found does consolidate.source_meta say what is wrong."""
    from pathlib import Path

    p = Path(init_from).expanduser()
    for root in (p, p / "checkpoints"):
        if (root / "config.json").is_file():
            return root
        steps = [d for d in root.glob("step_*") if d.name[5:].isdigit() and (d / "hf" / "config.json").is_file()]
        if steps:
            return max(steps, key=lambda d: int(d.name[5:])) / "hf"
    if (p / "hf" / "config.json").is_file():  # a step_N directory
        return p / "hf"
    from lmforge.training.checkpoint.consolidate import source_meta

    return source_meta(init_from)


def _ds_buildable(cfg: Config, cand: Candidate, world: int) -> bool:
    """build_ds_config also checks batch divisibility; the plan only needs the ZeRO keys."""
    return cfg.train.global_batch_size % (cfg.train.micro_batch_size * world) == 0


# --------------------------------------------------------------------------- recommendation

def candidates(cfg: Config, hw: Hardware) -> list[Candidate]:
    """Candidates in order of expected speed: no offload before offload (host memory bandwidth),
    no recompute before activation checkpointing (+33% compute), lower ZeRO stage before higher
    (less communication), the configured micro batch before smaller ones. Micro batches are the
    divisors of the per-rank batch, so the global batch stays what the config says."""
    base = candidate_of(cfg)
    dp = hw.world_size // (base.tensor_parallel * base.sequence_parallel)
    per_rank = cfg.train.global_batch_size // dp if cfg.train.global_batch_size % dp == 0 else cfg.train.micro_batch_size
    micro = sorted({m for m in range(1, per_rank + 1) if per_rank % m == 0 and m <= max(per_rank, 1)}, reverse=True)
    out = []
    for offload in ((False, False), (True, False), (True, True)):
        for ckpt in (False, True):
            for stage in (1, 2, 3):
                if offload[1] and stage != 3:
                    continue
                for mb in micro:
                    out.append(replace(base, zero_stage=stage, offload_optimizer=offload[0],
                                       offload_params=offload[1], micro_batch_size=mb, activation_checkpointing=ckpt))
    return out


def recommend(cfg: Config, hw: Hardware, vocab_size: int | None = None) -> Estimate | None:
    """The first candidate whose per-rank total fits the capacity; None if none does."""
    if hw.capacity is None:
        return None
    vocab = vocab_size or (0 if cfg.model.init_from else resolve_vocab(cfg)[0])  # init_from: the model's own
    for cand in candidates(cfg, hw):
        est = estimate(cfg, candidate=cand, vocab_size=vocab, hw=hw)
        if est.fits:
            return est
    return None


# --------------------------------------------------------------------------- report

def _gib(b: float) -> str:
    return f"{b / GIB:8.2f} GiB" if b >= 0.01 * GIB else f"{b / 2**20:8.1f} MiB"


def format_table(est: Estimate, rec: Estimate | None) -> str:
    hw, s, cand = est.hardware, est.shape, est.candidate
    kind = "GPU" if hw.device == "cuda" else "CPU process"
    lines = [f"model     {s.model_type} {s.n_params / 1e6:,.2f}M params (hidden {s.hidden}, layers {s.layers}, "
             f"heads {s.heads}/{s.kv_heads} kv, intermediate {s.intermediate}, vocab {s.vocab})",
             f"ranks     {hw.nodes} node(s) x {hw.ranks_per_node} = {hw.world_size}, {kind}, {hw.precision}, "
             f"optimizer {est.optimizer}, seq_len {est.seq_len}",
             f"layout    {cand.describe()}", "",
             f"{'per-rank memory':<34}{'':>14}"]
    for name, value in est.terms.items():
        lines.append(f"  {name:<32}{_gib(value):>14}")
    lines.append(f"  {'total':<32}{_gib(est.device_total):>14}")
    if hw.capacity is not None:
        cap = "GPU memory" if hw.device == "cuda" else "host RAM / ranks per node"
        lines.append(f"  {'capacity (' + cap + ')':<32}{_gib(hw.capacity):>14}   "
                     f"{'fits' if est.fits else 'DOES NOT FIT'}")
    lines.append(f"  activations without / with checkpointing: {_gib(est.activations_without_checkpointing).strip()}"
                 f" / {_gib(est.activations_with_checkpointing).strip()}")
    for name, value in est.host_terms.items():
        lines.append(f"  host (offloaded) {name:<23}{_gib(value):>14}")
    lines.append("")
    lines.append(f"throughput  {est.flops_per_token / 1e9:.3f} GFLOP/token")
    if est.tokens_per_s is not None:
        lines.append(f"  {est.tokens_per_s:,.0f} tokens/s total, {est.tokens_per_s / hw.world_size:,.0f} per rank "
                     f"at {hw.peak_tflops:g} peak TFLOP/s, assumed MFU {hw.mfu:.0%} (effective {est.mfu:.0%})")
    for note in est.notes:
        lines.append(f"  note: {note}")
    lines.append("")
    if rec is None:
        lines.append("recommended: no layout fits" if hw.capacity is not None else "recommended: give --gpu-memory")
    else:
        same = rec.candidate == cand
        lines.append(f"recommended {rec.candidate.describe()}")
        lines.append(f"  {_gib(rec.device_total).strip()} per rank" + (" (the configured layout)" if same else ""))
    return "\n".join(lines)


def plan_dict(est: Estimate, rec: Estimate | None) -> dict[str, Any]:
    return {"estimate": est.to_dict(), "recommended": None if rec is None else rec.to_dict()}


__all__ = ["Candidate", "Estimate", "Hardware", "ModelShape", "activation_bytes", "candidate_of", "candidates",
           "estimate", "format_table", "hardware", "model_shape", "parse_memory", "plan_dict", "recommend"]
