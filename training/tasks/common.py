"""What the record-reading tasks (sft, classification, ner) share: records (jsonl / parquet /
`datasets.save_to_disk`) → a tokenizer → examples, batches padded with -100 targets, one loss, and
an evaluation over the whole eval split.

    lmforge prepare configs/ner.yaml     # records → examples, without training (RecordTask.prepare)

Every batch is (model inputs, targets) with -100 for "no loss here", so one loss (mean cross
entropy over the targets that count) serves all of them. Evaluation covers the whole eval split,
sharded over data-parallel ranks with equal batch counts (ZeRO-3 needs every rank in every
forward); predictions are gathered so every rank computes the same metrics (early stopping then
decides the same way on all of them).

numpy, torch and datasets are imported inside the functions: the registry (and with it config
validation) imports this module, and must stay light.
"""

from __future__ import annotations

import bisect
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable

from ..config import Config, ConfigError, DataConfig

if TYPE_CHECKING:
    import numpy as np
    import torch

IGNORE = -100


@dataclass
class TaskData:
    """What a task's prepare returns: everything preflight checked and a rank trains on. `train` and
    `eval` have len() and .batch(indices) -> (inputs, targets)."""
    tokenizer: object
    train: object
    eval: object
    vocab_size: int
    eos_id: int
    pad_id: int | None = None         # what batches are padded with: a sequence-classification head's config.pad_token_id
    labels: list[str] | None = None   # classification labels / ner tags: the model's head
    summary: dict = field(default_factory=dict)  # what `lmforge prepare` prints
    source_rows: list[int] | None = None  # data.mixture: train rows are its sources' rows, one source after another


# --------------------------------------------------------------------------- records

def embedded_paths(cfg: DataConfig, paths: list[str]) -> list[str]:
    """`{embedded:TASK}/train.jsonl` (or `{embedded:sft-SCHEMA}`, e.g. sft-alpaca): the labelled stdlib
    data of training/embedded.py, built once into the cache (under a file lock, so every rank may ask),
    in a folder named by embedded.version(): a changed builder or Python builds anew."""
    out = []
    for p in paths:
        if p.startswith("{embedded:"):
            from filelock import FileLock

            from .. import embedded

            name, _, rest = p[len("{embedded:"):].partition("}")
            root = cfg.resolved_cache_dir() / "embedded" / name / embedded.version()
            task, _, schema = name.partition("-")  # sft-alpaca: the sft pairs as alpaca records
            with FileLock(str(root) + ".lock"):
                if not (root / "train.jsonl").is_file():
                    try:
                        embedded.build(task, root, **({"schema": schema} if schema else {}))
                    except ValueError as e:
                        raise ConfigError(f"data.paths: {p}: {e}") from None
            p = str(root) + rest
        out.append(p)
    return out


def _load_records(cfg: DataConfig, paths: list[str], cache: Path, log) -> tuple[list[dict], Callable[[int], str]]:
    """(the records in `paths` (json/jsonl/parquet/arrow), where(i): "FILE record K" of record i).
    Each file is its own split of one load_dataset call, so a bad record can be traced to its file."""
    import datasets

    from ..data import resolve_files, screen_files

    paths = embedded_paths(cfg, paths)
    files, fmt = resolve_files(cfg.model_copy(update={"paths": paths}))
    if fmt not in ("json", "parquet", "arrow"):
        raise ConfigError(f"data.paths: fine-tuning tasks read records (json/jsonl, parquet or a datasets "
                          f"directory), got {fmt} files such as {files[0]}")
    if fmt == "arrow":
        parts = [datasets.load_from_disk(str(f)) for f in files]
        parts = [p["train"] if isinstance(p, datasets.DatasetDict) else p for p in parts]
    else:
        files = screen_files(cfg, files, fmt, log)
        splits = datasets.load_dataset(fmt, data_files={f"file{i}": [str(f)] for i, f in enumerate(files)},
                                       cache_dir=str(cache))
        parts = [splits[f"file{i}"] for i in range(len(files))]
    records, starts = [], []
    for part in parts:
        starts.append(len(records))
        records += part.to_list()

    def where(i: int) -> str:
        k = bisect.bisect_right(starts, i) - 1
        return f"{files[k]} record {i - starts[k]}"
    return records, where


def require_columns(train: list[dict], held: list[dict], columns: dict[str, str]) -> None:
    """columns: column name → the config key that names it; both splits must have them all."""
    for where, records in (("training", train), ("eval", held)):
        missing = [c for c in columns if c not in records[0]]
        if missing:
            need = " and ".join(f"{c!r} ({k})" for c, k in columns.items())
            raise ConfigError(f"data: the {where} records need columns {need}; they have {sorted(records[0])}")


