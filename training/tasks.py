"""Fine-tuning tasks: records (jsonl / parquet / `datasets.save_to_disk`) → tokenized examples →
batches, plus each task's evaluation metrics.

    python -m lmforge.training.embedded classification /tmp/cls      # labelled data from the stdlib
    lmforge train configs/classification.yaml --nproc 2              # task: classification

  sft             `messages` ([{role, content}, ...]) or `prompt`/`response` records, rendered with the
                  chat template (the tokenizer's, data.chat_template, or BUILTIN_CHAT_TEMPLATE); the
                  loss is on assistant tokens only. With data.packing several records share one row:
                  position_ids restart at every record, which transformers turns into a
                  block-diagonal causal mask (attention never crosses a record; it does so only
                  without a KV cache, hence model.build's use_cache=False), and each record's
                  targets are its own, so no loss predicts the next record's first token.
  classification  `text` + `label`; AutoModelForSequenceClassification (encoder or decoder models).
  ner             `tokens` (words) + `tags` (BIO per word); AutoModelForTokenClassification; each
                  word's label sits on its first sub-word token, the others are ignored (-100).

Every batch is (model inputs, targets) with -100 for "no loss here", so one loss (mean cross
entropy over the targets that count) serves all tasks. Evaluation covers the whole eval split,
sharded over data-parallel ranks with equal batch counts (ZeRO-3 needs every rank in every
forward); predictions are gathered so every rank computes the same metrics (early stopping then
decides the same way on all of them).
"""

from __future__ import annotations

import json
import math
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from filelock import FileLock

from .config import Config, ConfigError, DataConfig

IGNORE = -100

# Used when the tokenizer has no chat template and data.chat_template is unset. The assistant turn
# ends with the EOS token, so the model learns to stop; its content and EOS are the trained span.
BUILTIN_CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] }}\n\n"
    "{% elif m['role'] == 'user' %}### Instruction:\n{{ m['content'] }}\n\n"
    "{% elif m['role'] == 'assistant' %}### Response:\n{{ m['content'] }}{{ eos_token }}\n\n"
    "{% else %}{{ raise_exception('unknown role ' + m['role']) }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}### Response:\n{% endif %}")


# --------------------------------------------------------------------------- records

def embedded_paths(cfg: DataConfig, paths: list[str]) -> list[str]:
    """`{embedded:TASK}/train.jsonl`: the labelled stdlib data of training/embedded.py, built once
    into the cache (under a file lock, so every rank may ask)."""
    out = []
    for p in paths:
        if p.startswith("{embedded:"):
            name, _, rest = p[len("{embedded:"):].partition("}")
            from . import embedded

            root = cfg.resolved_cache_dir() / "embedded" / name
            with FileLock(str(root) + ".lock"):
                if not (root / "train.jsonl").is_file():
                    try:
                        embedded.build(name, root)
                    except ValueError as e:
                        raise ConfigError(f"data.paths: {p}: {e}") from None
            p = str(root) + rest
        out.append(p)
    return out


def _load_records(cfg: DataConfig, paths: list[str], cache: Path):
    """A datasets.Dataset of the records in `paths` (json/jsonl/parquet/arrow)."""
    import datasets

    from .data import resolve_files

    paths = embedded_paths(cfg, paths)
    files, fmt = resolve_files(cfg.model_copy(update={"paths": paths}))
    if fmt not in ("json", "parquet", "arrow"):
        raise ConfigError(f"data.paths: fine-tuning tasks read records (json/jsonl, parquet or a datasets "
                          f"directory), got {fmt} files such as {files[0]}")
    if fmt == "arrow":
        parts = [datasets.load_from_disk(str(f)) for f in files]
        parts = [p["train"] if isinstance(p, datasets.DatasetDict) else p for p in parts]
        return datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    return datasets.load_dataset(fmt, data_files=[str(f) for f in files], split="train", cache_dir=str(cache))


