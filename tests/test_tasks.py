"""The task registry (training/tasks/): every registered task has a recipe in configs/ and a row in
the task table of docs/fine-tuning.md, and its recipe trains for a few steps on 2 gloo ranks through the CLI, logging
its headline metric. A new task module is covered by adding its name to tasks.TASKS.

    pytest tests/test_tasks.py -x
"""

from __future__ import annotations

import json

import pytest

from conftest import DEBUG, REPO, debug_overrides, lmforge
from lmforge.training import tasks
from lmforge.training.config import ConfigError, load_config

# A few steps; evaluation before and after training only (eval.interval=0, so no early stopping);
# one checkpoint at the end. eval.generate/max_new_tokens keep SFT's BLEU generation short.
SMOKE = ("train.steps=6", "eval.interval=0", "checkpoint.interval=0", "eval.early_stopping.metric=null",
         "eval.generate=2", "eval.max_new_tokens=8")
MEMBERS = ("name", "recipe", "headline", "causal", "parallel", "auto_model", "peft_task_type", "mixtures",
           "metrics", "prepare", "model_inputs", "loss", "evaluate")


TASK_TABLE = REPO / "docs" / "fine-tuning.md"


def task_table_rows() -> dict[str, list[str]]:
    """The task table of docs/fine-tuning.md: task name → the cells of its row."""
    rows = {}
    for line in TASK_TABLE.read_text().splitlines():
        if line.startswith("| `") and line.count(" | ") == 5:
            cells = [c.strip() for c in line.strip("| ").split(" | ")]
            rows[cells[0].strip("`")] = cells
    return rows


def test_registry_holds_one_module_per_task():
    assert tasks.names()[0] == "pretrain"  # the config's default task
    for name in tasks.names():
        task = tasks.get(name)
        assert task.name == name and (REPO / "training" / "tasks" / f"{name}.py").is_file()
        assert [m for m in MEMBERS if not hasattr(task, m)] == []
        assert "data" in task.parallel
    with pytest.raises(ConfigError) as err:
        load_config(DEBUG, ["task=translation"])
    assert str(err.value).startswith("task: Input should be ") and all(repr(n) in str(err.value) for n in tasks.names())


@pytest.mark.parametrize("name", tasks.names())
def test_recipe_and_task_table_row(name):
    task = tasks.get(name)
    cfg = load_config(REPO / task.recipe)
    assert cfg.task == name, f"{task.recipe} trains task {cfg.task}, not {name}"
    assert task.headline in task.metrics(cfg)
    row = task_table_rows().get(name)
    assert row is not None, f"the task table of docs/fine-tuning.md has no row for `{name}`"
    assert row[1] == f"`{task.recipe}`" and row[3] == f"`{task.auto_model}`", row
    assert row[4].startswith(task.headline) and row[5] == ", ".join(task.parallel), row


@pytest.mark.parametrize("name", tasks.names())
def test_recipe_trains_on_two_ranks(name, tmp_path, data_cache, request):
    task = tasks.get(name)
    recipe = REPO / task.recipe
    extra = [f"model.init_from={request.getfixturevalue('base')}"] if load_config(recipe).model.init_from else []
    run_dir = tmp_path / "run"
    overrides = debug_overrides(run_dir, data_cache, *SMOKE, *extra)
    proc = lmforge("train", recipe, *overrides, "--nproc", "2")  # raises unless it exits 0
    evals = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if any(k.startswith("eval/") for k in rec):
            evals[rec["step"]] = rec
    assert sorted(evals) == [0, 6], evals
    assert set(task.metrics(load_config(recipe, overrides))) <= set(evals[6]), evals[6]
    assert f"task {name}, " in proc.stderr and "(6 steps, " in proc.stderr
