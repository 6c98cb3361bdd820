"""`lmforge compress` for real: llm-compressor oneshot in its own environment (.venv-compress, built by
`make compress-env`; without it these tests fail with the message saying so), torchao in the main one.
Every output is reloaded here, in the main environment, through transformers (compressed-tensors /
torchao) and its held-out perplexity is compared with the uncompressed model's.

    .venv/bin/python -m pytest tests/test_compress.py
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from conftest import lmforge
from lmforge.tools import artifact
from lmforge.training.config import ConfigError

CALIBRATION = "32"  # rows of 64 tokens: enough for this 0.6M-parameter model, and 4x faster than the default 128


def weight_bytes(d: Path) -> int:
    return sum(p.stat().st_size for p in Path(d).glob("*.safetensors"))


def load(d: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(d)).eval()


def perplexity(model, tokens: torch.Tensor) -> float:
    """exp(mean next-token loss) over the held-out rows (every row has the same length)."""
    with torch.no_grad():
        return math.exp(model(input_ids=tokens, labels=tokens).loss.item())


def linears(model) -> dict[str, torch.nn.Linear]:
    """The layers every recipe targets: all Linear layers but lm_head."""
    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"}


def no_output(out: Path) -> bool:
    return not out.exists() and not any(out.parent.glob(".tmp_*"))


@pytest.fixture(scope="module")
def heldout(lm_hf) -> torch.Tensor:
    return artifact.heldout_tokens(artifact.run_config(lm_hf))


@pytest.fixture(scope="module")
def base_ppl(lm_hf, heldout) -> float:
    return perplexity(load(lm_hf), heldout)


def compress(src: Path, out: Path, recipe: str, *extra) -> dict:
    from lmforge.tools.compress import RECIPES

    calibration = ["--calibration-samples", CALIBRATION] if RECIPES[recipe].calibrated else []
    lmforge("compress", src, "--recipe", recipe, "--out", out, *calibration, *extra, timeout=900)
    return json.loads((out / "compression.json").read_text())


def check_common(src: Path, out: Path, record: dict) -> None:
    """What every output carries: the input's run config and its own, untruncated tokenizer."""
    from transformers import AutoTokenizer

    assert (out / artifact.RUN_CONFIG).read_text() == (src / artifact.RUN_CONFIG).read_text()
    assert (out / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()
    long_text = "def f(x):\n    return x + 1\n" * 200
    assert len(AutoTokenizer.from_pretrained(str(out))(long_text).input_ids) > 1000  # no truncation (llm-compressor's 256)
    assert record["weight_bytes"] == {"before": weight_bytes(src), "after": weight_bytes(out),
                                      "ratio": weight_bytes(out) / weight_bytes(src)}


def test_w4a16(lm_hf, tmp_path, heldout, base_ppl):
    out = tmp_path / "w4a16"
    proc = lmforge("compress", lm_hf, "--recipe", "w4a16", "--out", out, "--calibration-samples", CALIBRATION,
                   timeout=900)
    assert "--group-size auto: 128" in proc.stderr  # the default: 128 divides every layer of this model
    record = json.loads((out / "compression.json").read_text())
    check_common(lm_hf, out, record)
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["format"] == "pack-quantized"
    assert {"weight_bits": 4, "group_size": 128, "activation_bits": None}.items() <= record["quantization"]["groups"][0].items()
    assert weight_bytes(out) < 0.5 * weight_bytes(lm_hf) and record["file_shrank"]

    model = load(out)
    ppl = perplexity(model, heldout)
    print(f"w4a16: ppl {base_ppl:.3f} -> {ppl:.3f}, {weight_bytes(lm_hf)} -> {weight_bytes(out)} bytes")
    assert ppl <= 1.05 * base_ppl
    for name, m in linears(model).items():  # decompressed, each group of 128 inputs holds at most 2^4 values
        assert max(len(torch.unique(g)) for g in m.weight.detach().reshape(-1, 128)) <= 16, name

    # A quantized directory is not compressed a second time.
    from lmforge.tools.compress import compress as run

    with pytest.raises(ConfigError, match="quantized weights; lmforge compress starts from dense weights"):
        run(out, tmp_path / "again", "w8a8")
    assert no_output(tmp_path / "again")


def test_w8a8(lm_hf, tmp_path, heldout, base_ppl):
    from safetensors import safe_open

    out = tmp_path / "w8a8"
    record = compress(lm_hf, out, "w8a8")
    check_common(lm_hf, out, record)
    group = record["quantization"]["groups"][0]
    assert (group["weight_bits"], group["strategy"], group["activation_bits"], group["activation_dynamic"]) == \
        (8, "channel", 8, True)
    with safe_open(str(out / "model.safetensors"), "pt") as f:  # the file really holds int8 weights
        int8 = {k.removesuffix(".weight") for k in f.keys() if f.get_slice(k).get_dtype() == "I8"}
    model = load(out)
    assert int8 == set(linears(model))
    assert weight_bytes(out) < 0.5 * weight_bytes(lm_hf) and record["file_shrank"]
    ppl = perplexity(model, heldout)
    print(f"w8a8: ppl {base_ppl:.3f} -> {ppl:.3f}, {weight_bytes(lm_hf)} -> {weight_bytes(out)} bytes")
    assert ppl <= 1.01 * base_ppl


def test_sparse_2of4(lm_hf, tmp_path, heldout, base_ppl):
    out = tmp_path / "s24"
    record = compress(lm_hf, out, "sparse-2of4")
    check_common(lm_hf, out, record)
    model = load(out)
    for name, m in linears(model).items():  # at least 2 of every 4 consecutive inputs' weights are zero
        zeros = (m.weight.detach() == 0).reshape(m.out_features, -1, 4).sum(-1)
        assert bool((zeros >= 2).all()), name
    assert record["sparsity"]["groups_of_4_with_2_zeros"] == 1.0 and record["sparsity"]["zero_fraction"] >= 0.5
    # Honest about the saving: none, in this stack.
    assert not record["file_shrank"] and weight_bytes(out) >= 0.99 * weight_bytes(lm_hf)
    assert "no size or CPU-speed saving" in record["saves"]
    ppl = perplexity(model, heldout)
    print(f"sparse-2of4: ppl {base_ppl:.3f} -> {ppl:.3f}")
    assert math.isfinite(ppl)


def test_int8_torchao(lm_hf, tmp_path, heldout, base_ppl):
    from torchao.quantization import Int8Tensor

    out = tmp_path / "int8"
    record = compress(lm_hf, out, "int8-torchao")
    check_common(lm_hf, out, record)
    model = load(out)
    for name, m in linears(model).items():  # reloaded through transformers: still int8 in memory
        assert isinstance(m.weight, Int8Tensor) and m.weight.qdata.dtype == torch.int8, name
    assert record["quantization"]["int8_layers"] == len(linears(model))
    assert weight_bytes(out) < 0.5 * weight_bytes(lm_hf)
    ppl = perplexity(model, heldout)
    print(f"int8-torchao: ppl {base_ppl:.3f} -> {ppl:.3f}, {weight_bytes(lm_hf)} -> {weight_bytes(out)} bytes")
    assert ppl <= 1.01 * base_ppl


def test_w8a16_with_another_group_size(lm_hf, tmp_path, heldout, base_ppl):
    out = tmp_path / "w8a16"
    record = compress(lm_hf, out, "w8a16", "--group-size", "64")  # for models whose widths 128 does not divide
    check_common(lm_hf, out, record)
    group = record["quantization"]["groups"][0]
    assert (group["weight_bits"], group["group_size"]) == (8, 64) and record["file_shrank"]
    assert "group 64" in record["method"] and "per 64 inputs" in record["saves"]
    ppl = perplexity(load(out), heldout)
    print(f"w8a16: ppl {base_ppl:.3f} -> {ppl:.3f}")
    assert ppl <= 1.01 * base_ppl


def tiny_llama(d: Path, hidden: int) -> Path:
    """An HF Llama directory with no lmforge_run.yaml (its data has to come from --data)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(hidden_size=hidden, intermediate_size=3 * hidden, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=2, vocab_size=512)).save_pretrained(str(d))
    return d


def test_group_size_auto_picks_the_largest_that_divides_every_layer():
    from lmforge.tools.compress import RECIPES, auto_group_size

    w4a16 = RECIPES["w4a16"]
    assert auto_group_size(w4a16, {"q": 128, "down": 384}) == 128
    assert auto_group_size(w4a16, {"q": 64, "down": 192}) == 64     # the debug model (README's walkthrough)
    assert auto_group_size(w4a16, {"q": 256, "down": 704}) == 64    # 704 = 11 x 64
    assert auto_group_size(w4a16, {"q": 96, "down": 288}) == 32
    with pytest.raises(ConfigError, match=r"no supported group size .* \(48, 144\)"):
        auto_group_size(w4a16, {"q": 48, "down": 144})


def test_wanda_with_data_config(lm_hf, tmp_path):
    """A directory without lmforge_run.yaml calibrates on --data's training split and then carries it."""
    src = tiny_llama(tmp_path / "tiny", 64)
    out = tmp_path / "wanda"
    data = lm_hf / artifact.RUN_CONFIG  # a training YAML (its data cache is this session's)
    record = compress(src, out, "wanda", "--data", data)
    assert artifact.run_config(out).data == artifact.run_config(lm_hf).data
    assert (out / "tokenizer.json").is_file()  # the input had none: the calibration data's tokenizer
    assert record["calibration"]["samples"] == int(CALIBRATION)
    for name, m in linears(load(out)).items():
        assert float((m.weight == 0).float().mean()) >= 0.5, name
    assert not record["file_shrank"] and "no size or speed saving" in record["saves"]


# --------------------------------------------------------------------------- bad input: refused before any work

def test_bad_input_through_the_cli(lm_hf, tmp_path):
    assert "sparse-2of4" in lmforge("compress", "--help").stdout
    out = tmp_path / "out"
    proc = lmforge("compress", lm_hf, "--recipe", "int3", "--out", out, check=False)
    assert proc.returncode == 2 and "invalid choice: 'int3'" in proc.stderr and no_output(out)
    proc = lmforge("compress", tmp_path, "--recipe", "w4a16", "--out", out, check=False)
    assert proc.returncode == 2 and "is not a Hugging Face model directory" in proc.stderr and no_output(out)
    proc = lmforge("compress", lm_hf, "--recipe", "w4a16", "--out", out, "--group-size", "abc", check=False)
    assert proc.returncode == 2 and "argument --group-size: 'abc': auto or a whole number" in proc.stderr


def test_bad_input(lm_hf, tmp_path, monkeypatch):
    from lmforge.tools.compress import compress as run

    out = tmp_path / "out"
    cases = []
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("x")
    cases.append((tmp_path / "notes", "w4a16", {}, "not a Hugging Face model directory"))
    # hidden 64: an explicit group of 128 cannot divide any layer's in_features (checked from the Linear
    # shapes); hidden 48 (MLP 144): no supported group divides them, so auto has nothing to pick.
    narrow = tiny_llama(tmp_path / "narrow", 64)
    cases.append((narrow, "w4a16", {"data": lm_hf / artifact.RUN_CONFIG, "group_size": 128}, r"group size 128 does "
                  r"not divide the in_features of 7 of 7 Linear layer\(s\): model.layers.0.self_attn.q_proj \(64\)"))
    odd = tiny_llama(tmp_path / "odd", 48)
    cases.append((odd, "w8a16", {"data": lm_hf / artifact.RUN_CONFIG}, r"no supported group size \(128, 64, 32\) "
                  r"divides every quantized layer's in_features \(48, 144\); use w8a8"))
    cases.append((narrow, "w8a8", {}, "has no lmforge_run.yaml .* pass --data"))  # no data named anywhere
    cases.append((lm_hf, "w8a8", {"group_size": 64}, "--group-size is for the group-wise recipes"))
    cases.append((lm_hf, "int8-torchao", {"calibration_samples": 32}, "is data-free: --calibration-samples would be"))
    cases.append((lm_hf, "w8a8", {"calibration_samples": 100_000}, "calibration data: .*--calibration-samples"))
    cases.append((lm_hf, "w8a8", {"seq_len": 4096}, "longer than the model's max_position_embeddings"))
    # A classifier's run config: compression is for causal LMs.
    cls = tmp_path / "cls"
    cls.mkdir()
    for name in ("config.json", "model.safetensors"):
        (cls / name).symlink_to(lm_hf / name)
    (cls / artifact.RUN_CONFIG).write_text((lm_hf / artifact.RUN_CONFIG).read_text().replace("task: pretrain",
                                                                                            "task: classification"))
    cases.append((cls, "w8a8", {}, "works on causal language models .* task=classification"))
    if not torch.cuda.is_available():
        cases.append((lm_hf, "fp8", {}, "--recipe fp8 needs a CUDA GPU"))
    for src, recipe, kw, message in cases:
        with pytest.raises(ConfigError, match=message):
            run(src, out, recipe, **kw)
        assert no_output(out), (recipe, message)

    # The compression environment is missing: a clear pointer to `make compress-env`.
    monkeypatch.setenv("LMFORGE_COMPRESS_PYTHON", str(tmp_path / "no-such-python"))
    with pytest.raises(ConfigError, match="make compress-env"):
        run(lm_hf, out, "w4a16")
    assert no_output(out)


def test_failed_oneshot_leaves_nothing(lm_hf, tmp_path, monkeypatch):
    """A python without llm-compressor: the worker dies mid-way, the half-written output goes with it."""
    from lmforge.tools.compress import OneshotFailed, compress as run

    monkeypatch.setenv("LMFORGE_COMPRESS_PYTHON", sys.executable)  # the main environment has no llmcompressor
    out = tmp_path / "out"
    with pytest.raises(OneshotFailed, match="exited 1"):
        run(lm_hf, out, "w4a16", calibration_samples=2)
    assert no_output(out)
