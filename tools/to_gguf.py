"""A Hugging Face Llama, Mistral or Qwen2 directory → one GGUF file for llama.cpp / Ollama
(`lmforge export --format gguf`).

    lmforge export runs/debug --format gguf --out exports/debug-f16.gguf                 # f16 (default)
    lmforge export exports/debug --format gguf --quant q8_0 --out exports/debug-q8_0.gguf
    lmforge export exports/debug --format gguf --quant q4_k_m --out exports/debug-q4.gguf  # needs `make llama-cpp`

Why written here with `gguf.GGUFWriter` instead of llama.cpp's `convert_hf_to_gguf.py`: the converter
ships only inside llama-cpp-python's source, and it refuses a locally trained BPE tokenizer ("BPE
pre-tokenizer was not recognized": it identifies tokenizers by hashing the tokens of a fixed text,
so only published ones pass). lmforge's own tokenizer is byte-level BPE with GPT-2's split regex,
which llama.cpp knows as pre-tokenizer "gpt-2" — we can name it instead of guessing it by hash.
Names come from gguf-py's own tensor map for the llama.cpp architecture (the table the converter
uses; tools/architectures.py: Llama and Mistral are llama.cpp's "llama", Qwen2 its "qwen2" with q/k/v
bias tensors). For "llama", Q/K rows are permuted as the converter does, because llama.cpp applies
rotary embeddings to interleaved pairs there while transformers rotates the two halves of each head;
llama.cpp's "qwen2" rotates halves too (NEOX), so its rows are written as they are.

f32/f16/q8_0 are written by gguf-py (its `quants` module). Q4_K_M is a k-quant mix (Q4_K/Q6_K
per tensor) only llama.cpp computes: the f32 file goes through llama.cpp's `llama_model_quantize`
(llama-cpp-python, built by `make llama-cpp`). A k-quant needs rows that are multiples of 256; for a
narrower tensor llama.cpp falls back to a 32-block type (Q4_K → Q5_0, Q6_K → Q8_0; F16 when even 32
does not divide), and we print which types the file really holds.

The training config rides along in the metadata key `lmforge.run_config` (artifact.run_config reads it).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

if TYPE_CHECKING:
    import numpy as np

from lmforge.tools import architectures
from lmforge.training.config import ConfigError

QUANTS = ("f32", "f16", "q8_0", "q4_k_m")
DEFAULT_QUANT = "f16"
RUN_CONFIG_KEY = "lmforge.run_config"
Q8_BLOCK = 32  # elements per Q8_0 block (gguf.GGML_QUANT_SIZES); a row must be a whole number of blocks


def check_quant(quant: str | None) -> str:
    """--quant → one of QUANTS (default f16), or a ConfigError naming the allowed values."""
    q = (quant or DEFAULT_QUANT).lower()
    if q not in QUANTS:
        raise ConfigError(f"--quant {quant}: unknown GGUF quant type; allowed: {', '.join(QUANTS)}")
    if q == "q4_k_m" and not llama_cpp_available():
        raise ConfigError("--quant q4_k_m needs llama.cpp's quantizer (k-quants are not in gguf-py): run "
                          "`make llama-cpp` (llama-cpp-python at the Makefile's pinned version; compiles llama.cpp, "
                          "20-30 min), or use --quant q8_0/f16")
    return q


def llama_cpp_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


def _rows(conf: dict) -> dict[str, int]:
    """Row length (input features) of every kind of weight matrix, which a block quant must divide."""
    head_dim = architectures.head_dim(conf)
    return {"hidden_size": conf["hidden_size"], "intermediate_size": conf["intermediate_size"],
            "num_attention_heads * head_dim": conf["num_attention_heads"] * head_dim}


def check_model(meta_dir: Path, quant: str) -> None:
    """Refuse, before any weights are read, what this writer cannot express faithfully."""
    conf = json.loads((meta_dir / "config.json").read_text())
    arch = architectures.get(conf, str(meta_dir), "--format gguf",
                             hint="export it with --format onnx, or convert it with llama.cpp's convert_hf_to_gguf.py")
    if conf.get("attention_bias") or conf.get("mlp_bias"):  # Llama's optional ones; Qwen2's q/k/v biases are written
        raise ConfigError(f"--format gguf: {meta_dir} has attention/MLP biases, which this GGUF writer does not carry "
                          f"for model_type {arch.model_type}")
    context = conf["max_position_embeddings"]
    short = [w for w in architectures.layer_windows(conf) if w is not None and w < context]
    if short:
        raise ConfigError(f"--format gguf: {meta_dir} attends within a sliding window of {short[0]} tokens in "
                          f"{len(short)} of {conf['num_hidden_layers']} layers (sliding_window), shorter than "
                          f"max_position_embeddings {context}; llama.cpp's {arch.gguf_arch!r} architecture attends to "
                          "the whole context, so the GGUF would compute something else beyond the window")
    rope = conf.get("rope_parameters") or conf.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise ConfigError(f"--format gguf: rope_type {rope.get('rope_type', rope.get('type'))!r} (rope scaling) is not "
                          "written by this GGUF writer; only plain RoPE")
    if quant == "q8_0":
        bad = {k: v for k, v in _rows(conf).items() if v % Q8_BLOCK}
        if bad:
            raise ConfigError(f"--quant q8_0: a Q8_0 block holds {Q8_BLOCK} weights of a row, and this model's rows "
                              f"are {', '.join(f'{k}={v}' for k, v in bad.items())} (not multiples of {Q8_BLOCK}); "
                              "use --quant f16 or f32")
    _check_tokenizer(meta_dir)


def _check_tokenizer(meta_dir: Path) -> None:
    """llama.cpp re-implements tokenizers by name; we can only name GPT-2-style byte-level BPE."""
    path = meta_dir / "tokenizer.json"
    if not path.is_file():
        raise ConfigError(f"--format gguf: {meta_dir} has no tokenizer.json (a fast tokenizer is needed)")
    tok = json.loads(path.read_text())
    model, pre = tok.get("model") or {}, tok.get("pre_tokenizer") or {}
    gpt2_pre = pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space")
    if model.get("type") != "BPE" or model.get("byte_fallback") or not gpt2_pre or tok.get("normalizer"):
        raise ConfigError(f"--format gguf writes byte-level BPE tokenizers with GPT-2 pre-tokenization (the tokenizer "
                          f"lmforge trains); {path} is model {model.get('type')!r}, pre_tokenizer {pre.get('type')!r}"
                          f"{' with a normalizer' if tok.get('normalizer') else ''}: convert it with llama.cpp's "
                          "convert_hf_to_gguf.py, or export --format onnx")


def _tokens(hf_dir: Path, vocab_size: int) -> tuple[list[str], list[int]]:
    """Token strings by id and their llama.cpp types, padded to the model's vocabulary as the converter does."""
    import gguf

    tok = json.loads((hf_dir / "tokenizer.json").read_text())
    by_id: dict[int, str] = {i: t for t, i in tok["model"]["vocab"].items()}
    kind = {i: gguf.TokenType.NORMAL for i in by_id}
    for added in tok.get("added_tokens", []):
        by_id[added["id"]] = added["content"]
        kind[added["id"]] = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
    if by_id and max(by_id) >= vocab_size:
        raise ConfigError(f"{hf_dir}: the tokenizer has id {max(by_id)} but the model's vocab_size is {vocab_size}")
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(vocab_size)]
    types = [int(kind.get(i, gguf.TokenType.UNUSED)) for i in range(vocab_size)]
    return tokens, types


