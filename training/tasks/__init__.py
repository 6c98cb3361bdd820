"""Tasks: what a run learns (the config's `task:`). One module per task in this package, one line
per task in TASKS; the rest of lmforge asks the registry for a task's data, loss, evaluation, model
class and rules instead of comparing task names.

    python -c "from lmforge.training import tasks; print({n: tasks.get(n).headline for n in tasks.names()})"
    lmforge prepare configs/ner.yaml             # one task's prepare: data → tokenizer + examples
    pytest tests/test_tasks.py -x                # every task: a recipe, a docs row, a 2-rank run

Adding a task: training/tasks/NAME.py defining TASK (an object with the members of `Task`; record
tasks subclass common.RecordTask), NAME in TASKS, a recipe in configs/ and a row in docs/fine-tuning.md's task
table (tests/test_tasks.py checks both and trains it). Config validation imports this registry, so
task modules import numpy, torch and transformers only inside the functions that use them.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from .common import TaskData

if TYPE_CHECKING:
    import torch

    from ..config import Config

# The registry: training/tasks/<name>.py defines TASK. The order is the one errors list them in.
TASKS = ("pretrain", "sft", "classification", "ner", "dpo", "orpo", "reward")


class Task(Protocol):
    """What a task module's TASK provides; train, model, config and the tools use nothing else of it."""
    name: str                  # the config's `task:` value, and the module's name
    recipe: str                # the configs/ file that runs it (docs/fine-tuning.md's task table, tests/test_tasks.py)
    headline: str              # the eval metric a run's summary reports, before -> after
    causal: bool               # a causal LM (next-token logits): distillation, GGUF/ONNX, compression and
                               # perplexity reports apply to it
    parallel: tuple[str, ...]  # layouts it trains under: "data", and "sequence" (Ulysses) / "tensor" (AutoTP)
    auto_model: str            # the transformers auto class of its model, e.g. "AutoModelForCausalLM"
    peft_task_type: str        # the peft.TaskType of its adapters (which head modules train beside them)
    mixtures: bool             # takes data.mixture (several weighted sources; train rows laid out source by source)

    def metrics(self, cfg: Config) -> tuple[str, ...]:
        """The keys its evaluation reports under this config (eval.early_stopping.metric picks one)."""

    def validate(self, cfg: Config) -> None:
        """The task's own rules on the rest of the config (config validation calls it): ValueError naming the key."""

    def prepare(self, cfg: Config, init_dir: Path | None, log) -> TaskData:
        """Data → tokenizer and train/eval examples; every bad input is a ConfigError here, before a
        model is built. init_dir: model.init_from's config and tokenizer (consolidate.source_meta)."""

    def model_inputs(self, inputs, targets: torch.Tensor, device, groups=None) -> tuple[dict, torch.Tensor]:
        """A batch (examples.batch(indices)) as model keyword arguments and targets (-100: no loss) on
        the device; `groups` (parallel.RankGroups): this rank's sequence-parallel chunk where the task has one."""

    def prepare_run(self, engine, data: TaskData, cfg: Config, groups, device, log) -> None:
        """Once the engine holds the starting weights, before any checkpoint is loaded into it; every rank
        calls it (dpo: the reference log-probs). Whatever loss() and step_metrics() need of this run."""

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The training loss of a micro batch: mean cross entropy over the targets that count."""

    def step_metrics(self) -> dict[str, float]:
        """train/* scalars of the micro batches since the last call, the same on every rank (every rank calls it)."""

    def evaluate(self, engine, data: TaskData, cfg: Config, groups, device) -> dict[str, float]:
        """Held-out metrics ("eval/loss" first), the same on every rank; every rank calls it."""


def _load(name: str) -> Task:
    task = importlib.import_module(f"{__name__}.{name}").TASK
    if task.name != name:
        raise ImportError(f"training/tasks/{name}.py's TASK is named {task.name!r}, not {name!r}")
    return task


_REGISTRY: dict[str, Task] = {name: _load(name) for name in TASKS}


def names() -> tuple[str, ...]:
    return TASKS


def get(name: str) -> Task:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; the registry (training/tasks/) has {', '.join(TASKS)}") from None


def causal_names() -> tuple[str, ...]:
    """The tasks that train a causal LM (pretrain, sft): what distillation and the deployment tools take."""
    return tuple(n for n in TASKS if _REGISTRY[n].causal)


def prepare(cfg: Config, init_dir: Path | None, log) -> TaskData:
    """cfg.task's prepare (what preflight and `lmforge prepare` run)."""
    return get(cfg.task).prepare(cfg, init_dir, log)
