"""A Hugging Face causal LM directory → an ONNX Runtime directory (`lmforge export --format onnx`).

    lmforge export runs/debug --format onnx --out exports/debug-onnx
    lmforge export exports/debug --format onnx --int8 --out exports/debug-onnx-int8

The directory holds `model.onnx` (weights as external data beside it when over 2 GB) with one
input `input_ids` (int64 [batch, seq], both dynamic) and one output `logits` (float32 [batch, seq,
vocab]), plus the tokenizer, config.json and lmforge_run.yaml. The graph has no KV cache: it scores
whole sequences (perplexity, classification-style use), which is what `lmforge report` measures.

How: `torch.onnx.export(..., dynamo=True)` of a wrapper returning only the logits. optimum-onnx
would do this for us but pins transformers < 4.58, so it cannot share our environment; the legacy
TorchScript exporter fails on `aten::diff` in transformers' masking code. --int8 is onnxruntime's
`quantize_dynamic` (int8 weights, activations quantized on the fly), applied to the fp32 export.
Before the directory is published, onnxruntime's logits on a held-back input are compared with
PyTorch's: an export that does not reproduce the model is an error, not an artifact.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

MODEL = "model.onnx"
CHECK_TOL = 1e-3  # fp32 onnxruntime vs torch logits; measured ~5e-6 on the test model
_TWO_GB = 2 * 1024**3  # protobuf's limit: bigger models keep their weights as external data


def write(hf_dir: Path, out_dir: Path, int8: bool = False, log: Callable[[str], None] = print) -> dict:
    """Export `hf_dir` into `out_dir` (created); returns {"export_s", "max_abs_diff", "bytes"}."""
    import time

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32, attn_implementation="sdpa",
                                                 local_files_only=True).eval()
    model.config.use_cache = False
    out_dir.mkdir(parents=True, exist_ok=True)
    scratch = out_dir / "fp32" if int8 else out_dir
    scratch.mkdir(exist_ok=True)
    t0 = time.perf_counter()
    _export(model, scratch / MODEL)
    diff = _check(model, scratch / MODEL)
    log(f"onnx: exported in {time.perf_counter() - t0:.1f} s; onnxruntime vs torch logits max |diff| {diff:.2e}")
    if diff > CHECK_TOL:
        raise RuntimeError(f"onnx export does not reproduce the model: max |logit diff| {diff:.3g} > {CHECK_TOL}")
    if int8:
        _quantize_int8(scratch / MODEL, out_dir / MODEL)
        import shutil

        shutil.rmtree(scratch)
    model.config.save_pretrained(str(out_dir))
    AutoTokenizer.from_pretrained(str(hf_dir), local_files_only=True).save_pretrained(str(out_dir))
    size = sum(p.stat().st_size for p in out_dir.iterdir() if p.name.startswith(MODEL))
    log(f"onnx{' int8' if int8 else ''}: {size / 2**20:.2f} MiB")
    return {"export_s": time.perf_counter() - t0, "max_abs_diff": diff, "bytes": size}


def _logits_only(model):
    """The model as a module whose one input is input_ids and one output the logits (no cache, no dict)."""
    import torch

    class Logits(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids):
            return self.m(input_ids=input_ids, use_cache=False).logits

    return Logits(model)


def _export(model, path: Path) -> None:
    import torch

    # batch 2 / seq 16 as the example, so neither dimension is specialised to 1
    example = torch.randint(0, model.config.vocab_size, (2, 16))
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
    program = torch.onnx.export(_logits_only(model), (example,), dynamo=True, input_names=["input_ids"],
                                output_names=["logits"], dynamic_shapes={"input_ids": {0: batch, 1: seq}},
                                verbose=False)
    program.save(str(path))  # external data only when the model passes 2 GB


def _check(model, path: Path) -> float:
    """Max |logit| difference onnxruntime vs torch on an input of another batch and length than the example."""
    import onnxruntime as ort
    import torch

    ids = torch.randint(0, model.config.vocab_size, (3, 37), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(input_ids=ids, use_cache=False).logits.numpy()
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(["logits"], {"input_ids": ids.numpy()})[0]
    return float(abs(got - ref).max())


def _quantize_int8(src: Path, dst: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    large = sum(p.stat().st_size for p in src.parent.iterdir()) > _TWO_GB
    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, use_external_data_format=large)
