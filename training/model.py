"""The model: any Hugging Face model (its task's auto class: a causal LM, a sequence or token
classifier) from a size preset, a local config or local pretrained weights (model.init_from), built
under ZeRO-3 partitioning when stage 3 is on, optionally wrapped in peft adapters (LoRA, QLoRA, AdaLoRA).

    lmforge config configs/demo.yaml   # prints the model shape and parameter count it resolves to
    lmforge train configs/lora.yaml    # LoRA on an lmforge checkpoint

For ZeRO-3, transformers itself wraps construction (`from_config` and `from_pretrained`) in
`deepspeed.zero.Init` once an `HfDeepSpeedConfig` is alive, so each rank only ever materialises its
own partition: a model larger than one rank's memory can be created.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch

from . import parallel, tasks
from .arithmetic import pad_vocab
from .config import MODEL_PRESETS, ConfigError, FinetuneConfig, ModelConfig

_hf_ds_config_ref = None  # transformers reads ZeRO-3 state through a weak global; keep it alive


def hf_config(cfg: ModelConfig, vocab_size: int, eos_id: int, source: Path | None = None,
              labels: list[str] | None = None):
    """The transformers config of the model to train; no weights are touched. `source`: the
    resolved model.init_from directory; `labels`: the classes/tags of a classification/ner head."""
    from transformers import AutoConfig, LlamaConfig

    if cfg.path or source:
        path = source or Path(cfg.path).expanduser()
        key = "model.init_from" if source else "model.path"
        if not (path / "config.json").is_file():
            raise ConfigError(f"{key}: {path} has no config.json (a local Hugging Face model directory is needed)")
        # trust_remote_code: hub.check_remote_code has refused a model with code unless it is set
        conf = AutoConfig.from_pretrained(str(path), local_files_only=True, trust_remote_code=cfg.trust_remote_code)
        if conf.vocab_size < vocab_size:
            raise ConfigError(f"{key}: the model's vocab_size {conf.vocab_size} is smaller than the "
                              f"tokenizer's {vocab_size}; use the model's own tokenizer (data.tokenizer)")
    else:
        kwargs: dict[str, Any] = dict(MODEL_PRESETS[cfg.preset])
        kwargs.setdefault("vocab_size", pad_vocab(vocab_size))
        # Overrides go into the constructor, so derived sizes follow them (head_dim = hidden_size /
        # num_attention_heads unless head_dim itself is overridden); set afterwards they would not.
        unknown = sorted(set(cfg.overrides) - set(LlamaConfig().to_dict()) - {"head_dim"})
        if unknown:
            raise ConfigError(f"model.overrides.{unknown[0]}: LlamaConfig has no such key")
        kwargs.update(bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id)
        kwargs.update(cfg.overrides)
        conf = LlamaConfig(**kwargs)
        return _with_labels(conf, labels)
    for key, value in cfg.overrides.items():
        if not hasattr(conf, key):
            raise ConfigError(f"model.overrides.{key}: {type(conf).__name__} has no such key")
        setattr(conf, key, value)
    return _with_labels(conf, labels)


def _with_labels(conf, labels: list[str] | None):
    if labels is not None:
        conf.num_labels = len(labels)
        conf.id2label = dict(enumerate(labels))
        conf.label2id = {name: i for i, name in enumerate(labels)}
    return conf


def auto_class(task: str):
    """The transformers auto class that builds `task`'s model (its Task.auto_model)."""
    import transformers

    return getattr(transformers, tasks.get(task).auto_model)


_HEADS = ("lm_head", "score", "classifier", "embed_out", "output")


def target_modules(model: torch.nn.Module, ft: FinetuneConfig) -> list[str]:
    """The module names peft adapts: finetune.target_modules, or every linear layer but the head;
    a name that matches nothing is a config error."""
    import bitsandbytes as bnb

    linear = (torch.nn.Linear, bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, linear)}
    names -= set(_HEADS)
    if ft.target_modules == "all-linear":
        return sorted(names)
    unknown = [t for t in ft.target_modules if t not in names]
    if unknown:
        raise ConfigError(f"finetune.target_modules: {unknown} match no linear layer of this model; "
                          f"its linear layers are {sorted(names)}")
    return list(ft.target_modules)


def check_finetune(conf, task: str, ft: FinetuneConfig, trust_remote_code: bool = False) -> None:
    """Validate the adapter settings against the model's modules without building it (meta device)."""
    if ft.method == "full":
        return
    with torch.device("meta"):
        model = auto_class(task).from_config(conf, trust_remote_code=trust_remote_code)
        targets = target_modules(model, ft)
    if ft.method == "qlora":
        check_4bit_training_path(model, targets)


