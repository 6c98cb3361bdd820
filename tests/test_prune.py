"""Structured pruning and healing (issue: "parameter count and file size drop by the requested amount,
and healing recovers at least half of the perplexity lost"), on the once-per-session trained model:

    lmforge prune LM_HF --out P --mlp 0.5
    lmforge train configs/heal.yaml --nproc 2 model.init_from=P distill.teacher=LM_HF …; lmforge export …

Perplexity is measured here in plain transformers on the run's held-out tokens (artifact.heldout_tokens);
`pytest -s` prints size, perplexity and CPU forward tokens/s before and after.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO, lmforge, losses

HEAL = REPO / "configs" / "heal.yaml"


def expected_params(c) -> int:
    """A Llama's parameter count from its config alone (no biases)."""
    H, hd = c.hidden_size, c.head_dim
    attn = H * c.num_attention_heads * hd * 2 + H * c.num_key_value_heads * hd * 2  # q, o; k, v
    per_layer = attn + 3 * H * c.intermediate_size + 2 * H                            # + MLP, 2 norms
    return c.num_hidden_layers * per_layer + c.vocab_size * H * (1 if c.tie_word_embeddings else 2) + H


def load(d: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(d), local_files_only=True).eval()


def weight_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in Path(d).glob("*.safetensors"))


@torch.no_grad()
def measure(d: Path, tokens: torch.Tensor) -> dict:
    """Held-out perplexity (next-token loss inside each row) and forward tokens/s, one thread."""
    model = load(d)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        total, count, t0 = 0.0, 0, time.perf_counter()
        for rows in tokens.split(8):
            logits = model(input_ids=rows).logits[:, :-1]
            total += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), rows[:, 1:].reshape(-1),
                                                       reduction="sum").item()
            count += rows[:, 1:].numel()
        seconds = time.perf_counter() - t0
    finally:
        torch.set_num_threads(threads)
    return {"ppl": math.exp(total / count), "tok_s": tokens.numel() / seconds, "bytes": weight_bytes(d),
            "params": sum(p.numel() for p in model.parameters())}


