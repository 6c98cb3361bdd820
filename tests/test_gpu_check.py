"""bench/gpu_check.py, the script a lent GPU runs (`make gpu-check`), run here with CPU shapes
(--cpu): every check's code path, the JSON it writes and the table it prints; and the wheel budget.
On CUDA the same functions run the ~1B ZeRO-3 bf16 run, SDPA's flash kernel and bitsandbytes on
the GPU (not run in this suite: no GPU)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO

pytestmark = pytest.mark.slow  # one ZeRO-3 engine, a few steps


def test_cpu_run_writes_every_check(tmp_path):
    out = tmp_path / "gpu-check.json"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py"), "--cpu", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["runtime"]["backend"] == "gloo" and r["runtime"]["attention_used"] == "sdpa"
    z = r["zero3"]
    assert z["params"] > 0 and z["step_s"] > 0 and z["tokens_per_s"] > 0 and z["mfu"] is None  # no CPU peak
    assert len(z["losses"]) == 6 and all(l == l for l in z["losses"])  # finite
    assert z["optimizer_state_bytes_per_param"] == pytest.approx(8.0)  # AdamW under ZeRO-3
    assert r["attention"]["sdpa"]["within"] and r["attention"]["sdpa"]["max_abs_diff"] < 1e-4
    assert 1.9 < r["adam8bit"]["state_bytes_per_param"] < 2.2
    assert r["plan"]["estimate_bytes"] > 0
    for check in ("runtime", "zero3", "attention", "adam8bit", "plan"):
        assert f"| {check} |" in proc.stdout


def test_wheel_budget(tmp_path):
    (tmp_path / "a-1-py3-none-any.whl").write_bytes(b"0" * (40 << 20))
    run = lambda: subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py"), "--wheels", str(tmp_path)],
                                 capture_output=True, text=True, cwd=REPO)
    proc = run()
    assert proc.returncode == 0 and "40.00 MiB  total (budget 64 MiB): fits" in proc.stdout
    (tmp_path / "b-1-py3-none-any.whl").write_bytes(b"0" * (30 << 20))
    proc = run()
    assert proc.returncode == 1 and "OVER" in proc.stdout
