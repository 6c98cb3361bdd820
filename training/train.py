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
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from . import checkpoint, data, dist, engine as engine_lib, evaluate as evaluate_lib, metrics as metrics_lib, model as model_lib
from . import distill as distill_lib, tasks as tasks_lib
from .config import Config, ConfigError, build_ds_config, dump_config, load_config


@dataclass
class Plan:
    """What preflight established: everything a rank needs that could have failed on bad input."""
    runtime: dist.Runtime
    data: data.PreparedData | None       # pretrain: packed token files
    hf_config: object
    ds_config: dict
    resume_from: Path | None
    layout_change: checkpoint.LayoutChange | None = None  # resume_from's layout differs: universal resume
    task: tasks_lib.TaskData | None = None  # sft / classification / ner: tokenized records
    tokenizer_dir: Path | None = None


def preflight(cfg: Config, world_size: int, log) -> Plan:
    """Every check that bad config or bad data can fail, run before any rank starts (by the
    launcher) and again, cheaply, inside each rank (for torchrun/srun starts): data are prepared
    and cached, the model config resolved, the DeepSpeed config built, the resume point chosen."""
    try:
        runtime = dist.select_runtime(cfg.train.precision, cfg.model.attention)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    ds_config = build_ds_config(cfg, world_size, runtime.precision)
    meta = None
    if cfg.model.init_from:
        from .checkpoint.consolidate import source_meta

        meta = source_meta(cfg.model.init_from)  # config + tokenizer; weights are consolidated in the ranks
    prepared, task = None, None
    if cfg.task == "pretrain":
        data_cfg = cfg.data
        if meta is not None and not cfg.data.tokenizer:
            data_cfg = cfg.data.model_copy(update={"tokenizer": str(meta)})  # the model's own tokenizer
        prepared = data.prepare(data_cfg, log)
        conf = model_lib.hf_config(cfg.model, prepared.vocab_size, prepared.eos_id, meta)
        tokenizer_dir = prepared.tokenizer_dir
    else:
        task = tasks_lib.prepare(cfg, meta, log)
        conf = model_lib.hf_config(cfg.model, task.vocab_size, task.tokenizer.eos_token_id, meta, task.labels,
                                   task.tokenizer.pad_token_id)
        tokenizer_dir = None
    model_lib.check_finetune(conf, cfg.task, cfg.finetune)
    if cfg.distill.teacher:
        distill_lib.check_teacher(cfg.distill, conf, task.tokenizer if task is not None
                                  else data.load_tokenizer(tokenizer_dir))
    sp = cfg.parallel.sequence
    heads, kv_heads = getattr(conf, "num_attention_heads", None), getattr(conf, "num_key_value_heads", None)
    if sp > 1 and heads is not None and (heads % sp or (kv_heads and kv_heads % sp and sp % kv_heads)):
        raise ConfigError(f"parallel.sequence={sp} must divide the model's attention heads ({heads}) and its "
                          f"key/value heads ({kv_heads}) divide or be divided by it (Ulysses splits heads)")
    max_pos = model_lib.max_positions(conf)
    if max_pos is not None and cfg.data.seq_len > max_pos:
        raise ConfigError(f"data.seq_len ({cfg.data.seq_len}) exceeds the model's max positions ({max_pos})")
    if prepared is not None:
        for split in (prepared.train_tokens, prepared.val_tokens):
            data.PackedTokens(split, cfg.data.seq_len)  # enough tokens for one sequence of each split
    resume, change = None, None
    if cfg.checkpoint.resume == "auto":
        resume = checkpoint.find_latest(cfg.checkpoint_dir, log)
        if resume is not None:
            try:
                checkpoint.check_compatible(resume, cfg, world_size)
            except checkpoint.IncompatibleCheckpoint as e:
                raise ConfigError(str(e)) from None
            change = checkpoint.layout_change(resume, cfg, world_size)
            if change is not None:
                from .checkpoint import universal  # imports no DeepSpeed: the launcher's driver runs this too

                problem = universal.unsupported(change)
                if problem is None and cfg.finetune.method != "full":
                    problem = (f"finetune.method={cfg.finetune.method} checkpoints hold only adapter weights, which "
                               "the universal conversion does not cover: resume on the layout that wrote it")
                if problem is not None:
                    raise ConfigError(f"{resume} was written by {change.saved}; this run: {change.now}. {problem}")
                # Resumed through DeepSpeed's universal format (universal.load converts it once).
                # DeepSpeed reads this flag from the engine's config when it loads; a copy, so
                # the run config's own DeepSpeed dict is untouched.
                log.info(f"{resume} was written by {change}: resuming through a universal checkpoint")
                ds_config = {**ds_config, "checkpoint": {**ds_config.get("checkpoint", {}), "load_universal": True}}
    return Plan(runtime, prepared, conf, ds_config, resume, change, task, tokenizer_dir)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train_step(engine, train_data, micro_batches, device, layout: dist.Layout | None = None,
               loss_scale: float = 1.0, adalora: engine_lib.AdaLoraStep | None = None,
               distiller: distill_lib.Distiller | None = None) -> float:
    """One optimizer step over this rank's micro batches; returns the cross entropy averaged over all
    ranks (SP chunks are equal-sized and TP peers compute the same loss, so this is the token-weighted
    global mean in every layout). Task data (dict inputs) average over the targets that count. With
    a distiller the gradient is that of its blend of this cross entropy and the teacher's KL term;
    the return value stays the cross entropy, comparable with eval/loss."""
    total = torch.zeros((), dtype=torch.float64, device=device)
    for indices in micro_batches:
        inputs, targets = train_data.batch(indices)
        kwargs, targets = evaluate_lib.model_inputs(inputs, targets, device, layout)
        logits = engine(**kwargs).logits
        if isinstance(inputs, dict):
            summed, count = tasks_lib.loss_sum(logits, targets)
            loss = summed / max(count, 1)
        else:
            loss = evaluate_lib.token_loss(logits, targets)
        objective = loss if distiller is None else distiller.blend(loss, logits, targets, kwargs)
        # DeepSpeed scales by 1/accumulation and syncs at the boundary; loss_scale: engine.loss_scale
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
    runtime = dist.select_runtime(cfg.train.precision, cfg.model.attention)
    d = dist.setup(runtime)
    stop = dist.StopRequest(cfg.run_dir, d.is_main)  # installed early: a signal during startup counts
    try:
        return run(cfg, d, dist.get_logger(d.rank), report or (lambda metrics: None), stop)
    finally:
        stop.close()
        dist.teardown()


