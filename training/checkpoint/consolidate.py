"""Consolidate an lmforge checkpoint (ZeRO 1/2/3, any world size) into a Hugging Face model
directory: safetensors weights, config and tokenizer; LoRA/QLoRA/AdaLoRA adapters merged.

    lmforge export runs/debug --out /tmp/debug-hf         # the newest checkpoint of a run
    python -m lmforge.training.checkpoint.consolidate runs/debug/checkpoints/step_30 /tmp/step30-hf

Full weights come from DeepSpeed's own `zero_to_fp32` (the fp32 master weights, gathered from
every rank's optimizer partition; AutoTP checkpoints from their universal conversion). An adapter
run saves only its adapter (and task head), as peft writes it (`adapter/`), so its consolidation is
the base model the run started from (model.init_from) + the adapter, merged with peft's
`merge_and_unload`.

`model.init_from` may name an lmforge run or checkpoint: it is consolidated once into `step_N_hf/`
beside the checkpoint (checkpoint.derived_dir; under a file lock, so every rank may ask; reused
while the checkpoint is unchanged, pruned with it).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
from pathlib import Path

import torch
from filelock import FileLock

from .. import checkpoint, model as model_lib, tasks
from ..config import Config, ConfigError, yaml_load


def find_checkpoint(path: str | Path, which: str = "latest") -> Path:
    """A run directory, its checkpoints/ directory or a step_N directory → a verified step_N.
    which: latest (newest complete) or best (the one early stopping marked)."""
    p = Path(path).expanduser()
    if (p / "manifest.json").is_file() or p.name.startswith("step_"):
        problem = checkpoint.verify(p)
        if problem:
            raise ConfigError(f"{p} is not a complete lmforge checkpoint: {problem}")
        return p
    root = p / "checkpoints" if (p / "checkpoints").is_dir() else p
    if which == "best":
        best = checkpoint.read_best(root)
        if best is None:
            raise ConfigError(f"{root} has no best checkpoint (no eval.early_stopping.metric in that run)")
        return root / best["tag"]
    found = checkpoint.find_latest(root, logging.getLogger("lmforge"))  # warns about skipped broken ones
    if found is None:
        raise ConfigError(f"{p}: no complete lmforge checkpoint (expected a run directory, its checkpoints/ "
                          "or a step_N directory)")
    return found


def saved_config(ckpt: Path) -> Config:
    return Config.model_validate(yaml_load((ckpt / "config.yaml").read_text(), ckpt / "config.yaml"))


def source_meta(init_from: str | Path) -> Path:
    """model.init_from → a directory with its HF config.json and tokenizer, without consolidating
    any weights (preflight runs in launchers too): the HF directory itself, or a checkpoint's hf/."""
    p = Path(init_from).expanduser()
    if (p / "config.json").is_file():
        return p
    if not p.exists():
        raise ConfigError(f"model.init_from: {p} does not exist")
    meta = find_checkpoint(p) / "hf"
    if not (meta / "config.json").is_file():
        raise ConfigError(f"model.init_from: {meta.parent} has no hf/config.json (an lmforge checkpoint from before "
                          "export support); resume that run for one more checkpoint")
    return meta


def resolve_source(init_from: str | Path) -> Path:
    """model.init_from → a Hugging Face directory with weights (consolidating a checkpoint once)."""
    p = Path(init_from).expanduser()
    if (p / "config.json").is_file():
        return p
    if not p.exists():
        raise ConfigError(f"model.init_from: {p} does not exist")
    ckpt = find_checkpoint(p)
    out = checkpoint.derived_dir(ckpt, "hf")
    with FileLock(str(out) + ".lock"):
        stamp = out / "lmforge_source.json"
        if not (stamp.is_file() and json.loads(stamp.read_text()).get("source") == checkpoint.source_id(ckpt)):
            tmp = checkpoint.temp_dir(out)
            shutil.rmtree(tmp, ignore_errors=True)
            to_hf(ckpt, tmp)
            (tmp / "lmforge_source.json").write_text(json.dumps({"source": checkpoint.source_id(ckpt),
                                                                 "checkpoint": str(ckpt)}))
            shutil.rmtree(out, ignore_errors=True)
            os.replace(tmp, out)
    return out