# bitsandbytes (0.48+) repacks a Linear4bit's weights the first time it runs in eval mode without
# grad on a CPU with AVX512-BF16, for a bf16 inference kernel (`support_avx512bf16_for_cpu`). That
# layout is for inference only: it needs out_features % 32 == 0 (an AssertionError mid-run
# otherwise), computes in bf16, and once packed, training runs through a kernel with no backward
# pass, so no gradient reaches the adapters below that layer. Why: docs/cpu_paths.md.
PACKED_4BIT_MULTIPLE = 32  # bnb's block_n in _convert_weight_packed_for_cpu


def keep_4bit_training_path(model: torch.nn.Module) -> int:
    """Switch bnb's packed CPU inference path off on every 4-bit layer, so evaluation and training
    run the dequantize-and-matmul path that every other CPU runs. Returns the layers switched."""
    import bitsandbytes as bnb

    switched = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit) and getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            switched += 1
    return switched


def four_bit_path(device_type: str) -> str:
    """Which bitsandbytes 4-bit kernel a QLoRA run uses here, for the start-up log and the tests."""
    if device_type == "cuda":
        return "bitsandbytes CUDA 4-bit kernels"
    from bitsandbytes.functional import has_avx512bf16

    packed = " (this CPU has AVX512-BF16: bnb's packed bf16 inference path is switched off)" if has_avx512bf16() else ""
    return f"bitsandbytes CPU dequantize + fp32 matmul{packed}"


