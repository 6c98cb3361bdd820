"""Labelled data from the standard library's sources (training/embedded.py) and the task metrics
(training/tasks/: classification.py, ner.py, sft.py): files written, byte-identical rebuilds, the
split by file, sane labels, and the metrics on examples whose answers are known.

    pytest tests/test_embedded.py
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from lmforge.training import embedded

# Small packages keep each build near a second; the defaults are exercised once through the CLI.
PACKAGES = ["json", "concurrent", "http"]


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict:
    """Each task built twice into separate directories: (result, second result) by name."""
    out = {}
    for name, task, kw in (("classification", "classification", {}), ("ner", "ner", {}),
                           ("sft", "sft", {}), ("sft_chat", "sft", {"schema": "messages"}),
                           ("sft_alpaca", "sft", {"schema": "alpaca"}), ("sft_sharegpt", "sft", {"schema": "sharegpt"})):
        runs = [embedded.build(task, tmp_path_factory.mktemp(f"{name}{i}"), max_train=400, max_eval=90,
                               seed=0, packages=PACKAGES, **kw) for i in range(2)]
        out[name] = runs
    return out


@pytest.mark.parametrize("name", ["classification", "ner", "sft", "sft_chat", "sft_alpaca", "sft_sharegpt"])
def test_deterministic_split_by_file(built, name):
    first, second = built[name]
    for split in ("train", "eval"):
        assert first[split].read_bytes() == second[split].read_bytes()  # same bytes, every run
        assert not list(first[split].parent.glob("*.tmp"))  # the atomic write left no temporary
    train, evals = _read(first["train"]), _read(first["eval"])
    assert first["counts"] == {"train": len(train), "eval": len(evals)}
    assert 0 < len(train) <= 400 and 0 < len(evals) <= 90
    train_files, eval_files = {r["source"] for r in train}, {r["source"] for r in evals}
    assert not train_files & eval_files
    assert {f.split("/")[0] for f in train_files | eval_files} <= set(PACKAGES)


def test_split_files_every_default_package_on_both_sides():
    for pkg in embedded.available_packages(embedded.DEFAULT_PACKAGES):
        files = embedded.package_files(pkg)
        train, evals = embedded.split_files(files, seed=0)
        assert train and evals and sorted(train + evals) == files, pkg
        assert not any("/test/" in f or "/tests/" in f for f in files)


def test_classification_labels(built):
    train, evals = _read(built["classification"][0]["train"]), _read(built["classification"][0]["eval"])
    train_labels = {r["label"] for r in train}
    assert train_labels == set(PACKAGES)  # >= 3 classes, and every one has training files
    assert {r["label"] for r in evals} <= train_labels
    for r in train + evals:
        assert r["source"].startswith(r["label"] + "/")
        assert 0 < len(r["text"]) <= embedded.SNIPPET_CHARS
        # the package names are masked: the label cannot be read off the snippet
        assert not re.search(r"\b(json|concurrent|http)\b", r["text"], re.IGNORECASE), r["text"]
    per_class = {lab: sum(r["label"] == lab for r in train) for lab in train_labels}
    assert max(per_class.values()) <= 400 // len(PACKAGES)


def _valid_bio(tags: list[str]) -> bool:
    prev = "O"
    for t in tags:
        if t.startswith("I-") and prev[2:] != t[2:]:
            return False
        prev = t
    return True


def test_ner_tags(built):
    records = _read(built["ner"][0]["train"]) + _read(built["ner"][0]["eval"])
    allowed = {"O"} | {f"{p}-{t}" for p in "BI" for t in embedded.NER_TYPES}
    for r in records:
        assert len(r["tokens"]) == len(r["tags"]) >= embedded.NER_MIN_TOKENS
        assert set(r["tags"]) <= allowed and _valid_bio(r["tags"]), r
    types = {t[2:] for r in records for t in r["tags"] if t != "O"}
    assert len(types) >= 3
    assert any("I-NAME" in r["tags"] for r in records)  # multi-token entities exist: BIO means something


def test_bio_tags_by_hand():
    src = "x = os.path.join('a' 'b', 1) if y else None\nz = f'{x.y!r:>{w}} z'  # comment\n"
    (line1, toks1), (line2, toks2) = embedded._logical_lines(src)
    assert (line1, [s for _, s in toks1]) == (1, ["x", "=", "os", ".", "path", ".", "join", "(", "'a'", "'b'", ",",
                                                  "1", ")", "if", "y", "else", "None"])
    assert embedded.bio_tags(toks1) == ["B-NAME", "O", "B-NAME", "I-NAME", "I-NAME", "I-NAME", "I-NAME", "O",
                                        "B-STRING", "I-STRING", "O", "B-NUMBER", "O",
                                        "B-KEYWORD", "B-NAME", "B-KEYWORD", "B-KEYWORD"]
    # an f-string is one STRING word on every Python (3.12+ tokenizes it into pieces); comments go
    assert (line2, toks2) == (2, [("NAME", "z"), ("OP", "="), ("STRING", "f'{x.y!r:>{w}} z'")])


def test_sft_records(built):
    for r in _read(built["sft"][0]["train"]) + _read(built["sft"][0]["eval"]):
        assert r["prompt"].strip() and r["response"].strip()
        assert "`" in r["prompt"] and "\n" not in r["response"]
    for r in _read(built["sft_chat"][0]["train"]):
        assert [m["role"] for m in r["messages"]] == ["user", "assistant"]
        assert all(m["content"].strip() for m in r["messages"])
    # the two forms hold the same pairs
    plain = _read(built["sft"][0]["train"])
    chat = _read(built["sft_chat"][0]["train"])
    assert [(r["prompt"], r["response"]) for r in plain] == [(r["messages"][0]["content"], r["messages"][1]["content"])
                                                            for r in chat]
    alpaca = _read(built["sft_alpaca"][0]["train"])
    assert [(r["prompt"], r["response"]) for r in plain] == [(r["instruction"], r["output"]) for r in alpaca]
    sharegpt = _read(built["sft_sharegpt"][0]["train"])
    assert {tuple(t["from"] for t in r["conversations"]) for r in sharegpt} == {("system", "human", "gpt")}
    assert [(r["prompt"], r["response"]) for r in plain] == [(r["conversations"][1]["value"], r["conversations"][2]["value"])
                                                            for r in sharegpt]
    # each shape reads back through the sft task's own conversion (and detection) as the same exchange
    from lmforge.training.config import DataConfig
    from lmforge.training.tasks import sft

    cfg = DataConfig(paths=["x"])
    for shape, records in (("alpaca", alpaca), ("sharegpt", sharegpt)):
        assert sft.detect_schema(cfg, records[0]) == shape
        convs = [sft.SCHEMAS[shape](cfg, r) for r in records]
        assert [(c[-2]["content"], c[-1]["content"]) for c in convs] == [(r["prompt"], r["response"]) for r in plain]
        assert [c[-1]["role"] for c in convs] == ["assistant"] * len(plain)


def test_cli_defaults(tmp_path):
    """The documented command, with the default packages (the whole stdlib for sft is slower)."""
    proc = subprocess.run([sys.executable, "-m", "lmforge.training.embedded", "classification", str(tmp_path),
                           "--max-train", "700", "--max-eval", "140"], capture_output=True, text=True, check=True)
    assert "train" in proc.stdout and "asyncio=" in proc.stdout, proc.stdout
    labels = {r["label"] for r in _read(tmp_path / "train.jsonl")}
    assert labels == set(embedded.available_packages(embedded.DEFAULT_PACKAGES))


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="task must be one of"):
        embedded.build("translation", tmp_path)
    with pytest.raises(ValueError, match="not stdlib packages"):
        embedded.build("ner", tmp_path, packages=["json", "no_such_package"])
    with pytest.raises(ValueError, match=">= 2 files"):
        embedded.build("classification", tmp_path, packages=["json", "argparse"])  # argparse is one module
    assert not list(tmp_path.iterdir())  # nothing written when the arguments are wrong


# --------------------------------------------------------------------------- metrics

def test_classification_metrics():
    pytest.importorskip("sklearn")
    from lmforge.training.tasks.classification import classification_metrics, most_frequent

    labels = ["a", "a", "a", "b", "c", "c"]
    preds = ["a", "a", "b", "b", "c", "a"]
    m = classification_metrics(preds, labels, ["a", "b", "c"], majority_label=most_frequent(["c", "c", "a"]))
    # per class F1: a = 2·2/(2·2+1+1) = 2/3, b = 2·1/(2·1+1+0) = 2/3, c = 2·1/(2·1+0+1) = 2/3
    assert m == pytest.approx({"accuracy": 4 / 6, "macro_f1": 2 / 3, "majority_baseline": 2 / 6})
    assert classification_metrics(preds, labels)["majority_baseline"] == pytest.approx(3 / 6)  # gold majority: a
    # a class in neither gold nor predictions is left out of the macro average, not scored 0
    assert classification_metrics(preds, labels, ["a", "b", "c", "d"])["macro_f1"] == pytest.approx(2 / 3)
    # ints and their decoded strings compare equal; an answer outside the classes is wrong
    assert classification_metrics(["1", 0, "zero"], [1, 0, 0], [0, 1])["accuracy"] == pytest.approx(2 / 3)
    assert most_frequent(["b", "a", "b", "a"]) == "a"  # ties: the smallest, whatever the order
    with pytest.raises(ValueError):
        classification_metrics(["a"], ["a", "b"])


def test_ner_metrics_seqeval_example():
    pytest.importorskip("seqeval")
    from lmforge.training.tasks.ner import ner_metrics

    # seqeval's README example: one of two gold entities found exactly, and one wrong span
    gold = [["O", "O", "O", "B-MISC", "I-MISC", "I-MISC", "O"], ["B-PER", "I-PER", "O"]]
    pred = [["O", "O", "B-MISC", "I-MISC", "I-MISC", "I-MISC", "O"], ["B-PER", "I-PER", "O"]]
    assert ner_metrics(pred, gold) == pytest.approx(
        {"entity_precision": 0.5, "entity_recall": 0.5, "entity_f1": 0.5, "token_accuracy": 0.8})
    assert ner_metrics(gold, gold)["entity_f1"] == 1.0
    with pytest.raises(ValueError, match="sequence 1"):
        ner_metrics([["O"], ["O"]], [["O"], ["O", "O"]])


def test_bleu():
    pytest.importorskip("sacrebleu")
    from lmforge.training.tasks.sft import bleu

    refs = ["Serialize obj to a JSON formatted str.", "Return a new event loop for the current thread."]
    assert bleu(refs, refs) == pytest.approx(100.0)
    assert 0.0 < bleu(["Serialize obj to a JSON string.", "Return the event loop."], refs) < 100.0
    assert bleu(["nothing alike here at all", "completely different words in it"], refs) == 0.0
    with pytest.raises(ValueError):
        bleu(["a"], [])