def load_merged(ckpt: Path, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The checkpoint's model in memory (CPU, eval mode), adapters merged."""
    from transformers import AutoConfig

    cfg = saved_config(ckpt)
    conf = AutoConfig.from_pretrained(str(meta_dir(ckpt)), local_files_only=True)
    cls = model_lib.auto_class(cfg.task)
    if (ckpt / "adapter").is_dir():
        from peft import PeftModel

        if not cfg.model.init_from and not cfg.model.path:
            raise ConfigError(f"{ckpt} holds an adapter but its config names no base model")
        base_dir = resolve_source(cfg.model.init_from) if cfg.model.init_from else Path(cfg.model.path).expanduser()
        base = cls.from_pretrained(str(base_dir), config=conf, dtype=dtype, local_files_only=True)
        model = PeftModel.from_pretrained(base, str(ckpt / "adapter")).merge_and_unload()
    else:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)
        model = cls.from_config(conf, dtype=torch.float32)
        missing, unexpected = model.load_state_dict(state, strict=False)
        tied = {k for k in missing if k.endswith("lm_head.weight") and getattr(conf, "tie_word_embeddings", False)}
        if set(missing) - tied or unexpected:
            raise RuntimeError(f"{ckpt}: consolidated weights do not fit the model (missing "
                               f"{sorted(set(missing) - tied)[:5]}, unexpected {sorted(unexpected)[:5]})")
        model.tie_weights()
        model = model.to(dtype)
    model.config.use_cache = True
    return model.eval()