def _permute(w, n_head: int):
    """HF's rotate-half Q/K rows (of a weight or a bias) → llama.cpp's interleaved pairs (convert_hf_to_gguf
    LlamaModel.permute)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _state(hf_dir: Path) -> tuple[set[str], Iterator[tuple[str, "np.ndarray"]]]:
    """(tensor names, iterator of (name, float32 array)): the safetensors shards read one tensor at a time."""
    from safetensors import safe_open

    files = sorted(hf_dir.glob("*.safetensors"))
    if not files:
        raise ConfigError(f"{hf_dir}: no *.safetensors weights")
    keys: set[str] = set()
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            keys |= set(st.keys())

    def tensors():
        for f in files:
            with safe_open(str(f), framework="pt") as st:
                for name in st.keys():
                    yield name, st.get_tensor(name).float().numpy()

    return keys, tensors()


def _add_hparams(w, conf: dict, vocab_size: int) -> None:
    head_dim = architectures.head_dim(conf)
    rope = conf.get("rope_parameters") or {}
    w.add_context_length(conf["max_position_embeddings"])
    w.add_embedding_length(conf["hidden_size"])
    w.add_block_count(conf["num_hidden_layers"])
    w.add_feed_forward_length(conf["intermediate_size"])
    w.add_head_count(conf["num_attention_heads"])
    w.add_head_count_kv(conf.get("num_key_value_heads") or conf["num_attention_heads"])
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(float(rope.get("rope_theta", conf.get("rope_theta", 10000.0))))
    w.add_layer_norm_rms_eps(conf["rms_norm_eps"])
    w.add_vocab_size(vocab_size)
    if head_dim != conf["hidden_size"] // conf["num_attention_heads"]:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)


def _add_tokenizer(w, hf_dir: Path, vocab_size: int) -> None:
    import gguf

    tokens, types = _tokens(hf_dir, vocab_size)
    w.add_tokenizer_model("gpt2")  # llama.cpp's name for byte-level BPE
    w.add_tokenizer_pre("gpt-2")  # the split regex _check_tokenizer verified
    w.add_token_list(tokens)
    w.add_token_types(types)
    # merges and bos/eos/unk/pad ids, read from tokenizer.json/tokenizer_config.json the converter's way
    gguf.SpecialVocab(hf_dir, load_merges=True, n_vocab=vocab_size).add_to_gguf(w, quiet=True)
    # lmforge's data pipeline adds no BOS/EOS around text; llama.cpp would otherwise decide by default
    w.add_add_bos_token(False)
    w.add_add_eos_token(False)


def write(hf_dir: Path, out_file: Path, quant: str, run_config_yaml: str, name: str = "lmforge",
          log: Callable[[str], None] = print) -> dict:
    """Write `hf_dir` (a dense HF directory of an architectures.ARCHITECTURES model) as GGUF `quant` to
    `out_file` (general.name `name`); returns {ggml type: tensor count} of the written file."""
    if quant == "q4_k_m":
        f32 = out_file.with_name(out_file.name + ".f32.tmp")
        try:
            _write_gguf(hf_dir, f32, "f32", run_config_yaml, name)
            _llama_cpp_quantize(f32, out_file, quant)
        finally:
            f32.unlink(missing_ok=True)
    else:
        _write_gguf(hf_dir, out_file, quant, run_config_yaml, name)
    types = tensor_types(out_file)
    log(f"gguf {quant}: {out_file.stat().st_size / 2**20:.2f} MiB, tensor types "
        + ", ".join(f"{n}×{t}" for t, n in sorted(types.items())))
    if quant == "q4_k_m" and "Q4_K" not in types:
        log("gguf q4_k_m: no tensor is Q4_K — k-quants need rows that are multiples of 256, so llama.cpp fell back to "
            "the 32-block types above for every weight matrix of this model (the file is still what llama.cpp "
            "calls Q4_K_M)")
    return types


def _write_gguf(hf_dir: Path, out_file: Path, quant: str, run_config_yaml: str, name: str) -> None:
    import gguf
    import numpy as np
    from tqdm import tqdm

    conf = json.loads((hf_dir / "config.json").read_text())
    arch = architectures.get(conf, str(hf_dir), "--format gguf")
    model_arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch.gguf_arch)
    vocab_size = conf["vocab_size"]
    n_head, n_kv = conf["num_attention_heads"], conf.get("num_key_value_heads") or conf["num_attention_heads"]
    qtype = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
             "q8_0": gguf.GGMLQuantizationType.Q8_0}[quant]
    ftype = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
             "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[quant]
    names = gguf.get_tensor_name_map(model_arch, conf["num_hidden_layers"])

    # use_temp_file: gguf-py spools tensors into a SpooledTemporaryFile (RAM up to 256 MiB, then $TMPDIR) as they
    # are added, so memory holds about one tensor plus 256 MiB, not the model
    w = gguf.GGUFWriter(str(out_file), arch.gguf_arch, use_temp_file=True)
    w.add_name(name)
    w.add_file_type(ftype)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_hparams(w, conf, vocab_size)
    _add_tokenizer(w, hf_dir, vocab_size)
    w.add_string(RUN_CONFIG_KEY, run_config_yaml)
    keys, tensors = _state(hf_dir)
    for hf_name, data in tqdm(tensors, total=len(keys), desc=f"gguf {quant}", unit="tensor"):
        if hf_name.endswith("rotary_emb.inv_freq"):
            continue  # recomputed by llama.cpp from rope.freq_base
        if hf_name == "lm_head.weight" and conf.get("tie_word_embeddings"):
            # tied: llama.cpp reuses token_embd when output.weight is absent; a checkpoint may hold the
            # shared tensor under either name
            if "model.embed_tokens.weight" in keys:
                continue
            hf_name = "model.embed_tokens.weight"
        gname = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gname is None:
            raise ConfigError(f"--format gguf: tensor {hf_name} has no name in llama.cpp's {arch.gguf_arch!r} "
                              f"architecture (not a plain {arch.causal_lm} checkpoint)")
        if arch.qk_interleaved and hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            data = _permute(data, n_head)
        elif arch.qk_interleaved and hf_name.endswith(("k_proj.weight", "k_proj.bias")):
            data = _permute(data, n_kv)
        if data.ndim == 1 or qtype == gguf.GGMLQuantizationType.F32:  # norms stay f32, as in llama.cpp's own files
            w.add_tensor(gname, np.ascontiguousarray(data, dtype=np.float32))
        elif qtype == gguf.GGMLQuantizationType.F16:
            w.add_tensor(gname, data.astype(np.float16))
        else:
            w.add_tensor(gname, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file(progress=False)
    w.close()


def _llama_cpp_quantize(src: Path, dst: Path, quant: str) -> None:
    import ctypes
    import os

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = {"q4_k_m": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M}[quant]
    params.nthread = os.cpu_count() or 1
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0 or not dst.is_file():
        raise RuntimeError(f"llama.cpp's llama_model_quantize({src.name} → {quant}) failed with status {rc}; "
                           "its log above says why")


def tensor_types(gguf_file: Path) -> dict[str, int]:
    """{ggml type name: tensor count} of a GGUF file: what it really holds after fallbacks."""
    from collections import Counter

    from gguf import GGUFReader

    return dict(Counter(t.tensor_type.name for t in GGUFReader(str(gguf_file)).tensors))
