"""Pretraining: a causal LM on packed documents. Its data are training/data.py's cached token files
cut into fixed-length sequences (data.PackedTokens), its evaluation training/evaluate.py's held-out
loss and perplexity over eval.batches fixed micro batches per rank.

    lmforge train configs/debug.yaml --nproc 2
    lmforge prepare configs/demo.yaml              # tokenizer + token files only
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ..config import Config
from .common import NoRunState, TaskData

if TYPE_CHECKING:
    import torch


class Pretrain(NoRunState):
    name = "pretrain"
    recipe = "configs/debug.yaml"
    headline = "eval/ppl"
    causal = True
    parallel = ("data", "sequence", "tensor")
    auto_model = "AutoModelForCausalLM"
    peft_task_type = "CAUSAL_LM"
    mixtures = True

    def metrics(self, cfg: Config) -> tuple[str, ...]:
        return ("eval/loss", "eval/ppl")

    def prepare(self, cfg: Config, init_dir: Path | None, log) -> TaskData:
        from .. import data

        sources = data.prepare_sources(data_config(cfg, init_dir), log)
        # PackedTokens refuses a split with fewer tokens than one sequence: a ConfigError here, in preflight
        train, val = ([data.PackedTokens(p, cfg.data.seq_len) for p in paths]
                      for paths in ([s.train_tokens for s in sources], [s.val_tokens for s in sources]))
        prepared = sources[0]
        summary = {"tokenizer": str(prepared.tokenizer_dir), "train": str(prepared.train_tokens),
                   "val": str(prepared.val_tokens), **prepared.meta}
        if not cfg.data.mixture:
            return TaskData(data.load_tokenizer(prepared.tokenizer_dir), train[0], val[0], prepared.vocab_size,
                            prepared.eos_id, summary=summary)
        summary = {"tokenizer": str(prepared.tokenizer_dir),
                   "sources": {name: {"weight": round(w, 4), "train_rows": len(t), **s.meta} for name, w, t, s
                               in zip(cfg.data.source_names(), cfg.data.weights(), train, sources)}}
        return TaskData(data.load_tokenizer(prepared.tokenizer_dir), data.ConcatRows(train),
                        data.ConcatRows(val, interleave=True), prepared.vocab_size, prepared.eos_id, summary=summary,
                        source_rows=[len(t) for t in train])

    def model_inputs(self, inputs: torch.Tensor, targets: torch.Tensor, device, groups=None) -> tuple[dict, torch.Tensor]:
        from ..evaluate import model_inputs

        return model_inputs(inputs, targets, device, groups)

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        from ..evaluate import token_loss

        return token_loss(logits, targets)

    def evaluate(self, engine, data: TaskData, cfg: Config, groups, device) -> dict[str, float]:
        from .. import data as data_lib, evaluate

        batches = data_lib.eval_indices(len(data.eval), cfg.eval.batches, cfg.train.micro_batch_size,
                                        groups.dp_rank, groups.dp_size)
        return evaluate.evaluate(engine, data.eval, batches, device, groups)


def data_config(cfg: Config, init_dir: Path | None):
    """cfg.data, with model.init_from's tokenizer when data.tokenizer is unset (the model's own)."""
    if init_dir is not None and not cfg.data.tokenizer:
        return cfg.data.model_copy(update={"tokenizer": str(init_dir)})
    return cfg.data


TASK = Pretrain()