def check_4bit_training_path(model: torch.nn.Module, targets: list[str]) -> None:
    """Before any rank starts: a 4-bit layer must go through what a run does to it (evaluate, then
    train) on this machine with its weights left in the layout training uses and the gradient
    reaching its input. Refuses otherwise, naming the target layers whose shapes would fail."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        import bitsandbytes as bnb

        layer = bnb.nn.Linear4bit(64, 64, bias=False, compute_dtype=torch.float32, quant_type="nf4").to(device)
        keep_4bit_training_path(layer)
        x = torch.randn(2, 64, device=device, requires_grad=True)
        with torch.no_grad():
            layer.eval()(x.detach())  # as in evaluation: inputs that need no grad
        layer.train()(x).sum().backward()
    except Exception as e:  # a bnb build without a 4-bit backend for this device
        raise ConfigError(f"finetune.method=qlora needs bitsandbytes 4-bit support on this machine, which is "
                          f"not usable here ({type(e).__name__}: {e}); use finetune.method=lora") from None
    if x.grad is None or getattr(layer.weight.quant_state, "packing_format_for_cpu", False):
        at_risk = sorted({f"{n} ({m.out_features})" for n, m in model.named_modules()
                          if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in targets
                          and m.out_features % PACKED_4BIT_MULTIPLE})
        raise ConfigError(
            f"finetune.method=qlora: this bitsandbytes ({bnb.__version__}) repacks 4-bit weights for its CPU "
            f"inference kernel after an evaluation, and lmforge cannot switch that off: training through it loses "
            f"the gradients of every adapter below, and it fails on layers whose out_features are not a multiple of "
            f"{PACKED_4BIT_MULTIPLE}{': ' + ', '.join(at_risk) if at_risk else ''}. Install bitsandbytes 0.50 "
            f"(the version lmforge is tested with) or use finetune.method=lora")


def build(cfg: ModelConfig, conf, ds_config: dict, attention: str, dtype: torch.dtype,
          activation_checkpointing: bool = False, task: str = "pretrain", source: Path | None = None,
          finetune: FinetuneConfig | None = None, total_steps: int = 0, pad_id: int | None = None) -> torch.nn.Module:
    """`source`: the model.init_from directory (weights to start from); `finetune`: peft adapters;
    `pad_id`: the id batches are padded with (the tokenizer's)."""
    from transformers.integrations import HfDeepSpeedConfig

    global _hf_ds_config_ref
    if ds_config["zero_optimization"]["stage"] == 3:
        _hf_ds_config_ref = HfDeepSpeedConfig(parallel.zero_init_config(ds_config))
    else:
        _hf_ds_config_ref = None
    cls = auto_class(task)
    weights = source or (Path(cfg.path).expanduser() if cfg.path and cfg.pretrained else None)
    method = finetune.method if finetune else "full"
    if weights is not None:
        extra = {}
        if method == "qlora":
            from transformers import BitsAndBytesConfig

            extra["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype,
                bnb_4bit_use_double_quant=True, llm_int8_skip_modules=list(_HEADS))
        # A causal LM's weights under a classification head: the head is new (and reported so).
        model = cls.from_pretrained(str(weights), config=conf, attn_implementation=attention, dtype=dtype,
                                    local_files_only=True, trust_remote_code=cfg.trust_remote_code, **extra)
    else:
        model = cls.from_config(conf, attn_implementation=attention, dtype=dtype, trust_remote_code=cfg.trust_remote_code)
    model.config.use_cache = False  # no KV cache while training
    # A sequence-classification head pools the last token that is not config.pad_token_id: it must be
    # the id batches are padded with, or a padded row is scored at a pad. Set on the built model (as
    # TRL's trainers do), so the embedding's padding_idx, a row that gets no gradient, stays the
    # checkpoint's rather than becoming EOS (pad == EOS in most tokenizers).
    if pad_id is not None and (not tasks.get(task).causal or model.config.pad_token_id is None):
        model.config.pad_token_id = pad_id
    if activation_checkpointing:
        # Non-reentrant: works with ZeRO-3's parameter hooks and with inputs that need no grad.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if method != "full":
        model = apply_peft(model, finetune, task, total_steps, activation_checkpointing)
    return model


def apply_peft(model: torch.nn.Module, ft: FinetuneConfig, task: str, total_steps: int,
               activation_checkpointing: bool) -> torch.nn.Module:
    """Wrap in peft adapters; only they (and a new task head) train. peft's task types put a
    classification head (score/classifier) into modules_to_save, so it trains and is saved too."""
    import peft

    task_type = getattr(peft.TaskType, tasks.get(task).peft_task_type)
    targets = target_modules(model, ft)
    if ft.method == "qlora":
        keep_4bit_training_path(model)
        model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=activation_checkpointing,
                                                     gradient_checkpointing_kwargs={"use_reentrant": False})
    if ft.method == "adalora":
        # Rank budget: full (init_r) for the first 10% of steps, pruned towards r until the last 20%,
        # then fixed. update_and_allocate runs after every optimizer step (engine.AdaLoraStep).
        tinit, tfinal = max(1, total_steps // 10), max(1, total_steps // 5)
        if total_steps - tinit - tfinal < 1:
            raise ConfigError(f"finetune.method=adalora needs more steps than {total_steps} to prune ranks")
        config = peft.AdaLoraConfig(task_type=task_type, init_r=ft.init_r, target_r=ft.r, lora_alpha=ft.alpha,
                                    lora_dropout=ft.dropout, target_modules=targets, total_step=total_steps,
                                    tinit=tinit, tfinal=tfinal, deltaT=1)
    else:
        config = peft.LoraConfig(task_type=task_type, r=ft.r, lora_alpha=ft.alpha, lora_dropout=ft.dropout,
                                 target_modules=targets)
    return peft.get_peft_model(model, config)


def is_peft(model: torch.nn.Module) -> bool:
    return type(model).__module__.startswith("peft")


def trainable_params(model: torch.nn.Module) -> int:
    return sum(numel(p) for p in model.parameters() if p.requires_grad)


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


def describe(conf, n_total: int) -> str:
    keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "vocab_size", "max_position_embeddings")
    shape = ", ".join(f"{k}={getattr(conf, k)}" for k in keys if hasattr(conf, k))
    return f"{conf.model_type} {n_total / 1e6:.2f}M params ({shape})"


def save_hf_files(module: torch.nn.Module, tokenizer, out: Path, is_main: bool) -> Callable[[], None] | None:
    """Collective (a checkpoint's `write_extra`): for a peft model its adapter in out/adapter as
    peft writes it (under ZeRO-3 the trainable adapter parameters are gathered first; they are
    small). Returns, on rank 0, what writes the model's HF config and the tokenizer to out/hf:
    nothing in it is collective, and it reads nothing training changes."""
    trainable = [p for p in module.parameters() if p.requires_grad]
    peft_model = is_peft(module)
    gather = peft_model and any(hasattr(p, "ds_id") for p in trainable)
    if gather:
        import deepspeed

        ctx = deepspeed.zero.GatheredParameters(trainable, modifier_rank=None)
    else:
        import contextlib

        ctx = contextlib.nullcontext()
    with ctx:
        if is_main and peft_model:
            module.save_pretrained(str(out / "adapter"), safe_serialization=True)
    if not is_main:
        return None
    import copy

    conf = copy.deepcopy((module.get_base_model() if peft_model else module).config)
    if hasattr(conf, "quantization_config"):
        del conf.quantization_config  # QLoRA's 4-bit loading is a training choice, not the model's

    def write() -> None:
        conf.save_pretrained(str(out / "hf"))
        tokenizer.save_pretrained(str(out / "hf"))
    return write
