"""Hugging Face Hub ids (training/hub.py) without a Hub: a hub cache laid out as huggingface_hub
writes it (blobs/, snapshots/<commit>/ symlinks into them, refs/main and a tag) from tiny models
built here, HF_HOME pointing at it, HF_HUB_OFFLINE=1; then the real resolution, training and export
code paths read the ids.

    pytest -q tests/test_hub.py
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from conftest import DEBUG, debug_overrides, lmforge, losses

from lmforge.training import hub
from lmforge.training.config import ConfigError, load_config

MAIN, V2, REMOTE = "1" * 40, "2" * 40, "3" * 40  # commits: refs/main, tag v2, a model with its own code
SFT_HUB_MODEL = "HuggingFaceTB/SmolLM2-135M"


def tiny_model(path: Path, layers: int, positions: int = 128) -> Path:
    """A Llama of `layers` layers with lmforge's own byte-level BPE tokenizer and run config."""
    import datasets
    from transformers import LlamaConfig, LlamaForCausalLM

    from lmforge.tools.artifact import write_run_config
    from lmforge.training.data import _train_tokenizer

    text = [Path(json.__file__).read_text()]
    tok = _train_tokenizer(datasets.Dataset.from_dict({"text": text}), 300, path)
    LlamaForCausalLM(LlamaConfig(vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                 num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=positions,
                                 eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id)).save_pretrained(path)
    write_run_config(load_config(DEBUG), path)  # what `lmforge export` carries: GGUF export reads it
    return path


