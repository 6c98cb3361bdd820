"""The reward recipe against TRL's RewardTrainer, as TRL's docs run it: the same SFT model
(WORK/runs/sft_pref of bench/bench_preference.py, exported), the same embedded pairs, batch and steps.
Both reward models are then scored the same way (plain transformers, one pair at a time) on the
held-out pairs, per corruption (shuffled lines, swapped names).

    .venv/bin/python bench/bench_preference.py --work /tmp/bp --tasks reward   # runs/sft_pref, runs/reward
    .venv/bin/python bench/bench_reward_peer.py --work /tmp/bp                  # + TRL, the table
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

LMFORGE = Path(sys.executable).parent / "lmforge"
SEQ_LEN = 192  # configs/reward.yaml's data.seq_len: a reward row holds at most this many tokens


def export(work: Path, run: str) -> Path:
    """The run's export, made anew each call: the run may have been retrained since the last one."""
    out = work / "exports" / run
    subprocess.run([str(LMFORGE), "export", str(work / "runs" / run), "--out", str(out), "--overwrite"], check=True,
                   stdout=subprocess.DEVNULL)
    return out


def conversation(r: dict, answer: str) -> list[dict]:
    return [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r[answer]}]


def trl_reward(sft: Path, train: list[dict], out: Path, steps: int, lr: float) -> float:
    """TRL's RewardTrainer on the pairs in conversational form (TRL renders them with the chat template;
    max_length: the recipe's data.seq_len, beyond which TRL drops a pair where lmforge cuts it: the
    embedded pairs fit); returns the wall time of train()."""
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    from lmforge.training.tasks.sft import BUILTIN_CHAT_TEMPLATE

    tok = AutoTokenizer.from_pretrained(sft)
    tok.chat_template = tok.chat_template or BUILTIN_CHAT_TEMPLATE  # the template lmforge renders with
    pairs = Dataset.from_list([{"chosen": conversation(r, "chosen"), "rejected": conversation(r, "rejected")} for r in train])
    longest = max(len(tok(tok.apply_chat_template(conversation(r, a), tokenize=False), add_special_tokens=False).input_ids)
                  for r in train for a in ("chosen", "rejected"))
    print(f"longest training conversation: {longest} tokens (TRL drops a pair over {SEQ_LEN})", flush=True)
    model = AutoModelForSequenceClassification.from_pretrained(sft, num_labels=1)
    args = RewardConfig(output_dir=str(out), per_device_train_batch_size=16, max_steps=steps, learning_rate=lr,
                        warmup_steps=5, lr_scheduler_type="cosine", logging_steps=30, eval_strategy="no",
                        save_strategy="no", max_length=SEQ_LEN, report_to=[], use_cpu=True, seed=0)
    trainer = RewardTrainer(model=model, args=args, train_dataset=pairs, processing_class=tok)
    t0 = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t0
    trainer.save_model(str(out))
    tok.save_pretrained(str(out))
    return wall


def accuracy(model_dir: Path, held: list[dict]) -> dict[str, float]:
    """Held-out accuracy (score(chosen) > score(rejected)) per corruption and over all pairs."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from lmforge.training.tasks.sft import BUILTIN_CHAT_TEMPLATE

    tok = AutoTokenizer.from_pretrained(model_dir)
    template = tok.chat_template or BUILTIN_CHAT_TEMPLATE
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()

    def score(r, answer):
        text = tok.apply_chat_template(conversation(r, answer), chat_template=template, tokenize=False)
        ids = tok(text, add_special_tokens=False, return_tensors="pt").input_ids[:, :SEQ_LEN]
        return float(model(input_ids=ids).logits[0, 0])

    right = defaultdict(list)
    with torch.no_grad():
        for r in held:
            right[r["corruption"]].append(score(r, "chosen") > score(r, "rejected"))
    acc = {k: sum(v) / len(v) for k, v in sorted(right.items())}
    acc["all"] = sum(sum(v) for v in right.values()) / len(held)
    return acc


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, default=Path("/tmp/bench-preference"), help="bench_preference.py's --work")
    p.add_argument("--steps", type=int, nargs="+", default=[90], help="TRL runs of these lengths")
    p.add_argument("--lr", type=float, default=3e-4)
    args = p.parse_args()
    data = sorted((args.work / "cache" / "embedded" / "preference").glob("*/train.jsonl"), key=lambda f: f.stat().st_mtime)
    if not data or not (args.work / "runs" / "sft_pref").is_dir():
        sys.exit(f"no runs/sft_pref or embedded pairs under {args.work}: run bench/bench_preference.py --work {args.work} first")
    train, held = ([json.loads(x) for x in (data[-1].parent / f).read_text().splitlines()] for f in ("train.jsonl", "eval.jsonl"))
    sft = export(args.work, "sft_pref")
    rows = []
    if (args.work / "runs" / "reward").is_dir():
        rows.append(("lmforge configs/reward.yaml (2 ranks)", accuracy(export(args.work, "reward"), held)))
    for steps in args.steps:
        out = args.work / "exports" / f"trl_reward_{steps}"
        wall = trl_reward(sft, train, out, steps, args.lr)
        rows.append((f"TRL RewardTrainer, {steps} steps, lr {args.lr:g} (1 process, {wall:.0f} s)", accuracy(out, held)))
    print(f"# {dt.date.today()} {platform.node()} {platform.processor() or platform.machine()}: "
          f"{len(train)} training pairs, {len(held)} held out")
    kinds = [k for k in rows[0][1] if k != "all"]
    print(f"| reward model | {' | '.join(kinds)} | all |")
    print("|---|" + "---:|" * (len(kinds) + 1))
    for name, acc in rows:
        print(f"| {name} | {' | '.join(f'{acc[k]:.3f}' for k in kinds)} | {acc['all']:.3f} |")


if __name__ == "__main__":
    main()
