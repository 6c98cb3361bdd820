"""`lmforge export`: an lmforge run or checkpoint → a Hugging Face model directory that
transformers (and vLLM) load: safetensors weights sharded by --max-shard-size, config, generation
config, tokenizer, and a model card (README.md) recording the training config, steps, tokens and
the final eval metrics. LoRA/QLoRA/AdaLoRA adapters are merged into the base.

    lmforge export runs/debug --out exports/debug                  # the newest checkpoint
    lmforge export runs/classification --out exports/cls --which best
    lmforge export runs/debug/checkpoints/step_20 --out exports/s20 --max-shard-size 500MB

Causal LMs also export to a single GGUF file for llama.cpp / Ollama (tools/to_gguf.py) and to an
ONNX Runtime directory (tools/to_onnx.py), from a run/checkpoint or from a dense Hugging Face
directory lmforge wrote (export, dense compress recipes, prune), which carries lmforge_run.yaml:

    lmforge export exports/debug --format gguf --quant q8_0 --out exports/debug-q8_0.gguf
    lmforge export runs/debug --format gguf --out exports/debug-f16.gguf    # f16 is the default
    lmforge export exports/debug --format onnx --int8 --out exports/debug-onnx-int8

The weights come from training/checkpoint/consolidate.py (DeepSpeed's zero_to_fp32 for full
runs; base + peft adapter, merged, for adapter runs), so any ZeRO stage and world size exports the
same way.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from lmforge.tools import artifact
from lmforge.training.checkpoint import consolidate
from lmforge.training.config import Config, ConfigError


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
    _check_flags(fmt, quant, int8, max_shard_size)
    out = Path(out)
    if fmt == "hf":
        return _export_hf(path, out, which, max_shard_size, overwrite)
    src = _source(path, which)
    artifact.require_causal(src.cfg, f"--format {fmt}")
    if fmt == "gguf":
        from lmforge.tools import to_gguf

        q = to_gguf.check_quant(quant)
        if out.suffix != ".gguf":
            raise ConfigError(f"--out {out}: a GGUF export is one file named *.gguf")
        to_gguf.check_model(src.meta, q)
        with artifact.atomic_output(out, overwrite) as tmp, _hf_dir(src, out.parent) as hf:
            to_gguf.write(hf, tmp, q, src.cfg.to_yaml(), name=out.stem)
    else:
        from lmforge.tools import to_onnx

        with artifact.atomic_output(out, overwrite) as tmp, _hf_dir(src, out.parent) as hf:
            to_onnx.write(hf, tmp, int8)
            artifact.write_run_config(src.cfg, tmp)
    return out


def _export_hf(path: str | Path, out: Path, which: str, max_shard_size: str, overwrite: bool) -> Path:
    if (Path(path) / "config.json").is_file():
        raise ConfigError(f"{path} is already a Hugging Face directory; --format hf exports a run or checkpoint "
                          "(--format gguf/onnx convert a Hugging Face directory)")
    ckpt = consolidate.find_checkpoint(path, which)
    with artifact.atomic_output(out, overwrite) as tmp:  # a half-written export never carries the final name
        consolidate.to_hf(ckpt, tmp, max_shard_size=max_shard_size)
        (tmp / "README.md").write_text(model_card(ckpt, out))
        artifact.write_run_config(consolidate.saved_config(ckpt), tmp)
    return out


def _check_flags(fmt: str, quant: str | None, int8: bool, max_shard_size: str) -> None:
    if fmt not in ("hf", "gguf", "onnx"):
        raise ConfigError(f"--format {fmt}: allowed hf, gguf, onnx")
    if max_shard_size != "2GB" and fmt != "hf":
        raise ConfigError(f"--max-shard-size is for --format hf (safetensors shards), not --format {fmt}")
    if quant is not None and fmt != "gguf":
        hint = "; for int8 ONNX weights pass --int8" if fmt == "onnx" else ""
        raise ConfigError(f"--quant is for --format gguf, not --format {fmt}{hint}")
    if int8 and fmt != "onnx":
        hint = "; for 8-bit GGUF weights pass --quant q8_0" if fmt == "gguf" else ""
        raise ConfigError(f"--int8 is for --format onnx, not --format {fmt}{hint}")


@dataclass
class _Source:
    """What to convert: `meta` holds config.json + tokenizer (readable before any weights are
    consolidated); either `hf` (dense weights already there) or `ckpt` (to consolidate)."""
    cfg: Config
    meta: Path
    hf: Path | None = None
    ckpt: Path | None = None


def _source(path: str | Path, which: str) -> _Source:
    p = Path(path).expanduser()
    if (p / "config.json").is_file() or p.suffix == ".gguf":
        if which != "latest":
            raise ConfigError(f"--which {which} picks a checkpoint of a run; {p} is a model directory")
        artifact.require_dense_hf(p, "GGUF/ONNX export")
        cfg = artifact.run_config(p, hint="export from the lmforge run (or `lmforge export` directory) it came from")
        return _Source(cfg, p, hf=p)
    ckpt = consolidate.find_checkpoint(p, which)
    return _Source(consolidate.saved_config(ckpt), consolidate.meta_dir(ckpt), ckpt=ckpt)


@contextlib.contextmanager
def _hf_dir(src: _Source, near: Path) -> Iterator[Path]:
    """A dense HF directory for `src`: the input itself, or the checkpoint consolidated into a
    temporary directory beside the output (same disk; removed afterwards)."""
    if src.hf is not None:
        yield src.hf
        return
    with tempfile.TemporaryDirectory(prefix=".lmforge-hf-", dir=near) as tmp:
        yield consolidate.to_hf(src.ckpt, Path(tmp))
