"""training/startup.py's timeline, and the import order it measures: the CLI and the local launcher
import no torch, so the forkserver (which imports it for the ranks) starts before the driver's
preflight does. The line a real run logs: tests/test_train.py."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from lmforge.training import startup
from lmforge.training.startup import ENV, Timeline


def test_phases_run_from_mark_to_mark_and_sum_to_the_total():
    t = Timeline(100.0, [("driver imports", 100.5), ("driver preflight", 103.0), ("rank start", 105.0)])
    assert t.phases() == {"driver imports": 0.5, "driver preflight": 2.5, "rank start": 2.0}
    assert t.total() == 5.0
    assert t.describe() == "first step 5.0 s after the command (driver imports 0.5, driver preflight 2.5, rank start 2.0)"
    assert t.metrics() == {"startup/to_first_step_s": 5.0, "startup/driver_imports_s": 0.5,
                           "startup/driver_preflight_s": 2.5, "startup/rank_start_s": 2.0}


def test_a_rank_continues_the_timeline_its_launcher_handed_down(monkeypatch):
    driver = Timeline(time.time() - 3, [("driver imports", time.time() - 2)])
    monkeypatch.setenv(ENV, driver.env()[ENV])
    monkeypatch.setattr(startup, "TIMELINE", Timeline(0.0))  # a forked rank's copy, made before the launcher's marks
    startup.for_rank()
    assert startup.TIMELINE.start == driver.start
    assert [n for n, _ in startup.TIMELINE.marks] == ["driver imports", "rank start"]
    assert 1.5 < startup.TIMELINE.phases()["rank start"] < 60


def test_without_a_launcher_the_timeline_starts_with_the_process():
    code = "import time; t0 = time.time(); from lmforge.training.startup import Timeline; print(t0 - Timeline.parse(None).start)"
    before_imports = float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert 0 <= before_imports < 5  # Python's own start, before the first line ran (/proc, 10 ms ticks)
    assert Timeline.parse("not json").marks == [] and Timeline.parse(json.dumps({"start": 1})).marks == []


@pytest.mark.parametrize("module", ["lmforge.launcher.cli", "lmforge.launcher.local"])
def test_the_driver_reaches_the_forkserver_without_importing_torch(module):
    code = f"import sys, {module}; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
