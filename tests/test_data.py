"""Data pipeline with real `datasets` and `tokenizers`: formats, packing, caching, the sampler,
and the bad-data errors (these go through `lmforge train`, which must fail before any rank)."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from conftest import DEBUG, debug_overrides, lmforge
from lmforge.training import data
from lmforge.training.config import ConfigError, DataConfig

DOCS = [f"def function_{i}(x):\n    return x * {i} + {i * i}  # document {i}\n" * (3 + i % 4) for i in range(60)]


def _cfg(tmp_path, paths, **kw) -> DataConfig:
    return DataConfig(paths=[str(p) for p in paths], vocab_size=300, seq_len=16, holdout=0.1,
                      cache_dir=str(tmp_path / "cache"), **kw)


def _decode_docs(prepared: data.PreparedData) -> list[str]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(prepared.tokenizer_dir))
    docs = []
    for split in (prepared.train_tokens, prepared.val_tokens):
        ids = np.load(split)
        assert ids[-1] == prepared.eos_id  # every document ends with EOS, nothing padded
        cuts = np.flatnonzero(ids == prepared.eos_id)
        starts = np.concatenate([[0], cuts[:-1] + 1])
        docs += [tok.decode(ids[s:e]) for s, e in zip(starts, cuts)]
    return docs


def test_text_files_one_document_each_with_eos_between(tmp_path):
    for i, d in enumerate(DOCS):
        (tmp_path / f"doc{i:02d}.txt").write_text(d)
    prepared = data.prepare(_cfg(tmp_path, [tmp_path / "*.txt"]))
    assert prepared.meta["train_docs"] + prepared.meta["val_docs"] == len(DOCS)
    assert prepared.meta["val_docs"] >= 1
    assert sorted(_decode_docs(prepared)) == sorted(DOCS)  # byte-level BPE round-trips exactly


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "arrow"])
def test_row_formats_through_datasets(tmp_path, fmt):
    import datasets

    ds = datasets.Dataset.from_dict({"body": DOCS, "id": list(range(len(DOCS)))})
    if fmt == "jsonl":
        path = tmp_path / "d.jsonl"
        path.write_text("".join(json.dumps({"body": d, "id": i}) + "\n" for i, d in enumerate(DOCS)))
    elif fmt == "parquet":
        path = tmp_path / "d.parquet"
        ds.to_parquet(str(path))
    else:
        path = tmp_path / "saved"
        datasets.DatasetDict({"train": ds}).save_to_disk(str(path))
    cfg = _cfg(tmp_path, [path], text_field="body", format="arrow" if fmt == "arrow" else "auto")
    prepared = data.prepare(cfg)
    assert sorted(_decode_docs(prepared)) == sorted(DOCS)


def test_missing_text_field_names_the_columns(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(ConfigError, match=r"data.text_field: column 'text' not in the data \(columns: \['body'\]\)"):
        data.prepare(_cfg(tmp_path, [path]))


def test_pretokenized_memmap_file(tmp_path):
    for i, d in enumerate(DOCS):
        (tmp_path / f"doc{i:02d}.txt").write_text(d)
    first = data.prepare(_cfg(tmp_path, [tmp_path / "*.txt"]))
    tokens = np.load(first.train_tokens)
    np.save(tmp_path / "corpus.npy", tokens)
    cfg = DataConfig(paths=[str(tmp_path / "corpus.npy")], tokenizer=str(first.tokenizer_dir), seq_len=16,
                     holdout=0.1, cache_dir=str(tmp_path / "cache2"))
    prepared = data.prepare(cfg)
    train, val = np.load(prepared.train_tokens, mmap_mode="r"), np.load(prepared.val_tokens)
    assert np.array_equal(np.concatenate([train, val]), tokens)


def test_cache_is_reused_and_keyed_by_content(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i, d in enumerate(DOCS):
        (src / f"doc{i:02d}.txt").write_text(d)
    cfg = _cfg(tmp_path, [src])
    a = data.prepare(cfg)
    mtime = a.train_tokens.stat().st_mtime_ns
    b = data.prepare(cfg)
    assert b.train_tokens == a.train_tokens and b.train_tokens.stat().st_mtime_ns == mtime
    (src / "doc00.txt").write_text("changed content\n")
    c = data.prepare(cfg)
    assert c.train_tokens != a.train_tokens


def test_packing_covers_the_stream_with_one_token_overlap(tmp_path):
    path = tmp_path / "t.npy"
    np.save(path, np.arange(101, dtype=np.uint16))
    packed = data.PackedTokens(path, seq_len=10)
    assert len(packed) == 10
    x, y = packed.batch([0, 9])
    assert x[0].tolist() == list(range(10)) and y[0].tolist() == list(range(1, 11))
    assert x[1].tolist() == list(range(90, 100)) and y[1].tolist() == list(range(91, 101))


@pytest.mark.parametrize("dp,accum", [(1, 1), (2, 1), (2, 3), (4, 2)])
def test_sampler_shards_are_disjoint_and_cover_an_epoch(dp, accum):
    n, micro = 96, 4
    samplers = [data.ShardedSampler(n, seed=7, dp_rank=r, dp_size=dp, micro_batch=micro, grad_accum=accum)
                for r in range(dp)]
    steps = n // (micro * dp * accum)
    seen = [[i for _ in range(steps) for mb in s.next_step() for i in mb] for s in samplers]
    flat = [i for rank in seen for i in rank]
    assert sorted(flat) == list(range(n))  # disjoint and covering
    # the second epoch is a different order, and the position is one integer that resumes exactly
    s = data.ShardedSampler(n, seed=7, dp_rank=0, dp_size=dp, micro_batch=micro, grad_accum=accum)
    s.load_state_dict({"consumed": samplers[0].consumed})
    assert s.next_step() == samplers[0].next_step()


@pytest.mark.parametrize("case", ["no-match", "missing", "empty", "filtered", "seq-len", "batch"])
def test_bad_data_fails_before_any_rank(case, tmp_path, data_cache):
    """The launcher's preflight refuses bad data with a ConfigError naming it; through the CLI (the
    first case): exit 2, and no run directory written."""
    from lmforge.training.config import load_config
    from lmforge.training.train import preflight

    (tmp_path / "empty.txt").write_text("")
    extra, expected = {
        "no-match": (f"data.paths=[{tmp_path}/nope/*.txt]", ["data.paths: ", "matches no files"]),
        "missing": (f"data.paths=[{tmp_path}/missing.txt]", ["missing.txt does not exist"]),
        "empty": (f"data.paths=[{tmp_path}/empty.txt]", ["every file is empty"]),
        "filtered": ("data.min_doc_chars=100000000", ["no documents left after filtering (data.min_doc_chars=100000000)"]),
        "seq-len": ("data.seq_len=1024", ["data.seq_len (1024) exceeds the model's max positions (512)"]),
        "batch": ("train.global_batch_size=12", ["train.micro_batch_size (4) x data-parallel size (2) = 8"]),
    }[case]
    args = debug_overrides(tmp_path / "r", data_cache, extra)
    if case == "no-match":
        proc = lmforge("train", DEBUG, *args, "--nproc", "2", check=False)
        assert proc.returncode == 2 and all(e in proc.stderr for e in expected), proc.stderr[-2000:]
        assert not (tmp_path / "r").exists()
    with pytest.raises(ConfigError) as err:
        preflight(load_config(DEBUG, args), 2, logging.getLogger("test_data"))
    assert all(e in str(err.value) for e in expected), str(err.value)


def test_cli_prepare_builds_the_cache(tmp_path):
    out = json.loads(lmforge("prepare", DEBUG, f"data.cache_dir={tmp_path}").stdout)  # cold: trains a tokenizer
    assert out["train_tokens"] > 0 and out["val_docs"] >= 1 and out["vocab_size"] == 512
    assert np.load(out["train"], mmap_mode="r").shape == (out["train_tokens"],)


# --------------------------------------------------------------------------- undecodable / binary files

BINARY = b"BINARYMARKER " * 5 + b"\x7fELF\x02\x01\x01\x00\x00\xff"  # an ELF header: NUL at byte 72


def _corpus_with_a_binary_file(tmp_path):
    src = tmp_path / "corpus"
    src.mkdir()
    for i, d in enumerate(DOCS):
        (src / f"doc{i:02d}.txt").write_text(d)
    (src / "logo.txt").write_bytes(BINARY)
    return src


def test_binary_file_in_a_text_corpus_fails_preflight_naming_it(tmp_path, data_cache):
    from lmforge.training.config import load_config
    from lmforge.training.train import preflight

    src = _corpus_with_a_binary_file(tmp_path)
    args = debug_overrides(tmp_path / "r", data_cache, f"data.paths=[{src}]")
    with pytest.raises(ConfigError) as err:
        preflight(load_config(DEBUG, args), 2, logging.getLogger("test_data"))
    msg = str(err.value)
    assert f"{src / 'logo.txt'}: NUL byte at byte offset 72: a binary file" in msg, msg
    assert "data.on_bad_file=skip" in msg


def test_binary_file_skipped_with_a_warning(tmp_path, caplog):
    src = _corpus_with_a_binary_file(tmp_path)
    log = logging.getLogger("test_data")
    with caplog.at_level(logging.WARNING, logger=log.name):
        prepared = data.prepare(_cfg(tmp_path, [src], on_bad_file="skip"), log)
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warned == [f"data.on_bad_file=skip: leaving out {src / 'logo.txt'}: NUL byte at byte offset 72: "
                      "a binary file"]
    assert prepared.meta["files"] == len(DOCS)
    assert sorted(_decode_docs(prepared)) == sorted(DOCS)  # nothing of the binary file
    with pytest.raises(ConfigError, match="every file is bad"):
        data.prepare(_cfg(tmp_path, [src / "logo.txt"], on_bad_file="skip"), log)


@pytest.mark.parametrize("reader", ["pretrain", "records"])
def test_invalid_utf8_in_jsonl_names_file_and_offset(tmp_path, reader):
    from conftest import REPO
    from lmforge.training.config import load_config
    from lmforge.training.tasks import common

    lines = [json.dumps({"text": d, "prompt": "p", "response": d}).encode() + b"\n" for d in DOCS[:3]]
    lines[2] = lines[2].replace(b"document", b"docum\xe9nt", 1)  # latin-1, not UTF-8
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"".join(lines))
    offset = len(lines[0]) + len(lines[1]) + lines[2].index(b"\xe9")
    with pytest.raises(ConfigError) as err:
        if reader == "pretrain":
            data.prepare(_cfg(tmp_path, [path]))
        else:  # a fine-tuning task's records (what its prepare reads first)
            cfg = load_config(REPO / "configs" / "sft.yaml", [f"data.paths=[{path}]", "data.eval_paths=[]",
                                                              f"data.cache_dir={tmp_path / 'cache'}"])
            common.load_splits(cfg, logging.getLogger("test_data"))
    assert f"{path}: invalid UTF-8 byte 0xe9 at byte offset {offset} (invalid continuation byte)" in str(err.value)


def test_unreadable_parquet_names_the_file(tmp_path):
    path = tmp_path / "d.parquet"
    path.write_bytes(b"PAR1" + b"\x00" * 64)  # a magic number and no footer: a truncated download
    with pytest.raises(ConfigError, match=rf"{path}: not a readable parquet file .*data.on_bad_file=skip"):
        data.prepare(_cfg(tmp_path, [path]))
