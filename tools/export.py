"""`lmforge export`: an lmforge run or checkpoint → a Hugging Face model directory that
transformers (and vLLM) load: safetensors weights sharded by --max-shard-size, config, generation
config, tokenizer, and a model card (README.md) recording the training config, steps, tokens and
the final eval metrics. LoRA/QLoRA/AdaLoRA adapters are merged into the base.

    lmforge export runs/debug --out exports/debug                  # the newest checkpoint
    lmforge export runs/classification --out exports/cls --which best
    lmforge export runs/debug/checkpoints/step_20 --out exports/s20 --max-shard-size 500MB

The weights come from training/consolidate.py (DeepSpeed's zero_to_fp32 for full runs; base +
peft adapter, merged, for adapter runs), so any ZeRO stage and world size exports the same way.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from lmforge.tools import artifact
from lmforge.training import consolidate
from lmforge.training.config import ConfigError


def _final_metrics(run_dir: Path, step: int) -> dict:
    """The eval metrics logged at `step` (metrics.jsonl of the run that wrote the checkpoint)."""
    found = {}
    path = run_dir / "metrics.jsonl"
    if path.is_file():
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            if rec.get("step") == step:
                found.update({k: v for k, v in rec.items() if k.startswith("eval/")})
    return found


def model_card(ckpt: Path, out: Path) -> str:
    cfg = consolidate.saved_config(ckpt)
    client = json.loads((ckpt / "client.json").read_text())
    step = client["step"]
    metrics = _final_metrics(ckpt.parent.parent, step)
    rows = "\n".join(f"| {k} | {v:.4f} |" for k, v in sorted(metrics.items())) or "| (none logged) | |"
    adapter = f" with {cfg.finetune.method} adapters merged into `{cfg.model.init_from}`" if (ckpt / "adapter").is_dir() else ""
    return f"""---
library_name: transformers
tags: [lmforge, {cfg.task}]
---
# {out.name}

Exported by lmforge from `{ckpt}`{adapter} on {time.strftime('%Y-%m-%d')}.

- task: {cfg.task}
- steps: {step}, tokens: {client.get('tokens', 0):,}
- ZeRO stage {cfg.parallel.zero_stage}, {client.get('world_size')} rank(s), optimizer {cfg.train.optimizer}

## Final evaluation (step {step})

| metric | value |
|---|---|
{rows}

## Training config

```yaml
{cfg.to_yaml()}```
"""


def export(path: str | Path, out: str | Path, which: str = "latest", max_shard_size: str = "2GB",
           overwrite: bool = False, fmt: str = "hf", quant: str | None = None, int8: bool = False) -> Path:
    if fmt != "hf" or quant or int8:
        raise ConfigError("--format gguf/onnx are not implemented yet")  # TODO(helper B)
    ckpt = consolidate.find_checkpoint(path, which)
    out = Path(out)
    with artifact.atomic_output(out, overwrite) as tmp:  # a half-written export never carries the final name
        consolidate.to_hf(ckpt, tmp, max_shard_size=max_shard_size)
        (tmp / "README.md").write_text(model_card(ckpt, out))
        artifact.write_run_config(consolidate.saved_config(ckpt), tmp)
    return out