def load_splits(cfg: Config, log, convert: Callable | None = None) -> tuple[list[dict], list[dict]]:
    """(train records, eval records): data.eval_paths, or a stable hash split of data.paths (or of
    data.dataset). convert(records, where) → records runs on each file set before the split (RecordTask.rows)."""
    from ..data import load_hub_dataset

    cache = cfg.data.resolved_cache_dir() / "hf_datasets"

    def load(paths: list[str] | None):
        if paths is None:  # data.dataset
            records = load_hub_dataset(cfg.data, cache).to_list()
            where = lambda i: f"data.dataset {cfg.data.dataset} ({cfg.data.split}) record {i}"  # noqa: E731
        else:
            records, where = _load_records(cfg.data, paths, cache, log)
        return convert(records, where) if convert and records else records

    records = load(None if cfg.data.dataset else cfg.data.paths)
    if cfg.data.eval_paths:
        return records, load(cfg.data.eval_paths)
    cut = int(cfg.data.holdout * 10_000)
    is_val = [zlib.crc32(str(i).encode()) % 10_000 < cut for i in range(len(records))]
    if not any(is_val) and records:
        is_val[-1] = True
    if all(is_val):
        raise ConfigError("data: too few records to hold any out for evaluation; set data.eval_paths")
    log.info(f"data.eval_paths unset: holding out {sum(is_val)} of {len(records)} records (data.holdout)")
    return [r for r, v in zip(records, is_val) if not v], [r for r, v in zip(records, is_val) if v]


def label_names(train: list[dict], held: list[dict], field_name: str, tagging: bool) -> list[str]:
    """The sorted labels (tagging: tags) of the training records; the eval records may have no other."""
    def labels_of(records):
        for r in records:
            v = r.get(field_name)
            if v is None:
                raise ConfigError(f"data.label_field: a record has no {field_name!r} (keys: {sorted(r)})")
            yield from (map(str, v) if tagging else [str(v)])

    names = sorted(set(labels_of(train)))
    unseen = sorted(set(labels_of(held)) - set(names))
    if unseen:
        raise ConfigError(f"the eval data has label(s) {unseen[:10]} that the training data never has "
                          f"(training labels: {names[:20]}); a model cannot learn them")
    return names


# --------------------------------------------------------------------------- tokenizer

