"""The DeepSpeed engine: the ONE place ZeRO stage, offload, optimizer, scheduler and precision meet
`deepspeed.initialize`.

    lmforge train configs/debug.yaml parallel.zero_stage=2 --nproc 2

The optimizer is a client optimizer chosen from the run config (torch AdamW, or DeepSpeed's
CPUAdam when the optimizer state is offloaded): a DeepSpeed-config `"optimizer": {"type": "AdamW"}`
would JIT-build FusedAdam (~190 s on CPU) and put a setting in a second place.
"""

from __future__ import annotations

import math

import torch

from .config import Config


def lr_lambda(cfg: Config, total_steps: int):
    """Multiplier of train.lr at optimizer step s: linear warmup, then cosine/linear decay to
    min_lr_ratio (or constant)."""
    t = cfg.train
    warmup = min(t.warmup, total_steps)

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if t.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        decay = 0.5 * (1 + math.cos(math.pi * progress)) if t.schedule == "cosine" else 1 - progress
        return t.min_lr_ratio + (1 - t.min_lr_ratio) * decay

    return f


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on biases, norms and embeddings-as-vectors (any parameter with < 2 dims)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        # ZeRO-3 partitions parameters to 1-D shards; ds_shape keeps the real shape.
        ndim = len(getattr(p, "ds_shape", p.shape))
        (decay if ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(cfg: Config, model: torch.nn.Module) -> torch.optim.Optimizer:
    t = cfg.train
    groups = _param_groups(model, t.weight_decay)
    if cfg.parallel.offload_optimizer:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=t.lr, betas=t.betas, eps=t.eps, adamw_mode=True)
    return torch.optim.AdamW(groups, lr=t.lr, betas=t.betas, eps=t.eps)


def initialize(cfg: Config, model: torch.nn.Module, ds_config: dict, total_steps: int):
    """Wrap the model in a DeepSpeed engine; the engine owns optimizer and scheduler stepping."""
    import deepspeed

    optimizer = build_optimizer(cfg, model)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, total_steps))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=ds_config)
    return engine

