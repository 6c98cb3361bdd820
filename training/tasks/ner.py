"""Named-entity recognition: `tokens` (words) + `tags` (BIO per word) records;
AutoModelForTokenClassification; each word's label sits on its first sub-word token, the others are
ignored (-100). Metrics: seqeval's entity precision/recall/F1 and token accuracy.

    python -m lmforge.training.embedded ner /tmp/ner      # labelled data from the stdlib
    lmforge train configs/ner.yaml --nproc 2

seqeval ships only an sdist whose setup_requires breaks under pip's build isolation today:
`pip install setuptools_scm && pip install --no-build-isolation seqeval`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..config import Config, ConfigError, DataConfig
from .common import IGNORE, RecordTask, TaskData, label_names, pad, require_columns

if TYPE_CHECKING:
    import numpy as np
    import torch


@dataclass
class TaggingExamples:
    ids: list[np.ndarray]
    targets: list[np.ndarray]   # per token: tag index on a word's first sub-word, else -100
    words: list[int]            # words per record (truncation may drop some from `targets`)
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

        rows = [self.ids[i] for i in indices]
        mask = pad([np.ones(len(r), dtype=np.int64) for r in rows], 0)
        return ({"input_ids": pad(rows, self.pad_id), "attention_mask": mask},
                pad([self.targets[i] for i in indices], IGNORE))


def encode(cfg: Config, tok, records: list[dict], names: list[str]) -> TaggingExamples:
    """Records → sub-word token ids (truncated to data.seq_len) and per-token targets."""
    import numpy as np

    index = {n: i for i, n in enumerate(names)}
    tag_key = cfg.data.label_field or "tags"
    ids, targets, words = [], [], []
    for r in records:
        w, t = [str(x) for x in r[cfg.data.words_field]], [str(x) for x in r[tag_key]]
        if len(w) != len(t):
            raise ConfigError(f"ner: a record has {len(w)} words but {len(t)} tags: {w[:8]}…")
        enc = tok(w, is_split_into_words=True, add_special_tokens=True, truncation=True,
                  max_length=cfg.data.seq_len)
        target, last = np.full(len(enc["input_ids"]), IGNORE, dtype=np.int64), None
        for pos, wid in enumerate(enc.word_ids()):
            if wid is not None and wid != last:
                target[pos] = index[t[wid]]
            last = wid
        ids.append(np.asarray(enc["input_ids"], dtype=np.int64))
        targets.append(target)
        words.append(len(w))
    return TaggingExamples(ids, targets, words, tok.pad_token_id)


class Ner(RecordTask):
    name = "ner"
    recipe = "configs/ner.yaml"
    headline = "eval/entity_f1"
    auto_model = "AutoModelForTokenClassification"
    peft_task_type = "TOKEN_CLS"

    def metrics(self, cfg: Config) -> tuple[str, ...]:
        return ("eval/loss", "eval/entity_precision", "eval/entity_recall", "eval/entity_f1", "eval/token_accuracy")

    def texts(self, cfg: DataConfig, records: list[dict]):
        return (" ".join(map(str, r.get(cfg.words_field) or [])) for r in records)

    def examples(self, cfg: Config, tok, train: list[dict], held: list[dict], log):
        key = cfg.data.label_field or "tags"
        require_columns(train, held, {cfg.data.words_field: "data.words_field", key: "data.label_field"})
        names = label_names(train, held, key, tagging=True)
        bad = [t for t in names if t != "O" and not (t[:2] in ("B-", "I-") and len(t) > 2)]
        if bad:
            raise ConfigError(f"ner: tags must be BIO (O, B-TYPE, I-TYPE); found {bad[:5]}")
        tr, ev = encode(cfg, tok, train, names), encode(cfg, tok, held, names)
        log.info(f"ner: tags {names}, {len(tr)} training / {len(ev)} eval records")
        return tr, ev, names

    def predictions(self, logits, targets, real):
        arg = logits.argmax(-1).cpu()
        return [(i, arg[k][targets[k] != IGNORE].tolist()) for k, i in enumerate(real)]

    def scores(self, engine, data: TaskData, cfg: Config, groups, device, loss, predictions):
        names, targets = data.labels, data.eval.targets
        gold, pred = [], []
        for i, p in predictions:
            # the words that data.seq_len kept (truncation drops the rest from both sides)
            gold.append([names[t] for t in targets[i][targets[i] != IGNORE]])
            pred.append([names[t] for t in p])
        return {f"eval/{k}": v for k, v in ner_metrics(pred, gold).items()}


TASK = Ner()


# --------------------------------------------------------------------------- metrics

def ner_metrics(pred_tag_seqs: Sequence[Sequence[str]], gold_tag_seqs: Sequence[Sequence[str]]) -> dict[str, float]:
    """{"entity_precision", "entity_recall", "entity_f1", "token_accuracy"} for BIO tag sequences.

    Entity scores are seqeval's default (CoNLL-2000 conlleval) mode: an entity counts only if its
    type and both ends match; an I-X that follows O or another type starts a new entity, as
    conlleval reads a model's ill-formed output. token_accuracy is the share of tags equal to gold,
    O included, so it is high even for a model that finds no entity at all: report entity_f1.
    seqeval is imported here: only runs that score NER need it."""
    from seqeval.metrics import accuracy_score, f1_score, precision_score, recall_score

    if len(pred_tag_seqs) != len(gold_tag_seqs):
        raise ValueError(f"ner_metrics: {len(pred_tag_seqs)} predicted sequences for {len(gold_tag_seqs)} gold")
    for i, (p, g) in enumerate(zip(pred_tag_seqs, gold_tag_seqs)):
        if len(p) != len(g):
            raise ValueError(f"ner_metrics: sequence {i} has {len(p)} predicted tags for {len(g)} gold tags")
    if not any(len(g) for g in gold_tag_seqs):
        raise ValueError("ner_metrics: no tags")
    pred = [list(p) for p in pred_tag_seqs]
    gold = [list(g) for g in gold_tag_seqs]
    # zero_division=0: no gold and no predicted entities is a score of 0 here, without a warning per call
    return {"entity_precision": float(precision_score(gold, pred, zero_division=0)),
            "entity_recall": float(recall_score(gold, pred, zero_division=0)),
            "entity_f1": float(f1_score(gold, pred, zero_division=0)),
            "token_accuracy": float(accuracy_score(gold, pred))}
