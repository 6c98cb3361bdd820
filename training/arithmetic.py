"""Model and hardware arithmetic from the config alone, without torch or transformers: the GPUs we
know, FLOPs per token, and a Llama-family model's config as plain values. `lmforge plan` is pure
arithmetic and answers in under 2 s because it imports nothing heavier than this.

    lmforge plan configs/pretrain_7b.yaml --nodes 2 --gpus-per-node 8 --gpu H100
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

MIB = 2**20

# Per device: dense bf16/fp16 peak TFLOP/s (no sparsity) and the memory the driver reports
# (nvidia-smi / rocm-smi, MiB). Matched against a device name by substring, longest key first, so
# "A100-40GB" wins over "A100". Where a GPU comes in several sizes the bare name is the larger one.
GPUS: dict[str, tuple[float, int]] = {
    "H200": (989.0, 143771), "H100": (989.0, 81559), "H800": (989.0, 81559),
    "A100-40GB": (312.0, 40960), "A100": (312.0, 81920), "A800": (312.0, 81920),
    "L40S": (362.0, 46068), "L40": (181.0, 46068), "A6000": (155.0, 49140),
    "A10G": (70.0, 23028), "A10": (125.0, 23028), "L4": (121.0, 23034),
    "V100-16GB": (125.0, 16384), "V100": (125.0, 32768), "T4": (65.0, 15360),
    "MI300X": (1307.0, 196592), "MI250X": (383.0, 65536),  # MI250X: per GCD, as ROCm shows it
}


def gpu_spec(name: str) -> tuple[str, float, int] | None:
    """A device name ("H100", "NVIDIA H100 80GB HBM3") → (table key, peak TFLOP/s, memory bytes)."""
    for key in sorted(GPUS, key=len, reverse=True):
        if key.lower() in name.lower():
            peak, mib = GPUS[key]
            return key, peak, mib * MIB
    return None


def pad_vocab(n: int, multiple: int = 64) -> int:
    return (n + multiple - 1) // multiple * multiple


def flops_per_token(conf, n_matmul_params: int, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward): 6·N for the weight matmuls plus the
    attention score/value matmuls, 12·layers·hidden·seq (the PaLM appendix B convention, no
    causal discount). Computed from the config, so it is right under ZeRO-3 partitioning."""
    return 6.0 * n_matmul_params + 12.0 * conf.num_hidden_layers * conf.hidden_size * seq_len


def max_positions(conf) -> int | None:
    return getattr(conf, "max_position_embeddings", None) or getattr(conf, "n_positions", None)


LLAMA_LIKE = ("llama", "mistral", "qwen2", "qwen3")
# The config keys the arithmetic reads. An override outside them (or another architecture) needs
# transformers' own config class, which validates it: model.hf_config, the slow path.
SHAPE_KEYS = frozenset({
    "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
    "head_dim", "vocab_size", "max_position_embeddings", "tie_word_embeddings", "attention_bias", "mlp_bias",
    "rope_theta", "rms_norm_eps", "initializer_range", "attention_dropout", "hidden_act", "use_cache"})


def plain_config(presets: dict[str, dict], preset: str | None, path: Path | None, overrides: dict[str, Any],
                 vocab_size: int) -> SimpleNamespace | None:
    """What model.hf_config would return, as plain values, for a Llama-family preset or a local
    config.json; None where only transformers can answer (another architecture, another key)."""
    if set(overrides) - SHAPE_KEYS:
        return None
    if path is None:
        values: dict[str, Any] = dict(presets[preset], model_type="llama")
        values.setdefault("vocab_size", pad_vocab(vocab_size))
    else:
        file = path / "config.json"
        if not file.is_file():
            return None
        values = json.loads(file.read_text())
        if values.get("model_type") not in LLAMA_LIKE or values.get("vocab_size", 0) < vocab_size:
            return None  # hf_config says what is wrong
    values.update(overrides)
    values.setdefault("num_key_value_heads", values["num_attention_heads"])
    return SimpleNamespace(**values)
