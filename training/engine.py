"""The DeepSpeed engine: the ONE place ZeRO stage, offload, optimizer, scheduler and precision meet
`deepspeed.initialize`.

    lmforge train configs/debug.yaml parallel.zero_stage=2 --nproc 2
    lmforge train configs/debug.yaml train.optimizer=adamw_8bit --nproc 2

The optimizer is a client optimizer chosen from the run config (torch AdamW, DeepSpeed's CPUAdam
when the optimizer state is offloaded, or a bitsandbytes 8-bit optimizer): a DeepSpeed-config `"optimizer": {"type": "AdamW"}`
would JIT-build FusedAdam (~190 s on CPU) and put a setting in a second place.
"""

from __future__ import annotations

import math

import torch

from . import parallel
from .config import Config


def lr_lambda(cfg: Config, total_steps: int):
    """Multiplier of train.lr at optimizer step s: linear warmup, then cosine/linear decay to
    min_lr_ratio (or constant)."""
    t = cfg.train
    warmup = cfg.warmup_steps(total_steps)

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
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # An empty group (LoRA: every adapter weight is a matrix) would be dropped by ZeRO but not by
    # the lr scheduler built on the same optimizer, which then mismatches it.
    return [g for g in groups if g["params"]]


def build_optimizer(cfg: Config, model: torch.nn.Module, log=None) -> torch.optim.Optimizer:
    t = cfg.train
    groups = _param_groups(model, t.weight_decay)
    if t.optimizer != "adamw":
        return _bnb_optimizer(t, groups, log)
    if cfg.parallel.offload_optimizer:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=t.lr, betas=t.betas, eps=t.eps, adamw_mode=True)
    # fused: one pass over each (ZeRO-flattened) partition instead of single_tensor's ~10, which torch
    # picks on CPU when asked nothing: 1.4 against 14.5 ms per step for 2.6M parameters on one core;
    # the HF Trainer's default (adamw_torch_fused) too. A checkpoint saved unfused resumes unfused
    # (load_state_dict keeps the saved group's flags).
    return torch.optim.AdamW(groups, lr=t.lr, betas=t.betas, eps=t.eps, fused=_fused_supported(groups))


def _fused_supported(groups: list[dict]) -> bool:
    """torch's fused AdamW kernel covers these parameters' devices (CPU, CUDA, …) and dtypes."""
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    devices = set(_get_fused_kernels_supported_devices())
    return all(p.device.type in devices and torch.is_floating_point(p) for g in groups for p in g["params"])


def _bnb_optimizer(t, groups: list[dict], log) -> torch.optim.Optimizer:
    """bitsandbytes 8-bit optimizers as DeepSpeed's client optimizer (ZeRO hands them its flat fp32
    partitions, which are large enough for bnb's 8-bit path). Blockwise 8-bit state also runs on
    CPU tensors; only the paged variant needs CUDA (unified memory), so on CPU it is the plain one."""
    try:
        import bitsandbytes as bnb
    except ImportError as e:
        raise RuntimeError(f"train.optimizer={t.optimizer} needs bitsandbytes: pip install 'bitsandbytes>=0.45' ({e})") from None
    name = t.optimizer
    if name == "paged_adamw_8bit" and not torch.cuda.is_available():
        if log is not None:
            log.warning("paged_adamw_8bit: paging needs CUDA unified memory; using adamw_8bit on this CPU machine")
        name = "adamw_8bit"
    if name == "lion_8bit":
        return bnb.optim.Lion8bit(groups, lr=t.lr, betas=t.betas)
    cls = bnb.optim.PagedAdamW8bit if name == "paged_adamw_8bit" else bnb.optim.AdamW8bit
    return cls(groups, lr=t.lr, betas=t.betas, eps=t.eps)


def torch_optimizer(engine) -> torch.optim.Optimizer:
    """The torch optimizer that steps (build_optimizer's): DeepSpeed's ZeRO wrapper holds it."""
    opt = engine.optimizer
    return getattr(opt, "optimizer", opt)


def state_bytes_per_param(engine) -> float:
    """Optimizer state this rank holds per parameter of its partition (measured, after a step:
    optimizers create their state lazily). AdamW: 8; bnb 8-bit Adam: ~2.03; Lion 8-bit: ~1.02."""
    inner = torch_optimizer(engine)
    # Keyed by the (flat fp32 partition) tensors it optimizes; ZeRO-3 empties param_groups between steps.
    params = sum(p.numel() for p in inner.state)
    state = sum(v.numel() * v.element_size() for s in inner.state.values() for v in s.values()
                if torch.is_tensor(v) and v.dim() > 0)  # step counters are scalars
    return state / max(1, params)


