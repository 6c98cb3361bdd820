"""The Llama-family architectures that lmforge prune rebuilds smaller and `lmforge export --format gguf`
writes for llama.cpp. One row each; a model of any other architecture is refused, naming it.

    python -c "from lmforge.tools import architectures as a; print(a.SUPPORTED)"

- llama: the reference layout (q/k/v/o and gate/up/down projections, RMSNorm, RoPE, GQA).
- mistral: Llama's modules plus `sliding_window`; llama.cpp runs it as its "llama" architecture
  (convert_hf_to_gguf.py registers MistralForCausalLM on LlamaModel), which has no sliding window.
- qwen2: Llama's modules with biases on q/k/v (no o_proj or MLP bias), often tied embeddings;
  llama.cpp's "qwen2" architecture rotates the two halves of each head as transformers does (NEOX
  RoPE), so its Q/K rows are written unpermuted (convert_hf_to_gguf.py's Qwen2Model).
"""

from __future__ import annotations

from dataclasses import dataclass

from lmforge.training.config import ConfigError


@dataclass(frozen=True)
class Architecture:
    model_type: str        # config.json's model_type
    causal_lm: str         # the transformers class of its causal LM (config.json's `architectures`)
    gguf_arch: str         # llama.cpp's architecture name (gguf.MODEL_ARCH_NAMES)
    qk_interleaved: bool   # llama.cpp applies RoPE to interleaved pairs: Q/K rows are permuted when written


ARCHITECTURES = {a.model_type: a for a in (
    Architecture("llama", "LlamaForCausalLM", "llama", qk_interleaved=True),
    Architecture("mistral", "MistralForCausalLM", "llama", qk_interleaved=True),
    Architecture("qwen2", "Qwen2ForCausalLM", "qwen2", qk_interleaved=False),
)}
SUPPORTED = ", ".join(ARCHITECTURES)


def _get(conf, key: str, default=None):
    return conf.get(key, default) if isinstance(conf, dict) else getattr(conf, key, default)


def get(conf, where: str, what: str, hint: str = "") -> Architecture:
    """The architecture of `conf` (a transformers config or config.json as a dict), if it is a causal LM
    of a supported model_type; else a ConfigError naming what it is. `where`: the model's path; `hint`:
    what to do instead, appended to the refusal of another architecture."""
    model_type, archs = _get(conf, "model_type"), _get(conf, "architectures") or []
    arch = ARCHITECTURES.get(model_type)
    if arch is None:
        named = f" ({', '.join(archs)})" if archs else ""
        raise ConfigError(f"{where}: {what} supports the Llama-family architectures ({SUPPORTED}); this model is "
                          f"model_type {model_type!r}{named}{f'; {hint}' if hint else ''}")
    if archs and arch.causal_lm not in archs:
        raise ConfigError(f"{where}: {what} works on causal language models ({arch.causal_lm}); this one is "
                          f"{', '.join(archs)}")
    return arch


def head_dim(conf) -> int:
    """Per-head width: config.head_dim where the config has one (Llama, Mistral), else hidden / heads (Qwen2)."""
    return _get(conf, "head_dim") or _get(conf, "hidden_size") // _get(conf, "num_attention_heads")


def layer_windows(conf) -> list[int | None]:
    """Per layer, the sliding window it attends within (None: the whole context), as transformers builds
    its masks: `layer_types` where the config has them, else Qwen2's use_sliding_window/max_window_layers,
    else Mistral's sliding_window for every layer."""
    n, window = _get(conf, "num_hidden_layers"), _get(conf, "sliding_window")
    types = _get(conf, "layer_types")
    if not types and _get(conf, "model_type") == "qwen2":
        on = bool(_get(conf, "use_sliding_window") and window)
        types = ["sliding_attention" if on and i >= _get(conf, "max_window_layers", 0) else "full_attention"
                 for i in range(n)]
    if not types:
        types = ["sliding_attention" if window else "full_attention"] * n
    return [window if t == "sliding_attention" else None for t in types]