def _require_columns(train: list[dict], held: list[dict], columns: dict[str, str]) -> None:
    """columns: column name → the config key that names it; both splits must have them all."""
    for where, records in (("training", train), ("eval", held)):
        missing = [c for c in columns if c not in records[0]]
        if missing:
            need = " and ".join(f"{c!r} ({k})" for c, k in columns.items())
            raise ConfigError(f"data: the {where} records need columns {need}; they have {sorted(records[0])}")


def load_splits(cfg: Config, log) -> tuple[list[dict], list[dict]]:
    """(train records, eval records): data.eval_paths, or a stable hash split of data.paths."""
    cache = cfg.data.resolved_cache_dir() / "hf_datasets"
    train = _load_records(cfg.data, cfg.data.paths, cache)
    if cfg.data.eval_paths:
        held = _load_records(cfg.data, cfg.data.eval_paths, cache)
        return train.to_list(), held.to_list()
    records = train.to_list()
    cut = int(cfg.data.holdout * 10_000)
    is_val = [zlib.crc32(str(i).encode()) % 10_000 < cut for i in range(len(records))]
    if not any(is_val) and records:
        is_val[-1] = True
    if all(is_val):
        raise ConfigError("data: too few records to hold any out for evaluation; set data.eval_paths")
    log.info(f"data.eval_paths unset: holding out {sum(is_val)} of {len(records)} records (data.holdout)")
    return [r for r, v in zip(records, is_val) if not v], [r for r, v in zip(records, is_val) if v]


# --------------------------------------------------------------------------- tokenizer

def _texts(task: str, cfg: DataConfig, records: list[dict]):
    for r in records:
        if task == "classification":
            yield str(r.get(cfg.text_field, ""))
        elif task == "ner":
            yield " ".join(map(str, r.get(cfg.words_field) or []))
        else:
            msgs = r.get(cfg.messages_field) or [{"content": r.get(cfg.prompt_field, "")},
                                                  {"content": r.get(cfg.response_field, "")}]
            yield "\n".join(str(m.get("content", "")) for m in msgs)


