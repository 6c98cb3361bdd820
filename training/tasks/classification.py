"""Sequence classification: `text` + `label` records; AutoModelForSequenceClassification (encoder
or decoder models); metrics accuracy, macro F1 and the majority baseline (scikit-learn).

    python -m lmforge.training.embedded classification /tmp/cls      # labelled data from the stdlib
    lmforge train configs/classification.yaml --nproc 2
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..config import Config, ConfigError, DataConfig
from .common import RecordTask, TaskData, label_names, pad, require_columns

if TYPE_CHECKING:
    import numpy as np
    import torch


@dataclass
class ClassificationExamples:
    ids: list[np.ndarray]
    labels: np.ndarray
    pad_id: int

    @property
    def tokens_per_row(self) -> float:
        """Mean tokens of a row, padding excluded (throughput counts these)."""
        import numpy as np

        return float(np.mean([len(x) for x in self.ids]))

    def __len__(self) -> int:
        return len(self.ids)

    def batch(self, indices) -> tuple[dict, torch.Tensor]:
        import numpy as np
        import torch

        rows = [self.ids[i] for i in indices]
        input_ids = pad(rows, self.pad_id)
        mask = pad([np.ones(len(r), dtype=np.int64) for r in rows], 0)
        return {"input_ids": input_ids, "attention_mask": mask}, torch.from_numpy(self.labels[list(indices)])

    def majority(self, n_labels: int) -> int:
        """The most frequent label (the smallest index on a tie): the baseline a classifier must beat."""
        import numpy as np

        return int(np.bincount(self.labels, minlength=n_labels).argmax())


def encode(cfg: Config, tok, records: list[dict], names: list[str]) -> ClassificationExamples:
    """Records → token ids (truncated to data.seq_len) and label indices."""
    import numpy as np

    index = {n: i for i, n in enumerate(names)}
    texts = [str(r.get(cfg.data.text_field) or "") for r in records]
    enc = tok(texts, add_special_tokens=True, truncation=True, max_length=cfg.data.seq_len)["input_ids"]
    ids = [np.asarray(e or [tok.pad_token_id], dtype=np.int64) for e in enc]
    label_key = cfg.data.label_field or "label"
    return ClassificationExamples(ids, np.asarray([index[str(r[label_key])] for r in records], dtype=np.int64),
                                  tok.pad_token_id)


class Classification(RecordTask):
    name = "classification"
    recipe = "configs/classification.yaml"
    headline = "eval/accuracy"
    auto_model = "AutoModelForSequenceClassification"
    peft_task_type = "SEQ_CLS"

    def metrics(self, cfg: Config) -> tuple[str, ...]:
        return ("eval/loss", "eval/accuracy", "eval/macro_f1")

    def texts(self, cfg: DataConfig, records: list[dict]):
        return (str(r.get(cfg.text_field, "")) for r in records)

    def examples(self, cfg: Config, tok, train: list[dict], held: list[dict], log):
        key = cfg.data.label_field or "label"
        require_columns(train, held, {cfg.data.text_field: "data.text_field", key: "data.label_field"})
        names = label_names(train, held, key, tagging=False)
        if len(names) < 2:
            raise ConfigError(f"classification needs at least 2 labels in the training data, found {names}")
        tr, ev = encode(cfg, tok, train, names), encode(cfg, tok, held, names)
        log.info(f"classification: {len(names)} labels, {len(tr)} training / {len(ev)} eval records; "
                 f"majority label {names[tr.majority(len(names))]!r}")
        return tr, ev, names

    def predictions(self, logits, targets, real):
        return list(zip(real, logits.argmax(-1)[:len(real)].tolist()))

    def scores(self, engine, data: TaskData, cfg: Config, groups, device, loss, predictions):
        names = data.labels
        gold = [names[g] for g in data.eval.labels[[i for i, _ in predictions]]]
        majority = names[data.train.majority(len(names))]
        return {f"eval/{k}": v for k, v in classification_metrics(
            [names[p] for _, p in predictions], gold, names, majority_label=majority).items()}


TASK = Classification()


# --------------------------------------------------------------------------- metrics

def most_frequent(labels: Sequence[Hashable]) -> Hashable:
    """The most frequent label; a tie goes to the smallest by str() so the answer never depends on
    the order records arrive in."""
    if len(labels) == 0:
        raise ValueError("most_frequent: no labels")
    counts = Counter(labels)
    return min(counts, key=lambda k: (-counts[k], str(k)))


def classification_metrics(preds: Sequence[Hashable], labels: Sequence[Hashable],
                           label_names: Sequence[Hashable] | None = None, *,
                           majority_label: Hashable | None = None) -> dict[str, float]:
    """{"accuracy", "macro_f1", "majority_baseline"} for predicted vs gold labels (compared as str).

    label_names: the task's classes; default the gold and predicted labels seen. A prediction
    outside them (a generative model may answer "jsn") counts as wrong, for accuracy and as a miss
    of the gold class for F1. macro_f1 averages over the label_names present in gold or
    predictions: a class in neither has no defined F1, and counting it as 0 would punish a small eval set for
    its sampling.
    majority_label: the baseline's constant answer. Pass the most frequent TRAINING label
    (`most_frequent(train_labels)`): that is the model a classifier must beat. Default: the most
    frequent gold label here, which is the best constant on this set, an optimistic baseline.
    scikit-learn is imported here: only runs that score classification need it."""
    from sklearn.metrics import f1_score

    if len(preds) != len(labels):
        raise ValueError(f"classification_metrics: {len(preds)} predictions for {len(labels)} labels")
    if len(labels) == 0:
        raise ValueError("classification_metrics: no examples")
    # Compared as str: sklearn refuses a mix of int and str labels, which a model's decoded answer
    # ("3") against integer class ids would be, and "3" == 3 is what a reader means.
    y, p = [str(v) for v in labels], [str(v) for v in preds]
    names = [str(v) for v in label_names] if label_names is not None else sorted(set(y) | set(p))
    scored = [n for n in names if n in set(y) | set(p)]
    macro_f1 = f1_score(y, p, labels=scored, average="macro", zero_division=0) if scored else 0.0
    baseline = str(most_frequent(labels) if majority_label is None else majority_label)
    return {"accuracy": sum(a == b for a, b in zip(p, y)) / len(y),
            "macro_f1": float(macro_f1),
            "majority_baseline": sum(v == baseline for v in y) / len(y)}
