"""What every tool after training shares: the run config an artifact carries, atomic outputs, and
the token streams compression and reports draw from the run's own data pipeline.

An artifact is a Hugging Face directory (`lmforge export`, `lmforge compress`, `lmforge prune`), an
ONNX directory (model.onnx + tokenizer) or a single GGUF file. Each directory carries the training
config as `lmforge_run.yaml` (a GGUF file carries it in its metadata), so calibration samples and
the report's held-out tokens come from the same data pipeline, tokenizer and split that trained it:

    python -c "from lmforge.tools import artifact; print(artifact.heldout_tokens(artifact.run_config('exports/debug')).shape)"
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from lmforge.training.config import Config, ConfigError, validate, yaml_load

if TYPE_CHECKING:  # numpy and torch load only when tokens are needed: `lmforge --help` imports this module
    import numpy as np
    import torch

RUN_CONFIG = "lmforge_run.yaml"  # the training config, inside every artifact directory


def write_run_config(cfg: Config, out_dir: Path) -> None:
    (Path(out_dir) / RUN_CONFIG).write_text(cfg.to_yaml())


def run_config(path: str | Path, hint: str = "pass --data CONFIG to name the training config whose data to use"
               ) -> Config:
    """The training config an artifact carries (a directory's lmforge_run.yaml, or a GGUF's metadata)."""
    path = Path(path)
    if path.is_file() and path.suffix == ".gguf":
        from gguf import GGUFReader

        field = GGUFReader(str(path)).get_field("lmforge.run_config")
        if field is None:
            raise ConfigError(f"{path} carries no lmforge.run_config (not written by lmforge export); {hint}")
        return validate(yaml_load(field.contents()))
    found = path / RUN_CONFIG
    if not found.is_file():
        raise ConfigError(f"{path} has no {RUN_CONFIG} (not written by an lmforge tool); {hint}")
    return validate(yaml_load(found.read_text(), found))


# --------------------------------------------------------------------------- what an artifact is

DENSE_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
WEIGHT_SUFFIXES = DENSE_WEIGHT_SUFFIXES + (".gguf", ".onnx", ".data")


def kind(path: str | Path) -> str:
    """"gguf" (one file), "onnx" (model.onnx + tokenizer) or "hf" (a Hugging Face model directory)."""
    path = Path(path)
    if path.is_file() and path.suffix == ".gguf":
        return "gguf"
    if path.is_dir() and (path / "model.onnx").is_file():
        return "onnx"
    if path.is_dir() and (path / "config.json").is_file():
        return "hf"
    raise ConfigError(f"{path}: not a model artifact (a Hugging Face directory with config.json, an ONNX directory "
                      "with model.onnx, or a .gguf file)")


def quantization(hf_dir: str | Path) -> str:
    """How a Hugging Face directory stores its weights: "dense", "compressed-tensors" (quantized by
    llm-compressor), "torchao", or another quant_method. A compressed-tensors file with no
    quantization groups (a sparsity recipe) holds plain dense weights."""
    qc = json.loads((Path(hf_dir) / "config.json").read_text()).get("quantization_config") or {}
    method = qc.get("quant_method")
    if not method or (method == "compressed-tensors" and not qc.get("config_groups")):
        return "dense"
    return method


def require_dense_hf(path: str | Path, what: str) -> None:
    """`what` starts from dense Hugging Face weights: refuse GGUF, ONNX and quantized inputs clearly."""
    try:
        k = kind(path)
    except ConfigError:
        raise ConfigError(f"{path} is not a Hugging Face model directory (no config.json); `lmforge export` makes one") from None
    if k != "hf":
        raise ConfigError(f"{what} takes a Hugging Face model directory; {path} is {'an ONNX' if k == 'onnx' else 'a GGUF'}"
                          " artifact: pass the directory it was exported from")
    q = quantization(path)
    if q != "dense":
        raise ConfigError(f"{path} holds {q}-quantized weights; {what} starts from dense weights: pass the "
                          "directory it was compressed from")


def dense_hf_config(path: str | Path, what: str):
    """The transformers config of the dense Hugging Face directory `what` starts from (checked by
    require_dense_hf, and holding weight files)."""
    from transformers import AutoConfig

    path = Path(path)
    require_dense_hf(path, what)
    if not any(p.name.endswith(DENSE_WEIGHT_SUFFIXES) for p in path.iterdir()):
        raise ConfigError(f"{path} holds no weights (*.safetensors / *.bin)")
    try:
        return AutoConfig.from_pretrained(str(path), local_files_only=True)
    except (ValueError, OSError) as e:
        raise ConfigError(f"{path}/config.json is not a transformers config: {e}") from None


def refuse_unused(reason: str, **flags) -> None:
    """Calibration flags a run will not read are an error, not silently ignored: `flags` maps the
    option name (underscores for dashes) to its value, None when not given."""
    given = [f"--{name.replace('_', '-')}" for name, v in flags.items() if v is not None]
    if given:
        raise ConfigError(f"{reason}: {', '.join(given)} would be ignored")


def weight_bytes(path: str | Path) -> int:
    """Bytes of weight files only (no tokenizer or metadata), the same count for every tool."""
    path = Path(path)
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES]
    return sum(p.stat().st_size for p in files)


def carry(src_dir: str | Path, dst_dir: str | Path) -> None:
    """Copy the run config from one artifact directory to the next one derived from it."""
    src = Path(src_dir) / RUN_CONFIG
    if src.is_file():
        shutil.copy(src, Path(dst_dir) / RUN_CONFIG)


def require_causal(cfg: Config, what: str) -> None:
    """Compression, GGUF/ONNX and the perplexity report are for causal LMs (Task.causal)."""
    from lmforge.training import tasks

    if not tasks.get(cfg.task).causal:
        raise ConfigError(f"{what} works on causal language models (task {' or '.join(tasks.causal_names())}); "
                          f"this artifact was trained with task={cfg.task}")


def check_out(out: str | Path, overwrite: bool = False) -> Path:
    """Refuse an existing --out before any work starts (atomic_output checks again at the end)."""
    out = Path(out)
    if out.exists() and (out.is_file() or any(out.iterdir())) and not overwrite:
        raise ConfigError(f"--out {out} exists (pass --overwrite to replace it)")
    if out.resolve() == Path.cwd().resolve() or out.name in ("", ".", ".."):
        raise ConfigError(f"--out {out}: name a new file or directory, not the current one")
    return out


@contextlib.contextmanager
def atomic_output(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside `out` (a file or a directory); rename it to `out` only when the
    block finishes, so a crash or a refused input never leaves a half-written artifact under the
    final name. The temporary name is unique to this process: two runs aimed at the same --out do
    not delete each other's work."""
    out = check_out(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".tmp_{out.name}.{os.getpid()}")
    _remove(tmp)
    try:
        yield tmp
    except BaseException:
        _remove(tmp)
        raise
    if not tmp.exists():
        raise RuntimeError(f"nothing was written to {tmp}")
    try:
        check_out(out, overwrite)  # another process may have published it meanwhile
    except ConfigError:
        _remove(tmp)
        raise
    _remove(out)
    tmp.rename(out)


