"""Task metrics for fine-tuned models: classification (accuracy, macro F1, majority baseline),
NER (entity-level precision/recall/F1 with seqeval, token accuracy) and corpus BLEU (sacrebleu).

    python -c "from lmforge.training.task_metrics import bleu; print(bleu(['the cat sat on the mat'], ['the cat sat on the mat']))"

The scoring libraries are imported inside the functions: they are only needed by runs that score
those tasks, and importing this module must not fail without them. Needs scikit-learn, seqeval
and sacrebleu (seqeval ships only an sdist whose setup_requires breaks under pip's build isolation
today: `pip install setuptools_scm && pip install --no-build-isolation seqeval`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable, Sequence


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
    frequent gold label here, which is the best constant on this set, an optimistic baseline."""
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


def ner_metrics(pred_tag_seqs: Sequence[Sequence[str]], gold_tag_seqs: Sequence[Sequence[str]]) -> dict[str, float]:
    """{"entity_precision", "entity_recall", "entity_f1", "token_accuracy"} for BIO tag sequences.

    Entity scores are seqeval's default (CoNLL-2000 conlleval) mode: an entity counts only if its
    type and both ends match; an I-X that follows O or another type starts a new entity, as
    conlleval reads a model's ill-formed output. token_accuracy is the share of tags equal to gold,
    O included, so it is high even for a model that finds no entity at all: report entity_f1."""
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


def bleu(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU (0-100) of hypotheses against one reference each, sacrebleu's defaults (13a
    tokenization, exponential smoothing), so scores compare with published sacrebleu numbers.

    Corpus BLEU pools n-gram counts over all sentences: a corpus made only of sentences shorter
    than 4 tokens has no 4-grams and scores 0 even when every hypothesis is exact."""
    import sacrebleu

    if len(hypotheses) != len(references):
        raise ValueError(f"bleu: {len(hypotheses)} hypotheses for {len(references)} references")
    if not hypotheses:
        raise ValueError("bleu: no hypotheses")
    return float(sacrebleu.corpus_bleu(list(hypotheses), [list(references)]).score)