@torch.no_grad()
def assert_same_function_as_masked_source(src: Path, pruned: Path, rows: torch.Tensor) -> None:
    """The pruned model computes what the source computes with the removed units silenced: a removed MLP
    channel's down_proj column, a removed group's o_proj columns (its k/v feed nothing else) and a removed
    layer's o_proj and down_proj zeroed (the residual stream then passes it unchanged). Wrong slicing of
    any weight breaks the equality."""
    source, record = load(src), json.loads((pruned / "pruning.json").read_text())
    c = source.config
    width = c.num_attention_heads // c.num_key_value_heads * c.head_dim
    for i, layer in enumerate(source.model.layers):
        for ch in record["removed"]["mlp_channels"].get(str(i), []):
            layer.mlp.down_proj.weight[:, ch] = 0
        for g in record["removed"]["kv_groups"].get(str(i), []):
            layer.self_attn.o_proj.weight[:, g * width:(g + 1) * width] = 0
        if i in record["removed"]["layers"]:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
    torch.testing.assert_close(load(pruned)(input_ids=rows).logits, source(input_ids=rows).logits, rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def heldout(lm_hf) -> torch.Tensor:
    from lmforge.tools import artifact

    return artifact.heldout_tokens(artifact.run_config(lm_hf))


@pytest.fixture(scope="module")
def teacher(lm_hf, heldout) -> dict:
    return measure(lm_hf, heldout)


@pytest.fixture(scope="module")
def pruned_mlp(lm_hf, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pruned") / "mlp50"
    t0 = time.perf_counter()
    lmforge("prune", lm_hf, "--out", out, "--mlp", "0.5", "--calibration-samples", "32")
    print(f"\nlmforge prune --mlp 0.5: {time.perf_counter() - t0:.1f} s")
    return out


def test_prune_mlp_half_drops_params_and_bytes_by_the_mlp_share(lm_hf, pruned_mlp, heldout, teacher):
    from transformers import AutoConfig

    before, after = (AutoConfig.from_pretrained(str(d)) for d in (lm_hf, pruned_mlp))
    assert after.intermediate_size == before.intermediate_size // 2
    assert (after.num_attention_heads, after.num_key_value_heads, after.head_dim, after.num_hidden_layers) == (
        before.num_attention_heads, before.num_key_value_heads, before.head_dim, before.num_hidden_layers)
    got = measure(pruned_mlp, heldout)
    # Exactly the MLP half: 3 matrices of hidden x intermediate/2 per layer; nothing else changed.
    mlp_half = before.num_hidden_layers * 3 * before.hidden_size * (before.intermediate_size // 2)
    assert teacher["params"] == expected_params(before)
    assert got["params"] == expected_params(after) == teacher["params"] - mlp_half
    # The file shrinks by the same fp32 bytes (within the safetensors header).
    assert abs((teacher["bytes"] - got["bytes"]) - 4 * mlp_half) < 2048, (teacher["bytes"], got["bytes"])
    record = json.loads((pruned_mlp / "pruning.json").read_text())
    assert (record["params_before"], record["params_after"]) == (teacher["params"], got["params"])
    assert len(record["removed"]["mlp_channels"]) == before.num_hidden_layers
    assert all(len(v) == before.intermediate_size // 2 for v in record["removed"]["mlp_channels"].values())
    # Channels kept by activation score had the larger activations.
    assert all(s["kept"] > s["removed"] for s in record["scores"]["mlp_channels"].values())
    assert (pruned_mlp / "lmforge_run.yaml").read_text() == (lm_hf / "lmforge_run.yaml").read_text()
    assert math.isfinite(got["ppl"]) and got["ppl"] > teacher["ppl"]
    assert_same_function_as_masked_source(lm_hf, pruned_mlp, heldout[:4])


def test_heal_by_distillation_recovers_at_least_half_the_lost_perplexity(lm_hf, pruned_mlp, heldout, teacher,
                                                                        data_cache, tmp_path):

    run_dir, healed = tmp_path / "heal", tmp_path / "healed"
    t0 = time.perf_counter()
    # data.holdout: lm_run's split, so the held-out rows stay unseen by the healing run too.
    lmforge("train", HEAL, "--nproc", "2", f"model.init_from={pruned_mlp}", f"distill.teacher={lm_hf}",
            f"run_dir={run_dir}", f"data.cache_dir={data_cache}", "data.holdout=0.1", "logging.progress=false")
    t_heal = time.perf_counter() - t0
    lmforge("export", run_dir, "--out", healed)
    kd = [json.loads(line)["train/kd_loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
          if "train/kd_loss" in line]
    assert len(kd) == len(losses(run_dir)) and all(math.isfinite(x) and x > 0 for x in kd)  # logged every step
    pruned, after = measure(pruned_mlp, heldout), measure(healed, heldout)
    assert after["params"] == pruned["params"] and after["bytes"] == pytest.approx(pruned["bytes"], abs=2048)
    lost = pruned["ppl"] - teacher["ppl"]
    print(f"\nhealing run (2 ranks, ZeRO-2, {len(kd)} steps) {t_heal:.1f} s")
    print("| model | params | bytes | ppl | CPU tokens/s (1 thread) |\n|---|---|---|---|---|")
    for name, m in (("unpruned", teacher), ("pruned --mlp 0.5", pruned), ("healed", after)):
        print(f"| {name} | {m['params']:,} | {m['bytes']:,} | {m['ppl']:.3f} | {m['tok_s']:,.0f} |")
    assert lost > 0
    assert pruned["ppl"] - after["ppl"] >= 0.5 * lost, (teacher["ppl"], pruned["ppl"], after["ppl"])


def test_prune_heads_and_layers(lm_hf, heldout, teacher, tmp_path):
    from transformers import AutoConfig

    out = tmp_path / "heads-layers"
    lmforge("prune", lm_hf, "--out", out, "--heads", "0.5", "--layers", "0.5", "--calibration-samples", "16")
    before, after = (AutoConfig.from_pretrained(str(d)) for d in (lm_hf, out))
    # Whole key/value groups go: GQA ratio and head_dim stay.
    assert after.num_key_value_heads == before.num_key_value_heads // 2
    assert after.num_attention_heads == before.num_attention_heads // 2
    assert after.head_dim == before.head_dim and after.num_hidden_layers == before.num_hidden_layers // 2
    got = measure(out, heldout)
    assert got["params"] == expected_params(after) < teacher["params"]
    assert abs((teacher["bytes"] - got["bytes"]) - 4 * (teacher["params"] - got["params"])) < 2048
    record = json.loads((out / "pruning.json").read_text())
    importance = record["scores"]["layers_block_importance"]
    assert record["removed"]["layers"] == [min(range(len(importance)), key=importance.__getitem__)]
    assert math.isfinite(got["ppl"]) and got["ppl"] > teacher["ppl"]
    assert_same_function_as_masked_source(lm_hf, out, heldout[:4])


def test_bad_prune_input_is_refused_before_any_output(lm_hf, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForSequenceClassification

    from lmforge.tools.prune import Keep, prune
    from lmforge.training.config import ConfigError

    out = tmp_path / "never"
    proc = lmforge("prune", lm_hf, "--out", out, "--mlp", "0", check=False)  # the CLI: exit 2, one line
    assert proc.returncode == 2 and "--mlp 0.0: the fraction to keep must be in (0, 1]" in proc.stderr, proc.stderr
    classifier = tmp_path / "classifier"
    LlamaForSequenceClassification(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                               num_attention_heads=2)).save_pretrained(classifier)
    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=2)).save_pretrained(gpt2)
    weightless = tmp_path / "weightless"
    LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2).save_pretrained(weightless)
    for src, keep, message in ((lm_hf, Keep(layers=1.5), "--layers 1.5: the fraction to keep must be in (0, 1]"),
                               (lm_hf, Keep(heads=0.2), "at least one must stay"),  # 0.2 x 2 groups rounds to 0
                               (lm_hf, Keep(), "nothing to prune"),
                               (classifier, Keep(mlp=0.5), "causal language models (LlamaForCausalLM)"),
                               (gpt2, Keep(mlp=0.5), "supports the Llama-family architectures"),
                               (tmp_path, Keep(mlp=0.5), "not a Hugging Face model directory"),
                               (weightless, Keep(mlp=0.5), "holds no weights")):
        with pytest.raises(ConfigError, match=re.escape(message)):
            prune(src, out, keep)
    with pytest.raises(ConfigError, match="--score magnitude reads no calibration data: --seq-len would be ignored"):
        prune(lm_hf, out, Keep(mlp=0.5), score="magnitude", seq_len=32)
    assert not out.exists() and not (tmp_path / ".tmp_never").exists()


def _other_tokenizer_teacher(path: Path, vocab_size: int) -> Path:
    """A causal Llama whose tokenizer was trained on other text (its ids mean other tokens)."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 50, vocab_size=300,
                            special_tokens=["<|endoftext|>"])
    PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>").save_pretrained(path)
    LlamaForCausalLM(LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2)).save_pretrained(path)
    return path


def test_distill_teacher_with_another_vocabulary_is_refused_before_ranks_start(pruned_mlp, data_cache, tmp_path):
    """Refused by preflight, before any rank starts; through the CLI (the first teacher): exit 2 and no
    run directory written."""
    from transformers import AutoConfig

    from lmforge.training.config import ConfigError, load_config
    from lmforge.training.train import preflight

    vocab = AutoConfig.from_pretrained(str(pruned_mlp)).vocab_size
    for teacher, message in ((_other_tokenizer_teacher(tmp_path / "same-size", vocab), "tokenizer differs"),
                             (_other_tokenizer_teacher(tmp_path / "other-size", vocab + 64), "vocab_size")):
        run_dir = tmp_path / f"run-{teacher.name}"
        args = [f"model.init_from={pruned_mlp}", f"distill.teacher={teacher}", f"run_dir={run_dir}",
                f"data.cache_dir={data_cache}", "data.holdout=0.1"]
        if teacher.name == "same-size":
            proc = lmforge("train", HEAL, "--nproc", "2", *args, check=False)
            assert proc.returncode == 2 and "distill.teacher" in proc.stderr and message in proc.stderr, proc.stderr[-3000:]
            assert not (run_dir / "config.yaml").exists()  # the launcher writes it only after preflight
        with pytest.raises(ConfigError, match="distill.teacher") as err:
            preflight(load_config(HEAL, args), 2, logging.getLogger("test_prune"))
        assert message in str(err.value)


def test_distill_config_refusals():
    from lmforge.training.config import ConfigError, load_config

    base = ["model.init_from=/x", "distill.teacher=/y"]
    for extra, message in ((["task=classification"], "for task pretrain or sft"),
                           (["parallel.sequence=2", "parallel.zero_stage=3"], "parallel.sequence/tensor"),
                           (["distill.alpha=1.5"], "distill.alpha"),
                           (["distill.temperature=0"], "distill.temperature")):
        with pytest.raises(ConfigError, match=re.escape(message)):
            load_config(HEAL, base + extra)
    assert load_config(HEAL, base).distill.alpha == 0.5


def test_kd_loss_is_the_temperature_scaled_kl_over_counted_targets():
    from lmforge.training.distill import kd_loss

    torch.manual_seed(0)
    student, teacher = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    targets = torch.tensor([[1, 2, -100, 4, 5], [-100, -100, 3, 3, 3]])
    T = 2.0
    keep = targets != -100
    p_t, log_p_s = (teacher[keep] / T).softmax(-1), (student[keep] / T).log_softmax(-1)
    expected = (p_t * (p_t.log() - log_p_s)).sum(-1).mean() * T * T
    torch.testing.assert_close(kd_loss(student, teacher, targets, T), expected)
    moved = student.clone()
    moved[~keep] += 5.0  # ignored positions count for nothing
    torch.testing.assert_close(kd_loss(moved, teacher, targets, T), expected)
    assert kd_loss(teacher, teacher, targets, T).abs().item() < 1e-6