def tokenizer_for(cfg: Config, init_dir: Path | None, texts: Callable[[], Iterable[str]], log):
    """The model's own tokenizer (model.init_from / model.path), else data.tokenizer, else a
    byte-level BPE trained on `texts()` (the training records as the task reads them; cached by content)."""
    from filelock import FileLock

    from ..data import _train_tokenizer, load_tokenizer

    for source in (init_dir, Path(cfg.model.path).expanduser() if cfg.model.path else None):
        if source is not None and any((source / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
            return load_tokenizer(source)
    if cfg.data.tokenizer:
        return load_tokenizer(cfg.data.tokenizer)
    import datasets

    texts = list(texts())
    digest = zlib.crc32("\x00".join(texts).encode()) ^ cfg.data.vocab_size
    out = cfg.data.resolved_cache_dir() / "task_tokenizers" / f"{cfg.task}-{digest:08x}"
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + ".lock"):
        if not (out / "tokenizer.json").is_file():
            log.info(f"training a {cfg.data.vocab_size}-token BPE tokenizer on the {len(texts)} training records → {out}")
            _train_tokenizer(datasets.Dataset.from_dict({"text": texts}), cfg.data.vocab_size, out)
    return load_tokenizer(out)


# --------------------------------------------------------------------------- batches, loss, evaluation

def pad(rows: list[np.ndarray], value: int, length: int | None = None) -> torch.Tensor:
    import numpy as np
    import torch

    n = length or max(len(r) for r in rows)
    out = np.full((len(rows), n), value, dtype=np.int64)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
    return torch.from_numpy(out)


def loss_sum(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(summed cross entropy over the targets that count, their number): pretraining's token_loss,
    whose cross entropy already skips -100 targets."""
    from ..evaluate import token_loss

    return token_loss(logits, targets, reduction="sum"), int((targets != IGNORE).sum())


def eval_batches(n: int, micro: int, dp_rank: int, dp_size: int) -> list[list[int]]:
    """This rank's share of all n eval examples in micro batches; every rank gets the same number
    of batches (the last ones padded with -1: run for ZeRO-3's sake, not counted)."""
    per_rank = -(-n // dp_size)
    mine = [i if i < n else -1 for i in range(dp_rank * per_rank, (dp_rank + 1) * per_rank)]
    return [mine[i:i + micro] for i in range(0, len(mine), micro)]


def gather(obj) -> list:
    """Every rank's `obj`, on every rank."""
    import torch

    out = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


class NoRunState:
    """The Task members that most tasks do not need: no rules of their own, nothing set up per run,
    no train/* scalars beyond the loss."""

    def validate(self, cfg: Config) -> None:
        pass

    def prepare_run(self, engine, data: TaskData, cfg: Config, groups, device, log) -> None:
        pass

    def step_metrics(self) -> dict[str, float]:
        return {}


class RecordTask(NoRunState):
    """The part of the Task protocol (training/tasks/__init__.py) that every record task shares:
    prepare's records → tokenizer → examples, dict batches, the mean loss over targets that count,
    and the evaluation loop. A task adds its attributes and the hooks below."""
    causal = False
    parallel = ("data",)  # sequence/tensor parallelism are for pretraining long or wide models
    mixtures = False      # data.mixture: a task that takes one sets this and implements concat()

    # ---- hooks
    def texts(self, cfg: DataConfig, records: list[dict]) -> Iterable[str]:
        """The text of each training record, for a tokenizer trained here."""
        raise NotImplementedError

    def template(self, cfg: DataConfig, tok) -> str | None:
        """The chat template the task renders records with, or None (it renders none)."""
        return None

    def rows(self, cfg: DataConfig, records: list[dict], where: Callable[[int], str], log) -> list[dict]:
        """The records as the task reads them, from the records of one file set; where(i) names record
        i's file and index for a ConfigError. Default: as loaded."""
        return records

    def examples(self, cfg: Config, tok, train: list[dict], held: list[dict],
                 log) -> tuple[object, object, list[str] | None]:
        """(train examples, eval examples, head labels or None) from the records; bad records raise ConfigError."""
        raise NotImplementedError

    def concat(self, parts: list) -> object:
        """Several sources' examples (what examples() returns) as one, rows in order (data.mixture)."""
        raise NotImplementedError

    def predictions(self, logits: torch.Tensor, targets: torch.Tensor, real: list[int]) -> list[tuple[int, object]]:
        """(example index, prediction) of the real (non-padding) examples of an eval batch."""
        return []

    def scores(self, engine, data: TaskData, cfg: Config, groups, device, loss: float,
               predictions: list[tuple[int, object]]) -> dict[str, float]:
        """The eval metrics besides eval/loss, from every rank's predictions (sorted by example)."""
        raise NotImplementedError

    # ---- the protocol
    def prepare(self, cfg: Config, init_dir: Path | None, log) -> TaskData:
        """Records → examples. Every bad input is a ConfigError here, before a model is built."""
        # one run config per source (data.mixture's entries; else the run's own): its records, fields, format
        per_source = [cfg.model_copy(update={"data": s}) for s in cfg.data.sources()]
        splits = [load_splits(c, log, lambda records, where, c=c: self.rows(c.data, records, where, log))
                  for c in per_source]
        for train, held in splits:
            if not train or not held:
                raise ConfigError(f"data: {'training' if not train else 'eval'} split is empty")
        tok = tokenizer_for(cfg, init_dir, lambda: (t for c, (train, _) in zip(per_source, splits)
                                                    for t in self.texts(c.data, train)), log)
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        template = self.template(cfg.data, tok)
        if template is not None:  # saved with the tokenizer (checkpoints, exports): inference renders as training did
            tok.chat_template = template
        made = [self.examples(c, tok, train, held, log) for c, (train, held) in zip(per_source, splits)]
        if len(made) == 1:
            (tr, ev, labels), rows = made[0], None
        else:
            tr, ev, labels = self.concat([m[0] for m in made]), self.concat([m[1] for m in made]), made[0][2]
            rows = [len(m[0]) for m in made]
        summary = {"task": cfg.task, "train_rows": len(tr), "eval_rows": len(ev), "labels": labels,
                   "vocab_size": len(tok)}
        if rows:
            summary["source_rows"] = dict(zip(cfg.data.source_names(), rows))
        return TaskData(tok, tr, ev, len(tok), tok.eos_token_id, tok.pad_token_id, labels, summary, rows)

    def model_inputs(self, inputs: dict, targets: torch.Tensor, device, groups=None) -> tuple[dict, torch.Tensor]:
        return {k: v.to(device) for k, v in inputs.items()}, targets.to(device)

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        summed, count = loss_sum(logits, targets)
        return summed / max(count, 1)

    def evaluate(self, engine, data: TaskData, cfg: Config, groups, device) -> dict[str, float]:
        import torch

        with torch.no_grad():
            was_training = engine.module.training
            engine.eval()
            examples = data.eval
            sums = torch.zeros(2, dtype=torch.float64, device=device)
            preds: list[tuple[int, object]] = []
            for indices in eval_batches(len(examples), cfg.train.micro_batch_size, groups.dp_rank, groups.dp_size):
                real = [i for i in indices if i >= 0]
                inputs, targets = examples.batch([i if i >= 0 else 0 for i in indices])
                targets[[k for k, i in enumerate(indices) if i < 0]] = IGNORE  # padding examples count for nothing
                kwargs, on_device = self.model_inputs(inputs, targets, device)
                logits = engine(**kwargs).logits
                total, count = loss_sum(logits, on_device)
                sums += torch.tensor([total.item(), count], dtype=torch.float64, device=device)
                preds += self.predictions(logits, targets, real)
            torch.distributed.all_reduce(sums)
            loss = (sums[0] / sums[1].clamp(min=1)).item()
            out = {"eval/loss": loss}
            gathered = sorted(p for part in gather(preds) for p in part)
            out.update(self.scores(engine, data, cfg, groups, device, loss, gathered))
            engine.train(was_training)
        return out
