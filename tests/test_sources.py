"""Data sources beyond local files and their mixtures (README "Data: sources, URLs and mixtures"):
s3:// paths read through fsspec from a real S3-compatible server (moto's, on 127.0.0.1, started
here), a dataset repository read by datasets.load_dataset offline with config/split/data_files,
the mixture sampler (weights, determinism, its state across a restart on 2 gloo ranks), and one
2-rank `lmforge train` of a 70/30 mixture whose measured shares, epoch-derived steps and
ratio-derived warmup are read back from metrics.jsonl.

    pytest tests/test_sources.py -q
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import DEBUG, REPO as ROOT, debug_overrides, lmforge
from harness import run_ranks
# every lmforge name this file uses (one place to follow a rename)
from lmforge.training import data, tasks
from lmforge.training.config import ConfigError, DataConfig, load_config
from lmforge.training.tasks import common


def _jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


@pytest.fixture(scope="module")
def s3(tmp_path_factory, monkeypatch_module):
    """A moto S3 server on 127.0.0.1 (a free port) with fake credentials: (boto3 client, endpoint URL)."""
    boto3 = pytest.importorskip("boto3")
    server_mod = pytest.importorskip("moto.server")
    for k, v in dict(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1").items():
        monkeypatch_module.setenv(k, v)
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    yield boto3.client("s3", endpoint_url=url), url
    server.stop()


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def test_s3_paths_are_fetched_once_and_again_when_the_object_changes(s3, tmp_path):
    client, url = s3
    client.create_bucket(Bucket="corpus")
    for i in range(2):
        client.put_object(Bucket="corpus", Key=f"web/part{i}.jsonl",
                          Body=_jsonl([{"body": f"web page {i}.{j} about rivers and hills"} for j in range(30)]))
    client.put_object(Bucket="corpus", Key="web/notes.txt", Body=b"not matched by the glob")
    cfg = DataConfig(paths=["s3://corpus/web/*.jsonl"], text_field="body", storage_options={"endpoint_url": url},
                     cache_dir=str(tmp_path), vocab_size=300, seq_len=8)
    files, fmt = data.resolve_files(cfg)
    assert fmt == "json" and [f.name for f in files] == ["part0.jsonl", "part1.jsonl"]
    assert all(tmp_path / "remote" in f.parents for f in files)
    stamps = [f.stat().st_mtime_ns for f in files]
    assert data.resolve_files(cfg)[0] == files and [f.stat().st_mtime_ns for f in files] == stamps  # not re-fetched
    prepared = data.prepare(cfg)
    assert prepared.meta["train_docs"] + prepared.meta["val_docs"] == 60
    tok = data.load_tokenizer(prepared.tokenizer_dir)
    assert "rivers" in tok.decode(np.load(prepared.train_tokens)[:40].tolist())

    client.put_object(Bucket="corpus", Key="web/part1.jsonl", Body=_jsonl([{"body": "changed"}]))
    again, _ = data.resolve_files(cfg)  # a new ETag: a new local copy, and a new cache entry after it
    assert again[0] == files[0] and again[1] != files[1] and again[1].read_text() == '{"body": "changed"}\n'
    assert data.prepare(cfg).meta["train_docs"] + data.prepare(cfg).meta["val_docs"] == 31

    # a directory URL takes every file under it; a missing object or bucket is a ConfigError naming it
    assert len(data.resolve_files(cfg.model_copy(update={"paths": ["s3://corpus/web"], "format": "text"}))[0]) == 3
    for missing in ("s3://corpus/nothing.jsonl", "s3://no-bucket/x.jsonl"):
        with pytest.raises(ConfigError, match=f"data.paths: {missing} does not exist"):
            data.resolve_files(cfg.model_copy(update={"paths": [missing]}))


@pytest.fixture
def dataset_repo(tmp_path, monkeypatch):
    """A dataset repository as on the Hub: README.md's `configs` name two subsets and their splits."""
    import datasets

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # read at import; the env is for subprocesses
    repo = tmp_path / "repo"
    for sub, word in (("en", "river"), ("de", "fluss")):
        (repo / sub).mkdir(parents=True)
        (repo / sub / "train.jsonl").write_bytes(_jsonl([{"text": f"{word} {i}"} for i in range(40)]))
        (repo / sub / "test.jsonl").write_bytes(_jsonl([{"text": f"{word} test {i}"} for i in range(5)]))
    (repo / "README.md").write_text("---\nconfigs:\n"
                                    "- config_name: en\n  data_files:\n  - split: train\n    path: en/train.jsonl\n"
                                    "  - split: test\n    path: en/test.jsonl\n  default: true\n"
                                    "- config_name: de\n  data_files:\n  - split: train\n    path: de/train.jsonl\n"
                                    "  - split: test\n    path: de/test.jsonl\n---\n")
    return repo


