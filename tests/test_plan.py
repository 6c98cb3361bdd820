"""`lmforge plan`: the arithmetic (fast) and one real 2-rank measurement (slow).

    .venv/bin/python -m pytest -q tests/test_plan.py                 # all
    .venv/bin/python -m pytest -q tests/test_plan.py -m 'not slow'   # arithmetic only (seconds)
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from conftest import DEBUG, REPO, lmforge
from lmforge.tools import plan
from lmforge.training.config import ConfigError, load_config
from lmforge.training.model import count_params, hf_config

GIB = 2**30


def cfg_of(*overrides: str):
    return load_config(DEBUG, list(overrides))


def est(*overrides: str, **kw) -> plan.Estimate:
    return plan.estimate(cfg_of(*overrides), **kw)


@pytest.mark.parametrize("preset", ["llama-debug", "llama-demo", "llama-1b", "llama-7b"])
def test_param_count_matches_the_built_model(preset):
    cfg = cfg_of(f"model.preset={preset}")
    conf = hf_config(cfg.model, cfg.data.vocab_size, 0)
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):  # the real module tree, no memory
        model = AutoModelForCausalLM.from_config(conf)
    assert (plan.model_shape(conf).n_params, plan.model_shape(conf).n_matmul) == count_params(model)


def test_zero3_divides_params_grads_and_optimizer_by_world_size():
    one = est("parallel.zero_stage=3", "train.global_batch_size=16", "model.preset=llama-1b", world_size=1)
    eight = est("parallel.zero_stage=3", "train.global_batch_size=16", "model.preset=llama-1b", world_size=8)
    for term in ("parameters", "gradients", "optimizer state"):
        assert eight.terms[term] == pytest.approx(one.terms[term] / 8, rel=1e-6), term
    assert eight.terms["activations"] == one.terms["activations"]  # per-rank batch is the same


def test_stages_partition_progressively():
    kw = dict(world_size=4)
    z1, z2, z3 = (est(f"parallel.zero_stage={s}", "model.preset=llama-1b", **kw) for s in (1, 2, 3))
    assert z1.terms["optimizer state"] == z2.terms["optimizer state"] == z3.terms["optimizer state"]
    assert z1.terms["gradients"] > z2.terms["gradients"] == z3.terms["gradients"]
    assert z1.terms["parameters"] == z2.terms["parameters"] > z3.terms["parameters"]


def test_8bit_state_is_smaller_than_adamw():
    def opt_bytes(name):
        return est("model.preset=llama-1b", f"train.optimizer={name}", world_size=2).terms["optimizer state"]

    adamw, adam8, lion8 = opt_bytes("adamw"), opt_bytes("adamw_8bit"), opt_bytes("lion_8bit")
    assert lion8 < adam8 < adamw
    n = est("model.preset=llama-1b", world_size=2).n_params
    assert adamw - adam8 == pytest.approx((8 - 2.04) * n / 2, rel=1e-3)


def test_offload_moves_state_to_the_host():
    on = est("parallel.offload_optimizer=true", "parallel.offload_params=true", world_size=2)
    assert on.terms["optimizer state"] == 0 and on.terms["parameters"] == 0
    assert on.host_terms["optimizer state"] > 0 and on.host_terms["parameters"] > 0


def test_activation_checkpointing_lowers_activations():
    e = est("model.preset=llama-1b", "data.seq_len=2048", world_size=2, gpu_memory="80GiB")
    assert e.activations_with_checkpointing < e.activations_without_checkpointing / 4
    cand = plan.replace(plan.candidate_of(cfg_of()), activation_checkpointing=True, zero_stage=3)
    ck = est("model.preset=llama-1b", "data.seq_len=2048", world_size=2, gpu_memory="80GiB", candidate=cand)
    assert ck.terms["activations"] == e.activations_with_checkpointing


def test_sequence_and_tensor_parallel_split_activations():
    base = plan.candidate_of(cfg_of())
    kw = dict(world_size=4, gpu_memory="80GiB")
    full = est("model.preset=llama-1b", **kw)
    sp = est("model.preset=llama-1b", **kw, candidate=plan.replace(base, sequence_parallel=2))
    tp = est("model.preset=llama-1b", **kw, candidate=plan.replace(base, tensor_parallel=2))
    assert sp.terms["activations"] == pytest.approx(full.terms["activations"] / 2, rel=0.01)
    assert tp.terms["activations"] < full.terms["activations"]
    # TP 2 x ZeRO-3 over the other 2 ranks holds the same quarter of the weights as ZeRO-3 over 4
    assert tp.terms["parameters"] == pytest.approx(full.terms["parameters"], rel=1e-6)


def test_recommend_picks_a_layout_that_fits():
    cfg = load_config(DEBUG, ["model.preset=llama-7b", "data.seq_len=4096", "train.micro_batch_size=4",
                              "train.global_batch_size=64", "parallel.zero_stage=1"])
    hw = plan.hardware(cfg, 1, 8, "80GiB")
    configured = plan.estimate(cfg, hw=hw)
    assert configured.fits is False  # 7B, ZeRO-1, no checkpointing, micro batch 4 x 4096: no
    rec = plan.recommend(cfg, hw)
    assert rec is not None and rec.fits and rec.device_total <= 80 * GIB
    assert rec.candidate != configured.candidate
    tiny = plan.hardware(cfg, 1, 8, "1GiB")
    assert plan.recommend(cfg, tiny) is None  # 7B states alone need more than 1 GiB per rank


def test_tokens_per_s_and_mfu():
    e = est("model.preset=llama-1b", world_size=8, gpu_memory="80GiB", gpu="H100", mfu=0.5)
    assert e.tokens_per_s == pytest.approx(8 * 989e12 * 0.5 / e.flops_per_token)
    assert e.mfu == 0.5
    cpu = est(world_size=2)
    assert cpu.tokens_per_s is None and any("peak" in n for n in cpu.notes)


@pytest.mark.parametrize("text,expected", [("80GiB", 80 * GIB), ("80G", 80 * GIB), ("40GB", 40 * 10**9),
                                           ("81920MiB", 80 * GIB), ("1024", 1024)])
def test_parse_memory(text, expected):
    assert plan.parse_memory(text) == expected


@pytest.mark.parametrize("bad", ["banana", "-3GiB", "0"])
def test_parse_memory_rejects(bad):
    with pytest.raises(ConfigError):
        plan.parse_memory(bad)


def test_cli_json_parses_and_table_prints():
    out = lmforge("plan", DEBUG, "model.preset=llama-1b", "--gpus-per-node", "8", "--gpu-memory", "80GiB",
                  "--gpu", "A100", "--json")
    doc = json.loads(out.stdout)
    e = doc["estimate"]
    assert e["hardware"]["world_size"] == 8 and e["hardware"]["precision"] == "bf16"
    assert e["total_per_rank_bytes"] == sum(e["memory_per_rank_bytes"].values())
    assert set(e["memory_per_rank_bytes"]) >= {"parameters", "gradients", "optimizer state", "activations",
                                               "communication buffers", "allocator headroom", "runtime overhead"}
    assert doc["recommended"]["fits"] is True
    table = lmforge("plan", DEBUG, "--gpus-per-node", "2").stdout
    assert "per-rank memory" in table and "recommended" in table


def test_cli_bad_gpu_memory_exits_2():
    out = lmforge("plan", DEBUG, "--gpu-memory", "banana", check=False)
    assert out.returncode == 2 and "--gpu-memory" in out.stderr and "banana" in out.stderr


@pytest.mark.slow
def test_estimate_matches_measured_peak_per_rank(data_cache):
    """2 real gloo ranks, ZeRO-3, one model size: plan's per-rank growth within +-15% of measured."""
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "bench_plan_memory.py"), "--sizes", "m",
                           "--stages", "3", "--cache-dir", str(data_cache), "--json"],
                          capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode in (0, 1) and proc.stdout.strip().startswith("{"), proc.stderr[-4000:]
    row = json.loads(proc.stdout)["rows"][0]
    assert abs(row["ratio"] - 1) <= 0.15, row


