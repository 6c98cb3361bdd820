"""`lmforge export --format gguf|onnx`: each file reloads in its real runtime and reproduces the
model it came from (logits or held-out perplexity), carries the run config, and bad input fails
cleanly with nothing written.

    .venv/bin/python -m pytest tests/test_formats.py -q
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import lmforge

ROWS = 16  # held-out rows scored per check (the fixture's split has about 14)


def _ppl(logits: torch.Tensor, ids: torch.Tensor) -> float:
    logits = torch.as_tensor(logits).float()
    return torch.exp(torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                       ids[:, 1:].reshape(-1))).item()


@pytest.fixture(scope="module")
def heldout(lm_hf):
    from lmforge.tools import artifact

    return artifact.heldout_tokens(artifact.run_config(lm_hf), ROWS)


@pytest.fixture(scope="module")
def hf_logits(lm_hf, heldout):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(lm_hf), dtype=torch.float32).eval()
    with torch.no_grad():
        return model(heldout, use_cache=False).logits


@pytest.fixture(scope="module")
def gguf_dir(lm_run, lm_hf, tmp_path_factory) -> Path:
    """f16 and q8_0 from the HF export (in this process: export() is what the CLI calls); f32 straight
    from the run directory (consolidated on the way), through the CLI."""
    from lmforge.tools.export import export

    out = tmp_path_factory.mktemp("gguf")
    for quant in ("f16", "q8_0"):
        export(lm_hf, out / f"m-{quant}.gguf", fmt="gguf", quant=quant)
    lmforge("export", lm_run, "--format", "gguf", "--quant", "f32", "--out", out / "m-f32.gguf")
    return out


def _gguf_logits(path: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids, use_cache=False).logits


@pytest.mark.parametrize("quant,weight_type", [("f32", "F32"), ("f16", "F16"), ("q8_0", "Q8_0")])
def test_gguf_reloads_in_transformers(gguf_dir, lm_hf, heldout, hf_logits, quant, weight_type):
    from lmforge.tools import artifact
    from lmforge.tools.to_gguf import tensor_types

    path = gguf_dir / f"m-{quant}.gguf"
    assert sorted(p.name for p in gguf_dir.iterdir()) == ["m-f16.gguf", "m-f32.gguf", "m-q8_0.gguf"]  # no temp left
    assert artifact.run_config(path).to_yaml() == artifact.run_config(lm_hf).to_yaml()
    types = tensor_types(path)
    assert set(types) <= {"F32", weight_type} and types.get(weight_type, 0) >= 14  # 7 matrices × 2 layers (+ embd/out)

    logits = _gguf_logits(path, heldout)
    diff = (logits - hf_logits).abs().max().item()
    ppl, ref = _ppl(logits, heldout), _ppl(hf_logits, heldout)
    print(f"gguf {quant}: {path.stat().st_size} bytes, max |logit diff| {diff:.2e}, ppl {ppl:.4f} vs {ref:.4f}")
    if quant == "f32":  # written from the run directory: consolidation + GGUF layout round trip exactly
        assert diff < 1e-5
    elif quant == "f16":
        assert diff < 1e-2 or abs(ppl / ref - 1) < 0.005
    else:
        assert ppl <= ref * 1.01
    assert diff > 0 or quant == "f32"  # a quantized file that reproduces fp32 bit for bit was not quantized


def test_gguf_sizes_and_tokenizer(gguf_dir, lm_hf):
    from transformers import AutoTokenizer

    size = {q: (gguf_dir / f"m-{q}.gguf").stat().st_size for q in ("f32", "f16", "q8_0")}
    assert size["q8_0"] < 0.6 * size["f16"] < 0.6 * size["f32"]
    # the tokenizer transformers rebuilds from the GGUF metadata splits text exactly as the original
    text = "def load(fp):\n    return json.loads(fp.read())  # naïve ünïcode\t\n"
    want = AutoTokenizer.from_pretrained(str(lm_hf))(text)["input_ids"]
    got = AutoTokenizer.from_pretrained(str(gguf_dir), gguf_file="m-q8_0.gguf")(text)["input_ids"]
    assert got == want


def test_gguf_tied_embeddings_and_mha(lm_hf, heldout, tmp_path):
    """Shapes the fixture lacks (llama-1b's tied embeddings; as many KV heads as heads, head_dim 32):
    a random model of that shape round-trips through f32 GGUF exactly."""
    from gguf import GGUFReader
    from transformers import AutoModelForCausalLM, LlamaConfig

    from lmforge.tools.export import export

    src = tmp_path / "tied"
    shutil.copytree(lm_hf, src, ignore=shutil.ignore_patterns("*.safetensors", "config.json"))
    torch.manual_seed(0)
    conf = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=2,
                       num_key_value_heads=2, vocab_size=512, tie_word_embeddings=True, rope_theta=500000.0)
    model = AutoModelForCausalLM.from_config(conf).eval()
    model.save_pretrained(str(src))
    out = export(src, tmp_path / "tied.gguf", fmt="gguf", quant="f32")
    assert "output.weight" not in {t.name for t in GGUFReader(str(out)).tensors}
    with torch.no_grad():
        want = model(heldout, use_cache=False).logits
    assert (_gguf_logits(out, heldout) - want).abs().max().item() < 1e-5


@pytest.mark.slow
def test_llama_cpp_runtime(gguf_dir, lm_hf, heldout, hf_logits, tmp_path):
    """llama.cpp itself (llama-cpp-python, `make llama-cpp`): f32 equals PyTorch; q4_k_m within +5% ppl."""
    pytest.importorskip("llama_cpp")
    from llama_cpp import Llama

    def scores(path: Path) -> torch.Tensor:
        llm = Llama(model_path=str(path), n_ctx=heldout.shape[1], logits_all=True, n_threads=2, verbose=False)
        rows = []
        for row in heldout:
            llm.reset()
            llm.eval(row.tolist())
            rows.append(torch.tensor(llm.scores[: len(row)], dtype=torch.float32))  # a copy: scores is reused
        llm.close()
        return torch.stack(rows)

    ref = _ppl(hf_logits, heldout)
    f32 = scores(gguf_dir / "m-f32.gguf")
    diff = (f32 - hf_logits).abs().max().item()
    print(f"llama.cpp f32: ppl {_ppl(f32, heldout):.4f} vs torch {ref:.4f}, max |logit diff| {diff:.2e}")
    assert abs(_ppl(f32, heldout) / ref - 1) < 1e-3 and diff < 1e-2

    q4 = tmp_path / "m-q4_k_m.gguf"
    lmforge("export", lm_hf, "--format", "gguf", "--quant", "q4_k_m", "--out", q4)
    assert sorted(p.name for p in tmp_path.iterdir()) == [q4.name]  # the f32 intermediate is gone
    ppl = _ppl(scores(q4), heldout)
    print(f"llama.cpp q4_k_m: {q4.stat().st_size} bytes, ppl {ppl:.4f} vs {ref:.4f}")
    assert ppl <= ref * 1.05
    assert q4.stat().st_size < (gguf_dir / "m-q8_0.gguf").stat().st_size


@pytest.mark.slow
def test_llama_cpp_real_k_quants(lm_hf, tmp_path):
    """The fixture's rows (128, 384) are too narrow for 256-blocks, so its q4_k_m holds only llama.cpp's
    fallback types. A random model 256 wide gets real Q4_K/Q6_K tensors: llama.cpp and transformers'
    GGUF loader (dequantizing the same blocks) must agree on its logits."""
    pytest.importorskip("llama_cpp")
    from llama_cpp import Llama
    from transformers import AutoModelForCausalLM, LlamaConfig

    from lmforge.tools.export import export
    from lmforge.tools.to_gguf import tensor_types

    src = tmp_path / "wide"
    shutil.copytree(lm_hf, src, ignore=shutil.ignore_patterns("*.safetensors", "config.json"))
    torch.manual_seed(0)
    conf = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=512)
    model = AutoModelForCausalLM.from_config(conf).eval()
    model.save_pretrained(str(src))
    out = export(src, tmp_path / "wide.gguf", fmt="gguf", quant="q4_k_m")
    types = tensor_types(out)
    assert types.get("Q4_K", 0) >= 8 and "Q6_K" in types, types
    ids = torch.randint(0, 512, (1, 48), generator=torch.Generator().manual_seed(1))
    llm = Llama(model_path=str(out), n_ctx=64, logits_all=True, n_threads=2, verbose=False)
    llm.eval(ids[0].tolist())
    got = torch.tensor(llm.scores[:48])
    llm.close()
    dequantized = _gguf_logits(out, ids)[0]
    with torch.no_grad():
        fp32 = model(ids, use_cache=False).logits[0]

    def rel(a, b):
        return ((a - b).norm() / b.norm()).item()

    print(f"q4_k_m 256-wide: {types}; relative L2: llama.cpp vs dequantized {rel(got, dequantized):.2e}, "
          f"dequantized vs fp32 {rel(dequantized, fp32):.2e}")
    # both runtimes read the same 4-bit blocks: they agree far more closely than either agrees with fp32
    # (llama.cpp also rounds activations to 8 bits for k-quant dot products, hence not exact)
    assert rel(got, dequantized) < 0.2 * rel(dequantized, fp32)


@pytest.fixture(scope="module")
def onnx_dirs(lm_hf, tmp_path_factory) -> dict[str, Path]:
    from lmforge.tools.export import export

    out = tmp_path_factory.mktemp("onnx")
    lmforge("export", lm_hf, "--format", "onnx", "--out", out / "fp32")  # the CLI
    export(lm_hf, out / "int8", fmt="onnx", int8=True)  # what it calls, in this process
    return {"fp32": out / "fp32", "int8": out / "int8"}


def _onnx_logits(d: Path, ids: torch.Tensor):
    import onnxruntime as ort

    sess = ort.InferenceSession(str(d / "model.onnx"), providers=["CPUExecutionProvider"])
    (inp,), (outp,) = sess.get_inputs(), sess.get_outputs()
    assert (inp.name, inp.type, outp.name, outp.type) == ("input_ids", "tensor(int64)", "logits", "tensor(float)")
    assert all(isinstance(dim, str) for dim in inp.shape)  # batch and sequence are both dynamic
    return torch.from_numpy(sess.run(["logits"], {"input_ids": ids.numpy()})[0])


def test_onnx_matches_torch(onnx_dirs, lm_hf, heldout, hf_logits):
    from lmforge.tools import artifact

    d = onnx_dirs["fp32"]
    assert {"model.onnx", "config.json", "tokenizer.json", "lmforge_run.yaml"} <= {p.name for p in d.iterdir()}
    assert artifact.run_config(d).to_yaml() == artifact.run_config(lm_hf).to_yaml()
    logits = _onnx_logits(d, heldout)
    assert logits.shape == hf_logits.shape
    diff = (logits - hf_logits).abs().max().item()
    print(f"onnx fp32: max |logit diff| vs torch {diff:.2e}")
    assert diff < 1e-4
    one = _onnx_logits(d, heldout[:1, :5])  # another batch and length than the export's example
    assert (one - hf_logits[:1, :5]).abs().max().item() < 1e-4


def test_onnx_int8_smaller_within_one_percent(onnx_dirs, heldout, hf_logits):
    fp32, int8 = (onnx_dirs[k] / "model.onnx" for k in ("fp32", "int8"))
    assert int8.stat().st_size < 0.5 * fp32.stat().st_size
    assert not (onnx_dirs["int8"] / "fp32").exists()  # the fp32 intermediate is not shipped
    ppl, ref = _ppl(_onnx_logits(onnx_dirs["int8"], heldout), heldout), _ppl(hf_logits, heldout)
    print(f"onnx int8: {int8.stat().st_size} vs {fp32.stat().st_size} bytes, ppl {ppl:.4f} vs {ref:.4f}")
    assert ppl <= ref * 1.01


# --------------------------------------------------------------------------- bad input

def _artifact_like(lm_hf: Path, dst: Path, **config) -> Path:
    """A copy of the HF export with config.json keys changed and/or a different task in its run config."""
    shutil.copytree(lm_hf, dst)
    task = config.pop("task", None)
    conf = json.loads((dst / "config.json").read_text())
    conf.update(config)
    (dst / "config.json").write_text(json.dumps(conf))
    if task:
        from lmforge.tools import artifact
        from lmforge.training.config import validate, yaml_load

        raw = yaml_load((dst / "lmforge_run.yaml").read_text())
        raw["task"] = task
        artifact.write_run_config(validate(raw), dst)
    return dst


def _refused(tmp_path: Path, *args, match: str) -> None:
    out = tmp_path / "out"
    proc = lmforge("export", *args, "--out", out, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert match in proc.stderr, proc.stderr[-2000:]
    assert not any(p.name.startswith(("out", ".tmp_", ".lmforge-hf-")) for p in tmp_path.iterdir())


def test_cli_refuses_bad_flags_and_artifacts(lm_hf, tmp_path):
    _refused(tmp_path, lm_hf, "--format", "gguf", "--quant", "q5_z", match="unknown GGUF quant type")
    _refused(tmp_path, _artifact_like(lm_hf, tmp_path / "cls", task="classification"), "--format", "onnx",
             match="causal language models")


@pytest.mark.parametrize("args,match", [
    (dict(fmt="hf", quant="f16"), "--quant is for --format gguf"),
    (dict(fmt="onnx", quant="q8_0"), "pass --int8"),
    (dict(fmt="gguf", int8=True), "pass --quant q8_0"),
    (dict(fmt="gguf", quant="q8_0", out_name="model.bin"), "*.gguf"),
    (dict(fmt="gguf", quant="q8_0", hidden_size=48, head_dim=12), "not multiples of 32"),
    (dict(fmt="gguf", model_type="gpt2"), "supports the Llama-family architectures"),
    (dict(fmt="hf"), "already a Hugging Face directory"),
])
def test_export_refuses(lm_hf, tmp_path, args, match):
    from lmforge.tools.export import export
    from lmforge.training.config import ConfigError

    args = dict(args)
    fmt, quant, int8 = args.pop("fmt"), args.pop("quant", None), args.pop("int8", False)
    out = tmp_path / args.pop("out_name", "m.gguf" if fmt == "gguf" else "out")
    src = _artifact_like(lm_hf, tmp_path / "src", **args) if args else lm_hf
    with pytest.raises(ConfigError, match=match.replace("*", r"\*")):
        export(src, out, fmt=fmt, quant=quant, int8=int8)
    assert not out.exists() and not any(p.name.startswith(".") for p in tmp_path.iterdir())


def test_q4_k_m_without_llama_cpp(lm_hf, tmp_path):
    from lmforge.tools.to_gguf import llama_cpp_available

    if llama_cpp_available():
        pytest.skip("llama-cpp-python is installed: q4_k_m works (test_llama_cpp_runtime)")
    _refused(tmp_path, lm_hf, "--format", "gguf", "--quant", "q4_k_m", match="make llama-cpp")


def test_failure_mid_write_leaves_nothing(lm_hf, tmp_path):
    """Weights that break while the GGUF is being written: an error, and neither the file nor its temp."""
    broken = _artifact_like(lm_hf, tmp_path / "broken")
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    out = tmp_path / "m.gguf"
    proc = lmforge("export", broken, "--format", "gguf", "--out", out, check=False)
    assert proc.returncode != 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken"]
