"""`lmforge report`: the baseline's perplexity equals a plain transformers evaluation of the run's
held-out tokens, sizes and ratios are the files', gates pass and fail by the numbers and set the exit
code, the PNG opens, and bad gates or paths fail before any model loads."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch

from conftest import REPO, lmforge


def derived(lm_hf: Path, out: Path, change) -> Path:
    """A Hugging Face artifact made from lm_hf by `change(model)`, carrying its tokenizer and run config."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(lm_hf))
    with torch.no_grad():
        model = change(model)
    model.save_pretrained(str(out))
    for f in ("tokenizer.json", "tokenizer_config.json", "lmforge_run.yaml"):
        shutil.copy(lm_hf / f, out / f)
    return out


def perplexity(hf_dir: Path) -> float:
    from transformers import AutoModelForCausalLM

    from lmforge.tools import artifact

    tokens = artifact.heldout_tokens(artifact.run_config(hf_dir))
    model = AutoModelForCausalLM.from_pretrained(str(hf_dir)).eval()
    with torch.no_grad():
        logits = model(input_ids=tokens).logits[:, :-1]
    return math.exp(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)),
                                                      tokens[:, 1:].reshape(-1)).item())


def noisy(model):
    torch.manual_seed(0)
    for p in model.parameters():
        p.add_(torch.randn_like(p) * 0.05)
    return model


def test_report_measures_and_gates(lm_hf, tmp_path):
    half = derived(lm_hf, tmp_path / "bf16", lambda m: m.to(torch.bfloat16))
    bad = derived(lm_hf, tmp_path / "noisy", noisy)
    out = tmp_path / "report"
    proc = lmforge("report", half, bad, "--baseline", lm_hf, "--out", out, "--gate", "ppl<=+5%", check=False)
    assert proc.returncode == 1, proc.stderr[-3000:]  # the noisy model fails the gate
    rep = json.loads((out / "report.json").read_text())
    base, (r_half, r_bad) = rep["baseline"], rep["rows"]
    assert base["ppl"] == pytest.approx(perplexity(lm_hf), rel=1e-5)
    assert base["size"] == (lm_hf / "model.safetensors").stat().st_size
    assert r_half["size_ratio"] == pytest.approx(0.5, abs=0.01) and r_half["gate"] == "PASS"
    assert abs(r_half["ppl_change"]) < 0.01
    assert r_bad["gate"].startswith("FAIL") and r_bad["ppl"] > 1.05 * base["ppl"]
    assert rep["passed"] is False and rep["eval_tokens"] == rep["eval_rows"] * rep["seq_len"]
    md = (out / "report.md").read_text()
    assert "| bf16 |" in md and "FAIL" in md and "→ FAIL" in md
    from PIL import Image

    with Image.open(out / "report.png") as png:
        assert png.size[0] > 300 and png.size[1] > 200

    # the same report with the passing artifact only (and an absolute size gate) exits 0
    proc = lmforge("report", half, "--baseline", lm_hf, "--out", out, "--gate", "ppl<=+1%", "--gate",
                   f"size<={base['size'] * 0.6:.0f}", check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((out / "report.json").read_text())["passed"] is True


@pytest.mark.parametrize("args, expected", [
    (["--gate", "perplexity<=5%"], "expected METRIC OP VALUE"),
    (["--gate", "ppl=+5%"], "expected METRIC OP VALUE"),
    (["/nonexistent/model"], "does not exist"),
    (["pyproject.toml"], "not a model artifact"),
    (["--eval-seqs", "0"], "--eval-seqs 0: at least 1"),
    (["--seq-len", "1"], "--seq-len 1: at least 2"),
])
def test_report_refuses_bad_input_before_loading(args, expected, lm_hf, tmp_path):
    """report() raises a ConfigError before loading any model and writes nothing; through the CLI (the
    first case): exit 2."""
    from lmforge.tools.report import report
    from lmforge.training.config import ConfigError

    artifacts = [a for a in args if not a.startswith("-") and "%" not in a and not a.isdigit()] or [str(lm_hf)]
    flags = [a for a in args if a not in artifacts]
    if args == ["--gate", "perplexity<=5%"]:
        proc = lmforge("report", *artifacts, "--baseline", lm_hf, "--out", tmp_path / "r", *flags, check=False)
        assert proc.returncode == 2 and expected in proc.stderr, proc.stderr[-2000:]
    opts = dict(zip(flags[::2], flags[1::2]))
    artifacts = [str(REPO / a) if a == "pyproject.toml" else a for a in artifacts]  # the CLI ran in REPO
    with pytest.raises(ConfigError, match=re.escape(expected)):
        report(artifacts, str(lm_hf), str(tmp_path / "r"), gates=[opts["--gate"]] if "--gate" in opts else [],
               eval_seqs=int(opts.get("--eval-seqs", 64)),
               seq_len=int(opts["--seq-len"]) if "--seq-len" in opts else None, log=lambda m: None)
    assert not (tmp_path / "r").exists()


def test_report_never_replaces_other_files(lm_hf, tmp_path):
    from lmforge.tools.report import report
    from lmforge.training.config import ConfigError

    (tmp_path / "mine.txt").write_text("keep")
    with pytest.raises(ConfigError, match="holds other files"):
        report([str(lm_hf)], str(lm_hf), str(tmp_path), log=lambda m: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.txt"] and (tmp_path / "mine.txt").read_text() == "keep"
