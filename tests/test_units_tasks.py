"""Task losses and the distributed evaluation on in-process gloo ranks (tests/harness.py): tasks.common.loss_sum
counts only the targets that count, and tasks.evaluate (each rank's share of the eval set, padded to
equal batch counts, sums all-reduced, predictions gathered) gives the same loss and metrics on 2 ranks
as on 1 and as a plain loop over the examples, for classification, NER and SFT. Learning itself (the
tasks beat their baselines through the CLI) is in tests/test_finetune.py."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from harness import run_ranks
# every lmforge name this file uses (one place to follow a rename)
from lmforge.training import tasks
from lmforge.training.config import load_config
from lmforge.training.parallel import RankGroups
from lmforge.training.tasks.classification import ClassificationExamples, classification_metrics
from lmforge.training.tasks.common import IGNORE, TaskData, loss_sum
from lmforge.training.tasks.ner import TaggingExamples, ner_metrics
from lmforge.training.tasks.sft import CausalExamples

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
VOCAB, N_EVAL, MICRO = 40, 11, 4   # 11 examples, micro batch 4: on 2 ranks, 6 + 5 (one padding row)
LABELS = ["asyncio", "email", "json"]
TAGS = ["O", "B-NAME", "I-NAME"]


class TinyModel(torch.nn.Module):
    """Padding-invariant, so a row's logits do not depend on the batch it is in: `pool` (a
    classifier: masked mean of the embeddings) or per token (a tagger or a causal LM with positions)."""

    def __init__(self, out: int, pool: bool):
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.pos, self.head, self.pool = (torch.nn.Embedding(VOCAB, 8), torch.nn.Embedding(64, 8),
                                                    torch.nn.Linear(8, out), pool)

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        h = self.emb(input_ids) + (self.pos(position_ids) if position_ids is not None else 0)
        if self.pool:
            m = attention_mask.unsqueeze(-1).float()
            return self.head((h * m).sum(1) / m.sum(1))
        return self.head(h)


class Engine:
    """What tasks.evaluate uses of a DeepSpeed engine."""

    def __init__(self, module):
        self.module = module

    def __call__(self, **kwargs):
        return SimpleNamespace(logits=self.module(**kwargs))

    def eval(self):
        self.module.eval()

    def train(self, mode=True):
        self.module.train(mode)


def examples(task: str):
    rng = np.random.default_rng(1)
    ids = [rng.integers(1, VOCAB, size=int(rng.integers(3, 12))) for _ in range(N_EVAL)]
    if task == "classification":
        return ClassificationExamples(ids, rng.integers(0, len(LABELS), size=N_EVAL), pad_id=0)
    if task == "ner":
        targets = [np.where(rng.random(len(x)) < 0.7, rng.integers(0, len(TAGS), size=len(x)), IGNORE) for x in ids]
        return TaggingExamples(ids, targets, [int((t != IGNORE).sum()) for t in targets], pad_id=0)
    inputs = [x[:-1] for x in ids]
    targets = [np.where(np.arange(len(x) - 1) < len(x) // 2, IGNORE, x[1:]) for x in ids]  # the "response" half
    return CausalExamples(inputs, targets, [np.arange(len(x)) for x in inputs], pad_id=0, seq_len=16)


def setup(task: str):
    extra = ["eval.generate=0"] if task == "sft" else []
    cfg = load_config(CONFIGS / f"{task}.yaml", [f"train.micro_batch_size={MICRO}", f"train.global_batch_size={2 * MICRO}",
                                                 *extra])
    data = examples(task)
    labels = {"classification": LABELS, "ner": TAGS}.get(task)
    model = TinyModel({"classification": len(LABELS), "ner": len(TAGS)}.get(task, VOCAB), pool=task == "classification")
    return cfg, TaskData(tokenizer=None, train=data, eval=data, vocab_size=VOCAB, eos_id=0, labels=labels), model


def evaluate_tasks() -> dict:
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    out = {}
    for task in ("classification", "ner", "sft"):
        cfg, data, model = setup(task)
        model.train()
        out[task] = tasks.get(task).evaluate(Engine(model), data, cfg, RankGroups(rank, world), torch.device("cpu"))
        out[task + "/mode_kept"] = model.training  # evaluate puts the engine back in training mode
    return out


@pytest.fixture(scope="module")
def one_rank():
    return run_ranks(evaluate_tasks, 1)[0]


@pytest.fixture(scope="module")
def two_ranks():
    return run_ranks(evaluate_tasks, 2)


def plain(task: str) -> dict:
    """The eval loss and predictions by a loop over single examples, no ranks, no batching."""
    _, data, model = setup(task)
    total, count, preds = 0.0, 0, []
    with torch.no_grad():
        for i in range(len(data.eval)):
            inputs, targets = data.eval.batch([i])
            logits = model(**inputs)
            keep = targets != IGNORE
            total += F.cross_entropy(logits.reshape(-1, logits.size(-1))[keep.reshape(-1)], targets[keep],
                                     reduction="sum").item()
            count += int(keep.sum())
            preds.append(logits.argmax(-1)[0] if task == "classification" else logits.argmax(-1)[0][keep[0]])
    return {"loss": total / count, "preds": preds, "data": data}


@pytest.mark.parametrize("task", ["classification", "ner", "sft"])
def test_evaluate_on_two_ranks_equals_one_rank_and_a_plain_loop(task, one_rank, two_ranks):
    r0, r1 = two_ranks
    assert r0[task] == r1[task]  # every rank has the same metrics (early stopping decides on them)
    assert r0[task + "/mode_kept"] and one_rank[task + "/mode_kept"]
    assert r0[task].keys() == one_rank[task].keys()
    for key, value in one_rank[task].items():  # the loss sums float32 batch sums: batching moves its last bits
        assert r0[task][key] == (pytest.approx(value, rel=1e-6) if key in ("eval/loss", "eval/ppl") else value), key
    ref = plain(task)
    assert r0[task]["eval/loss"] == pytest.approx(ref["loss"], rel=1e-6)
    data = ref["data"]
    if task == "classification":
        expected = classification_metrics([LABELS[int(p)] for p in ref["preds"]], [LABELS[g] for g in data.eval.labels],
                                          LABELS, majority_label=LABELS[data.train.majority(len(LABELS))])
    elif task == "ner":
        expected = ner_metrics([[TAGS[int(t)] for t in p] for p in ref["preds"]],
                                            [[TAGS[t] for t in data.eval.targets[i][data.eval.targets[i] != IGNORE]]
                                             for i in range(N_EVAL)])
    else:
        expected = {"ppl": math.exp(ref["loss"])}
    for key, value in expected.items():
        assert r0[task][f"eval/{key}"] == pytest.approx(value, rel=1e-6), key


def test_loss_sum_counts_only_the_targets_that_count():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    targets = torch.tensor([[1, IGNORE, 3, 4, IGNORE], [IGNORE, IGNORE, 0, 6, 2]])
    total, count = loss_sum(logits, targets)
    keep = targets != IGNORE
    assert count == 6
    torch.testing.assert_close(total, F.cross_entropy(logits[keep], targets[keep], reduction="sum"))
    moved = logits.clone()
    moved[~keep] += 10.0  # logits of ignored positions count for nothing
    torch.testing.assert_close(loss_sum(moved, targets)[0], total)
    summed, none = loss_sum(logits, torch.full((2, 5), IGNORE))
    assert none == 0 and summed.item() == 0.0
