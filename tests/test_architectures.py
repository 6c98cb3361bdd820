"""Llama-family architectures across the tools (tools/architectures.py): a tiny random Llama, Qwen2 (q/k/v
biases, tied embeddings) and Mistral (sliding window), each saved with lmforge's own trained tokenizer and
run config, is pruned (the smaller model loads in plain transformers, computes what the source computes
with the removed units silenced, and keeps its architecture's config) and exported to GGUF (read back: the
llama.cpp architecture, tensor names and metadata, and transformers' GGUF loader reproduces the logits);
any other architecture is refused naming it.

    .venv/bin/python -m pytest tests/test_architectures.py -q
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from conftest import DEBUG, lmforge

ARCHS = ("llama", "qwen2", "mistral")
SHAPE = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=64)
WINDOW = 16  # Mistral's sliding window: shorter than the calibration and test rows, so carrying it matters


@pytest.fixture(scope="module")
def run_cfg(data_cache):
    """The debug config with its data prepared: lmforge's trained tokenizer and calibration tokens."""
    from lmforge.training import data
    from lmforge.training.config import load_config

    cfg = load_config(DEBUG, [f"data.cache_dir={data_cache}"])
    return cfg, data.prepare(cfg.data)


def _save(model, cfg, prepared, out: Path) -> Path:
    from transformers import AutoTokenizer

    from lmforge.tools import artifact

    model.save_pretrained(str(out))
    AutoTokenizer.from_pretrained(str(prepared.tokenizer_dir)).save_pretrained(str(out))
    artifact.write_run_config(cfg, out)
    return out


@pytest.fixture(scope="module")
def models(run_cfg, tmp_path_factory) -> dict[str, Path]:
    """model_type → a Hugging Face directory of a tiny random causal LM of that architecture."""
    from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

    cfg, prepared = run_cfg
    confs = {"llama": LlamaConfig(**SHAPE), "qwen2": Qwen2Config(**SHAPE, tie_word_embeddings=True),
             "mistral": MistralConfig(**SHAPE, sliding_window=WINDOW)}
    root = tmp_path_factory.mktemp("archs")
    out = {}
    for i, (name, conf) in enumerate(confs.items()):
        conf.vocab_size = prepared.vocab_size
        torch.manual_seed(i)
        model = AutoModelForCausalLM.from_config(conf)
        with torch.no_grad():  # random, not zero, biases: wrong slicing or a dropped bias shows in the logits
            for p in model.parameters():
                if p.ndim == 1 and not torch.all(p == 1):
                    p.normal_(0, 0.5)
        out[name] = _save(model, cfg, prepared, root / name)
    return out


@pytest.fixture(scope="module")
def rows(run_cfg) -> torch.Tensor:
    from lmforge.tools import artifact

    return artifact.heldout_tokens(run_cfg[0], 2, seq_len=48)  # longer than WINDOW


def load(d: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(d), local_files_only=True, dtype=torch.float32).eval()


def test_tiny_models_are_what_they_claim(models):
    """The fixture's premise: each directory loads as its architecture, Qwen2's with q/k/v biases."""
    for name, d in models.items():
        model = load(d)
        assert model.config.model_type == name
        attn = model.model.layers[0].self_attn
        assert (attn.q_proj.bias is not None, attn.o_proj.bias is None) == (name == "qwen2", True)
    assert load(models["mistral"]).config.sliding_window == WINDOW
    assert load(models["qwen2"]).config.tie_word_embeddings