def tokenizer_for(cfg: Config, init_dir: Path | None, train: list[dict], log):
    """The model's own tokenizer (model.init_from / model.path), else data.tokenizer, else a
    byte-level BPE trained on the training records (cached by content)."""
    from .data import _train_tokenizer, load_tokenizer

    for source in (init_dir, Path(cfg.model.path).expanduser() if cfg.model.path else None):
        if source is not None and any((source / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
            return load_tokenizer(source)
    if cfg.data.tokenizer:
        return load_tokenizer(cfg.data.tokenizer)
    import datasets

    texts = list(_texts(cfg.task, cfg.data, train))
    digest = zlib.crc32("\x00".join(texts).encode()) ^ cfg.data.vocab_size
    out = cfg.data.resolved_cache_dir() / "task_tokenizers" / f"{cfg.task}-{digest:08x}"
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + ".lock"):
        if not (out / "tokenizer.json").is_file():
            log.info(f"training a {cfg.data.vocab_size}-token BPE tokenizer on the {len(texts)} training records → {out}")
            _train_tokenizer(datasets.Dataset.from_dict({"text": texts}), cfg.data.vocab_size, out)
    return load_tokenizer(out)


# --------------------------------------------------------------------------- examples

def _pad(rows: list[np.ndarray], value: int, length: int | None = None) -> torch.Tensor:
    n = length or max(len(r) for r in rows)
    out = np.full((len(rows), n), value, dtype=np.int64)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
    return torch.from_numpy(out)


@dataclass
class ClassificationExamples:
    ids: list[np.ndarray]
    labels: np.ndarray
    pad_id: int

    @property
    def tokens_per_row(self) -> float:
        """Mean tokens of a row, padding excluded (throughput counts these)."""
        return float(np.mean([len(x) for x in self.ids]))

    def __len__(self) -> int:
        return len(self.ids)

    def batch(self, indices) -> tuple[dict, torch.Tensor]:
        rows = [self.ids[i] for i in indices]
        input_ids = _pad(rows, self.pad_id)
        mask = _pad([np.ones(len(r), dtype=np.int64) for r in rows], 0)
        return {"input_ids": input_ids, "attention_mask": mask}, torch.from_numpy(self.labels[list(indices)])


@dataclass
class TaggingExamples:
    ids: list[np.ndarray]
    targets: list[np.ndarray]   # per token: tag index on a word's first sub-word, else -100
    words: list[int]            # words per record (truncation may drop some from `targets`)
    pad_id: int

    @property
    def tokens_per_row(self) -> float:
        """Mean tokens of a row, padding excluded (throughput counts these)."""
        return float(np.mean([len(x) for x in self.ids]))

    def __len__(self) -> int:
        return len(self.ids)

    def batch(self, indices) -> tuple[dict, torch.Tensor]:
        rows = [self.ids[i] for i in indices]
        mask = _pad([np.ones(len(r), dtype=np.int64) for r in rows], 0)
        return ({"input_ids": _pad(rows, self.pad_id), "attention_mask": mask},
                _pad([self.targets[i] for i in indices], IGNORE))


@dataclass
class CausalExamples:
    """SFT rows: each is one or more records (packed); inputs/targets already shifted by one."""
    inputs: list[np.ndarray]
    targets: list[np.ndarray]
    positions: list[np.ndarray]
    pad_id: int
    seq_len: int

    @property
    def tokens_per_row(self) -> float:
        """Mean tokens of a row, padding excluded (throughput counts these)."""
        return float(np.mean([len(x) for x in self.inputs]))

    def __len__(self) -> int:
        return len(self.inputs)

    def batch(self, indices) -> tuple[dict, torch.Tensor]:
        rows = list(indices)
        n = max(len(self.inputs[i]) for i in rows)
        positions = np.zeros((len(rows), n), dtype=np.int64)
        for j, i in enumerate(rows):
            p = self.positions[i]
            positions[j, :len(p)] = p
            # padding counts up from 0 after the last record: its own "record", attended by nobody else
            positions[j, len(p):] = np.arange(n - len(p))
        return ({"input_ids": _pad([self.inputs[i] for i in rows], self.pad_id),
                 "position_ids": torch.from_numpy(positions)},
                _pad([self.targets[i] for i in rows], IGNORE))


# --------------------------------------------------------------------------- per task

def _label_names(cfg: Config, train: list[dict], held: list[dict], field_name: str, tagging: bool) -> list[str]:
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
    if len(names) < 2 and not tagging:
        raise ConfigError(f"classification needs at least 2 labels in the training data, found {names}")
    if tagging:
        bad = [t for t in names if t != "O" and not (t[:2] in ("B-", "I-") and len(t) > 2)]
        if bad:
            raise ConfigError(f"ner: tags must be BIO (O, B-TYPE, I-TYPE); found {bad[:5]}")
    return names


def _classification(cfg: Config, tok, records: list[dict], names: list[str]) -> ClassificationExamples:
    index = {n: i for i, n in enumerate(names)}
    texts = [str(r.get(cfg.data.text_field) or "") for r in records]
    enc = tok(texts, add_special_tokens=True, truncation=True, max_length=cfg.data.seq_len)["input_ids"]
    ids = [np.asarray(e or [tok.pad_token_id], dtype=np.int64) for e in enc]
    label_key = cfg.data.label_field or "label"
    return ClassificationExamples(ids, np.asarray([index[str(r[label_key])] for r in records], dtype=np.int64),
                                  tok.pad_token_id)


def _tagging(cfg: Config, tok, records: list[dict], names: list[str]) -> TaggingExamples:
    index = {n: i for i, n in enumerate(names)}
    tag_key = cfg.data.label_field or "tags"
    ids, targets, words = [], [], []
    for r in records:
        w, t = [str(x) for x in r[cfg.data.words_field]], [str(x) for x in r[tag_key]]
        if len(w) != len(t):
            raise ConfigError(f"ner: a record has {len(w)} words but {len(t)} tags: {w[:8]}…")
        enc = tok(w, is_split_into_words=True, add_special_tokens=True, truncation=True,
                  max_length=cfg.data.seq_len)
        target, last = np.full(len(enc["input_ids"]), IGNORE, dtype=np.int64), None
        for pos, wid in enumerate(enc.word_ids()):
            if wid is not None and wid != last:
                target[pos] = index[t[wid]]
            last = wid
        ids.append(np.asarray(enc["input_ids"], dtype=np.int64))
        targets.append(target)
        words.append(len(w))
    return TaggingExamples(ids, targets, words, tok.pad_token_id)


def _messages(cfg: DataConfig, r: dict) -> list[dict]:
    msgs = r.get(cfg.messages_field)
    if msgs is None:
        prompt, response = r.get(cfg.prompt_field), r.get(cfg.response_field)
        if not prompt or not response:
            raise ConfigError(f"sft: a record has neither {cfg.messages_field!r} nor a non-empty "
                              f"{cfg.prompt_field!r} and {cfg.response_field!r} (keys: {sorted(r)})")
        msgs = [{"role": "user", "content": str(prompt)}, {"role": "assistant", "content": str(response)}]
    if not any(m.get("role") == "assistant" and m.get("content") for m in msgs):
        raise ConfigError(f"sft: a record has no assistant response to learn: {json.dumps(msgs)[:200]}")
    return msgs


def chat_template(cfg: DataConfig, tok) -> str:
    if cfg.chat_template:
        p = Path(cfg.chat_template).expanduser()
        return p.read_text() if p.is_file() else cfg.chat_template
    return tok.chat_template or BUILTIN_CHAT_TEMPLATE


def render(tok, template: str, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant turns (as the template
    writes them, e.g. with EOS), found by rendering each prefix: the span of assistant turn i runs
    from the end of render(messages[:i], add_generation_prompt) to the end of render(messages[:i+1])."""
    def text(msgs, gen):
        try:
            return tok.apply_chat_template(msgs, chat_template=template, tokenize=False, add_generation_prompt=gen)
        except Exception as e:  # jinja errors of every kind
            raise ConfigError(f"sft: the chat template cannot render {json.dumps(msgs)[:200]}: {e}") from None

    full = text(messages, False)
    spans = []
    for i, m in enumerate(messages):
        if m.get("role") != "assistant":
            continue
        start, end = len(text(messages[:i], True)), len(text(messages[:i + 1], False))
        head = text(messages[:i + 1], False)
        if not full.startswith(head) or not full[start:end].count(str(m["content"])):
            raise ConfigError("sft: the chat template does not render conversations prefix by prefix, so the "
                              "assistant tokens cannot be located; set data.chat_template")
        while end > start and full[end - 1].isspace():
            end -= 1  # the separator after a turn is the template's, not the answer's
        spans.append((start, end))
    return full, spans


def sft_tokens(tok, template: str, messages: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """(token ids, trainable) where trainable[k] says token k lies in an assistant turn."""
    full, spans = render(tok, template, messages)
    enc = tok(full, add_special_tokens=False, return_offsets_mapping=True)
    train = np.array([any(a < e and b > s for s, e in spans) for a, b in enc["offset_mapping"]], dtype=bool)
    return np.asarray(enc["input_ids"], dtype=np.int64), train


def _sft(cfg: Config, tok, records: list[dict], log) -> CausalExamples:
    template = chat_template(cfg.data, tok)
    L = cfg.data.seq_len
    pieces, truncated = [], 0
    for r in records:
        ids, trainable = sft_tokens(tok, template, _messages(cfg.data, r))
        if len(ids) > L + 1:
            ids, trainable = ids[:L + 1], trainable[:L + 1]
            truncated += 1
        target = np.where(trainable[1:], ids[1:], IGNORE)
        if (target != IGNORE).any():
            pieces.append((ids[:-1], target))
    if truncated:
        log.warning(f"sft: {truncated} of {len(records)} records are longer than data.seq_len+1={L + 1} tokens "
                    "and were truncated")
    if not pieces:
        raise ConfigError("sft: no record keeps a response token within data.seq_len")
    rows: list[list[int]] = []
    if cfg.data.packing:  # greedy, in record order (deterministic): a row takes records while they fit
        used = L + 1
        for k, (inp, _) in enumerate(pieces):
            if used + len(inp) > L:
                rows.append([])
                used = 0
            rows[-1].append(k)
            used += len(inp)
    else:
        rows = [[k] for k in range(len(pieces))]
    inputs = [np.concatenate([pieces[k][0] for k in row]) for row in rows]
    targets = [np.concatenate([pieces[k][1] for k in row]) for row in rows]
    positions = [np.concatenate([np.arange(len(pieces[k][0])) for k in row]) for row in rows]
    return CausalExamples(inputs, targets, positions, tok.pad_token_id, L)


@dataclass
class TaskData:
    tokenizer: object
    train: object
    eval: object
    labels: list[str] | None = None           # classification labels / ner tags
    eval_records: list[dict] = field(default_factory=list)  # sft: for generation metrics
    majority_label: int | None = None         # classification: the most frequent training label

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)


def prepare(cfg: Config, init_dir: Path | None, log) -> TaskData:
    """Records → examples for cfg.task (not pretrain). Every bad input is a ConfigError here,
    before a model is built."""
    train, held = load_splits(cfg, log)
    if not train or not held:
        raise ConfigError(f"data: {'training' if not train else 'eval'} split is empty")
    tok = tokenizer_for(cfg, init_dir, train, log)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    if cfg.task == "classification":
        key = cfg.data.label_field or "label"
        _require_columns(train, held, {cfg.data.text_field: "data.text_field", key: "data.label_field"})
        names = _label_names(cfg, train, held, key, tagging=False)
        tr, ev = _classification(cfg, tok, train, names), _classification(cfg, tok, held, names)
        majority = int(np.bincount(tr.labels, minlength=len(names)).argmax())
        log.info(f"classification: {len(names)} labels, {len(tr)} training / {len(ev)} eval records; "
                 f"majority label {names[majority]!r}")
        return TaskData(tok, tr, ev, names, majority_label=majority)
    if cfg.task == "ner":
        key = cfg.data.label_field or "tags"
        _require_columns(train, held, {cfg.data.words_field: "data.words_field", key: "data.label_field"})
        names = _label_names(cfg, train, held, key, tagging=True)
        tr, ev = _tagging(cfg, tok, train, names), _tagging(cfg, tok, held, names)
        log.info(f"ner: tags {names}, {len(tr)} training / {len(ev)} eval records")
        return TaskData(tok, tr, ev, names)
    if cfg.task == "sft":
        tr, ev = _sft(cfg, tok, train, log), _sft(cfg, tok, held, log)
        log.info(f"sft: {len(train)} training records in {len(tr)} rows of ≤{cfg.data.seq_len} tokens "
                 f"({'packed' if cfg.data.packing else 'one per row'}), {len(held)} eval records")
        return TaskData(tok, tr, ev, eval_records=held)
    raise AssertionError(cfg.task)


# --------------------------------------------------------------------------- loss and evaluation

def loss_sum(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(summed cross entropy over the targets that count, their number): pretraining's token_loss,
    whose cross entropy already skips -100 targets."""
    from .evaluate import token_loss

    return token_loss(logits, targets, reduction="sum"), int((targets != IGNORE).sum())


def eval_batches(n: int, micro: int, dp_rank: int, dp_size: int) -> list[list[int]]:
    """This rank's share of all n eval examples in micro batches; every rank gets the same number
    of batches (the last ones padded with -1: run for ZeRO-3's sake, not counted)."""
    per_rank = -(-n // dp_size)
    mine = [i if i < n else -1 for i in range(dp_rank * per_rank, (dp_rank + 1) * per_rank)]
    return [mine[i:i + micro] for i in range(0, len(mine), micro)]


def _gather(obj) -> list:
    out = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


@torch.no_grad()
def evaluate(engine, task: TaskData, cfg: Config, dp_rank: int, dp_size: int, device) -> dict[str, float]:
    from . import task_metrics

    was_training = engine.module.training
    engine.eval()
    data = task.eval
    sums = torch.zeros(2, dtype=torch.float64, device=device)
    preds: list[tuple[int, object]] = []  # (example index, prediction)
    for indices in eval_batches(len(data), cfg.train.micro_batch_size, dp_rank, dp_size):
        real = [i for i in indices if i >= 0]
        inputs, targets = data.batch([i if i >= 0 else 0 for i in indices])
        targets[[k for k, i in enumerate(indices) if i < 0]] = IGNORE  # padding examples count for nothing
        logits = engine(**{k: v.to(device) for k, v in inputs.items()}).logits
        total, count = loss_sum(logits, targets.to(device))
        sums += torch.tensor([total.item(), count], dtype=torch.float64, device=device)
        if cfg.task == "classification":
            preds += list(zip(real, logits.argmax(-1)[:len(real)].tolist()))
        elif cfg.task == "ner":
            arg = logits.argmax(-1).cpu()
            for k, i in enumerate(real):
                keep = targets[k] != IGNORE
                preds.append((i, arg[k][keep].tolist()))
    torch.distributed.all_reduce(sums)
    loss = (sums[0] / sums[1].clamp(min=1)).item()
    out = {"eval/loss": loss}
    gathered = sorted(p for part in _gather(preds) for p in part)
    if cfg.task == "classification":
        names = task.labels
        gold = [names[g] for g in data.labels[[i for i, _ in gathered]]]
        out.update({f"eval/{k}": v for k, v in task_metrics.classification_metrics(
            [names[p] for _, p in gathered], gold, names, majority_label=names[task.majority_label]).items()})
    elif cfg.task == "ner":
        names = task.labels
        gold, pred = [], []
        for i, p in gathered:
            # the words that data.seq_len kept (truncation drops the rest from both sides)
            gold.append([names[t] for t in data.targets[i][data.targets[i] != IGNORE]])
            pred.append([names[t] for t in p])
        out.update({f"eval/{k}": v for k, v in task_metrics.ner_metrics(pred, gold).items()})
    else:  # sft: perplexity of the responses, BLEU of greedy answers
        out["eval/ppl"] = math.exp(min(loss, 50.0))
        if cfg.eval.generate:
            out["eval/bleu"] = _generation_bleu(engine, task, cfg, dp_rank, dp_size, device)
    engine.train(was_training)
    return out


def _generation_bleu(engine, task: TaskData, cfg: Config, dp_rank: int, dp_size: int, device) -> float:
    """Greedy answers to the first eval.generate held-out prompts, scored with sacrebleu."""
    from . import task_metrics

    tok, template = task.tokenizer, chat_template(cfg.data, task.tokenizer)
    records = task.eval_records[:cfg.eval.generate]
    jobs = []  # (prompt ids, reference)
    for r in records:
        msgs = _messages(cfg.data, r)
        last = max(i for i, m in enumerate(msgs) if m.get("role") == "assistant")
        prompt = tok.apply_chat_template(msgs[:last], chat_template=template, tokenize=False, add_generation_prompt=True)
        ids = tok(prompt, add_special_tokens=False)["input_ids"][-(cfg.data.seq_len - cfg.eval.max_new_tokens):]
        jobs.append((ids, str(msgs[last]["content"])))
    per_rank = -(-len(jobs) // dp_size)
    mine = list(range(dp_rank * per_rank, min(len(jobs), (dp_rank + 1) * per_rank)))
    zero3 = engine.zero_optimization_stage() == 3
    answers = []
    for k in range(per_rank):  # the same number of generate calls on every rank (ZeRO-3 gathers in each)
        j = mine[k] if k < len(mine) else (mine[0] if mine else 0)
        ids = torch.tensor([jobs[j][0]], device=device)
        out = engine.module.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                     max_new_tokens=cfg.eval.max_new_tokens, pad_token_id=tok.pad_token_id,
                                     eos_token_id=tok.eos_token_id, synced_gpus=zero3 and dp_size > 1)
        if k < len(mine):
            answers.append((j, tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()))
    gathered = sorted(a for part in _gather(answers) for a in part)
    return task_metrics.bleu([a for _, a in gathered], [jobs[j][1] for j, _ in gathered])
