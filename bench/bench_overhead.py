"""Step-time overhead of lmforge's training step against a bare, hand-rolled DeepSpeed loop on the
same model, data and DeepSpeed config, measured side by side in ONE run.

    .venv/bin/python bench/bench_overhead.py --config configs/demo.yaml --steps 30 --nproc 2

Requirement: median step time lmforge / bare <= 1.05.

How it measures. The script relaunches itself under torch.distributed.run (N ranks on a free
loopback port, OMP_NUM_THREADS=1 per rank). Every rank builds TWO DeepSpeed engines from the same
config, the same seed and the same DeepSpeed config dict (build_ds_config):

  lmforge  model.build + engine.initialize (torch AdamW with lmforge's param groups + LambdaLR),
           one step = exactly the body of training.train.run's loop without eval/checkpoints:
           engine.get_lr(), train_step(engine, data, sampler.next_step(), device) (which includes
           the loss all-reduce), metrics.Throughput, engine.get_global_grad_norm(),
           metrics.memory_gib() and metrics.log (TensorBoard + metrics.jsonl in a temp run_dir,
           rank 0; logging.interval=1 as in the configs).
  bare     the same HF model built the way a user would (transformers HfDeepSpeedConfig for
           ZeRO-3 + AutoModelForCausalLM.from_config), torch.optim.AdamW, deepspeed.initialize,
           and per micro batch: F.cross_entropy(engine(input_ids=x).logits.view(-1, V),
           y.view(-1)); engine.backward(loss); engine.step(). Batches come from a second
           ShardedSampler with identical arguments, so both see the same samples in the same order.

After 3 warm-up steps each, the two variants alternate step by step (the order inside each pair
flips every pair: AB BA AB ...), so machine noise hits both alike. Each step is timed with
time.perf_counter() around the whole step; the per-rank times are all-reduced with MAX (outside
the timed region; this also lines the ranks up before the next step). Step 1's losses of the two
variants are printed as a sanity check: same weights, same batch -> the same loss.

Only the markdown table goes to stdout; torchrun/DeepSpeed output goes to stderr.
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WARMUP = 3
MAX_RATIO = 1.05


# --------------------------------------------------------------------------- driver

def driver(args: argparse.Namespace) -> int:
    from lmforge.training.dist import free_port

    tmp = Path(tempfile.mkdtemp(prefix="lmforge-bench-overhead-"))
    result = tmp / "result.json"
    try:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.nproc),
               "--nnodes", "1", "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
               str(Path(__file__).resolve()), "--worker", "--config", str(Path(args.config).resolve()),
               "--steps", str(args.steps), "--run-dir", str(tmp / "run"), "--result", str(result)]
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        # Everything the ranks print (DeepSpeed's INFO lines included) goes to our stderr.
        rc = subprocess.call(cmd, env=env, stdout=sys.stderr.fileno())
        if rc != 0 or not result.is_file():
            print(f"bench_overhead: the ranks failed (exit {rc}); see stderr", file=sys.stderr)
            return rc or 1
        r = json.loads(result.read_text())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    rows = []
    for name in ("lmforge", "bare"):
        times = r["times"][name]
        med, mean = statistics.median(times), statistics.fmean(times)
        rows.append((name, med, mean, r["tokens_per_step"] / med))
    ratio = rows[0][1] / rows[1][1]
    ok = ratio <= MAX_RATIO
    date = _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    command = "python " + shlex.join(sys.argv)
    print(f"## lmforge step overhead vs bare DeepSpeed ({args.config})\n")
    print("| variant | median step s | mean step s | tokens/s |")
    print("|---|---:|---:|---:|")
    for name, med, mean, tps in rows:
        print(f"| {name} | {med:.4f} | {mean:.4f} | {tps:.0f} |")
    print()
    print(f"ratio lmforge/bare (median step time): **{ratio:.3f}** "
          f"(requirement <= {MAX_RATIO}: {'PASS' if ok else 'FAIL'})")
    print()
    print(f"- {args.steps} timed steps per variant after {WARMUP} warm-up steps each, interleaved; "
          f"step time = max over {r['world_size']} ranks; {r['tokens_per_step']} tokens/step; "
          f"ZeRO-{r['zero_stage']}, {r['precision']}, {r['model']}")
    print(f"- step-1 loss (same weights, same batch): lmforge {r['first_loss']['lmforge']:.6f}, "
          f"bare {r['first_loss']['bare']:.6f}")
    print(f"- {date}; {platform.platform()}, {os.cpu_count()} CPUs, {r['device']}; "
          f"torch {r['versions']['torch']}, deepspeed {r['versions']['deepspeed']}, "
          f"transformers {r['versions']['transformers']}; config {args.config}")
    print(f"- command: `{command}`")
    return 0 if ok or not args.strict else 1


# --------------------------------------------------------------------------- ranks

def worker(args: argparse.Namespace) -> int:
    import torch
    import torch.nn.functional as F

    from lmforge.training import arithmetic, data, dist, engine as engine_lib, metrics as metrics_lib, model as model_lib
    from lmforge.training.config import build_ds_config, load_config
    from lmforge.training.train import seed_everything, train_step

    cfg = load_config(args.config, [f"run_dir={args.run_dir}", "logging.progress=false", "checkpoint.interval=0"])
    runtime = dist.select_runtime(cfg.train.precision, cfg.model.attention)
    d = dist.setup(runtime)
    try:
        import deepspeed
        import transformers
        from transformers import AutoModelForCausalLM
        from transformers.integrations import HfDeepSpeedConfig

        log = dist.get_logger(d.rank)
        world = d.world_size
        prepared = data.prepare(cfg.data, log)
        conf = model_lib.hf_config(cfg.model, prepared.vocab_size, prepared.eos_id)
        ds = build_ds_config(cfg, world, runtime.precision)
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[runtime.precision]
        seq_len = cfg.data.seq_len
        accum = cfg.grad_accum(world)
        tokens_per_step = cfg.train.global_batch_size * seq_len
        total_steps = cfg.total_steps()
        train_data = data.PackedTokens(prepared.train_tokens, seq_len)

        def sampler():
            return data.ShardedSampler(len(train_data), cfg.train.seed, d.rank, world,
                                       cfg.train.micro_batch_size, accum)

        # (a) lmforge: the real model/engine path and the real loop body.
        seed_everything(cfg.train.seed)
        model = model_lib.build(cfg.model, copy.deepcopy(conf), copy.deepcopy(ds), runtime.attention, dtype)
        n_total, n_matmul = model_lib.count_params(model)
        lm_engine = engine_lib.initialize(cfg, model, copy.deepcopy(ds), total_steps)
        lm_sampler = sampler()
        metrics = metrics_lib.make_metrics(d.rank, cfg, fresh=True, eval_metrics=["eval/loss", "eval/ppl"])
        throughput = metrics_lib.Throughput(tokens_per_step,
                                            arithmetic.flops_per_token(model.config, n_matmul, seq_len),
                                            world, metrics_lib.peak_tflops(cfg.logging.peak_tflops))
        lm_state = {"step": 0, "tokens": 0}

        def lmforge_step() -> float:
            lr = lm_engine.get_lr()[0]
            t0 = time.perf_counter()
            loss = train_step(lm_engine, train_data, lm_sampler.next_step(), d.device)
            step_time = time.perf_counter() - t0
            lm_state["step"] += 1
            lm_state["tokens"] += tokens_per_step
            perf = throughput(step_time)
            grad_norm = lm_engine.get_global_grad_norm()
            metrics.log(lm_state["step"], {"train/loss": loss, "train/lr": lr, "train/tokens": lm_state["tokens"],
                                           "train/grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                                           "mem/peak_gib": metrics_lib.memory_gib(), **perf})
            return loss

        # (b) bare: what a user would hand-roll with transformers + DeepSpeed.
        seed_everything(cfg.train.seed)
        bare_ds = copy.deepcopy(ds)
        hf_ds_ref = HfDeepSpeedConfig(bare_ds) if bare_ds["zero_optimization"]["stage"] == 3 else None  # noqa: F841
        bare_model = AutoModelForCausalLM.from_config(copy.deepcopy(conf), attn_implementation=runtime.attention,
                                                      dtype=dtype)
        bare_model.config.use_cache = False
        t = cfg.train
        bare_opt = torch.optim.AdamW(bare_model.parameters(), lr=t.lr, betas=t.betas, eps=t.eps,
                                     weight_decay=t.weight_decay)
        bare_engine, _, _, _ = deepspeed.initialize(model=bare_model, optimizer=bare_opt, config=bare_ds)
        bare_sampler = sampler()
        device = d.device

        def bare_step(keep_loss: bool = False):
            losses = []
            for indices in bare_sampler.next_step():
                x, y = train_data.batch(indices)
                x, y = x.to(device), y.to(device)
                logits = bare_engine(input_ids=x).logits
                loss = F.cross_entropy(logits.view(-1, logits.size(-1)), y.reshape(-1))
                bare_engine.backward(loss)
                bare_engine.step()
                if keep_loss:
                    losses.append(loss.detach())
            return losses

        # Warm-up (untimed); step 1 of each also gives the sanity-check losses.
        first_lm = lmforge_step()
        first_bare = torch.stack(bare_step(keep_loss=True)).double().sum()
        torch.distributed.all_reduce(first_bare)
        first_bare = first_bare.item() / (accum * world)
        for _ in range(WARMUP - 1):
            lmforge_step()
            bare_step()

        timer = torch.zeros((), dtype=torch.float64, device=device)
        times: dict[str, list[float]] = {"lmforge": [], "bare": []}
        variants = {"lmforge": lmforge_step, "bare": bare_step}
        torch.distributed.barrier()
        for i in range(args.steps):
            order = ("lmforge", "bare") if i % 2 == 0 else ("bare", "lmforge")
            for name in order:
                t0 = time.perf_counter()
                variants[name]()
                timer.fill_(time.perf_counter() - t0)
                torch.distributed.all_reduce(timer, op=torch.distributed.ReduceOp.MAX)
                times[name].append(timer.item())
        metrics.close()
        if d.is_main:
            out = dict(times=times, tokens_per_step=tokens_per_step, world_size=world,
                       zero_stage=cfg.parallel.zero_stage, precision=runtime.precision,
                       device=f"{runtime.device_type} ({runtime.device_name})",
                       model=model_lib.describe(model.config, n_total),
                       first_loss={"lmforge": first_lm, "bare": first_bare},
                       versions={"torch": torch.__version__, "deepspeed": deepspeed.__version__,
                                 "transformers": transformers.__version__})
            Path(args.result).write_text(json.dumps(out))
        return 0
    finally:
        dist.teardown()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/demo.yaml", help="lmforge run config (default configs/demo.yaml)")
    p.add_argument("--steps", type=int, default=30, help="timed steps per variant (after 3 warm-up steps)")
    p.add_argument("--nproc", type=int, default=2, help="ranks (default 2)")
    p.add_argument("--strict", action="store_true", help="exit 1 when the ratio misses the requirement")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--run-dir", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args)
    return driver(args)


if __name__ == "__main__":
    sys.exit(main())
