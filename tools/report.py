"""`lmforge report`: what compression cost, measured. Every artifact is evaluated in its real runtime
on the same held-out tokens (the run's own held-out split, from the lmforge_run.yaml the artifacts
carry): perplexity and its change against the baseline, file size and ratio, load time and CPU
forward throughput. Writes report.md, report.json and report.png (size vs perplexity, one point per
artifact); `--gate` turns it into a CI step that exits 1 when an artifact fails.

    lmforge report exports/w4a16 exports/model-q8_0.gguf exports/onnx-int8 --baseline exports/hf --out reports/debug
    lmforge report exports/w4a16 --baseline exports/hf --gate 'ppl<=+5%' --gate 'size<=-50%'

Runtimes: a Hugging Face directory (dense, compressed-tensors or torchao) loads in transformers; a
GGUF file in llama.cpp (llama-cpp-python, `make llama-cpp`) when it is installed, else through
transformers' GGUF loader (dequantized, so only its perplexity is the file's: its speed is not
llama.cpp's; the report names the runtime of each row); an ONNX directory in onnxruntime.

Gates: METRIC OP VALUE, METRIC one of ppl, size, load_s, tokens_per_s; OP one of <= >= < >; VALUE a
change against the baseline (`+5%`, `-50%`) or an absolute number (`ppl<=450`). The baseline is not
gated.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from lmforge.tools import artifact
from lmforge.training.config import ConfigError, load_config

METRICS = {"ppl": "perplexity", "size": "weight bytes", "load_s": "load seconds", "tokens_per_s": "forward tokens/s"}
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf", ".onnx", ".data")


# --------------------------------------------------------------------------- gates

@dataclass(frozen=True)
class Gate:
    metric: str
    op: str
    value: float
    relative: bool  # value is a percentage change against the baseline
    text: str

    @staticmethod
    def parse(text: str) -> "Gate":
        m = re.fullmatch(r"\s*(\w+)\s*(<=|>=|<|>)\s*([+-]?\d+(?:\.\d+)?)\s*(%?)\s*", text)
        if not m or m.group(1) not in METRICS:
            raise ConfigError(f"--gate {text!r}: expected METRIC OP VALUE, e.g. 'ppl<=+5%' or 'size<=-50%'; "
                              f"METRIC one of {', '.join(METRICS)}")
        return Gate(m.group(1), m.group(2), float(m.group(3)), m.group(4) == "%", text.strip())

    def check(self, row: dict, base: dict) -> bool:
        got = row[self.metric]
        limit = base[self.metric] * (1 + self.value / 100) if self.relative else self.value
        return {"<=": got <= limit, ">=": got >= limit, "<": got < limit, ">": got > limit}[self.op]


# --------------------------------------------------------------------------- runtimes

@dataclass
class Loaded:
    runtime: str
    logits: Callable  # LongTensor [1, L] -> float numpy/torch [L, V]
    load_s: float


def kind(path: Path) -> str:
    if path.is_file() and path.suffix == ".gguf":
        return "gguf"
    if path.is_dir() and (path / "model.onnx").is_file():
        return "onnx"
    if path.is_dir() and (path / "config.json").is_file():
        return "hf"
    raise ConfigError(f"{path}: not an artifact (a Hugging Face directory with config.json, an ONNX directory "
                      "with model.onnx, or a .gguf file)")


def weight_bytes(path: Path) -> int:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file() and p.suffix in _WEIGHT_SUFFIXES]
    return sum(p.stat().st_size for p in files)


def _hf_flavour(path: Path) -> str:
    q = json.loads((path / "config.json").read_text()).get("quantization_config") or {}
    return {"compressed-tensors": "compressed-tensors", "torchao": "torchao"}.get(q.get("quant_method"), "dense")


def load(path: Path, gguf_runtime: str, threads: int) -> Loaded:
    import onnxruntime as ort  # imported before the clock starts: load time is the artifact's, not Python's
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.models.llama import modeling_llama  # noqa: F401

    k = kind(path)
    t0 = time.perf_counter()
    if k == "onnx":
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        sess = ort.InferenceSession(str(path / "model.onnx"), opts, providers=["CPUExecutionProvider"])
        fn = lambda ids: sess.run(["logits"], {"input_ids": ids.numpy()})[0][0]  # noqa: E731
        return Loaded("onnxruntime", fn, time.perf_counter() - t0)
    if k == "gguf" and gguf_runtime in ("auto", "llama.cpp"):
        try:
            from llama_cpp import Llama
        except ImportError:
            if gguf_runtime == "llama.cpp":
                raise ConfigError("--gguf-runtime llama.cpp needs llama-cpp-python (make llama-cpp)") from None
        else:
            return _llama_cpp(path, threads, t0)

    if k == "gguf":
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
        runtime = "transformers (GGUF dequantized)"
    else:
        model = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True)
        runtime = f"transformers ({_hf_flavour(path)})"
    model.eval()

    @torch.inference_mode()
    def fn(ids):
        return model(input_ids=ids, use_cache=False).logits[0].float()

    return Loaded(runtime, fn, time.perf_counter() - t0)


def _llama_cpp(path: Path, threads: int, t0: float) -> Loaded:
    import numpy as np
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=4096, logits_all=True, n_threads=threads, n_batch=512, verbose=False)

    def fn(ids):
        llm.reset()  # each row is scored from an empty context, as in the other runtimes
        llm.eval(ids[0].tolist())
        return np.array(llm.scores[: ids.shape[1]], dtype=np.float32)  # a copy: llama.cpp reuses the buffer

    return Loaded("llama.cpp", fn, time.perf_counter() - t0)


# --------------------------------------------------------------------------- measuring

def score(loaded: Loaded, tokens, speed_rows: int = 8, passes: int = 3) -> tuple[float, float]:
    """(perplexity over every next-token prediction inside each row, forward tokens/s at batch 1).
    Speed is the best of `passes` timed passes over the first `speed_rows` rows: on a shared CPU the
    fastest pass is the least disturbed one."""
    import torch
    from tqdm import tqdm

    nll, count = 0.0, 0
    loaded.logits(tokens[:1])  # warm-up: compressed-tensors decompresses, onnxruntime plans, at the first call
    for row in tqdm(tokens, desc=f"  {loaded.runtime}", leave=False, unit="row"):
        logits = torch.as_tensor(loaded.logits(row[None])).float()[:-1]
        nll += torch.nn.functional.cross_entropy(logits, row[1:], reduction="sum").item()
        count += len(row) - 1
    timed = tokens[:speed_rows]
    best = math.inf
    for _ in range(passes):
        t0 = time.perf_counter()
        for row in timed:
            loaded.logits(row[None])
        best = min(best, time.perf_counter() - t0)
    return math.exp(nll / count), timed.numel() / best


def _notes(path: Path) -> str:
    """What the tool that made the artifact says it changed (and whether that saves anything)."""
    for name in ("compression.json", "pruning.json", "export.json"):
        f = (path if path.is_dir() else path.parent) / name
        if f.is_file():
            info = json.loads(f.read_text())
            return str(info.get("saves") or info.get("summary") or "")
    return ""


def measure(path: Path, tokens, gguf_runtime: str, threads: int) -> dict:
    loaded = load(path, gguf_runtime, threads)
    ppl, tps = score(loaded, tokens)
    return dict(artifact=str(path), name=path.name, kind=kind(path), runtime=loaded.runtime, size=weight_bytes(path),
                ppl=ppl, load_s=loaded.load_s, tokens_per_s=tps, notes=_notes(path))


# --------------------------------------------------------------------------- writing

@dataclass
class Report:
    baseline: dict
    rows: list[dict]
    gates: list[str]
    eval_tokens: int
    eval_rows: int
    seq_len: int
    threads: int
    date: str = field(default_factory=lambda: time.strftime("%Y-%m-%d %H:%M"))

    @property
    def passed(self) -> bool:
        return not any(r["gate"].startswith("FAIL") for r in self.rows)


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


def to_markdown(rep: Report) -> str:
    b = rep.baseline
    lines = [f"# lmforge report ({rep.date})", "",
             f"Held-out tokens: {rep.eval_rows} rows × {rep.seq_len} = {rep.eval_tokens:,} (the run's own held-out "
             f"split); {rep.threads} CPU thread(s). Size counts weight files only.", "",
             "| artifact | runtime | size | size ratio | ppl | Δppl | load s | tokens/s | gate | notes |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|---|"]
    for r in [b, *rep.rows]:
        is_base = r is b
        change = "" if is_base else f"{100 * (r['ppl'] / b['ppl'] - 1):+.2f}%"
        lines.append(f"| {r['name']}{' (baseline)' if is_base else ''} | {r['runtime']} | {_mb(r['size'])} | "
                     f"{r['size'] / b['size']:.3f} | {r['ppl']:.3f} | {change} | {r['load_s']:.2f} | "
                     f"{r['tokens_per_s']:,.0f} | {'' if is_base else r['gate']} | {r['notes']} |")
    if rep.gates:
        lines += ["", "Gates: " + ", ".join(f"`{g}`" for g in rep.gates) + f" → {'PASS' if rep.passed else 'FAIL'}"]
    return "\n".join(lines) + "\n"


def plot(rep: Report, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and CI
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    for r in [rep.baseline, *rep.rows]:
        colour = "black" if r is rep.baseline else ("tab:red" if r["gate"].startswith("FAIL") else "tab:blue")
        ax.scatter(r["size"] / 1e6, r["ppl"], color=colour)
        ax.annotate(r["name"], (r["size"] / 1e6, r["ppl"]), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_xlabel("weight size (MB)")
    ax.set_ylabel("held-out perplexity")
    ax.set_title("size vs perplexity (black: baseline, red: failed a gate)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def report(artifacts: list[str], baseline: str, out: str, gates: list[str] = (), data: str | None = None,
           eval_seqs: int = 64, seq_len: int | None = None, gguf_runtime: str = "auto",
           threads: int | None = None, log=print) -> Report:
    parsed = [Gate.parse(g) for g in gates]  # a bad gate fails before any model loads
    paths = [Path(a) for a in artifacts]
    base = Path(baseline)
    for p in [base, *paths]:
        if not p.exists():
            raise ConfigError(f"{p} does not exist")
        kind(p)
    cfg = load_config(data) if data else artifact.run_config(base)
    artifact.require_causal(cfg, "lmforge report")
    tokens = artifact.heldout_tokens(cfg, eval_seqs, seq_len)
    threads = threads or os.cpu_count() or 1
    import torch

    torch.set_num_threads(threads)
    log(f"report: {len(paths)} artifact(s) against {base} on {tokens.shape[0]}×{tokens.shape[1]} held-out tokens")
    rows = []
    for p in [base, *paths]:
        r = measure(p, tokens, gguf_runtime, threads)
        log(f"  {r['name']:<28} {r['runtime']:<34} {_mb(r['size']):>10}  ppl {r['ppl']:.3f}  "
            f"{r['tokens_per_s']:,.0f} tok/s  load {r['load_s']:.2f} s")
        rows.append(r)
    base_row, rows = rows[0], rows[1:]
    for r in rows:
        failed = [g.text for g in parsed if not g.check(r, base_row)]
        r["gate"] = ("FAIL: " + ", ".join(failed)) if failed else ("PASS" if parsed else "")
        r["ppl_change"] = r["ppl"] / base_row["ppl"] - 1
        r["size_ratio"] = r["size"] / base_row["size"]
    rep = Report(base_row, rows, [g.text for g in parsed], tokens.numel(), tokens.shape[0], tokens.shape[1], threads)
    with artifact.atomic_output(out, overwrite=True) as tmp:
        tmp.mkdir()
        (tmp / "report.json").write_text(json.dumps(asdict(rep) | {"passed": rep.passed}, indent=1))
        (tmp / "report.md").write_text(to_markdown(rep))
        plot(rep, tmp / "report.png")
    return rep


# --------------------------------------------------------------------------- CLI

def register(sub) -> None:
    p = sub.add_parser("report", help="perplexity, size, load time and speed of artifacts vs a baseline; --gate for CI")
    p.add_argument("artifacts", nargs="+", help="HF directories (dense, compressed-tensors, torchao), .gguf files, "
                                                 "ONNX directories")
    p.add_argument("--baseline", required=True, help="the uncompressed Hugging Face directory (lmforge export)")
    p.add_argument("--out", default="report", help="directory for report.md, report.json, report.png")
    p.add_argument("--gate", action="append", default=[], help="e.g. 'ppl<=+5%%' (repeatable); exit 1 if any fails")
    p.add_argument("--data", default=None, help="training YAML whose held-out split to use (default: the baseline's "
                                                 "lmforge_run.yaml)")
    p.add_argument("--eval-seqs", type=int, default=64, help="held-out rows to score (default 64)")
    p.add_argument("--seq-len", type=int, default=None, help="row length (default: the run's data.seq_len)")
    p.add_argument("--gguf-runtime", choices=["auto", "llama.cpp", "transformers"], default="auto",
                   help="auto: llama.cpp when llama-cpp-python is installed, else transformers' GGUF loader")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for every runtime (default: all)")
    p.set_defaults(func=_cmd, overrides=[])


def _cmd(args) -> int:
    import sys

    rep = report(args.artifacts, args.baseline, args.out, args.gate, args.data, args.eval_seqs, args.seq_len,
                 args.gguf_runtime, args.threads, log=lambda m: print(m, file=sys.stderr))
    print(to_markdown(rep))
    print(f"written: {Path(args.out) / 'report.md'}, report.json, report.png", file=sys.stderr)
    return 0 if rep.passed else 1
