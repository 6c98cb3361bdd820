"""The model: any `AutoModelForCausalLM`, from a size preset, a local config or local pretrained
weights, built under ZeRO-3 partitioning when stage 3 is on.

    lmforge config configs/demo.yaml   # prints the model shape and parameter count it resolves to

For ZeRO-3, transformers itself wraps construction (`from_config` and `from_pretrained`) in
`deepspeed.zero.Init` once an `HfDeepSpeedConfig` is alive, so each rank only ever materialises its
own partition: a model larger than one rank's memory can be created.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .config import MODEL_PRESETS, ConfigError, ModelConfig

_hf_ds_config_ref = None  # transformers reads ZeRO-3 state through a weak global; keep it alive


def pad_vocab(n: int, multiple: int = 64) -> int:
    return (n + multiple - 1) // multiple * multiple


def hf_config(cfg: ModelConfig, vocab_size: int, eos_id: int):
    """The transformers config of the model to train; no weights are touched."""
    from transformers import AutoConfig, LlamaConfig

    if cfg.path:
        path = Path(cfg.path).expanduser()
        if not (path / "config.json").is_file():
            raise ConfigError(f"model.path: {path} has no config.json (a local Hugging Face model directory is needed)")
        conf = AutoConfig.from_pretrained(str(path), local_files_only=True)
        if conf.vocab_size < vocab_size:
            raise ConfigError(f"model.path: the model's vocab_size {conf.vocab_size} is smaller than the "
                              f"tokenizer's {vocab_size}; use the model's own tokenizer (data.tokenizer)")
    else:
        kwargs: dict[str, Any] = dict(MODEL_PRESETS[cfg.preset])
        kwargs.setdefault("vocab_size", pad_vocab(vocab_size))
        conf = LlamaConfig(**kwargs, bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id)
    for key, value in cfg.overrides.items():
        if not hasattr(conf, key):
            raise ConfigError(f"model.overrides.{key}: {type(conf).__name__} has no such key")
        setattr(conf, key, value)
    return conf


def max_positions(conf) -> int | None:
    return getattr(conf, "max_position_embeddings", None) or getattr(conf, "n_positions", None)


def build(cfg: ModelConfig, conf, ds_config: dict, attention: str, dtype: torch.dtype,
          activation_checkpointing: bool = False) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    global _hf_ds_config_ref
    if ds_config["zero_optimization"]["stage"] == 3:
        # zero.Init parses this config without the tensor-parallel groups and would count TP peers
        # as data-parallel ranks in its batch-size check; the batch keys do not matter to it.
        hf_config = {k: v for k, v in ds_config.items() if k != "train_batch_size"} if "tensor_parallel" in ds_config else ds_config
        _hf_ds_config_ref = HfDeepSpeedConfig(hf_config)
    else:
        _hf_ds_config_ref = None
    if cfg.path and cfg.pretrained:
        model = AutoModelForCausalLM.from_pretrained(str(Path(cfg.path).expanduser()), config=conf,
                                                     attn_implementation=attention, dtype=dtype,
                                                     local_files_only=True)
    else:
        model = AutoModelForCausalLM.from_config(conf, attn_implementation=attention, dtype=dtype)
    model.config.use_cache = False  # no KV cache while training
    if activation_checkpointing:
        # Non-reentrant: works with ZeRO-3's parameter hooks and with inputs that need no grad.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def register_sequence_parallel(model: torch.nn.Module, attention: str, sp: int, micro_batch: int, seq_len: int):
    """Ulysses SP through DeepSpeed's Hugging Face integration: patches transformers' attention so
    that each rank's chunk attends over the whole sequence (all-to-all over heads); returns the
    mpu that deepspeed.initialize needs to build the sequence-parallel groups."""
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF

    return UlyssesSPAttentionHF.register_with_transformers(
        model_name_or_path=model, core_attn_implementation=attention, sequence_parallel_size=sp,
        micro_batch_size=micro_batch, seq_length=seq_len, seq_length_is_variable=False)


def stored_params(model: torch.nn.Module) -> int:
    """Parameters this rank holds: its ZeRO-3 partition (ds_tensor) or, without ZeRO-3, its tensors
    (AutoTP has already cut them to this rank's shard)."""
    return sum(int(getattr(p, "ds_tensor", p).numel()) for p in model.parameters())


def numel(p: torch.nn.Parameter) -> int:
    """Full size of a parameter, also when ZeRO-3 has partitioned it (p.numel() is then 0)."""
    return int(getattr(p, "ds_numel", p.numel()))


def count_params(model: torch.nn.Module) -> tuple[int, int]:
    """(all parameters, parameters outside the input embedding)."""
    total = sum(numel(p) for p in model.parameters())
    emb = model.get_input_embeddings()
    emb_n = sum(numel(p) for p in emb.parameters()) if emb is not None else 0
    tied = getattr(model.config, "tie_word_embeddings", False)
    # A tied embedding is also the output projection, which is a real matmul: count it once there.
    return total, total - (0 if tied else emb_n)


def flops_per_token(conf, n_matmul_params: int, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward): 6·N for the weight matmuls plus the
    attention score/value matmuls, 12·layers·hidden·seq (the PaLM appendix B convention, no
    causal discount). Computed from the config, so it is right under ZeRO-3 partitioning."""
    layers = conf.num_hidden_layers
    hidden = conf.hidden_size
    return 6.0 * n_matmul_params + 12.0 * layers * hidden * seq_len


def describe(conf, n_total: int) -> str:
    keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "vocab_size", "max_position_embeddings")
    shape = ", ".join(f"{k}={getattr(conf, k)}" for k in keys if hasattr(conf, k))
    return f"{conf.model_type} {n_total / 1e6:.2f}M params ({shape})"

