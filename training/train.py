"""What every rank runs: config → data → model → DeepSpeed engine → loop (step, metrics, eval,
checkpoint). The same `main(cfg)` runs under every launcher, reading only torchrun's env vars:

    lmforge train configs/debug.yaml --nproc 2                                   # lmforge's launcher
    torchrun --nproc_per_node 2 -m lmforge.training.train configs/debug.yaml     # torchrun
    deepspeed --num_gpus 2 --module lmforge.training.train configs/debug.yaml    # DeepSpeed's CLI
    python -m lmforge.training.train configs/debug.yaml train.steps=20           # one process

Dotted overrides (train.lr=1e-3) follow the config path in every form.

Graceful stop: SIGTERM or SIGUSR1 to a rank (torchrun forwards SIGTERM; Slurm sends both), or
`touch RUN_DIR/STOP`, makes every rank finish its current step, save one checkpoint and exit 75;
the same command then resumes from it (see dist.StopRequest).
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import random
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from . import arithmetic, checkpoint, data, dist, engine as engine_lib, metrics as metrics_lib, model as model_lib
from . import distill as distill_lib, parallel, resume, runlock, runstate, startup, tasks as tasks_lib
from .config import Config, ConfigError, dump_config, load_config
from .faults import Faults
from .guard import Diverged, NonFiniteGuard
from .preflight import Prepared, preflight
from .watchdog import Watchdog


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train_step(engine, train_data, micro_batches, device, groups: parallel.RankGroups | None = None,
               loss_scale: float = 1.0, adalora: engine_lib.AdaLoraStep | None = None,
               distiller: distill_lib.Distiller | None = None, task: tasks_lib.Task | None = None,
               poison: bool = False) -> float:
    """One optimizer step over this rank's micro batches; returns the cross entropy averaged over all
    ranks (SP chunks are equal-sized and TP peers compute the same loss, so this is the token-weighted
    global mean in every layout). `task` (default pretrain) turns batches into model inputs and
    logits into its loss (record tasks: the mean over the targets that count). With a distiller the
    gradient is that of its blend of this cross entropy and the teacher's KL term; the return value
    stays the cross entropy, comparable with eval/loss. `poison` (training/faults.py) makes the loss NaN."""
    task = task or tasks_lib.get("pretrain")
    total = torch.zeros((), dtype=torch.float64, device=device)
    for indices in micro_batches:
        kwargs, targets = task.model_inputs(*train_data.batch(indices), device, groups)
        logits = engine(**kwargs).logits
        loss = task.loss(logits, targets)
        if poison:
            loss = loss * math.nan  # NaN gradients for real: DeepSpeed's overflow check skips the update
        objective = loss if distiller is None else distiller.blend(loss, logits, targets, kwargs)
        # DeepSpeed scales by 1/accumulation and syncs at the boundary; loss_scale: parallel.loss_scale
        engine.backward(objective * loss_scale if loss_scale != 1.0 else objective)
        if adalora is not None:
            adalora.before_step()
        engine.step()          # optimizer + scheduler step only at the accumulation boundary
        if adalora is not None:
            adalora.after_step()
        total += loss.detach().double()
    torch.distributed.all_reduce(total)
    return total.item() / (len(micro_batches) * torch.distributed.get_world_size())


def main(cfg: Config, report: Callable[[dict], None] | None = None) -> dict:
    """Train on the ranks the launcher started. `report`, if given, receives every evaluation's
    metrics on every rank (Ray Train / Ray Tune pass ray.train.report here)."""
    # tqdm's default lock is a multiprocessing one, which starts a resource-tracker process (and, in a
    # rank forked by the launcher, leaves a "leaked semaphore" warning); set before any bar (datasets'
    # bars in preflight too): a rank's bars need only a thread lock
    tqdm.set_lock(threading.RLock())
    startup.for_rank()
    runtime = dist.select_runtime(cfg.train.precision, cfg.model.attention)
    with runlock.for_rank(cfg):  # rank 0 without lmforge's launcher holds the run_dir (refused: exit 2)
        d = dist.setup(runtime, cfg.dist.timeout_s)
        startup.mark("process group")
        stop = dist.StopRequest(cfg.run_dir, d.is_main)  # installed early: a signal during startup counts
        try:
            return run(cfg, d, dist.get_logger(d.rank), report or (lambda metrics: None), stop)
        finally:
            stop.close()
            dist.teardown()


def run(cfg: Config, d: dist.DistInfo, log, report: Callable[[dict], None], stop: dist.StopRequest) -> dict:
    """The loop: step, log, evaluate, let the checkpointer decide, honour a stop; one way out."""
    prepared = preflight(cfg, d.world_size, log)
    cfg = prepared.cfg  # Hub ids replaced by their snapshot directories (training/hub.py)
    plan = resume.agree(cfg, prepared, d.rank, d.world_size, log)
    if d.is_main:
        dump_config(cfg, Path(cfg.run_dir) / "config.yaml")
    log.info("config:\n" + cfg.to_yaml())
    log.info(f"runtime: {plan.runtime.describe()} world_size={d.world_size} threads={torch.get_num_threads()}")
    startup.mark("rank preflight")
    r = setup(cfg, d, plan, log)
    startup.mark("setup")
    p, total_steps = r.progress, r.total_steps
    if d.is_main:
        runstate.started(cfg.run_dir, p.step, total_steps, d.world_size, r.headline)
    bar = tqdm(total=total_steps, initial=p.step, desc="train", unit="step", dynamic_ncols=True,
               mininterval=1.0, disable=not (d.is_main and cfg.logging.progress))
    evals: dict[int, dict] = {}
    faults, watchdog = r.faults, Watchdog(cfg.dist.hang_timeout_s, cfg.run_dir, d.rank, d.world_size, log)
    try:
        if p.step == 0:
            p.before = r.evaluate(p.step)[r.headline]
            log.info(f"held-out {_metric_name(r.headline)} before training: {p.before:.4f}")
            startup.mark("eval before")
        # the forward-only passes so far (that evaluation, a task's reference pass) must not be ZeRO-3's
        # parameter trace for the training steps: see engine.restart_zero3_trace
        engine_lib.restart_zero3_trace(r.engine)
        ending = "early_stopped_before" if r.stopping is not None and r.stopping.stopped else None
        state_bytes = None
        while ending is None and p.step < total_steps:
            watchdog.beat(f"training step {p.step + 1}")
            faults.maybe_hang(d.rank, p.step + 1)
            lr = r.engine.get_lr()[0]
            t0 = time.perf_counter()
            loss = train_step(r.engine, r.train_data, r.sampler.next_step(), d.device, r.groups, r.loss_scale,
                              r.adalora, r.distiller, r.task, poison=faults.poison(p.step + 1))
            step_time = time.perf_counter() - t0
            kd = {"train/kd_loss": r.distiller.pop_mean()} if r.distiller is not None else {}
            p.step += 1
            p.tokens += r.tokens_per_step
            grad_norm = r.engine.get_global_grad_norm()
            grad_norm = float(grad_norm) if grad_norm is not None else math.nan
            if r.bad_step(loss, grad_norm):
                bar.n = p.step  # a rollback moved the step back
                continue  # updated nothing (or rolled back): no metrics, eval or save for it
            perf = r.throughput(step_time)
            startup.first_step_done(log, r.metrics, p.step)
            if state_bytes is None:  # optimizers create their state at the first step: measure it then
                state_bytes = engine_lib.state_bytes_per_param(r.engine)
                log.info(f"optimizer state: {state_bytes:.2f} bytes per parameter on each rank's partition")
                r.metrics.log(p.step, {"mem/optimizer_state_bytes_per_param": state_bytes})
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{perf['perf/tokens_per_s']:.0f}", refresh=False)
            if p.step % cfg.logging.interval == 0 or p.step == total_steps:
                r.metrics.log(p.step, {"train/loss": loss, "train/lr": lr, "train/tokens": p.tokens,
                                       "train/grad_norm": grad_norm, "train/bad_steps": r.guard.total,
                                       "mem/peak_gib": metrics_lib.memory_gib(), **kd, **perf, **r.shares(),
                                       **r.task.step_metrics()})
            if cfg.eval.interval and p.step % cfg.eval.interval == 0:
                watchdog.beat(f"evaluating at step {p.step}")
                evals[p.step] = r.evaluate(p.step)
                log.info(f"step {p.step}: eval " + " ".join(f"{k.split('/')[1]} {v:.4f}" for k, v in evals[p.step].items()))
                report({"step": p.step, "train/loss": loss, **evals[p.step]})
                if r.stopping is not None and r.early_stop(p.step, evals[p.step]):
                    ending = "early_stopped"
                    continue
            watchdog.beat(f"saving step {p.step}")
            r.checkpointer.after_step(p.step)
            if p.step < total_steps and (reason := stop.agreed(d.device)) is not None:
                ending = f"stopped: {reason}"
        bar.close()
        watchdog.beat("finishing")
        out = finish(cfg, r, ending, evals, stop, report, log)
        summary = summary_scalars(out)
        r.metrics.summary(summary)
        if d.is_main:
            state = "stopped" if out.get("stopped") else "early_stopped" if out.get("early_stopped") else "finished"
            runstate.ended(cfg.run_dir, state, summary)
        return out
    finally:
        watchdog.close()
        bar.close()
        r.metrics.close()


def summary_scalars(out: dict) -> dict[str, float]:
    """finish()'s numbers as the trackers' run summary: summary/step, summary/tokens, summary/before,
    summary/after, summary/<final eval metric>, summary/stopped or summary/early_stopped (1)."""
    numbers = {k: v for k, v in {**out, **(out.get("metrics") or {})}.items() if isinstance(v, (int, float))}
    return {f"summary/{k.removeprefix('eval/')}": float(v) for k, v in numbers.items()}


def _metric_name(headline: str) -> str:
    return "perplexity" if headline == "eval/ppl" else headline.split("/")[1]


def finish(cfg: Config, r: "Run", ending: str | None, evals: dict[int, dict], stop: dist.StopRequest,
           report: Callable[[dict], None], log) -> dict:
    """The end of a run, however it ended: the checkpoint that holds it and the summary."""
    p, total_steps = r.progress, r.total_steps
    out = {"step": p.step, "tokens": p.tokens}
    if ending == "early_stopped_before":
        log.info(f"{r.resumed_from} ended this run early (early stopping): nothing left to train")
        out.update(checkpoint=str(r.resumed_from), early_stopped=True, best=r.stopping.best_tag)
    elif ending == "early_stopped":
        ckpt = r.checkpointer.save(p.step)
        r.checkpointer.wait()
        s = r.stopping
        log.warning(f"early stopping at step {p.step}: {s.metric} has not improved by more than "
                    f"{cfg.eval.early_stopping.min_delta} for {s.bad} evaluations; best "
                    f"{s.best:.4f} at {s.best_tag} (checkpoints/best.json)")
        report({"step": p.step, "early_stopped": 1})
        out.update(checkpoint=str(ckpt), early_stopped=True, best=s.best_tag, best_value=s.best)
    elif ending is not None:  # "stopped: <reason>"
        log.warning(f"stop requested ({ending.split(': ', 1)[1]}) after step {p.step}: saving a checkpoint")
        ckpt = r.checkpointer.save(p.step)
        r.checkpointer.wait()
        stop.clear()
        # Consumed before any rank exits: a launcher that sees one rank's exit may kill the
        # rest, and "STOP is gone" is how launchers and sbatch scripts know the save is done.
        torch.distributed.barrier()
        report({"step": p.step, "stopped": 1})
        log.warning(f"stopped at step {p.step} of {total_steps}; checkpoint {ckpt}. Exit {dist.EXIT_STOPPED}: "
                    "run the same command again (or requeue the job) to resume from it")
        out.update(checkpoint=str(ckpt), stopped=True)
    else:
        if p.step not in evals:
            evals[p.step] = r.evaluate(p.step)
            report({"step": p.step, **evals[p.step]})
        final = evals[p.step]
        ckpt = r.checkpointer.save(p.step)  # or the one already written (or resumed from) at this step
        r.checkpointer.wait()
        stop.clear()  # a request that came after the last step is void, not a reason to stop the next run
        fmt = ".2f" if r.headline == "eval/ppl" else ".4f"
        log.info(f"held-out {_metric_name(r.headline)}: {p.before:{fmt}} before -> {final[r.headline]:{fmt}} after "
                 f"({p.step} steps, {p.tokens:,} tokens)")
        log.info(f"checkpoint: {ckpt}")
        log.info(f"tensorboard --logdir {cfg.tensorboard_dir}")
        out.update(before=p.before, after=final[r.headline], checkpoint=str(ckpt), metrics=final)
        if r.headline == "eval/ppl":
            out.update(ppl_before=p.before, ppl_after=final[r.headline])
    return out


@dataclass
class Progress:
    """What the loop advances and every checkpoint carries."""
    step: int = 0
    tokens: int = 0
    before: float | None = None  # the headline metric before training


class Checkpointer:
    """Every save decision of a run (as torchtitan's trainer leaves them to its checkpointer): due by
    checkpoint.interval, on a stop request, at the end, and the best for early stopping. A step is
    saved once: a later decision at the same step gets that checkpoint (or the one resumed from).
    With checkpoint.async a save returns once the state is in host memory (training/checkpoint/
    background.py); wait() is where the loop needs it published (a stop, the end, a rollback)."""

    def __init__(self, cfg: Config, save: Callable[[int], Path], resumed_from: Path | None, is_main: bool,
                 metrics=None, background: "checkpoint.background.Background | None" = None):
        self.interval, self.root, self.is_main = cfg.checkpoint.interval, cfg.checkpoint_dir, is_main
        self._save = save
        self.last = resumed_from
        self.metrics, self.background = metrics, background

    def saved_at(self, step: int) -> Path | None:
        return self.last if self.last is not None and self.last.name == checkpoint.tag(step) else None

    def save(self, step: int) -> Path:
        path = self.saved_at(step)
        if path is None:
            t0 = time.perf_counter()
            path = self.last = self._save(step)
            if self.metrics is not None:  # how long the loop stood still for it (async: the copy)
                self.metrics.log(step, {"checkpoint/stall_s": time.perf_counter() - t0})
        return path

    def wait(self) -> None:
        """Collective: the save in flight (checkpoint.async) is published, or every rank raises why not."""
        if self.background is not None:
            self.background.wait()

    def after_step(self, step: int) -> None:
        if self.background is not None and self.metrics is not None and (waited := self.background.take_waited()):
            self.metrics.log(step, {"checkpoint/wait_s": waited})  # this step's optimizer waited for a save's write
        if self.interval and step % self.interval == 0:
            self.save(step)

    def save_best(self, step: int, metric: str, value: float) -> Path:
        path = self.save(step)
        self.wait()  # best.json names only a published checkpoint
        if self.is_main:
            checkpoint.mark_best(self.root, path.name, metric, value, step)
        return path


@dataclass
class Run:
    """Everything the loop works with, built once by setup()."""
    engine: object
    groups: parallel.RankGroups
    train_data: object
    sampler: data.ShardedSampler | data.MixtureSampler
    evaluate: Callable[[int], dict]
    headline: str
    metrics: object
    throughput: metrics_lib.Throughput
    checkpointer: Checkpointer
    progress: Progress
    tokens_per_step: int
    loss_scale: float
    stopping: "EarlyStopping | None"
    resumed_from: Path | None
    adalora: engine_lib.AdaLoraStep | None
    distiller: distill_lib.Distiller | None
    task: tasks_lib.Task
    guard: NonFiniteGuard
    restore: Callable[[Path], dict]   # load a checkpoint of this run into the engine (this rank)
    no_rollback_to: Path | None = None  # resumed from another layout: DeepSpeed loads it only converted
    faults: Faults = Faults(set(), None)  # training/faults.py: drills and tests only
    log: object = None
    total_steps: int = 0

    def shares(self) -> dict[str, float]:
        """data.mixture: each source's share of the training samples consumed so far (data/share/NAME)."""
        if not isinstance(self.sampler, data.MixtureSampler):
            return {}
        return {f"data/share/{name}": v for name, v in self.sampler.shares().items()}

    def bad_step(self, loss: float, grad_norm: float) -> bool:
        """The guard's verdict on a finished step: False if it was good; True if it updated nothing
        (or was rolled back) and the loop goes on; Diverged if the run gives up."""
        problem, action = self.guard.check(loss, grad_norm)
        if problem is None:
            return False
        step, g = self.progress.step, self.guard
        self.log.warning(f"step {step}: {problem}: nothing updated ({g.in_a_row} bad step(s) in a row, "
                         f"{g.total} in this run; train.on_nonfinite={g.mode}, max_nonfinite={g.limit})")
        self.metrics.log(step, {"train/bad_steps": g.total})
        self.checkpointer.wait()  # a rollback target must be published; and a failed save is the cause to report
        last = self.checkpointer.last
        if action == "rollback" and last is not None and g.may_roll_back_to(last.name) and last != self.no_rollback_to:
            position = self.sampler.state_dict()  # kept: the data since `last` is skipped, not replayed
            client = self.restore(last)
            self.progress.step, self.progress.tokens = client["step"], client["tokens"]
            self.sampler.load_state_dict(position)
            if self.stopping is not None:
                self.stopping.load_state_dict(client.get("early_stopping") or {})
            g.rolled_back(last.name)
            self.metrics.log(step, {"train/rollbacks": sum(g.rollbacks.values())})
            self.log.warning(f"rolled back to {last} (rollback {g.rollbacks[last.name]} to it); the data of steps "
                             f"{client['step'] + 1}-{step} are skipped")
            return True
        if action is None:
            return True
        if g.mode != "rollback":
            why = f"train.on_nonfinite={g.mode}" + (f" gives up after {2 * g.limit}" if g.mode == "skip" else "")
        elif last is None or last == self.no_rollback_to:
            why = "no checkpoint of this run to roll back to"
        else:
            why = f"rolled back to {last.name} {g.rollbacks[last.name]} times already"
        raise Diverged(step, f"step {step}: {problem}, {g.in_a_row} bad step(s) in a row ({why}). Nothing was saved "
                       f"after {last or 'the start'}: lower train.lr or check the data (train.on_nonfinite=skip or "
                       "rollback ride out occasional bad steps)")

    def early_stop(self, step: int, result: dict) -> bool:
        """Early stopping's verdict on an evaluation; the best so far is saved and marked."""
        verdict = self.stopping.update(step, result)
        if verdict == "improved":
            self.stopping.best_tag = checkpoint.tag(step)  # before the save, so its client state names itself
            path = self.checkpointer.save_best(step, self.stopping.metric, self.stopping.best)
            self.log.info(f"best {self.stopping.metric} so far: {self.stopping.best:.4f} at step {step} ({path})")
        return verdict == "stop"


def setup(cfg: Config, d: dist.DistInfo, plan: Prepared, log) -> Run:
    """Model, engine, data, sampler, metrics and checkpointer for the loop; a resumed run's state."""
    total_steps = cfg.total_steps(len(plan.data.train))
    groups = parallel.RankGroups.of(cfg, d.rank, d.world_size)
    accum = cfg.grad_accum(groups.dp_size)
    seq_len = cfg.data.seq_len
    task, train_data = tasks_lib.get(cfg.task), plan.data.train
    tokens_per_step = int(cfg.train.global_batch_size * train_data.tokens_per_row)  # task rows may vary in length

    seed_everything(cfg.train.seed)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[plan.runtime.precision]
    source = None
    if cfg.model.init_from:
        from .checkpoint.consolidate import resolve_source

        # An lmforge checkpoint is consolidated once, by rank 0 (transformers' save_pretrained
        # writes weights only on the main process of an initialised process group); then reused.
        if d.is_main:
            resolve_source(cfg.model.init_from)
        torch.distributed.barrier()
        source = resolve_source(cfg.model.init_from)
        log.info(f"initialising from {source}")
    distiller = None
    if cfg.distill.teacher:
        distiller = distill_lib.Distiller(cfg.distill, d.device, dtype, plan.runtime.attention)
        log.info(f"distillation from {distiller.path}: loss = {1 - cfg.distill.alpha:g} x CE + {cfg.distill.alpha:g} "
                 f"x T^2 KL (T={cfg.distill.temperature:g})")
    model = model_lib.build(cfg.model, plan.hf_config, plan.ds_config, plan.runtime.attention, dtype,
                            cfg.train.activation_checkpointing, cfg.task, source, cfg.finetune, total_steps,
                            pad_id=plan.data.pad_id)
    n_total, n_matmul = model_lib.count_params(model)
    startup.mark("model")
    log.info(f"model: {model_lib.describe(model.config, n_total)}")
    if cfg.finetune.method != "full":
        n_train = model_lib.trainable_params(model)
        log.info(f"finetune: {cfg.finetune.method}, {n_train:,} trainable parameters ({100 * n_train / n_total:.2f}%)")
    if cfg.finetune.method == "qlora":
        log.info(f"qlora: 4-bit base layers run {model_lib.four_bit_path(plan.runtime.device_type)}")
    engine = engine_lib.initialize(cfg, model, plan.ds_config, total_steps, log, plan.runtime.attention)
    startup.mark("engine")
    adalora = engine_lib.AdaLoraStep(engine) if cfg.finetune.method == "adalora" else None
    # the starting weights, before a resume loads a checkpoint: what dpo's reference pass must see
    task.prepare_run(engine, plan.data, cfg, groups, d.device, log)
    log.info(f"parameters stored on rank 0: {model_lib.stored_params(engine.module):,} of {n_total:,}")
    optimizer = engine_lib.torch_optimizer(engine)  # build_optimizer's, which ZeRO steps
    fused = " (fused)" if optimizer.param_groups[0].get("fused") else ""
    log.info(f"optimizer: {type(optimizer).__name__}{fused}, precision {plan.runtime.precision}, "
             f"activation checkpointing {'on' if cfg.train.activation_checkpointing else 'off'}")
    log.info(f"task {cfg.task}, ZeRO-{cfg.parallel.zero_stage}, {d.world_size} rank(s){groups.describe()}, micro batch "
             f"{cfg.train.micro_batch_size} x accumulation {accum} x {groups.dp_size} = global batch "
             f"{cfg.train.global_batch_size} ({tokens_per_step} tokens/step), {total_steps} steps")

    tokenizer = plan.data.tokenizer
    # Ranks of one sequence/tensor-parallel group read the same sequences: shard by data-parallel rank.
    if plan.data.source_rows is None:
        sampler = data.ShardedSampler(len(train_data), cfg.train.seed, groups.dp_rank, groups.dp_size,
                                      cfg.train.micro_batch_size, accum)
    else:
        sampler = data.MixtureSampler(plan.data.source_rows, cfg.data.weights(), cfg.train.seed, groups.dp_rank,
                                      groups.dp_size, cfg.train.micro_batch_size, accum, cfg.data.source_names())
        log.info("data.mixture: " + ", ".join(f"{n} weight {w:.3f} ({rows} rows)" for n, w, rows in
                                              zip(cfg.data.source_names(), cfg.data.weights(), plan.data.source_rows)))
    stopping = EarlyStopping(cfg) if cfg.eval.early_stopping.metric else None
    progress = Progress()

    def restore(path: Path) -> dict:
        """Load a checkpoint on this run's layout (a resume, the guard's rollback), the schedule then
        at train.lr as configured now (the checkpoint may be an earlier timeline's, another lr)."""
        client = checkpoint.load(engine, path, d.rank)
        engine_lib.apply_configured_lr(engine, cfg)
        return client

    if plan.resume_from is not None:
        if plan.layout_change is not None:
            from .checkpoint import universal  # only a resume on another layout needs it

            client = universal.load(engine, plan.resume_from, cfg, d.rank, log)
            engine_lib.apply_configured_lr(engine, cfg)
        else:
            client = restore(plan.resume_from)
        progress = Progress(client["step"], client["tokens"], client.get("before", client.get("ppl_before")))
        sampler.load_state_dict(client["sampler"])
        if stopping is not None:
            stopping.load_state_dict(client.get("early_stopping") or {})
        log.info(f"resumed from {plan.resume_from} at step {progress.step}")

    faults = Faults.from_env()
    # the optimizer's steps wait for a save's live tensors
    background = checkpoint.background.Background(cfg.dist.timeout_s, optimizer) if cfg.checkpoint.async_ else None
    metrics = metrics_lib.make_metrics(d.rank, cfg, fresh=plan.resume_from is None,
                                       eval_metrics=list(dict.fromkeys(["eval/loss", task.headline])))
    throughput = metrics_lib.Throughput(tokens_per_step, arithmetic.flops_per_token(model.config, n_matmul, seq_len),
                                        d.world_size, metrics_lib.peak_tflops(cfg.logging.peak_tflops))

    def evaluate(step: int) -> dict:
        result = task.evaluate(engine, plan.data, cfg, groups, d.device)
        metrics.log(step, result)
        return result

    def save(step: int) -> Path:
        if not engine_lib.state_is_finite(engine):
            raise Diverged(step, f"step {step}: the weights or optimizer state are not finite; not saving "
                                 f"{checkpoint.tag(step)} (a diverged state is never published)")
        client = {"tokens": progress.tokens, "sampler": sampler.state_dict(), "before": progress.before,
                  "early_stopping": stopping.state_dict() if stopping else None}
        def write_extra(out: Path) -> Callable[[], None] | None:
            return model_lib.save_hf_files(engine.module, tokenizer, out, d.is_main)

        return checkpoint.save(engine, cfg, step, client, d.rank, d.world_size, log, write_extra=write_extra,
                               fault=lambda: faults.maybe_die_saving(d.rank, step), in_background=background,
                               slow_write_s=faults.slow_write_s)

    return Run(engine=engine, groups=groups, train_data=train_data, sampler=sampler, evaluate=evaluate,
               headline=task.headline, metrics=metrics, throughput=throughput,
               checkpointer=Checkpointer(cfg, save, plan.resume_from, d.is_main, metrics, background), progress=progress,
               tokens_per_step=tokens_per_step, loss_scale=parallel.loss_scale(plan.ds_config, groups.sequence),
               stopping=stopping, resumed_from=plan.resume_from, adalora=adalora, distiller=distiller, task=task,
               guard=NonFiniteGuard(cfg.train.on_nonfinite, cfg.train.max_nonfinite, cfg.train.spike_threshold),
               restore=restore,
               no_rollback_to=plan.resume_from if plan.layout_change is not None else None, faults=faults, log=log,
               total_steps=total_steps)


class EarlyStopping:
    """eval.early_stopping: patience counted in evaluations; its state rides in checkpoints."""

    def __init__(self, cfg: Config):
        es = cfg.eval.early_stopping
        self.metric, self.patience, self.min_delta = es.metric, es.patience, es.min_delta
        self.minimize = es.minimize()
        self.best: float | None = None
        self.best_tag: str | None = None
        self.bad = 0
        self.stopped = False

    def update(self, step: int, result: dict) -> str:
        """'improved', 'worse' or 'stop' after an evaluation."""
        value = result[self.metric]
        better = self.best is None or (value < self.best - self.min_delta if self.minimize
                                       else value > self.best + self.min_delta)
        if better:
            self.best, self.bad = value, 0
            return "improved"
        self.bad += 1
        if self.bad >= self.patience:
            self.stopped = True
            return "stop"
        return "worse"

    def state_dict(self) -> dict:
        return {"best": self.best, "best_tag": self.best_tag, "bad": self.bad, "stopped": self.stopped}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.best_tag = state.get("best"), state.get("best_tag")
        self.bad, self.stopped = int(state.get("bad", 0)), bool(state.get("stopped", False))


def cli(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lmforge.training.train",
                                     description="Run one rank of an lmforge training job.")
    parser.add_argument("config", help="YAML run config")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=3e-4")
    # The deepspeed CLI appends --local_rank=N; the rank is read from LOCAL_RANK instead.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_intermixed_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        if main(cfg).get("stopped"):
            return dist.EXIT_STOPPED
    except ConfigError as e:
        if os.environ.get("RANK", "0") == "0":
            print(f"lmforge: config error: {e}", file=sys.stderr)
        return 2
    except (Diverged, checkpoint.DiskFull, resume.SplitResume) as e:
        # the job cannot go on, and every rank knows why: one line, and the code the launcher reports
        code = dist.EXIT_DIVERGED if isinstance(e, Diverged) else 1
        runstate.record_failure(cfg.run_dir, code, str(e), int(os.environ.get("RANK", "0")))
        if os.environ.get("RANK", "0") == "0":
            print(f"lmforge: {'diverged: ' if code == dist.EXIT_DIVERGED else ''}{e}", file=sys.stderr)
        return code
    return 0


def exit_with(code: int) -> None:
    """The run is over: checkpoint published, TensorBoard closed, process group destroyed. Leave
    without the interpreter's native teardown: a thread that a native library still holds at exit
    occasionally aborts a rank after a complete run ("terminate called without an active
    exception", SIGABRT; seen twice in a few hundred 2-rank gloo runs here), and the launcher then
    reports the finished job as failed. An exception still takes the normal path (traceback, exit 1)."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_with(cli())
