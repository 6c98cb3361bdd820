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
import shutil
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from lmforge.training.config import Config, ConfigError, validate, yaml_load

RUN_CONFIG = "lmforge_run.yaml"  # the training config, inside every artifact directory
CAUSAL_TASKS = ("pretrain", "sft")  # compression, GGUF/ONNX and the perplexity report are for causal LMs


def write_run_config(cfg: Config, out_dir: Path) -> None:
    (Path(out_dir) / RUN_CONFIG).write_text(cfg.to_yaml())


def run_config(path: str | Path) -> Config:
    """The training config an artifact carries (a directory's lmforge_run.yaml, or a GGUF's metadata)."""
    path = Path(path)
    if path.is_file() and path.suffix == ".gguf":
        from gguf import GGUFReader

        field = GGUFReader(str(path)).get_field("lmforge.run_config")
        if field is None:
            raise ConfigError(f"{path} carries no lmforge.run_config (not written by lmforge export); pass --data CONFIG")
        return validate(yaml_load(field.contents()))
    found = path / RUN_CONFIG
    if not found.is_file():
        raise ConfigError(f"{path} has no {RUN_CONFIG} (not written by lmforge export/compress); pass --data CONFIG "
                          "to name the training config whose data to use")
    return validate(yaml_load(found.read_text()))


def carry(src_dir: str | Path, dst_dir: str | Path) -> None:
    """Copy the run config from one artifact directory to the next one derived from it."""
    src = Path(src_dir) / RUN_CONFIG
    if src.is_file():
        shutil.copy(src, Path(dst_dir) / RUN_CONFIG)


def require_causal(cfg: Config, what: str) -> None:
    if cfg.task not in CAUSAL_TASKS:
        raise ConfigError(f"{what} works on causal language models (task {' or '.join(CAUSAL_TASKS)}); "
                          f"this artifact was trained with task={cfg.task}")


@contextlib.contextmanager
def atomic_output(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside `out` (a file or a directory); rename it to `out` only when the
    block finishes, so a crash or a refused input never leaves a half-written artifact under the
    final name."""
    out = Path(out)
    if out.exists() and (out.is_file() or any(out.iterdir())):
        if not overwrite:
            raise ConfigError(f"--out {out} exists (pass --overwrite to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(".tmp_" + out.name)
    _remove(tmp)
    try:
        yield tmp
    except BaseException:
        _remove(tmp)
        raise
    if not tmp.exists():
        raise RuntimeError(f"nothing was written to {tmp}")
    _remove(out)
    tmp.rename(out)


def _remove(p: Path) -> None:
    if p.is_dir():
        shutil.rmtree(p)
    elif p.exists():
        p.unlink()


def _tokens(cfg: Config, split: str) -> np.ndarray:
    from lmforge.training import data

    # SFT runs hold chat records; their data.paths still tokenize as a plain text stream through the
    # same tokenizer, which is what calibration and perplexity need (one definition for both tasks).
    require_causal(cfg, "held-out perplexity and calibration")
    prepared = data.prepare(cfg.data)
    return np.load(prepared.train_tokens if split == "train" else prepared.val_tokens, mmap_mode="r")


def _rows(stream: np.ndarray, n: int | None, seq_len: int, what: str, flag: str) -> torch.Tensor:
    have = (len(stream) - 1) // seq_len
    if have < 1 or (n is not None and have < n):
        raise ConfigError(f"{what}: the data holds {len(stream)} tokens, {have} sequence(s) of {seq_len}; "
                          f"{n or 1} needed ({flag})")
    n = have if n is None else n
    return torch.from_numpy(np.asarray(stream[:n * seq_len + 1], dtype=np.int64)[:n * seq_len].reshape(n, seq_len).copy())


def heldout_tokens(cfg: Config, max_seqs: int | None = 64, seq_len: int | None = None) -> torch.Tensor:
    """[N, L] token ids from the run's held-out split, in order (the same rows for every artifact).
    Perplexity is over next-token predictions inside each row."""
    seq_len = seq_len or cfg.data.seq_len
    stream = _tokens(cfg, "val")
    have = (len(stream) - 1) // seq_len
    return _rows(stream, min(max_seqs, have) if max_seqs else None, seq_len, "held-out tokens", "--eval-seqs/--seq-len")


def calibration_tokens(cfg: Config, n_samples: int, seq_len: int | None = None) -> torch.Tensor:
    """[n_samples, L] token ids from the run's training split: calibration never sees held-out data."""
    seq_len = seq_len or cfg.data.seq_len
    return _rows(_tokens(cfg, "train"), n_samples, seq_len, "calibration data", "--calibration-samples/--seq-len")