@pytest.mark.parametrize("arch,score", [("llama", "activation"), ("qwen2", "magnitude"), ("mistral", "activation")])
@torch.no_grad()
def test_prune(models, rows, arch, score, tmp_path):
    """Half the MLP channels, half the key/value groups and half the layers: the pruned model loads in plain
    transformers as the same architecture with a consistent config, and equals the source with the removed
    units silenced (a removed channel's down_proj column, a removed group's o_proj columns, a removed
    layer's o_proj and down_proj zeroed) — on rows longer than Mistral's window."""
    from transformers import AutoConfig

    from lmforge.tools.prune import Keep, prune

    src, out = models[arch], tmp_path / "pruned"
    record = prune(src, out, Keep(mlp=0.5, heads=0.5, layers=0.5), score=score, calibration_samples=4, log=print)
    before, after = AutoConfig.from_pretrained(str(src)), AutoConfig.from_pretrained(str(out))
    assert type(after) is type(before) and after.architectures == before.architectures
    head_dim = before.hidden_size // before.num_attention_heads
    assert (after.num_hidden_layers, after.num_attention_heads, after.num_key_value_heads, after.intermediate_size) == (
        1, 2, 1, 48)
    assert after.head_dim == head_dim  # written explicitly: hidden / heads would now be 32
    for key in ("sliding_window", "tie_word_embeddings", "max_position_embeddings", "vocab_size", "hidden_size"):
        assert getattr(after, key, None) == getattr(before, key, None), key
    if arch == "qwen2":
        assert after.layer_types == ["full_attention"] and not after.use_sliding_window

    small, source = load(out), load(src)
    attn = small.model.layers[0].self_attn
    assert (attn.q_proj.bias is not None) == (arch == "qwen2")
    if arch == "qwen2":
        assert tuple(attn.q_proj.bias.shape) == (2 * head_dim,) and tuple(attn.k_proj.bias.shape) == (head_dim,)
        assert small.lm_head.weight.data_ptr() == small.model.embed_tokens.weight.data_ptr()  # still tied
    # parameters: embeddings (once if tied), per layer q/k/v/o, 3 MLP matrices, 2 norms (+ q/k/v biases)
    H, V, I = after.hidden_size, after.vocab_size, after.intermediate_size
    q, kv = after.num_attention_heads * head_dim, after.num_key_value_heads * head_dim
    layer = 2 * H * q + 2 * H * kv + 3 * H * I + 2 * H + ((q + 2 * kv) if arch == "qwen2" else 0)
    assert record["params_after"] == sum(p.numel() for p in small.parameters()) == (
        V * H * (1 if after.tie_word_embeddings else 2) + layer + H)
    assert record["config_after"]["sliding_window"] == (WINDOW if arch == "mistral" else None)

    logits = small(input_ids=rows).logits
    assert torch.isfinite(logits).all()
    width = before.num_attention_heads // before.num_key_value_heads * head_dim
    for i, block in enumerate(source.model.layers):
        for ch in record["removed"]["mlp_channels"].get(str(i), []):
            block.mlp.down_proj.weight[:, ch] = 0
        for g in record["removed"]["kv_groups"].get(str(i), []):
            block.self_attn.o_proj.weight[:, g * width:(g + 1) * width] = 0
        if i in record["removed"]["layers"]:
            block.self_attn.o_proj.weight.zero_()
            block.mlp.down_proj.weight.zero_()
    torch.testing.assert_close(logits, source(input_ids=rows).logits, rtol=1e-4, atol=1e-4)


def _without_window(src: Path, dst: Path) -> Path:
    """A Mistral of the v0.2 kind (sliding_window null): what llama.cpp's "llama" architecture computes."""
    shutil.copytree(src, dst)
    conf = json.loads((dst / "config.json").read_text())
    conf["sliding_window"] = None
    (dst / "config.json").write_text(json.dumps(conf))
    return dst