def add_snapshot(cache: Path, repo: str, src: Path, commit: str, refs: tuple[str, ...] = ()) -> Path:
    """src's files as revision `commit` of `repo` in a Hub cache: content-named blobs, the snapshot's
    files relative symlinks to them, each ref a file holding the commit."""
    root = cache / f"models--{repo.replace('/', '--')}"
    snapshot = root / "snapshots" / commit
    for f in sorted(p for p in src.rglob("*") if p.is_file()):
        data = f.read_bytes()
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / f.relative_to(src)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    for ref in refs:
        (root / "refs").mkdir(parents=True, exist_ok=True)
        (root / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture(scope="module")
def hf_home(tmp_path_factory) -> Path:
    """HF_HOME with org/tiny: main = 1 layer, tag v2 = 2 layers; org/custom: config.json with auto_map."""
    home = tmp_path_factory.mktemp("hf-home")
    build = tmp_path_factory.mktemp("hub-models")
    add_snapshot(home / "hub", "org/tiny", tiny_model(build / "main", 1), MAIN, ("main",))
    add_snapshot(home / "hub", "org/tiny", tiny_model(build / "v2", 2), V2, ("v2",))
    custom = tiny_model(build / "custom", 1)
    conf = json.loads((custom / "config.json").read_text())
    conf["auto_map"] = {"AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"}
    (custom / "config.json").write_text(json.dumps(conf))
    add_snapshot(home / "hub", "org/custom", custom, REMOTE, ("main",))
    # what configs/sft_hub.yaml names, as a tiny stand-in (the recipe's code path, not its 135M weights)
    add_snapshot(home / "hub", SFT_HUB_MODEL, tiny_model(build / "smol", 1, positions=256), MAIN, ("main",))
    return home


@pytest.fixture
def offline(hf_home, monkeypatch) -> Path:
    """In process: huggingface_hub's cache and offline switch, as HF_HOME/HF_HUB_OFFLINE set them at import."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hf_home / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return hf_home / "hub"


def snapshot(cache: Path, commit: str, repo: str = "org/tiny") -> Path:
    return cache / f"models--{repo.replace('/', '--')}" / "snapshots" / commit


def test_ids_resolve_to_their_snapshots(offline, tmp_path):
    assert hub.resolve("org/tiny", "model.path") == snapshot(offline, MAIN)
    assert hub.resolve("org/tiny@v2", "model.path") == snapshot(offline, V2)
    assert hub.resolve(f"org/tiny@{V2}", "data.tokenizer") == snapshot(offline, V2)
    assert hub.resolve(str(tmp_path), "model.path") == tmp_path  # what exists on disk is a path, as before
    with pytest.raises(ConfigError, match=rf"model.path: org/absent is not a local directory.* {offline} "
                                          r"\(HF_HUB_OFFLINE is set\)"):
        hub.resolve("org/absent", "model.path")
    with pytest.raises(ConfigError, match="the Hub cache"):
        hub.resolve("org/tiny@v9", "model.path")
    with pytest.raises(ConfigError, match="not a directory and not a Hub id"):
        hub.resolve("/no/such/model", "model.path")

    # model.revision picks the tag; the loaders get the snapshot, the ranks the pinned commit
    cfg = load_config(DEBUG, [f"data.cache_dir={tmp_path}", "model.path=org/tiny", "model.revision=v2",
                              "data.tokenizer=org/tiny"])
    local, pinned = hub.resolve_ids(cfg)
    assert local.model.path == str(snapshot(offline, V2)) and local.model.revision is None
    assert local.data.tokenizer == str(snapshot(offline, MAIN))  # model.revision is the model's only
    assert pinned.model.path == f"org/tiny@{V2}" and pinned.data.tokenizer == f"org/tiny@{MAIN}"
    assert hub.resolve_ids(pinned)[0].to_dict() == local.to_dict()
    assert cfg.with_absolute_paths(tmp_path).model.path == "org/tiny"  # an id is not made a path
    with pytest.raises(ConfigError, match="data.tokenizer: /no/tok is not a directory and not a Hub id"):
        hub.resolve_ids(load_config(DEBUG, [f"data.cache_dir={tmp_path}", "data.tokenizer=/no/tok"]))
    with pytest.raises(ConfigError, match="names revision v2 and model.revision=main: set one"):
        hub.resolve_ids(cfg.model_copy(update={"model": cfg.model.model_copy(
            update={"path": "org/tiny@v2", "revision": "main"})}))


def test_remote_code_is_refused_unless_trusted(offline, tmp_path):
    base = [f"data.cache_dir={tmp_path}", "model.init_from=org/custom"]
    with pytest.raises(ConfigError, match=r"model.init_from: .* ships its own model code \(config.json auto_map: "
                                          r"AutoModelForCausalLM\).*model.trust_remote_code=true"):
        hub.resolve_ids(load_config(DEBUG, base))
    local, _ = hub.resolve_ids(load_config(DEBUG, base + ["model.trust_remote_code=true"]))
    assert local.model.init_from == str(snapshot(offline, REMOTE, "org/custom"))


def test_uncached_id_exits_2_before_any_rank(offline, data_cache, tmp_path, capsys):
    from lmforge.launcher import cli

    run_dir = tmp_path / "run"
    code = cli.main(["train", str(DEBUG), "--nproc", "1", *debug_overrides(run_dir, data_cache, "model.path=org/absent")])
    err = capsys.readouterr().err
    assert code == 2, err
    assert (f"lmforge: config error: model.path: org/absent is not a local directory, and as a Hub id it is not in the "
            f"Hub cache {offline} (HF_HUB_OFFLINE is set)") in err
    assert not run_dir.exists()


def test_a_tool_reads_an_id_at_its_revision(offline, tmp_path, capsys):
    from gguf import GGUFReader

    from lmforge.launcher import cli

    out = tmp_path / "v2.gguf"
    assert cli.main(["export", "org/tiny@v2", "--format", "gguf", "--out", str(out)]) == 0, capsys.readouterr().err
    blocks = GGUFReader(str(out)).fields["llama.block_count"]
    assert int(blocks.parts[blocks.data[0]][0]) == 2  # v2's two layers, not main's one


@pytest.mark.slow  # starts `lmforge train`
def test_two_ranks_train_from_a_hub_id_offline(hf_home, data_cache, tmp_path):
    # HF_HOME and HF_HUB_OFFLINE from the environment, as a user sets them
    run_dir = tmp_path / "run"
    lmforge("train", DEBUG, "--nproc", "2", *debug_overrides(
        run_dir, data_cache, "model.path=org/tiny", "data.tokenizer=org/tiny", "train.steps=2",
        "checkpoint.interval=0", "eval.interval=0", "eval.batches=1"),
        env_extra={"HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"})
    assert sorted(losses(run_dir)) == [1, 2]
    ckpt = run_dir / "checkpoints" / "step_2"
    main = snapshot(hf_home / "hub", MAIN)
    saved = load_config(ckpt / "config.yaml")
    assert saved.model.path == str(main) and saved.data.tokenizer == str(main)
    hf_conf = json.loads((ckpt / "hf" / "config.json").read_text())
    assert hf_conf["num_hidden_layers"] == 1 and hf_conf["vocab_size"] == 320  # main's model, its shape kept
    assert (ckpt / "hf" / "tokenizer.json").read_text() == (main / "tokenizer.json").read_text()


@pytest.mark.slow  # starts `lmforge train`
def test_sft_hub_recipe_fine_tunes_a_hub_id_on_alpaca_and_sharegpt_mixed_70_30(hf_home, data_cache, tmp_path):
    """configs/sft_hub.yaml as written, offline from the Hub cache, only shorter. The measured shares
    of the two record formats are its weights."""
    run_dir = tmp_path / "run"
    recipe = DEBUG.parent / "sft_hub.yaml"
    proc = lmforge("train", recipe, "--nproc", "2", *debug_overrides(
        run_dir, data_cache, "train.steps=16", "checkpoint.interval=16", "eval.interval=16",
        "eval.generate=2", "eval.max_new_tokens=4"),
        env_extra={"HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"})
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    shares = [r for r in rows if "data/share/alpaca" in r][-1]
    assert abs(shares["data/share/alpaca"] - 0.7) < 0.01 and abs(shares["data/share/sharegpt"] - 0.3) < 0.01, shares
    assert sorted(losses(run_dir)) == list(range(1, 17))
    assert any("eval/loss" in r for r in rows)
    saved = load_config(run_dir / "checkpoints" / "step_16" / "config.yaml")
    assert saved.model.init_from == str(snapshot(hf_home / "hub", MAIN, SFT_HUB_MODEL))  # read from the Hub cache
    assert "as alpaca" in proc.stderr and "as sharegpt" in proc.stderr, proc.stderr[-3000:]
