"""The embedded preference pairs (training/embedded.py `preference`): split by file, chosen !=
rejected, both corruptions present, the same pairs in both record shapes, byte-identical rebuilds,
and `{embedded:preference}` resolved through the tasks' embedded_paths.

    pytest tests/test_units_embedded_preference.py
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmforge.training import embedded

# Two small packages keep a build well under a second; the defaults are built once, via embedded_paths.
PACKAGES = ["json", "http", "concurrent"]


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict:
    """prompt-schema builds twice, and one messages-schema build, of PACKAGES."""
    out = {f"prompt{i}": embedded.build("preference", tmp_path_factory.mktemp(f"pref{i}"), max_train=300,
                                        max_eval=60, packages=PACKAGES) for i in range(2)}
    out["messages"] = embedded.build("preference", tmp_path_factory.mktemp("pref_msg"), max_train=300,
                                     max_eval=60, packages=PACKAGES, schema="messages")
    return out


def test_split_by_file_and_pairs(built):
    res = built["prompt0"]
    train, evals = _read(res["train"]), _read(res["eval"])
    assert res["counts"] == {"train": len(train), "eval": len(evals)} and train and evals
    assert not {r["source"] for r in train} & {r["source"] for r in evals}  # no file on both sides
    for r in train + evals:
        assert set(r) == {"prompt", "chosen", "rejected", "source", "line", "corruption"}
        assert r["chosen"] != r["rejected"] and r["corruption"] in embedded.CORRUPTIONS
        assert r["prompt"].startswith(f"Continue this function from `{r['source']}`:\n")
        assert len(r["prompt"]) <= embedded.PREF_PROMPT_CHARS and len(r["chosen"]) <= embedded.PREF_CHOSEN_CHARS
        assert len(r["prompt"]) + len(r["chosen"]) <= embedded.PREF_PAIR_CHARS
        chosen = r["chosen"].split("\n")
        assert embedded.PREF_CHOSEN_LINES[0] <= len(chosen) <= embedded.PREF_CHOSEN_LINES[1]
        assert max(map(len, r["prompt"].split("\n") + chosen)) <= embedded.PREF_LINE_CHARS
        # the chosen lines are the source's own, right after the prompt's (the header line is `line`)
        src = (embedded.stdlib_dir() / r["source"]).read_text(encoding="utf-8").split("\n")
        assert src[r["line"] - 1].rstrip() == r["prompt"].split("\n")[1]
        body = iter(ln.rstrip() for ln in src[r["line"]:])
        assert all(any(ln == c for ln in body) for c in chosen)  # in this order (blank/comment lines skipped)
        if r["corruption"] == "shuffled":  # the same lines in another order
            assert sorted(r["rejected"].split("\n")) == sorted(chosen)
        else:  # the same shape, other names: only identifier characters differ
            assert len(r["rejected"].split("\n")) == len(chosen)
            assert [c for c in r["rejected"] if not (c.isalnum() or c == "_")] == \
                   [c for c in r["chosen"] if not (c.isalnum() or c == "_")]
    for split in (train, evals):
        assert {r["corruption"] for r in split} == set(embedded.CORRUPTIONS)  # every kind, on both sides
    assert res["distribution"]["train"]["swapped"] <= 0.4 * len(train)
    assert set(res["lengths"]) == {"prompt", "chosen", "rejected"}
    p50, p95, top = res["lengths"]["chosen"]
    assert 0 < p50 <= p95 <= top <= embedded.PREF_CHOSEN_CHARS


def test_deterministic(built):
    for split in ("train", "eval"):
        assert built["prompt0"][split].read_bytes() == built["prompt1"][split].read_bytes()
        assert not list(built["prompt0"][split].parent.glob("*.tmp"))


def test_messages_schema_same_pairs(built):
    plain, chat = _read(built["prompt0"]["train"]), _read(built["messages"]["train"])
    assert [(r["prompt"], r["chosen"], r["rejected"], r["source"], r["line"], r["corruption"]) for r in plain] == \
           [(r["prompt"][0]["content"], r["chosen"][0]["content"], r["rejected"][0]["content"], r["source"],
             r["line"], r["corruption"]) for r in chat]
    roles = {(r["prompt"][0]["role"], r["chosen"][0]["role"], r["rejected"][0]["role"]) for r in chat}
    assert roles == {("user", "assistant", "assistant")}
    assert all(len(r[f]) == 1 for r in chat for f in ("prompt", "chosen", "rejected"))


def test_corruptions_by_hand():
    chosen = ["    if x:", "        return y", "    z = 1"]
    assert embedded._breaks("    y = f(a)", chosen) == 0
    # deeper after a plain line; 'if x:' then a line no deeper
    assert embedded._breaks("    y = f(a)", ["        return y", "    if x:", "    z = 1"]) == 2
    assert embedded._breaks("    y = f(a)", ["    return y", "    z = 1"]) == 1  # dead code after return
    import random
    out = embedded._shuffle("    y = f(a)", chosen, random.Random(0))
    assert out is not None and sorted(out) == sorted(chosen) and embedded._breaks("    y = f(a)", out) > 0
    # `n` is bound by the completion; after swapping it with `data` it is read first
    lines = ["    n = len(data)", "    return n + data"]
    names = [(0, 4, 5, "n", True), (0, 12, 16, "data", False), (1, 11, 12, "n", False), (1, 15, 19, "data", False)]
    swapped = embedded._swap(lines, names, {"def", "f", "data"}, random.Random(0))
    assert swapped == ["    data = len(n)", "    return data + n"]
    # `n` twice, `data` once: swapping them would change the answer's length, so no swap
    assert embedded._swap(lines[:1] + ["    return n"], names[:3], {"def", "f", "data"}, random.Random(0)) is None
    # all names only read: no local to read before its binding, so no swap
    assert embedded._swap(["    return f(a, b)", "    g(a)"], [(0, 11, 12, "f", False), (0, 13, 14, "a", False),
                          (0, 16, 17, "b", False), (1, 4, 5, "g", False), (1, 6, 7, "a", False)],
                          {"a", "b"}, random.Random(0)) is None


def test_bad_schema(tmp_path):
    with pytest.raises(ValueError, match="preference schema"):
        embedded.build("preference", tmp_path, schema="alpaca", packages=PACKAGES)
    with pytest.raises(ValueError, match="applies to sft and preference"):
        embedded.build("ner", tmp_path, schema="messages", packages=PACKAGES)
    assert not list(tmp_path.iterdir())


def test_embedded_paths_resolves(tmp_path):
    """The recipes' name for the default build ({embedded:preference-messages} passes schema=messages
    the same way, as {embedded:sft-messages} does; one default build is enough time spent here)."""
    from lmforge.training.config import DataConfig
    from lmforge.training.tasks.common import embedded_paths

    cfg = DataConfig(paths=["x"], cache_dir=str(tmp_path))
    train, evals = embedded_paths(cfg, ["{embedded:preference}/train.jsonl", "{embedded:preference}/eval.jsonl"])
    assert train == str(tmp_path / "embedded" / "preference" / embedded.version() / "train.jsonl")
    records, held = _read(Path(train)), _read(Path(evals))
    assert (len(records), len(held)) == embedded.DEFAULT_MAX["preference"]
    assert all(isinstance(r["prompt"], str) for r in records)
    assert {r["source"].split("/")[0] for r in records + held} <= set(embedded.DEFAULT_PACKAGES)
    assert not {r["source"] for r in records} & {r["source"] for r in held}
    swapped = sum(r["corruption"] == "swapped" for r in records)
    assert 0.2 * len(records) <= swapped <= 0.4 * len(records)  # the mix SWAP_FRACTION asks for