@pytest.mark.parametrize("arch,gguf_arch", [("llama", "llama"), ("qwen2", "qwen2"), ("mistral", "llama")])
@torch.no_grad()
def test_gguf(models, rows, arch, gguf_arch, tmp_path):
    """f32 GGUF read back: gguf's reader sees llama.cpp's architecture, its tensor names (Qwen2's bias
    tensors; no output.weight when tied) and hyperparameters; transformers' GGUF loader rebuilds the
    same function (which undoes the Llama Q/K permutation and must not need one for Qwen2)."""
    from gguf import GGUFReader
    from transformers import AutoModelForCausalLM

    from lmforge.tools import artifact
    from lmforge.tools.export import export

    src = _without_window(models[arch], tmp_path / "src") if arch == "mistral" else models[arch]
    # not named "mistral": transformers takes a llama GGUF whose general.name is exactly that for its own
    # "mistral" GGUF architecture, which gguf-py does not have
    out = export(src, tmp_path / f"tiny-{arch}.gguf", fmt="gguf", quant="f32")
    reader = GGUFReader(str(out))
    field = lambda key: reader.get_field(key).contents()  # noqa: E731
    conf = json.loads((src / "config.json").read_text())
    assert field("general.architecture") == gguf_arch
    assert (field(f"{gguf_arch}.block_count"), field(f"{gguf_arch}.attention.head_count"),
            field(f"{gguf_arch}.attention.head_count_kv"), field(f"{gguf_arch}.feed_forward_length")) == (
        conf["num_hidden_layers"], conf["num_attention_heads"], conf["num_key_value_heads"], conf["intermediate_size"])
    names = {t.name for t in reader.tensors}
    biases = {f"blk.{i}.attn_{x}.bias" for i in range(2) for x in "qkv"}
    assert (biases <= names) == (arch == "qwen2") and not any(n.endswith(("attn_output.bias", "ffn_down.bias"))
                                                              for n in names)
    assert ("output.weight" in names) == (arch != "qwen2")  # tied: llama.cpp reuses token_embd
    assert artifact.run_config(out).to_yaml() == artifact.run_config(src).to_yaml()

    gguf_model = AutoModelForCausalLM.from_pretrained(str(out.parent), gguf_file=out.name, dtype=torch.float32).eval()
    assert gguf_model.config.model_type == ("qwen2" if arch == "qwen2" else "llama")
    want = load(src)(input_ids=rows).logits
    assert (gguf_model(input_ids=rows, use_cache=False).logits - want).abs().max().item() < 1e-4


def test_gguf_refuses_a_window_llama_cpp_would_not_apply(models, tmp_path):
    from lmforge.tools.export import export
    from lmforge.training.config import ConfigError

    with pytest.raises(ConfigError, match=f"sliding window of {WINDOW} tokens in 2 of 2 layers"):
        export(models["mistral"], tmp_path / "m.gguf", fmt="gguf")
    assert not any(tmp_path.iterdir())


def test_other_architectures_are_refused_naming_them(run_cfg, tmp_path):
    """A GPT-2 (with lmforge's tokenizer and run config, so nothing else is wrong with it): prune and GGUF
    export refuse it naming its model_type and class; the CLI exits 2 with that one line."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from lmforge.tools.export import export
    from lmforge.tools.prune import Keep, prune
    from lmforge.training.config import ConfigError

    cfg, prepared = run_cfg
    gpt2 = _save(GPT2LMHeadModel(GPT2Config(vocab_size=prepared.vocab_size, n_embd=32, n_layer=1, n_head=2)), cfg,
                 prepared, tmp_path / "gpt2")
    named = "model_type 'gpt2' (GPT2LMHeadModel)"
    with pytest.raises(ConfigError, match=re.escape(f"lmforge prune supports the Llama-family architectures "
                                                    f"(llama, mistral, qwen2); this model is {named}")):
        prune(gpt2, tmp_path / "pruned", Keep(mlp=0.5))
    with pytest.raises(ConfigError, match=re.escape(named)):
        export(gpt2, tmp_path / "in-process.gguf", fmt="gguf")
    proc = lmforge("export", gpt2, "--format", "gguf", "--out", tmp_path / "cli.gguf", check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert named in last and "--format gguf supports the Llama-family architectures" in last, proc.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpt2"]


@pytest.mark.slow  # starts `lmforge train`
def test_a_run_of_a_tied_qwen2_exports(models, data_cache, tmp_path):
    """Training a Qwen2 with tied embeddings, then `lmforge export RUN`: DeepSpeed's consolidation
    returns lm_head.weight and embed_tokens.weight as one tensor under two names, which safetensors
    refuses; the export writes it once and transformers ties it back."""
    from transformers import AutoModelForCausalLM

    run_dir = tmp_path / "run"
    lmforge("train", DEBUG, "--nproc", "2", f"run_dir={run_dir}", f"data.cache_dir={data_cache}",
            f"model.path={models['qwen2']}", "train.steps=2", "checkpoint.interval=2", "eval.interval=0",
            "logging.progress=false")
    lmforge("export", run_dir, "--out", tmp_path / "hf")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert type(model).__name__ == "Qwen2ForCausalLM"
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    trained = AutoModelForCausalLM.from_pretrained(models["qwen2"])
    assert not torch.equal(model.model.embed_tokens.weight, trained.model.embed_tokens.weight)  # the run's weights