def state_is_finite(engine) -> bool:
    """Collective: every rank's weights (its partition of the fp32 master copy) and optimizer state
    are finite. Checked before a checkpoint is published, so a diverged state is never saved."""
    inner = torch_optimizer(engine)
    tensors = [p for p in engine.module.parameters()]
    tensors += [getattr(p, "ds_tensor", None) for p in tensors]  # ZeRO-3: this rank's shard
    tensors += list(inner.state)  # the flat fp32 partitions the optimizer steps (after the first step)
    tensors += [v for s in inner.state.values() for v in s.values() if torch.is_tensor(v)]
    tensors = [t for t in tensors if t is not None and torch.is_tensor(t) and t.is_floating_point() and t.numel()]
    # A NaN or inf anywhere makes the tensor's sum non-finite; one vectorised pass is ~20x faster than
    # isfinite().all() (which the loop pays at every save). A sum can also overflow with every element
    # finite: then the exact check decides.
    sums = torch.stack([t.sum().float().to(engine.device) for t in tensors]) if tensors else torch.zeros(0)
    ok = bool(torch.isfinite(sums).all()) or all(bool(torch.isfinite(t).all()) for t in tensors)
    flag = torch.tensor([0 if ok else 1], dtype=torch.int32, device=engine.device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return not flag.item()


def restart_zero3_trace(engine) -> bool:
    """ZeRO-3 records its parameter-fetch trace afresh at the next forward pass (False: nothing to
    restart, or this DeepSpeed keeps its trace elsewhere). The loop calls it once, after the passes
    that run before the first training step (the evaluation before training, a task's reference pass).

    DeepSpeed 0.19.8 keeps ONE trace for training and evaluation, and the first pass it sees becomes the
    trace: here a forward-only one. The first backward invalidates it, but the coordinator's release
    decisions, memoised per (module, trace position) in an lru_cache (__params_to_release), are not
    cleared with it: every later training forward frees each gathered parameter as soon as its module
    ends (no backward in the trace it was decided on), and backward gathers them again one at a time,
    which the prefetcher (its queue used up by the forward) does not cover. Measured on 2 CPU ranks at
    hidden 256: 15 all-gathers of 28 parameters per step instead of one of 14 (the HF Trainer's, which
    evaluates nothing first). Clearing both makes the first training step record the full trace.
    docs/deepspeed_workarounds.md#zero3-trace."""
    offload = getattr(engine.optimizer, "parameter_offload", None)  # ZeRO-3's optimizer only
    if offload is None:
        return False
    coordinator = offload.get_param_coordinator()
    memo = _release_memo(type(coordinator))
    if memo is None or not hasattr(coordinator, "_invalidate_trace"):
        return False
    if not coordinator.is_invalid_trace():
        coordinator._invalidate_trace()  # waits for in-flight gathers and frees them; the next forward records
    memo.cache_clear()
    return True


def _release_memo(coordinator_cls):
    """The lru_cache behind PartitionedParameterCoordinator.__params_to_release (0.19.8 wraps it in
    an NVTX range function without functools.wraps, so it is found in that wrapper's closure)."""
    fn = getattr(coordinator_cls, f"_{coordinator_cls.__name__}__params_to_release", None)
    for f in (fn, *(c.cell_contents for c in (getattr(fn, "__closure__", None) or ()))):
        if hasattr(f, "cache_clear"):
            return f
    return None


def initialize(cfg: Config, model: torch.nn.Module, ds_config: dict, total_steps: int, log=None,
               attention: str = "sdpa"):
    """Wrap the model in a DeepSpeed engine; the engine owns optimizer and scheduler stepping.
    Model parallelism comes from training/parallel.py (the groups DeepSpeed builds)."""
    import deepspeed

    mpu = parallel.mpu(cfg, model, attention)
    optimizer = build_optimizer(cfg, model, log)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, total_steps))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=ds_config, mpu=mpu)
    return engine


def apply_configured_lr(engine, cfg: Config) -> None:
    """After loading a checkpoint: the schedule at train.lr as configured now. The scheduler's saved
    state carries the peak lr it was built with (LambdaLR's base_lrs), which would otherwise win and
    make a changed train.lr (a rollback after a loss spike, checkpoint.resume) silently ineffective.
    With train.lr unchanged, every group's lr is what was saved (the same product)."""
    sched = engine.lr_scheduler
    sched.base_lrs = [cfg.train.lr] * len(sched.base_lrs)
    for group, base, f in zip(sched.optimizer.param_groups, sched.base_lrs, sched.lr_lambdas):
        group["lr"] = base * f(sched.last_epoch)


class AdaLoraStep:
    """AdaLoRA's rank allocation around DeepSpeed's optimizer step. peft's recipe is
    `optimizer.step(); model.base_model.update_and_allocate(step); zero_grad()`, but DeepSpeed's
    engine.step() steps and zeroes in one call and keeps the reduced gradients in its own buffers:
    so the full gradients of the adapter weights are read (safe_get_full_grad) at the accumulation
    boundary before the step, put back on p.grad for peft's importance scores after it, and the
    singular values peft masks are written into DeepSpeed's fp32 master copy too (otherwise the
    next step would copy the unmasked values back). ZeRO-1/2 only (config refuses ZeRO-3).
    The importance averages live in memory: a resumed run restarts them (the rank pattern itself is
    in the weights)."""

    def __init__(self, engine):
        self.engine = engine
        self.params = [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad and "lora_" in n]
        self.grads: dict[str, torch.Tensor] | None = None

    def before_step(self) -> None:
        if self.engine.is_gradient_accumulation_boundary():
            from deepspeed.utils import safe_get_full_grad

            self.grads = {n: safe_get_full_grad(p).detach().clone() for n, p in self.params}

    @torch.no_grad()
    def after_step(self) -> None:
        if self.grads is None:
            return
        from deepspeed.utils import safe_set_full_fp32_param

        for n, p in self.params:
            p.grad = self.grads[n].to(p.dtype)
        try:
            self.engine.module.base_model.update_and_allocate(self.engine.global_steps)
        finally:
            for _, p in self.params:
                p.grad = None
            self.grads = None
        for n, p in self.params:
            if "lora_E" in n:
                safe_set_full_fp32_param(p, p.data.float())
