"""The GPU check: what a short GPU window has to answer, one script, sized for < 8 minutes on one H100.

    make gpu-wheels                          # here: what the GPU image lacks, as wheels (<= 64 MiB)
    make gpu-check                           # on the GPU machine: installs them offline, runs this
    .venv/bin/python bench/gpu_check.py --cpu --out /tmp/gpu-check.json   # the same checks, CPU-sized

Checks, each a row of the printed table and a key of the JSON (--out):
  runtime     dist.select_runtime(): device, backend, precision; the attention implementation the
              model actually runs with (model.config._attn_implementation, not what was asked for)
  zero3       a ~1B Llama (preset llama-1b) at seq 4096, bf16, ZeRO-3 on 1 GPU: lmforge's own model
              build and DeepSpeed engine (training/model.py, training/engine.py) on random tokens;
              median step time after warm-up, tokens/s, MFU against the device's peak (training/
              metrics.py's table), CUDA peak memory
  attention   logits of SDPA with its flash kernel forced (and flash-attn's when installed) against
              eager attention, bf16, one random model: max and mean abs difference, within tolerance
  adam8bit    bitsandbytes AdamW8bit's state bytes per parameter after a step (goal ~2; AdamW: 8)
  plan        `lmforge plan`'s per-rank estimate (tools/plan.py) for the zero3 run against its
              measured peak memory
--cpu runs every check with CPU shapes (the debug Llama, fp32, seq 256) so that the code is tested
here (tests/test_gpu_check.py); --wheels DIR only sums a wheel directory against the budget.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WHEEL_BUDGET = 64 << 20
GPU = dict(preset="llama-1b", seq=4096, micro=1, steps=12, warmup=3, precision="bf16", vocab=32000)
CPU = dict(preset="llama-debug", seq=256, micro=2, steps=6, warmup=2, precision="fp32", vocab=512)


def _config(shape: dict):
    from lmforge.training.config import load_config

    return load_config(REPO / "configs" / "debug.yaml", [
        f"model.preset={shape['preset']}", f"data.seq_len={shape['seq']}", f"train.precision={shape['precision']}",
        f"train.micro_batch_size={shape['micro']}", f"train.global_batch_size={shape['micro']}",
        "parallel.zero_stage=3", f"train.steps={shape['steps']}", "train.warmup=0", f"data.vocab_size={shape['vocab']}"])


def check_runtime(cfg) -> dict:
    from lmforge.training import dist

    rt = dist.select_runtime(cfg.train.precision, cfg.model.attention)
    return {"device": rt.device_name, "device_type": rt.device_type, "backend": rt.backend, "precision": rt.precision,
            "attention_requested": rt.attention}


def check_zero3(cfg, shape: dict, runtime: dict) -> tuple[dict, object]:
    """One rank of a real run: lmforge's model build and engine, random tokens; returns the row and
    the model config (for the plan check)."""
    import torch

    from lmforge.training import arithmetic, dist, engine as engine_lib, metrics, model as model_lib
    from lmforge.training.config import build_ds_config

    rt = dist.select_runtime(cfg.train.precision, cfg.model.attention)
    d = dist.setup(rt, 600)
    ds = build_ds_config(cfg, 1, rt.precision)
    conf = model_lib.hf_config(cfg.model, shape["vocab"], eos_id=0)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[rt.precision]
    if rt.device_type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    model = model_lib.build(cfg.model, conf, ds, rt.attention, dtype, total_steps=shape["steps"])
    n_total, n_matmul = model_lib.count_params(model)
    engine = engine_lib.initialize(cfg, model, ds, shape["steps"], attention=rt.attention)
    build_s = time.perf_counter() - t0
    runtime["attention_used"] = engine.module.config._attn_implementation
    gen = torch.Generator().manual_seed(0)
    times, losses = [], []
    for _ in range(shape["steps"]):
        ids = torch.randint(0, shape["vocab"], (shape["micro"], shape["seq"]), generator=gen).to(d.device)
        if rt.device_type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        if rt.device_type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
        losses.append(float(loss.detach()))
    step_s = statistics.median(times[shape["warmup"]:])
    tokens_s = shape["micro"] * shape["seq"] / step_s
    tflops = tokens_s * arithmetic.flops_per_token(conf, n_matmul, shape["seq"]) / 1e12
    peak = metrics.peak_tflops(None)
    row = {"params": n_total, "seq_len": shape["seq"], "micro_batch": shape["micro"], "precision": rt.precision,
           "build_s": build_s, "step_s": step_s, "tokens_per_s": tokens_s, "tflops": tflops,
           "peak_tflops": peak, "mfu": tflops / peak if peak else None, "losses": losses,
           "optimizer_state_bytes_per_param": engine_lib.state_bytes_per_param(engine),
           "peak_memory_bytes": int(torch.cuda.max_memory_allocated()) if rt.device_type == "cuda" else None,
           "peak_reserved_bytes": int(torch.cuda.max_memory_reserved()) if rt.device_type == "cuda" else None}
    del engine, model
    model_lib._hf_ds_config_ref = None  # else transformers would build the next model under zero.Init too
    dist.teardown()
    return row, conf


def check_attention(device: str, dtype_name: str) -> dict:
    """Logits of one random model under each attention implementation this machine has, against eager."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from transformers import LlamaConfig, LlamaForCausalLM

    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    conf = LlamaConfig(hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8,
                       num_key_value_heads=4, vocab_size=4096, max_position_embeddings=2048)
    torch.manual_seed(0)
    eager = LlamaForCausalLM._from_config(conf, attn_implementation="eager", dtype=dtype).to(device).eval()
    ids = torch.randint(0, conf.vocab_size, (2, 1024 if device == "cuda" else 128), device=device)
    impls = {"sdpa": (["sdpa"], [SDPBackend.FLASH_ATTENTION] if device == "cuda" else None)}
    import importlib.util

    if device == "cuda" and importlib.util.find_spec("flash_attn"):
        impls["flash_attention_2"] = (["flash_attention_2"], None)
    with torch.no_grad():
        ref = eager(ids).logits.float()
        out = {}
        for name, (_, backends) in impls.items():
            eager.config._attn_implementation = name
            try:
                if backends:
                    with sdpa_kernel(backends):  # the flash kernel or an error: no silent fallback to math
                        got = eager(ids).logits.float()
                else:
                    got = eager(ids).logits.float()
            except RuntimeError as e:
                out[name] = {"error": str(e).splitlines()[0]}
                continue
            diff = (got - ref).abs()
            tol = 0.05 * ref.abs().max().item() if dtype_name == "bf16" else 1e-4 * max(1.0, ref.abs().max().item())
            out[name] = {"kernel": "flash" if backends else name, "max_abs_diff": diff.max().item(),
                         "mean_abs_diff": diff.mean().item(), "tolerance": tol, "within": diff.max().item() <= tol}
        eager.config._attn_implementation = "eager"
    return out