# The number a run's summary reports before -> after, per task.
HEADLINE = {"pretrain": "eval/ppl", "sft": "eval/ppl", "classification": "eval/accuracy", "ner": "eval/entity_f1"}


def run(cfg: Config, d: dist.DistInfo, log, report: Callable[[dict], None], stop: dist.StopRequest) -> dict:
    plan = preflight(cfg, d.world_size, log)
    if d.is_main:
        dump_config(cfg, Path(cfg.run_dir) / "config.yaml")
    log.info("config:\n" + cfg.to_yaml())
    log.info(f"runtime: {plan.runtime.describe()} world_size={d.world_size} threads={torch.get_num_threads()}")
    total_steps = cfg.total_steps()
    layout = dist.Layout(d.rank, d.world_size, cfg.parallel.sequence, cfg.parallel.tensor)
    accum = cfg.grad_accum(layout.dp_size)
    seq_len = cfg.data.seq_len
    task = plan.task
    if task is None:
        train_data = data.PackedTokens(plan.data.train_tokens, seq_len)
        val_data = data.PackedTokens(plan.data.val_tokens, seq_len)
        tokens_per_step = cfg.train.global_batch_size * seq_len
    else:
        train_data, val_data = task.train, task.eval
        tokens_per_step = int(cfg.train.global_batch_size * train_data.tokens_per_row)  # rows vary in length

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
                            cfg.train.activation_checkpointing, cfg.task, source, cfg.finetune, total_steps)
    n_total, n_matmul = model_lib.count_params(model)
    log.info(f"model: {model_lib.describe(model.config, n_total)}")
    if cfg.finetune.method != "full":
        n_train = model_lib.trainable_params(model)
        log.info(f"finetune: {cfg.finetune.method}, {n_train:,} trainable parameters ({100 * n_train / n_total:.2f}%)")
    if cfg.finetune.method == "qlora":
        log.info(f"qlora: 4-bit base layers run {model_lib.four_bit_path(plan.runtime.device_type)}")
    engine = engine_lib.initialize(cfg, model, plan.ds_config, total_steps, log, plan.runtime.attention)
    adalora = engine_lib.AdaLoraStep(engine) if cfg.finetune.method == "adalora" else None
    loss_scale = engine_lib.loss_scale(plan.ds_config, layout.sequence)
    log.info(f"parameters stored on rank 0: {model_lib.stored_params(engine.module):,} of {n_total:,}")
    log.info(f"optimizer: {type(engine.client_optimizer).__name__}, precision {plan.runtime.precision}, "
             f"activation checkpointing {'on' if cfg.train.activation_checkpointing else 'off'}")
    groups = (f" = {layout.dp_size} data-parallel x {layout.sequence} sequence-parallel x {layout.tensor} "
              f"tensor-parallel" if layout.group > 1 else "")
    log.info(f"task {cfg.task}, ZeRO-{cfg.parallel.zero_stage}, {d.world_size} rank(s){groups}, micro batch "
             f"{cfg.train.micro_batch_size} x accumulation {accum} x {layout.dp_size} = global batch "
             f"{cfg.train.global_batch_size} ({tokens_per_step} tokens/step), {total_steps} steps")

    tokenizer = task.tokenizer if task is not None else data.load_tokenizer(plan.tokenizer_dir)
    # Ranks of one sequence/tensor-parallel group read the same sequences: shard by data-parallel rank.
    sampler = data.ShardedSampler(len(train_data), cfg.train.seed, layout.dp_rank, layout.dp_size,
                                  cfg.train.micro_batch_size, accum)
    eval_batches = data.eval_indices(len(val_data), cfg.eval.batches, cfg.train.micro_batch_size,
                                     layout.dp_rank, layout.dp_size)
    headline = HEADLINE[cfg.task]
    stopping = EarlyStopping(cfg) if cfg.eval.early_stopping.metric else None
    step, tokens, before = 0, 0, None
    if plan.resume_from is not None:
        if plan.layout_change is not None:
            from .checkpoint import universal  # only a resume on another layout needs it

            client = universal.load(engine, plan.resume_from, cfg, d.rank, log)
        else:
            client = checkpoint.load(engine, plan.resume_from, d.rank)
        step, tokens, before = client["step"], client["tokens"], client.get("before", client.get("ppl_before"))
        sampler.load_state_dict(client["sampler"])
        if stopping is not None:
            stopping.load_state_dict(client.get("early_stopping") or {})
        log.info(f"resumed from {plan.resume_from} at step {step}")

    metrics = metrics_lib.make_metrics(d.rank, cfg.tensorboard_dir, Path(cfg.run_dir) / "metrics.jsonl", cfg.to_yaml())
    throughput = metrics_lib.Throughput(tokens_per_step, model_lib.flops_per_token(model.config, n_matmul, seq_len),
                                        d.world_size, metrics_lib.peak_tflops(cfg.logging.peak_tflops))

    def do_eval() -> dict:
        if task is None:
            result = evaluate_lib.evaluate(engine, val_data, eval_batches, d.device, layout)
        else:
            result = tasks_lib.evaluate(engine, task, cfg, layout.dp_rank, layout.dp_size, d.device)
        metrics.log(step, result)
        return result

    def do_save() -> Path:
        client = {"tokens": tokens, "sampler": sampler.state_dict(), "before": before,
                  "early_stopping": stopping.state_dict() if stopping else None}
        return checkpoint.save(engine, cfg, step, client, d.rank, d.world_size, log,
                               write_extra=lambda out: model_lib.save_hf_files(engine.module, tokenizer, out, d.is_main))

    if step == 0:
        before = do_eval()[headline]
        log.info(f"held-out {'perplexity' if headline == 'eval/ppl' else headline.split('/')[1]} before training: "
                 f"{before:.4f}")
    if stopping is not None and stopping.stopped:
        log.info(f"{plan.resume_from} ended this run early (early stopping): nothing left to train")
        return {"step": step, "tokens": tokens, "checkpoint": str(plan.resume_from), "early_stopped": True,
                "best": stopping.best_tag}

    evals: dict[int, dict] = {}
    last_save, state_bytes = None, None
    bar = tqdm(total=total_steps, initial=step, desc="train", unit="step", dynamic_ncols=True,
               mininterval=1.0, disable=not (d.is_main and cfg.logging.progress))
    while step < total_steps:
        lr = engine.get_lr()[0]
        t0 = time.perf_counter()
        loss = train_step(engine, train_data, sampler.next_step(), d.device, layout, loss_scale, adalora, distiller)
        step_time = time.perf_counter() - t0
        kd = {"train/kd_loss": distiller.pop_mean()} if distiller is not None else {}
        step += 1
        tokens += tokens_per_step
        perf = throughput(step_time)
        if state_bytes is None:  # optimizers create their state at the first step: measure it then
            state_bytes = engine_lib.state_bytes_per_param(engine)
            log.info(f"optimizer state: {state_bytes:.2f} bytes per parameter on each rank's partition")
            metrics.log(step, {"mem/optimizer_state_bytes_per_param": state_bytes})
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{perf['perf/tokens_per_s']:.0f}", refresh=False)
        if step % cfg.logging.interval == 0 or step == total_steps:
            grad_norm = engine.get_global_grad_norm()
            metrics.log(step, {"train/loss": loss, "train/lr": lr, "train/tokens": tokens,
                               "train/grad_norm": float(grad_norm) if grad_norm is not None else math.nan,
                               "mem/peak_gib": metrics_lib.memory_gib(), **kd, **perf})
        if cfg.eval.interval and step % cfg.eval.interval == 0:
            evals[step] = do_eval()
            shown = " ".join(f"{k.split('/')[1]} {v:.4f}" for k, v in evals[step].items())
            log.info(f"step {step}: eval {shown}")
            report({"step": step, "train/loss": loss, **evals[step]})
            if stopping is not None:
                verdict = stopping.update(step, evals[step])
                if verdict == "improved":
                    stopping.best_tag = f"step_{step}"  # before the save, so its client state names itself
                    last_save = do_save() if last_save is None or last_save.name != f"step_{step}" else last_save
                    if d.is_main:
                        checkpoint.mark_best(cfg.checkpoint_dir, last_save.name, stopping.metric, stopping.best, step)
                    log.info(f"best {stopping.metric} so far: {stopping.best:.4f} at step {step} ({last_save})")
                elif verdict == "stop":
                    bar.close()
                    ckpt = last_save if last_save is not None and last_save.name == f"step_{step}" else do_save()
                    metrics.close()
                    log.warning(f"early stopping at step {step}: {stopping.metric} has not improved by more than "
                                f"{cfg.eval.early_stopping.min_delta} for {stopping.bad} evaluations; best "
                                f"{stopping.best:.4f} at {stopping.best_tag} (checkpoints/best.json)")
                    report({"step": step, "early_stopped": 1})
                    return {"step": step, "tokens": tokens, "checkpoint": str(ckpt), "early_stopped": True,
                            "best": stopping.best_tag, "best_value": stopping.best}
        if cfg.checkpoint.interval and step % cfg.checkpoint.interval == 0 and (
                last_save is None or last_save.name != f"step_{step}"):
            last_save = do_save()
        reason = stop.agreed(d.device)
        if reason is not None and step < total_steps:
            bar.close()
            log.warning(f"stop requested ({reason}) after step {step}: saving a checkpoint")
            ckpt = last_save if last_save is not None and last_save.name == f"step_{step}" else do_save()
            stop.clear()
            # Consumed before any rank exits: a launcher that sees one rank's exit may kill the
            # rest, and "STOP is gone" is how launchers and sbatch scripts know the save is done.
            torch.distributed.barrier()
            metrics.close()
            report({"step": step, "stopped": 1})
            log.warning(f"stopped at step {step} of {total_steps}; checkpoint {ckpt}. Exit {dist.EXIT_STOPPED}: "
                        "run the same command again (or requeue the job) to resume from it")
            return {"step": step, "tokens": tokens, "checkpoint": str(ckpt), "stopped": True}
    bar.close()

    if step not in evals:
        evals[step] = do_eval()
        report({"step": step, **evals[step]})
    final = evals[step]
    if last_save is not None and last_save.name == f"step_{step}":
        ckpt = last_save
    elif plan.resume_from is not None and plan.resume_from.name == f"step_{step}":
        ckpt = plan.resume_from  # resumed a finished run (e.g. a job requeued after its last step)
    else:
        ckpt = do_save()
    stop.clear()  # a request that came after the last step is void, not a reason to stop the next run
    metrics.close()
    name, fmt = ("perplexity", ".2f") if headline == "eval/ppl" else (headline.split("/")[1], ".4f")
    log.info(f"held-out {name}: {before:{fmt}} before -> {final[headline]:{fmt}} after "
             f"({step} steps, {tokens:,} tokens)")
    log.info(f"checkpoint: {ckpt}")
    log.info(f"tensorboard --logdir {cfg.tensorboard_dir}")
    out = {"step": step, "tokens": tokens, "before": before, "after": final[headline], "checkpoint": str(ckpt),
           "metrics": final}
    if headline == "eval/ppl":
        out.update(ppl_before=before, ppl_after=final[headline])
    return out


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
    return 0


if __name__ == "__main__":
    code = cli()
    # The run is over: checkpoint published, TensorBoard closed, process group destroyed. Leave
    # without the interpreter's native teardown: a thread that a native library still holds at exit
    # occasionally aborts a rank after a complete run ("terminate called without an active
    # exception", SIGABRT; seen twice in a few hundred 2-rank gloo runs here), and the launcher then
    # reports the finished job as failed. An exception still takes the normal path (traceback, exit 1).
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
