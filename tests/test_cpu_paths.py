"""Code paths that the CPU's instruction set chooses, tested on whichever CPU runs the suite, in
process (seconds): QLoRA's 4-bit layers on bitsandbytes' two CPU paths (its packed AVX512-BF16
inference kernel and the dequantize path every other CPU runs), the preflight that refuses a
bitsandbytes whose packed path cannot be switched off, and the DeepSpeed op cache keyed by the CPU.

    pytest tests/test_cpu_paths.py -rs     # -rs: the skip lines name the path this CPU cannot run
"""

from __future__ import annotations

import pytest
import torch

from conftest import DEBUG

bnb = pytest.importorskip("bitsandbytes")
from bitsandbytes.functional import has_avx512bf16  # noqa: E402

from lmforge.training import dist  # noqa: E402
from lmforge.training import model as model_lib  # noqa: E402
from lmforge.training.config import ConfigError, FinetuneConfig, load_config  # noqa: E402

AVX512_BF16 = bool(has_avx512bf16())
NEEDS_PACKED = pytest.mark.skipif(
    not AVX512_BF16, reason="bitsandbytes' packed 4-bit path is a native AVX512-BF16 kernel: this CPU has no "
                            "avx512_bf16, so only the dequantize path runs here (tested above)")


def _layer(out_features: int, lmforge_path: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    dense = torch.nn.Linear(64, out_features, bias=False)
    layer = bnb.nn.Linear4bit(64, out_features, bias=False, compute_dtype=torch.float32, quant_type="nf4")
    layer.load_state_dict(dense.state_dict())
    layer = layer.to("cpu")  # quantizes
    if lmforge_path:
        assert model_lib.keep_4bit_training_path(layer) == int(AVX512_BF16)
    return layer


def _train_step(layer, x):
    x = x.detach().clone().requires_grad_(True)
    out = layer.train()(x)
    out.square().sum().backward()
    return out.detach(), x.grad


def _packed(layer) -> bool:
    return bool(getattr(layer.weight.quant_state, "packing_format_for_cpu", False))


@pytest.mark.parametrize("out_features", [176, 64, 4096])  # not a multiple of 32 (the packed path's refusal), real shapes
def test_lmforge_4bit_layer_evaluates_and_trains_on_one_path(out_features, record_property):
    """What a QLoRA run does to each base layer: train, evaluate (eval mode, no grad), train again.
    On lmforge's path all three give the training path's numbers, bitwise, and the input gradient."""
    record_property("bnb_4bit_path", model_lib.four_bit_path("cpu"))
    print("bitsandbytes path:", model_lib.four_bit_path("cpu"))
    layer = _layer(out_features, lmforge_path=True)
    x = torch.randn(3, 64)
    out1, grad1 = _train_step(layer, x)
    with torch.no_grad():
        evaluated = layer.eval()(x)
    out2, grad2 = _train_step(layer, x)
    assert not _packed(layer)
    assert torch.equal(evaluated, out1) and torch.equal(out2, out1)
    assert grad1 is not None and torch.equal(grad2, grad1)
    # and it computes with the dequantized 4-bit weights in fp32
    w = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    assert torch.allclose(out1, x @ w.t(), atol=1e-5)


@NEEDS_PACKED
@pytest.mark.parametrize("out_features", [176, 64])
def test_bitsandbytes_packed_path_is_not_a_training_path(out_features):
    """The other path, forced: bitsandbytes' own default on AVX512-BF16 CPUs. A 176-wide layer
    fails at its first evaluation; a 64-wide one is repacked and then trains through a bf16 kernel
    that gives other outputs and no input gradient. This is why lmforge switches it off."""
    layer = _layer(out_features, lmforge_path=False)
    assert layer.support_avx512bf16_for_cpu
    x = torch.randn(3, 64)
    out1, grad1 = _train_step(layer, x)
    if out_features % model_lib.PACKED_4BIT_MULTIPLE:
        with pytest.raises(AssertionError, match="divisible by block_n"), torch.no_grad():
            layer.eval()(x)
        return
    with torch.no_grad():
        layer.eval()(x)
    assert _packed(layer)
    out2, grad2 = _train_step(layer, x)
    assert grad2 is None or not torch.equal(out2, out1)


def _debug_hf_config(intermediate_size: int = 176):
    """The debug model with an MLP 176 wide by default: not a multiple of 32, a shape the packed path refuses."""
    cfg = load_config(DEBUG, [f"model.overrides.intermediate_size={intermediate_size}"])
    return model_lib.hf_config(cfg.model, 512, 0)


@pytest.mark.parametrize("intermediate_size", [176, 192])
def test_preflight_accepts_the_debug_model_on_this_cpu(intermediate_size):
    """A 176-wide MLP and the debug model's own 192 are accepted on both kinds of CPU: the probe in
    preflight evaluates and trains a 4-bit layer the way a run does."""
    model_lib.check_finetune(_debug_hf_config(intermediate_size), "sft", FinetuneConfig(method="qlora"))


@NEEDS_PACKED
def test_preflight_refuses_when_the_packed_path_cannot_be_switched_off(monkeypatch):
    """A bitsandbytes whose packed path lmforge cannot switch off (simulated: the switch does
    nothing) is refused before any rank starts, naming the layers that would fail and the multiple."""
    monkeypatch.setattr(model_lib, "keep_4bit_training_path", lambda model: 0)
    with pytest.raises(ConfigError) as e:
        model_lib.check_finetune(_debug_hf_config(), "sft", FinetuneConfig(method="qlora"))
    msg = str(e.value)
    assert "multiple of 32" in msg and "model.layers.0.mlp.gate_proj (176)" in msg and "mlp.up_proj (176)" in msg
    assert "down_proj" not in msg  # 64 wide: the packed path takes it


def test_deepspeed_op_cache_is_keyed_by_the_cpu(monkeypatch):
    """DeepSpeed JIT-builds its CPU ops with -march=native: a cache shared between an AVX-512 node
    and an AVX2 node (a home directory on NFS) must not hand one the other's build."""
    here = dist.default_extensions_dir()
    monkeypatch.setattr(dist, "_cpu_flags", lambda: "fpu sse2 avx avx2 fma")
    assert dist.default_extensions_dir() != here
    assert dist.default_extensions_dir().rsplit("-", 1)[0] == here.rsplit("-", 1)[0]