def test_dataset_by_name_with_config_split_and_data_files(dataset_repo, tmp_path):
    base = DataConfig(dataset=str(dataset_repo), cache_dir=str(tmp_path / "cache"), vocab_size=300, seq_len=8)
    cache = tmp_path / "hf"
    texts = lambda **kw: data.load_hub_dataset(base.model_copy(update=kw), cache)["text"]  # noqa: E731
    assert texts()[0] == "river 0" and len(texts()) == 40
    assert texts(dataset_config="de", split="test") == [f"fluss test {i}" for i in range(5)]
    assert texts(dataset_config="de", split="train[:10%]") == [f"fluss {i}" for i in range(4)]
    assert texts(data_files=["de/test.jsonl"]) == [f"fluss test {i}" for i in range(5)]  # data_files: split train
    with pytest.raises(ConfigError, match=r"data.dataset: cannot load .*repo \(config fr\), split 'train'"):
        texts(dataset_config="fr")
    prepared = data.prepare(base.model_copy(update={"dataset_config": "de"}))
    assert prepared.meta["format"] == "dataset" and prepared.meta["train_docs"] + prepared.meta["val_docs"] == 40
    assert data.prepare(base.model_copy(update={"dataset_config": "de"})).train_tokens == prepared.train_tokens
    cfg = load_config(DEBUG, ["task=sft", "data.paths=[]", f"data.dataset={dataset_repo}", "data.messages_field=m",
                              "data.prompt_field=text", "data.response_field=text"])
    train, held = common.load_splits(cfg, _Log())
    assert len(train) + len(held) == 40 and train[0]["text"].startswith("river")


class _Log:
    def info(self, *a):
        pass

    warning = info


def _two_source_config(tmp_path: Path) -> DataConfig:
    for name, word in (("a", "alpha"), ("b", "beta")):
        (tmp_path / name).mkdir()
        for i in range(20):
            (tmp_path / name / f"{i}.txt").write_text(" ".join(f"{word}{i % 3}" for _ in range(40)))
    return DataConfig(cache_dir=str(tmp_path / "cache"), vocab_size=300, seq_len=16,
                      mixture=[{"weight": 3, "name": "a", "paths": [str(tmp_path / "a")]},
                               {"weight": 1, "name": "b", "paths": [str(tmp_path / "b")]}])


def test_mixture_sources_share_one_tokenizer_and_rows_come_from_their_source(tmp_path):
    cfg = _two_source_config(tmp_path)
    sources = data.prepare_sources(cfg)
    assert len({(s.tokenizer_dir / "tokenizer.json").read_bytes() for s in sources}) == 1
    tok = data.load_tokenizer(sources[0].tokenizer_dir)
    parts = [data.PackedTokens(s.train_tokens, 16) for s in sources]
    rows = data.ConcatRows(parts)
    assert len(rows) == len(parts[0]) + len(parts[1])
    picks = [0, len(parts[0]), 1, len(parts[0]) + 2]
    x, y = rows.batch(picks)
    for row, i in zip(x, picks):
        word = "alpha" if i < len(parts[0]) else "beta"
        assert word in tok.decode(row.tolist()) and ("beta" if word == "alpha" else "alpha") not in tok.decode(row.tolist())
    assert torch.equal(x[1], parts[1].batch([0])[0][0]) and torch.equal(y[3], parts[1].batch([2])[1][0])
    val = data.ConcatRows([data.PackedTokens(s.val_tokens, 16) for s in sources], interleave=True)
    assert [val.locate(j)[0] for j in range(4)] == [0, 1, 0, 1]  # fixed eval batches cover both sources


