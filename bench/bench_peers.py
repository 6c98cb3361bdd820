"""lmforge's training step against what users compare it with, each system in its own processes
and set up as its own documentation writes it: an HF Trainer script with DeepSpeed ZeRO-3, a plain
DeepSpeed loop, and `lmforge train`. Same Llama shape, batch and precision; 2 CPU ranks, ZeRO-3, fp32.

    .venv/bin/python bench/bench_peers.py --rounds 2 --steps 30

Shapes (the two the speed issue names): A hidden 256, 4 layers, 4 heads, intermediate 768, vocab
4096, seq 256, micro batch 4; B hidden 512, 8 layers, 8 heads, intermediate 1536, vocab 4096, seq
512, micro batch 2. Each round runs the three systems one after another (the order rotates by
round). A system's step time is the mean of the wall time between consecutive optimizer steps
6..steps, taken where each system reports a finished step: the Trainer's on_step_end callback, the
loop's own clock, lmforge's metrics.jsonl (logging.interval=1): everything a step costs the user,
bookkeeping included.

  hf       torchrun --nproc-per-node 2 bench/bench_peers.py --role hf: transformers.Trainer,
           TrainingArguments(deepspeed={"zero_optimization": {"stage": 3}, … "auto"}), the model
           from AutoModelForCausalLM.from_config(config), random token sequences as the dataset (labels = inputs);
           the Trainer's own AdamW (no optimizer block), clipping 1.0.
  ds       torchrun --nproc-per-node 2 bench/bench_peers.py --role ds: deepspeed.initialize with
           DeepSpeed's defaults for ZeRO-3 (zero.Init through HfDeepSpeedConfig), torch AdamW,
           `engine(input_ids, labels=…).loss; engine.backward; engine.step`.
  lmforge  lmforge train configs/demo.yaml --nproc 2 with the shape as model.overrides, no
           evaluation or checkpoint inside the timed steps.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SHAPES = {
    "A": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=768, vocab_size=4096,
              seq=256, micro=4),
    "B": dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, intermediate_size=1536, vocab_size=4096,
              seq=512, micro=2),
}
FIRST = 6  # steps 6..N: after DeepSpeed's and the allocator's first-step work


def _llama(shape: dict):
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=shape["hidden_size"], num_hidden_layers=shape["num_hidden_layers"],
                       num_attention_heads=shape["num_attention_heads"], num_key_value_heads=shape["num_attention_heads"],
                       intermediate_size=shape["intermediate_size"], vocab_size=shape["vocab_size"],
                       max_position_embeddings=shape["seq"], attn_implementation="sdpa")


class Tokens:
    """Random token sequences (labels = inputs, as a causal-LM dataset gives them)."""

    def __init__(self, n: int, seq: int, vocab: int):
        import torch

        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, vocab, (n, seq), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def role_hf(shape: dict, steps: int, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter())

    # No train_batch_size: on CPU ranks the Trainer's own world size is 1 (its "auto" would be half of
    # DeepSpeed's micro x accumulation x 2 ranks); DeepSpeed derives it from the other two.
    ds = {"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": "auto",
          "gradient_accumulation_steps": "auto", "gradient_clipping": "auto"}
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(output_dir=tmp, per_device_train_batch_size=shape["micro"], max_steps=steps,
                                 learning_rate=2e-3, lr_scheduler_type="cosine", warmup_steps=2, weight_decay=0.1,
                                 adam_beta2=0.95, logging_steps=1, save_strategy="no", report_to=[],
                                 deepspeed=ds, disable_tqdm=True, dataloader_num_workers=0, seed=0)
        model = AutoModelForCausalLM.from_config(_llama(shape))  # after TrainingArguments: under zero.Init
        Trainer(model=model, args=args, train_dataset=Tokens(steps * shape["micro"] * 2, shape["seq"],
                                                             shape["vocab_size"]), callbacks=[Clock()]).train()
    if int(os.environ.get("RANK", "0")) == 0:
        out.write_text(json.dumps(times))
    torch.distributed.barrier()


def role_ds(shape: dict, steps: int, out: Path) -> None:
    import deepspeed
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    deepspeed.init_distributed(dist_backend="gloo")
    world = torch.distributed.get_world_size()
    ds = {"train_micro_batch_size_per_gpu": shape["micro"], "train_batch_size": shape["micro"] * world,
          "zero_optimization": {"stage": 3}, "gradient_clipping": 1.0}
    keep = HfDeepSpeedConfig(ds)  # noqa: F841 - transformers builds the model under zero.Init while it lives
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_llama(shape))
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, betas=(0.9, 0.95), weight_decay=0.1)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds)
    data = Tokens(steps * shape["micro"] * world, shape["seq"], shape["vocab_size"])
    rank = torch.distributed.get_rank()
    times = []
    for step in range(steps):
        i = (step * world + rank) * shape["micro"]
        ids = data.ids[i:i + shape["micro"]]
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        times.append(time.perf_counter())
    if rank == 0:
        out.write_text(json.dumps(times))
    torch.distributed.destroy_process_group()  # else gloo may abort the exit ("terminate called ...")


def run_lmforge(shape: dict, steps: int, workdir: Path) -> list[float]:
    run_dir = workdir / f"lmforge-{time.time_ns()}"
    over = {k: v for k, v in shape.items() if k not in ("seq", "micro")}
    over["num_key_value_heads"] = shape["num_attention_heads"]
    over["max_position_embeddings"] = shape["seq"]
    overrides = "{" + ", ".join(f"{k}: {v}" for k, v in over.items() if k != "vocab_size") + "}"
    cmd = [str(BIN / "lmforge"), "train", str(REPO / "configs" / "demo.yaml"), "--nproc", "2", f"run_dir={run_dir}",
           f"model.overrides={overrides}", f"data.vocab_size={shape['vocab_size']}", f"data.seq_len={shape['seq']}",
           f"train.micro_batch_size={shape['micro']}", f"train.global_batch_size={2 * shape['micro']}",
           f"train.steps={steps}", "eval.interval=0", "eval.batches=1", "checkpoint.interval=0",
           "logging.interval=1", "logging.progress=false", "parallel.zero_stage=3", "train.precision=fp32"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"lmforge failed:\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["time"] for r in rows if "train/loss" in r]


def run_peer(role: str, shape_name: str, steps: int, workdir: Path) -> list[float]:
    from lmforge.training.dist import free_port

    out = workdir / f"{role}-{time.time_ns()}.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [str(BIN / "torchrun"), "--nproc-per-node", "2", "--master-addr", "127.0.0.1", "--master-port",
           str(free_port()), __file__, "--role", role, "--shape", shape_name, "--steps", str(steps), "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env)
    if proc.returncode != 0 and not out.is_file():
        raise SystemExit(f"{role} failed:\n{proc.stderr[-3000:]}")
    if proc.returncode != 0:  # after its timed steps: gloo's teardown sometimes aborts the exit (SIGABRT)
        print(f"{role}: exited {proc.returncode} after writing its step times; they are used", file=sys.stderr)
    return json.loads(out.read_text())


def mean_step(stamps: list[float]) -> float:
    """Mean wall time of steps FIRST..N from the finish times of steps 1..N."""
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]  # gaps[k] = step k+2
    return statistics.mean(gaps[FIRST - 2:])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--role", choices=["hf", "ds"], default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--shape", choices=list(SHAPES), default=None)
    ap.add_argument("--shapes", nargs="*", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args()
    if a.role:
        {"hf": role_hf, "ds": role_ds}[a.role](SHAPES[a.shape], a.steps, a.out)
        return 0
    systems = ["hf", "ds", "lmforge"]
    got: dict[tuple[str, str], list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="lmforge-bench-peers-") as tmp:
        for name in a.shapes:
            for r in range(a.rounds):
                for system in systems[r % 3:] + systems[:r % 3]:
                    stamps = (run_lmforge(SHAPES[name], a.steps, Path(tmp)) if system == "lmforge"
                              else run_peer(system, name, a.steps, Path(tmp)))
                    got.setdefault((name, system), []).append(mean_step(stamps))
    print(f"{dt.date.today()}  {platform.node()}  {os.cpu_count()} CPUs  python {platform.python_version()}")
    print(f"| shape | system | mean step s, steps {FIRST}-{a.steps} (per round) | vs HF Trainer |\n|---|---|---|---:|")
    for name in a.shapes:
        hf = statistics.median(got[name, "hf"])
        for system in systems:
            runs = got[name, system]
            print(f"| {name} | {system} | {', '.join(f'{x:.3f}' for x in runs)} | {statistics.median(runs) / hf:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
