"""The llm-compressor half of `lmforge compress`: one `oneshot` run in the compression environment.

llm-compressor pins an older transformers and compressed-tensors than lmforge's main environment, so
it lives in its own venv (`make compress-env` → .venv-compress) and this script runs there as a
subprocess of `lmforge compress`. It imports only torch, numpy, transformers and llmcompressor, never
lmforge: the main process has already validated everything and written the calibration tokens.

    .venv-compress/bin/python tools/_oneshot.py --model exports/debug --recipe w4a16 \
        --tokens calib.npy --out /tmp/w4a16 [--batch-size 8] [--report oneshot.json]
    # calib.npy: int64 [N, L] token ids; fp8 is data-free and takes no --tokens

Output: `save_pretrained(..., save_compressed=True)`, i.e. safetensors in compressed-tensors format
with its quantization_config in config.json, which vLLM serves and transformers loads. The tokenizer
is not saved here (the caller copies the input's own files: llm-compressor's copy switches truncation
on).
"""

from __future__ import annotations

import argparse
import json
import time
from importlib.metadata import version

import numpy as np
import torch


def build_recipe(name: str, group_size: int | None = None, ignore: list[str] | tuple[str, ...] = ()) -> list:
    """`ignore`: the layers every recipe leaves at the input precision (compress.py's IGNORED)."""
    from llmcompressor.modifiers.pruning import WandaPruningModifier
    from llmcompressor.modifiers.gptq import GPTQModifier
    from llmcompressor.modifiers.pruning.sparsegpt import SparseGPTModifier
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.smoothquant import SmoothQuantModifier

    if name in ("w4a16", "w8a16"):  # group-wise (default 128) symmetric int weights, GPTQ error correction
        from compressed_tensors.quantization import preset_name_to_scheme

        scheme = preset_name_to_scheme(name.upper(), ["Linear"])
        if group_size:
            scheme.weights.group_size = group_size
        return [GPTQModifier(config_groups={"group_0": scheme}, ignore=list(ignore))]
    if name == "w8a8":  # SmoothQuant moves activation outliers into weights, then GPTQ int8 per channel
        return [SmoothQuantModifier(smoothing_strength=0.8),
                GPTQModifier(targets="Linear", scheme="W8A8", ignore=list(ignore))]
    if name == "fp8":  # per-channel fp8 weights, dynamic per-token fp8 activations: data-free
        return [QuantizationModifier(targets="Linear", scheme="FP8_DYNAMIC", ignore=list(ignore))]
    if name == "sparse-2of4":
        return [SparseGPTModifier(sparsity=0.5, mask_structure="2:4", targets=["Linear"], ignore=list(ignore))]
    if name == "wanda":  # unstructured 50% by |weight| x input activation norm
        return [WandaPruningModifier(sparsity=0.5, mask_structure="0:0", targets=["Linear"], ignore=list(ignore))]
    raise SystemExit(f"_oneshot.py: unknown recipe {name!r}")


def calibration_dataset(tokens: np.ndarray):
    """Pre-tokenized rows: llm-compressor skips its own tokenization when input_ids are given."""
    from datasets import Dataset

    ids = torch.from_numpy(np.ascontiguousarray(tokens, dtype=np.int64))
    return Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="Hugging Face model directory")
    p.add_argument("--recipe", required=True)
    p.add_argument("--tokens", default=None, help=".npy of int64 [N, L] calibration token ids (data-free recipes: none)")
    p.add_argument("--tokenizer", default=None, help="the tokenizer that made --tokens (default: --model's)")
    p.add_argument("--group-size", type=int, default=None, help="w4a16/w8a16: inputs per weight scale (default 128)")
    p.add_argument("--batch-size", type=int, default=1, help="calibration rows per forward (rows are equal length: no padding)")
    p.add_argument("--ignore", nargs="*", default=[], help="layers left at the input precision (e.g. lm_head)")
    p.add_argument("--out", required=True, help="directory to save the compressed model into")
    p.add_argument("--report", default=None, help="JSON file for the versions used and the time taken")
    args = p.parse_args(argv)

    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype="auto")
    data = {}
    if args.tokens:
        tokens = np.load(args.tokens)
        data = dict(dataset=calibration_dataset(tokens), num_calibration_samples=len(tokens),
                    max_seq_length=tokens.shape[1], shuffle_calibration_samples=False, batch_size=args.batch_size)
    # oneshot insists on a tokenizer when given data, though these rows are already token ids; it is
    # never saved (the caller copies the input's own files).
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.model) if args.tokens else None
    oneshot(model=model, tokenizer=tokenizer, recipe=build_recipe(args.recipe, args.group_size, args.ignore), **data)
    model.save_pretrained(args.out, save_compressed=True)
    seconds = time.perf_counter() - start
    print(f"_oneshot.py: {args.recipe} done in {seconds:.1f} s", flush=True)
    if args.report:
        versions = {name: version(name) for name in ("llmcompressor", "compressed-tensors", "transformers", "torch")}
        with open(args.report, "w") as f:
            json.dump({"versions": versions, "oneshot_seconds": round(seconds, 1)}, f)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