def to_hf(ckpt: Path, out: Path, max_shard_size: str = "2GB", dtype: torch.dtype = torch.float32) -> Path:
    """Write the checkpoint as a Hugging Face directory: safetensors weights, config, generation
    config, tokenizer. Full-weight checkpoints stream one output shard at a time (DeepSpeed reads its
    partition files memory-mapped), so peak memory stays near one shard, not the model, above the
    process; adapter runs build the merged model in memory (base + adapter, the base dominates)."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    out.mkdir(parents=True, exist_ok=True)
    if (ckpt / "adapter").is_dir():
        model = load_merged(ckpt, dtype)
        model.save_pretrained(str(out), safe_serialization=True, max_shard_size=max_shard_size, is_main_process=True)
    else:
        conf = AutoConfig.from_pretrained(str(meta_dir(ckpt)), local_files_only=True)
        _stream_weights(ckpt, out, max_shard_size, dtype)
        conf.architectures = [_check_keys(ckpt, conf, out)]  # vLLM picks its implementation by this name
        conf.dtype = dtype
        conf.use_cache = True
        conf.save_pretrained(str(out))
        if tasks.get(saved_config(ckpt).task).causal:
            GenerationConfig.from_model_config(conf).save_pretrained(str(out))
    AutoTokenizer.from_pretrained(str(ckpt / "hf"), local_files_only=True).save_pretrained(str(out))
    return out


def meta_dir(ckpt: Path) -> Path:
    meta = ckpt / "hf"
    if not (meta / "config.json").is_file():
        raise ConfigError(f"{ckpt} has no hf/config.json (written by lmforge before export support); "
                          "resume the run for one more checkpoint to export it")
    return meta


def _stream_weights(ckpt: Path, out: Path, max_shard_size: str, dtype: torch.dtype) -> None:
    cfg = saved_config(ckpt)
    if cfg.parallel.tensor == 1:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint, to_torch_tensor

        # DeepSpeed's own consolidation, lazily (each tensor gathered when its shard is written). Tied
        # parameters (tie_word_embeddings: lm_head.weight is embed_tokens.weight, as Qwen2 ships) come
        # back as one object under two names, which safetensors refuses to store twice (DeepSpeed's
        # convert_zero_checkpoint_to_state_dict fails on them): keep the first name, as the model's
        # named_parameters() does; transformers ties the other on load.
        state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name, lazy_mode=True)
        first: dict[int, str] = {}
        for name, t in state.items():
            first.setdefault(id(t), name)
        state = {name: state[name] for name in first.values()}
        shapes = to_torch_tensor(state, return_empty_tensor=True, dtype=dtype)
        _save_shards(shapes, lambda n: to_torch_tensor({n: state[n]}, dtype=dtype)[n], out, max_shard_size)
        return
    # zero_to_fp32 cannot read AutoTP slices: read the universal conversion's whole fp32 parameters
    # (docs/deepspeed_workarounds.md#zero-to-fp32-autotp), which a ZeRO-3 x TP source cannot have
    # (docs/deepspeed_workarounds.md#zero3-tp-source)
    if cfg.parallel.zero_stage == 3:
        raise ConfigError(f"{ckpt}: exporting a ZeRO-3 x tensor-parallel checkpoint is not supported: DeepSpeed "
                          "0.19's universal converter mis-sizes its replicated parameters "
                          "(see docs/deepspeed_workarounds.md#zero3-tp-source)")
    from . import universal

    zero = universal.convert(ckpt, logging.getLogger("lmforge.consolidate")) / "zero"
    names = sorted(d.name for d in zero.iterdir() if (d / "fp32.pt").is_file())

    def load(name: str) -> torch.Tensor:  # memory-mapped: reading a shape costs no copy
        t = torch.load(zero / name / "fp32.pt", map_location="cpu", weights_only=False, mmap=True)
        return t["param"] if isinstance(t, dict) else t

    shapes = {n: torch.empty(load(n).shape, dtype=dtype, device="meta") for n in names}
    _save_shards(shapes, lambda n: load(n).to(dtype).contiguous(), out, max_shard_size)


def _save_shards(shapes: dict[str, torch.Tensor], materialise, out: Path, max_shard_size: str) -> None:
    """Plan the safetensors shards from shapes (meta/empty tensors), then materialise and write one
    shard at a time, with the index file of a sharded checkpoint."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    split = split_torch_state_dict_into_shards(shapes, filename_pattern="model{suffix}.safetensors",
                                               max_shard_size=max_shard_size)
    out.mkdir(parents=True, exist_ok=True)
    for file, tensors in split.filename_to_tensors.items():
        save_file({n: materialise(n).contiguous() for n in tensors}, str(out / file), metadata={"format": "pt"})
    if split.is_sharded:
        (out / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": split.metadata, "weight_map": split.tensor_to_filename}, indent=2, sort_keys=True))


def _check_keys(ckpt: Path, conf, out: Path) -> str:
    """The written tensor names must be exactly the model's parameters (tied ones once) and
    persistent buffers: checked against the model built on the meta device, so nothing is allocated."""
    from safetensors import safe_open

    with torch.device("meta"):
        model = model_lib.auto_class(saved_config(ckpt).task).from_config(conf)
    written = set()
    for f in out.glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            written |= set(st.keys())
    required = {n for n, _ in model.named_parameters()}  # tied parameters appear once, as DeepSpeed names them
    missing, unexpected = required - written, written - set(model.state_dict())
    if missing or unexpected:
        raise RuntimeError(f"{ckpt}: consolidated weights do not fit the model (missing {sorted(missing)[:5]}, "
                           f"unexpected {sorted(unexpected)[:5]})")
    return type(model).__name__


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lmforge.training.checkpoint.consolidate",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", help="run directory, checkpoints/ or step_N")
    parser.add_argument("out", help="output Hugging Face directory")
    args = parser.parse_args(argv)
    try:
        ckpt = find_checkpoint(args.checkpoint)
        print(to_hf(ckpt, Path(args.out)))
    except ConfigError as e:
        print(f"lmforge: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
