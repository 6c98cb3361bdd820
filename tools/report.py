"""`lmforge report`: what compression cost, measured. Every artifact is evaluated in its real runtime
on the same held-out tokens (the run's own held-out split, from the lmforge_run.yaml the artifacts
carry): perplexity and its change against the baseline, file size and ratio, load time and CPU
forward throughput. Writes report.md, report.json and report.png (size vs perplexity, one point per
artifact); `--gate` turns it into a CI step: exit 0 when every artifact passes, 1 when one fails a
gate, 2 for bad input (before any model loads), 3 when a runtime fails while measuring. `--out`
names a directory that holds only the report's own files: nothing else there is ever replaced.

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
import importlib.util
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


def load(path: Path, gguf_runtime: str, threads: int, seq_len: int) -> Loaded:
    import torch
    from transformers import AutoModelForCausalLM  # imported before the clock starts: load time is the
    from transformers.models.llama import modeling_llama  # noqa: F401  artifact's, not Python's

    k = artifact.kind(path)
    if k == "onnx":
        import onnxruntime as ort

        t0 = time.perf_counter()
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        sess = ort.InferenceSession(str(path / "model.onnx"), opts, providers=["CPUExecutionProvider"])
        fn = lambda ids: sess.run(["logits"], {"input_ids": ids.numpy()})[0][0]  # noqa: E731
        return Loaded("onnxruntime", fn, time.perf_counter() - t0)
    t0 = time.perf_counter()
    if k == "gguf" and gguf_runtime in ("auto", "llama.cpp") and _has_llama_cpp():
        return _llama_cpp(path, threads, seq_len, t0)

    if k == "gguf":
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
        runtime = "transformers (GGUF dequantized)"
    else:
        model = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True)
        runtime = f"transformers ({artifact.quantization(path)})"
    model.eval()

    @torch.inference_mode()
    def fn(ids):
        return model(input_ids=ids, use_cache=False).logits[0].float()

    return Loaded(runtime, fn, time.perf_counter() - t0)


def _has_llama_cpp() -> bool:
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


def _llama_cpp(path: Path, threads: int, seq_len: int, t0: float) -> Loaded:
    import numpy as np
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=max(seq_len, 512), logits_all=True, n_threads=threads, n_batch=512,
                verbose=False)

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
    """What the tool that made the artifact says it saves (compression.json) or removed (pruning.json)."""
    if not path.is_dir():
        return ""
    if (path / "compression.json").is_file():
        return str(json.loads((path / "compression.json").read_text()).get("saves", ""))
    if (path / "pruning.json").is_file():
        info = json.loads((path / "pruning.json").read_text())
        if info.get("params_before") and info.get("params_after"):
            return f"structured pruning: {info['params_after'] / info['params_before']:.0%} of the parameters kept"
    return ""


def measure(path: Path, tokens, gguf_runtime: str, threads: int) -> dict:
    loaded = load(path, gguf_runtime, threads, tokens.shape[1])
    ppl, tps = score(loaded, tokens)
    return dict(artifact=str(path), name=path.name, kind=artifact.kind(path), runtime=loaded.runtime,
                size=artifact.weight_bytes(path), ppl=ppl, load_s=loaded.load_s, tokens_per_s=tps, notes=_notes(path))


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


REPORT_FILES = ("report.md", "report.json", "report.png")


def report(artifacts: list[str], baseline: str, out: str, gates: list[str] = (), data: str | None = None,
           eval_seqs: int = 64, seq_len: int | None = None, gguf_runtime: str = "auto",
           threads: int | None = None, log=print) -> Report:
    parsed = [Gate.parse(g) for g in gates]  # a bad gate fails before any model loads
    paths = [Path(a) for a in artifacts]
    base = Path(baseline)
    out = Path(out)
    if out.is_file() or (out.is_dir() and any(p.name not in REPORT_FILES for p in out.iterdir())):
        raise ConfigError(f"--out {out} holds other files; name a new directory (a report only replaces its own "
                          f"{', '.join(REPORT_FILES)})")
    for p in [base, *paths]:
        if not p.exists():
            raise ConfigError(f"{p} does not exist")
        artifact.kind(p)
    if gguf_runtime == "llama.cpp" and not _has_llama_cpp():
        raise ConfigError("--gguf-runtime llama.cpp needs llama-cpp-python (make llama-cpp)")
    if any(artifact.kind(p) == "onnx" for p in paths) and importlib.util.find_spec("onnxruntime") is None:
        raise ConfigError("ONNX artifacts need onnxruntime: pip install 'lmforge[compress]'")
    cfg = load_config(data) if data else artifact.run_config(base)
    artifact.require_causal(cfg, "lmforge report")
    max_positions = json.loads((base / "config.json").read_text()).get("max_position_embeddings") \
        if artifact.kind(base) != "gguf" else None
    tokens = artifact.heldout_tokens(cfg, eval_seqs, seq_len, max_positions)
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
    out.mkdir(parents=True, exist_ok=True)
    # Each file is written under a temporary name and renamed: a reader never sees half a report.
    _write(out / "report.json", lambda f: f.write_text(json.dumps(asdict(rep) | {"passed": rep.passed}, indent=1)))
    _write(out / "report.md", lambda f: f.write_text(to_markdown(rep)))
    _write(out / "report.png", lambda f: plot(rep, f))
    return rep


def _write(path: Path, write) -> None:
    tmp = path.with_name(f".tmp_{os.getpid()}_{path.name}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


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

    try:
        rep = report(args.artifacts, args.baseline, args.out, args.gate, args.data, args.eval_seqs, args.seq_len,
                     args.gguf_runtime, args.threads, log=lambda m: print(m, file=sys.stderr))
    except ConfigError:
        raise
    except Exception as e:  # a runtime failed: exit 3, so CI tells a crash from a failed gate (1)
        import traceback

        traceback.print_exc()
        print(f"lmforge report: measuring failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 3
    print(to_markdown(rep))
    print(f"written: {Path(args.out) / 'report.md'}, report.json, report.png", file=sys.stderr)
    return 0 if rep.passed else 1