def _remove(p: Path) -> None:
    if p.is_dir():
        shutil.rmtree(p)
    elif p.exists():
        p.unlink()


def document_data(cfg: Config):
    """The run's data read as documents for calibration and perplexity: cfg.data, or for a preference
    run its pairs' chosen answers (PreferenceTask.documents)."""
    from lmforge.training import tasks

    documents = getattr(tasks.get(cfg.task), "documents", None)
    return documents(cfg) if documents else cfg.data


def _tokens(cfg: Config, split: str) -> "np.ndarray":
    import numpy as np

    from lmforge.training import data

    # SFT runs hold chat records; their data.paths still tokenize as a plain text stream through the
    # same tokenizer, which is what calibration and perplexity need (one definition for both tasks).
    require_causal(cfg, "held-out perplexity and calibration")
    data_cfg = document_data(cfg)
    # a data.mixture: its sources' streams one after another (they share the run's tokenizer)
    streams = [np.load(p.train_tokens if split == "train" else p.val_tokens, mmap_mode="r")
               for p in data.prepare_sources(data_cfg)]
    return streams[0] if len(streams) == 1 else np.concatenate(streams)


def _rows(stream: "np.ndarray", n: int | None, seq_len: int, what: str, flag: str) -> "torch.Tensor":
    import numpy as np
    import torch

    have = (len(stream) - 1) // seq_len
    if have < 1 or (n is not None and have < n):
        raise ConfigError(f"{what}: the data holds {len(stream)} tokens, {have} sequence(s) of {seq_len}; "
                          f"{n or 1} needed ({flag})")
    n = have if n is None else n
    return torch.from_numpy(np.asarray(stream[:n * seq_len + 1], dtype=np.int64)[:n * seq_len].reshape(n, seq_len).copy())


def _check_rows(n: int | None, seq_len: int, flags: str, max_positions: int | None) -> None:
    if n is not None and n < 1:
        raise ConfigError(f"{flags.split('/')[0]} {n}: at least 1")
    if seq_len < 2:
        raise ConfigError(f"--seq-len {seq_len}: at least 2 (perplexity and calibration need a next token)")
    if max_positions and seq_len > max_positions:
        raise ConfigError(f"--seq-len {seq_len} is longer than the model's max_position_embeddings {max_positions}")


def heldout_tokens(cfg: Config, max_seqs: int | None = 64, seq_len: int | None = None,
                   max_positions: int | None = None) -> "torch.Tensor":
    """[N, L] token ids from the run's held-out split, in order (the same rows for every artifact).
    Perplexity is over next-token predictions inside each row."""
    seq_len = seq_len or cfg.data.seq_len
    _check_rows(max_seqs, seq_len, "--eval-seqs/--seq-len", max_positions)
    stream = _tokens(cfg, "val")
    have = (len(stream) - 1) // seq_len
    return _rows(stream, min(max_seqs, have) if max_seqs else None, seq_len, "held-out tokens", "--eval-seqs/--seq-len")


def calibration_tokens(cfg: Config, n_samples: int, seq_len: int | None = None, max_positions: int | None = None,
                       vocab_size: int | None = None) -> "torch.Tensor":
    """[n_samples, L] token ids from the run's training split: calibration never sees held-out data."""
    seq_len = seq_len or cfg.data.seq_len
    _check_rows(n_samples, seq_len, "--calibration-samples/--seq-len", max_positions)
    tokens = _rows(_tokens(cfg, "train"), n_samples, seq_len, "calibration data", "--calibration-samples/--seq-len")
    if vocab_size is not None and int(tokens.max()) >= vocab_size:
        raise ConfigError(f"the calibration data's tokenizer emits ids up to {int(tokens.max())}, beyond the model's "
                          f"vocab_size {vocab_size}: --data names a config with another tokenizer")
    return tokens