@pytest.mark.parametrize("weights", [(0.7, 0.3), (0.5, 0.3, 0.2), (0.97, 0.03)])
def test_mixture_sampler_hits_its_weights_deterministically(weights):
    sizes = [50, 7, 400][:len(weights)]
    make = lambda rank: data.MixtureSampler(sizes, weights, 11, rank, 2, 4, 2)  # noqa: E731
    r0, r1 = make(0), make(1)
    steps = [(r0.next_step(), r1.next_step()) for _ in range(60)]  # 960 samples
    counts = np.zeros(len(sizes))
    seen = [[] for _ in sizes]
    offsets = np.cumsum([0, *sizes])
    for s0, s1 in steps:
        flat = [i for m in range(2) for i in s0[m] + s1[m]]
        for i in flat:
            k = int(np.searchsorted(offsets, i, side="right")) - 1
            counts[k] += 1
            seen[k].append(i)
    assert np.abs(counts / counts.sum() - np.array(weights)).max() < 0.01
    assert r0.shares() == r1.shares() and abs(r0.shares()["0"] - weights[0]) < 0.01
    for k, n in enumerate(sizes):  # every pass over a source covers it once, in a new order each pass
        passes = [seen[k][p * n:(p + 1) * n] for p in range(len(seen[k]) // n)]
        assert all(sorted(p) == list(range(offsets[k], offsets[k] + n)) for p in passes)
        assert len(passes) < 2 or passes[0] != passes[1]
    other = data.MixtureSampler(sizes, weights, 12, 0, 2, 4, 2)
    assert [other.next_step() for _ in range(3)] != [s0 for s0, _ in steps[:3]]  # the seed orders the rows
    assert [make(0).next_step() for _ in range(1)] == [steps[0][0]]  # same seed, same order


SIZES, WEIGHTS, SEED, MICRO, ACCUM = [23, 9, 40], [0.6, 0.3, 0.1], 5, 3, 2
BEFORE, AFTER = 4, 7


def mixture_save_and_resume() -> dict:
    """On each gloo rank: a sampler, a save (rank 0's state through JSON, as client.json), steps
    after it, and a fresh sampler (a restarted rank) loading the saved state."""
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    sampler = data.MixtureSampler(SIZES, WEIGHTS, SEED, rank, world, MICRO, ACCUM)
    head = [sampler.next_step() for _ in range(BEFORE)]
    state = [json.loads(json.dumps(sampler.state_dict()))]
    torch.distributed.broadcast_object_list(state, src=0)
    tail = [sampler.next_step() for _ in range(AFTER)]
    restarted = data.MixtureSampler(SIZES, WEIGHTS, SEED, rank, world, MICRO, ACCUM)
    restarted.load_state_dict(state[0])
    return {"state": state[0], "own": sampler.state_dict(), "head": head, "tail": tail,
            "resumed": [restarted.next_step() for _ in range(AFTER)]}


def test_mixture_sampler_state_resumes_every_ranks_exact_sequence():
    r0, r1 = run_ranks(mixture_save_and_resume, 2)
    for r in (r0, r1):
        assert r["resumed"] == r["tail"]
    assert r0["own"] == r1["own"] and r0["state"]["consumed"] == BEFORE * MICRO * ACCUM * 2
    assert sum(r0["state"]["counts"]) == r0["state"]["consumed"]
    single = data.MixtureSampler(SIZES, WEIGHTS, SEED, 0, 2, MICRO, ACCUM)
    with pytest.raises(ConfigError, match="not one of this 3-source mixture"):
        single.load_state_dict({"consumed": 12, "seed": SEED, "n": 72})  # a one-source run's checkpoint


@pytest.mark.slow
def test_cli_mixture_run_measures_shares_and_derives_steps_and_warmup(tmp_path, data_cache):
    """One 2-rank pretraining run of a 70/30 mixture (train.epochs, train.warmup_ratio): the shares it
    logs are within 1% of the weights, its steps follow from the rows, its lr warms up over the ratio."""
    run_dir = tmp_path / "run"
    mixture = ("data.mixture=[{weight: 7, name: json, paths: ['{stdlib}/json/*.py']}, "
               "{weight: 3, name: email, paths: ['{stdlib}/email/*.py']}]")
    overrides = debug_overrides(run_dir, data_cache, "data.paths=[]", mixture, "train.steps=null", "train.epochs=0.1",
                                "train.warmup=0", "train.warmup_ratio=0.25", "eval.interval=0", "checkpoint.interval=0")
    lmforge("train", DEBUG, "--nproc", "2", *overrides)
    cfg = load_config(DEBUG, overrides)
    rows = [len(data.PackedTokens(s.train_tokens, cfg.data.seq_len)) for s in data.prepare_sources(cfg.data)]
    steps = math.ceil(0.1 * sum(rows) / cfg.train.global_batch_size)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    logged = {r["step"]: r for r in records if "train/loss" in r}
    assert max(logged) == steps
    last = logged[steps]
    assert abs(last["data/share/json"] - 0.7) < 0.01 and abs(last["data/share/email"] - 0.3) < 0.01
    warmup = round(0.25 * steps)
    assert logged[1]["train/lr"] == pytest.approx(cfg.train.lr / warmup)
    assert logged[warmup]["train/lr"] == pytest.approx(cfg.train.lr)


def test_sft_mixture_encodes_each_source_with_its_own_fields(tmp_path):
    """An SFT mixture: each entry's own columns (prompt/response here, a chat column there), one
    tokenizer over both, the train rows laid out source after source for the sampler."""
    (tmp_path / "qa.jsonl").write_bytes(_jsonl([{"q": f"what is {i}?", "a": f"it is {i}"} for i in range(30)]))
    (tmp_path / "chat.jsonl").write_bytes(_jsonl([{"turns": [{"role": "user", "content": f"hi {i}"},
                                                             {"role": "assistant", "content": f"hello {i}"}]}
                                                  for i in range(20)]))
    cfg = load_config(ROOT / "configs" / "sft.yaml", [
        "model.init_from=null", "data.paths=[]", "data.eval_paths=[]", "data.vocab_size=300", "data.seq_len=128",
        "data.packing=false", f"data.cache_dir={tmp_path / 'cache'}", "data.holdout=0.1", "model.preset=llama-debug",
        f"data.mixture=[{{weight: 2, name: qa, paths: [{tmp_path / 'qa.jsonl'}], prompt_field: q, response_field: a}},"
        f" {{weight: 1, name: chat, paths: [{tmp_path / 'chat.jsonl'}], messages_field: turns}}]"])
    prepared = tasks.prepare(cfg, None, _Log())
    qa_rows, chat_rows = prepared.source_rows
    assert qa_rows + chat_rows == len(prepared.train) and qa_rows > 20 and chat_rows > 10
    decode = lambda i: prepared.tokenizer.decode(prepared.train.inputs[i].tolist())  # noqa: E731
    assert "what is" in decode(0) and "hi " in decode(qa_rows) and "what is" not in decode(qa_rows)
    assert prepared.summary["source_rows"] == {"qa": qa_rows, "chat": chat_rows}
    # the held-out conversations (eval.generate's prompts) read with each source's own fields
    assert {c[0]["content"].split()[0] for c in prepared.eval.conversations} == {"what", "hi"}
