"""`lmforge export` (Hugging Face directory) against the training engine and DeepSpeed's own tool:
the exported model reproduces the engine's logged held-out loss on the very same eval batches, its
tensors equal what the checkpoint's `zero_to_fp32.py` script writes, and bad inputs leave nothing
behind. The AutoTP path (through the universal format) is checked in test_parallel.py, a sharded
export of a ZeRO-3 run in test_train.py (beside the ZeRO-3 run it reads)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from conftest import lmforge, run


def engine_eval_loss(run_dir: Path) -> tuple[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last = max((r for r in rows if "eval/loss" in r), key=lambda r: r["step"])
    return last["step"], last["eval/loss"]


def export_eval_loss(hf_dir: Path, run_dir: Path, world_size: int) -> float:
    """The engine's evaluation (training/evaluate.py) redone with the exported model in plain
    transformers: the same held-out micro batches of every data-parallel rank, token-weighted."""
    from transformers import AutoModelForCausalLM

    from lmforge.training import data
    from lmforge.training.checkpoint import consolidate
    from lmforge.training.evaluate import token_loss

    cfg = consolidate.saved_config(consolidate.find_checkpoint(run_dir))
    val = data.PackedTokens(data.prepare(cfg.data).val_tokens, cfg.data.seq_len)
    model = AutoModelForCausalLM.from_pretrained(str(hf_dir)).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for rank in range(world_size):
            for indices in data.eval_indices(len(val), cfg.eval.batches, cfg.train.micro_batch_size, rank, world_size):
                inputs, targets = val.batch(indices)
                total += token_loss(model(input_ids=inputs).logits, targets, reduction="sum").item()
                count += targets.numel()
    return total / count


def test_export_reproduces_the_engine_and_deepspeeds_script(lm_run, lm_hf, tmp_path):
    step, engine_loss = engine_eval_loss(lm_run)
    assert step == 150
    assert abs(export_eval_loss(lm_hf, lm_run, 2) - engine_loss) < 1e-5

    # DeepSpeed's own script, copied into every checkpoint directory, gives the same tensors
    from safetensors.torch import load_file

    ds_out = tmp_path / "ds"
    run([sys.executable, lm_run / "checkpoints" / "zero_to_fp32.py", lm_run / "checkpoints", ds_out,
         "--safe_serialization", "--tag", "step_150"])
    ours, theirs = load_file(str(lm_hf / "model.safetensors")), load_file(str(ds_out / "model.safetensors"))
    assert sorted(ours) == sorted(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)

    conf = json.loads((lm_hf / "config.json").read_text())
    assert conf["architectures"] == ["LlamaForCausalLM"]  # vLLM picks its model class by this name
    assert (lm_hf / "generation_config.json").is_file() and (lm_hf / "lmforge_run.yaml").is_file()
    assert "steps: 150" in (lm_hf / "README.md").read_text()


@pytest.mark.parametrize("case", ["not-a-checkpoint", "incomplete-shards", "exists"])
def test_export_bad_input_leaves_nothing(case, lm_run, tmp_path):
    """Refused with a ConfigError, nothing written; the CLI's exit 2 and one line: the first case."""
    import shutil

    from lmforge.tools.export import export
    from lmforge.training.config import ConfigError

    src, out = lm_run, tmp_path / "out"
    if case == "not-a-checkpoint":
        src = tmp_path / "empty"
        src.mkdir()
        expected = "no complete lmforge checkpoint"
    elif case == "incomplete-shards":
        shutil.copytree(lm_run / "checkpoints" / "step_150", tmp_path / "step_150")
        src = tmp_path / "step_150"
        (src / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()  # a shard lost in a copy
        expected = "is not a complete lmforge checkpoint"
    else:
        out.mkdir()
        (out / "keep.txt").write_text("mine")
        expected = "exists"
    if case == "not-a-checkpoint":
        proc = lmforge("export", src, "--out", out, check=False)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert expected in proc.stderr.strip().splitlines()[-1]
    else:
        with pytest.raises(ConfigError, match=expected):
            export(src, out)
    assert not (tmp_path / ".tmp_out").exists()
    assert (out / "keep.txt").read_text() == "mine" if case == "exists" else not out.exists()