def check_adam8bit(device: str) -> dict:
    import bitsandbytes as bnb
    import torch

    layer = torch.nn.Linear(4096, 4096, bias=False, device=device)
    opt = bnb.optim.AdamW8bit(layer.parameters(), lr=1e-3)
    layer(torch.randn(8, 4096, device=device)).square().mean().backward()
    opt.step()
    params = sum(p.numel() for p in layer.parameters())
    state = sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values()
                if torch.is_tensor(v) and v.dim() > 0)
    return {"device": device, "params": params, "state_bytes_per_param": state / params}


def check_plan(cfg, shape: dict, measured: dict) -> dict:
    from lmforge.tools import plan

    gpu = measured["peak_memory_bytes"] is not None
    est = plan.estimate(cfg, world_size=1, gpu_memory="80GiB" if gpu else None, vocab_size=shape["vocab"])
    out = {"estimate_bytes": est.device_total, "terms": dict(est.terms), "measured_bytes": measured["peak_memory_bytes"]}
    if gpu:
        out["estimate_over_measured"] = est.device_total / measured["peak_memory_bytes"]
    return out


def wheels(path: Path) -> int:
    files = sorted(p for p in path.iterdir() if p.suffix == ".whl")
    total = sum(p.stat().st_size for p in files)
    for p in files:
        print(f"{p.stat().st_size / 2**20:8.2f} MiB  {p.name}")
    print(f"{total / 2**20:8.2f} MiB  total (budget {WHEEL_BUDGET >> 20} MiB): {'fits' if total <= WHEEL_BUDGET else 'OVER'}")
    return 0 if total <= WHEEL_BUDGET else 1


def table(result: dict) -> str:
    rt, z, pl = result["runtime"], result["zero3"], result["plan"]
    rows = [("runtime", f"{rt['device']}: {rt['backend']}, {rt['precision']}, attention asked {rt['attention_requested']}, "
                        f"used {rt.get('attention_used')}"),
            ("zero3", f"{z['params'] / 1e9:.2f}B params, seq {z['seq_len']}: {z['step_s']:.3f} s/step, "
                      f"{z['tokens_per_s']:,.0f} tokens/s, {z['tflops']:.1f} TFLOP/s"
                      + (f", MFU {100 * z['mfu']:.1f}%" if z["mfu"] is not None else ", MFU n/a (no published peak)")),
            ("attention", "; ".join(f"{k}: " + (v["error"] if "error" in v else
                                               f"max |diff| {v['max_abs_diff']:.3g} (tol {v['tolerance']:.3g}) "
                                               f"{'ok' if v['within'] else 'OUT'}") for k, v in result["attention"].items())),
            ("adam8bit", f"{result['adam8bit']['state_bytes_per_param']:.2f} bytes/param on {result['adam8bit']['device']}"),
            ("plan", f"estimate {pl['estimate_bytes'] / 2**30:.2f} GiB" + (
                f" vs measured {pl['measured_bytes'] / 2**30:.2f} GiB ({pl['estimate_over_measured']:.2f}x)"
                if pl.get("estimate_over_measured") else " (measured: CUDA only)"))]
    return "| check | result |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cpu", action="store_true", help="CPU shapes: test the script here")
    ap.add_argument("--out", default="gpu-check.json")
    ap.add_argument("--wheels", type=Path, default=None, help="only sum this wheel directory against the budget")
    a = ap.parse_args()
    if a.wheels is not None:
        return wheels(a.wheels)
    import torch

    if not a.cpu and not torch.cuda.is_available():
        print("gpu_check: no CUDA device (use --cpu to run the CPU-sized checks)", file=sys.stderr)
        return 2
    shape = CPU if a.cpu else GPU
    cfg = _config(shape)
    device = "cpu" if a.cpu else "cuda"
    t0 = time.time()
    result = {"runtime": check_runtime(cfg)}
    result["zero3"], _ = check_zero3(cfg, shape, result["runtime"])
    result["attention"] = check_attention(device, shape["precision"])
    result["adam8bit"] = check_adam8bit(device)
    result["plan"] = check_plan(cfg, shape, result["zero3"])
    result["seconds"] = time.time() - t0
    Path(a.out).write_text(json.dumps(result, indent=1, default=str))
    print(table(result))
    print(f"\n{result['seconds']:.0f} s; JSON: {a.out}")
    ok = all(v.get("within", True) for v in result["attention"].values()) and "error" not in result["attention"].get("sdpa", {})
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