def test_plan_never_imports_deepspeed_or_torch():
    """Arithmetic only: the CLI's plan imports neither DeepSpeed nor torch (or transformers, which
    imports torch), which is what keeps `lmforge plan` under 2 s."""
    code = ("import sys, runpy; sys.argv = ['lmforge', 'plan', 'configs/pretrain_7b.yaml', '--nodes', '2', "
            "'--gpus-per-node', '8', '--gpu', 'H100']\n"
            "from lmforge.launcher import cli\n"
            "try:\n    cli.main()\nfinally:\n    print(sorted(m for m in ('deepspeed', 'torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout[-2000:] + out.stderr[-2000:]
    assert "recommended ZeRO-" in out.stdout


@pytest.mark.parametrize("preset", ["llama-debug", "llama-demo", "llama-1b", "llama-7b"])
def test_plain_config_shape_equals_transformers_config(preset, tmp_path):
    """The torch-free config the plan reads gives the shape transformers' own config gives, for the
    presets with overrides and for a local directory's config.json (Qwen2: q/k/v biases, tied)."""
    from transformers import Qwen2Config

    from lmforge.tools.plan import model_config, model_shape

    over = ["model.overrides.num_key_value_heads=2", "model.overrides.max_position_embeddings=2048"]
    cfg = load_config(DEBUG, [f"model.preset={preset}", *over])
    assert type(model_config(cfg, 512)).__name__ == "SimpleNamespace"
    assert model_shape(model_config(cfg, 512)) == model_shape(hf_config(cfg.model, 512, 0))
    Qwen2Config(hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=1024, tie_word_embeddings=True).save_pretrained(tmp_path)
    cfg = load_config(DEBUG, [f"model.path={tmp_path}"])
    assert type(model_config(cfg, 512)).__name__ == "SimpleNamespace"
    assert model_shape(model_config(cfg, 512)) == model_shape(hf_config(cfg.model, 512, 0))
    # a key outside the arithmetic's: transformers' config decides, and validates
    cfg = load_config(DEBUG, ["model.overrides.pretraining_tp=2"])
    assert type(model_config(cfg, 512)).__name__ == "LlamaConfig"
    with pytest.raises(ConfigError, match="model.overrides.hiden_size: LlamaConfig has no such key"):
        model_config(load_config(DEBUG, ["model.overrides.hiden_size=64"]), 512)


def test_a_named_gpu_implies_its_memory_and_peak():
    h100 = plan.hardware(load_config(DEBUG, ["model.preset=llama-1b"]), gpus_per_node=8, gpu="NVIDIA H100 80GB HBM3")
    assert (h100.device, h100.capacity, h100.peak_tflops) == ("cuda", 81559 * 2**20, 989.0)
    a100 = plan.hardware(load_config(DEBUG, []), gpu="A100-40GB", gpu_memory="38GiB", peak_tflops=300)
    assert (a100.capacity, a100.peak_tflops) == (38 * 2**30, 300)  # given values override the table
    assert plan.hardware(load_config(DEBUG, []), gpu="a100").capacity == 81920 * 2**20
    with pytest.raises(ConfigError, match="--gpu 'B300': unknown; known: H200, H100"):
        plan.hardware(load_config(DEBUG, []), gpu="B300")
