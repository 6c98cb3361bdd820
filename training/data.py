"""Data: documents (via `datasets`) → tokenizer (local or trained here) → one flat, memory-mapped
token file per split with EOS between documents → fixed-length packed sequences → a deterministic
sampler that gives every data-parallel rank a disjoint shard and whose position is checkpointed.

    lmforge prepare configs/demo.yaml      # build (or find) the cached tokenizer and token files

Preparation runs once per corpus+tokenizer fingerprint and is cached under data.cache_dir; it is
guarded by a file lock so ranks started by torchrun or srun may all call it: one builds, the others
wait and reuse. Corpora larger than RAM never need to fit in memory: tokens are written into an
on-disk .npy and read back with np.load(mmap_mode="r"). A pre-tokenized 1-D .npy can be given
directly with data.format=tokens. Before any of it, every text/json(l) file is checked to be UTF-8
text (a binary file is refused or, with data.on_bad_file=skip, left out), once per corpus version.

A source is local files, fsspec URLs (s3://, gs://, hf://, https://: fetched once into the cache,
keyed by URL, ETag and size) or a Hugging Face dataset (data.dataset, via load_dataset). A
data.mixture prepares each source with one shared tokenizer; MixtureSampler draws from them by weight.

    lmforge prepare run.yaml data.mixture='[{weight: 7, paths: [s3://b/web]}, {weight: 3, dataset: org/books}]'
"""

from __future__ import annotations

import codecs
import glob
import hashlib
import json
import logging
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from filelock import FileLock

from .config import ROW_SCHEMAS, ConfigError, DataConfig, is_url

EOS_TOKEN = "<|endoftext|>"
_SUFFIX_FORMAT = {".txt": "text", ".md": "text", ".py": "text", ".rst": "text", ".json": "json",
                  ".jsonl": "json", ".parquet": "parquet", ".npy": "tokens"}


@dataclass(frozen=True)
class PreparedData:
    tokenizer_dir: Path
    train_tokens: Path
    val_tokens: Path
    vocab_size: int     # len(tokenizer)
    eos_id: int
    meta: dict


# --------------------------------------------------------------------------- sources

def resolve_files(cfg: DataConfig) -> tuple[list[Path], str]:
    """Expand paths/globs/directories (local, or URLs fetched into the cache) into a sorted file
    list and settle the file type: text, json, parquet, arrow or tokens."""
    files: list[Path] = []
    for pattern in cfg.expanded_paths():
        p = Path(pattern)
        if is_url(pattern):
            if cfg.format == "arrow":
                raise ConfigError(f"data.paths: {pattern}: data.format=arrow reads a local save_to_disk directory")
            files += fetch(pattern, cfg)
            continue
        if cfg.format == "arrow":
            if not p.is_dir():
                raise ConfigError(f"data.paths: {pattern} is not a datasets.save_to_disk directory")
            files.append(p)
            continue
        if any(ch in pattern for ch in "*?["):
            matched = [Path(m) for m in glob.glob(pattern, recursive=True) if Path(m).is_file()]
        elif p.is_dir():
            matched = [m for m in p.rglob("*") if m.is_file() and not m.name.startswith(".")]
        elif p.is_file():
            matched = [p]
        else:
            raise ConfigError(f"data.paths: {pattern} does not exist")
        if not matched:
            raise ConfigError(f"data.paths: {pattern} matches no files")
        files += matched
    files = sorted(set(files))
    fmt = "auto" if cfg.format in ROW_SCHEMAS else cfg.format  # an sft record shape: the file type from the suffix
    if fmt == "auto":
        kinds = {_SUFFIX_FORMAT.get(f.suffix.lower(), "text") for f in files}
        if len(kinds) > 1:
            raise ConfigError(f"data.paths mixes formats {sorted(kinds)}; set data.format")
        fmt = kinds.pop()
    empty = [f for f in files if f.is_file() and f.stat().st_size == 0]
    if empty and len(empty) == len(files):
        raise ConfigError(f"data.paths: every file is empty (e.g. {empty[0]})")
    return files, fmt


# A remote object's version as its filesystem reports it (S3/HTTP ETag, GCS etag, Hub blob id, ...).
_VERSION_KEYS = ("ETag", "etag", "blob_id", "md5Hash", "LastModified", "last_modified", "updated", "mtime")


def fetch(url: str, cfg: DataConfig) -> list[Path]:
    """Local copies of the files at an fsspec URL (a file, a directory or a glob): each fetched once
    into <cache>/remote/, keyed by its URL, version (ETag, ...) and size, so a changed object is fetched
    again and an unchanged one never. Safe from every rank (a file lock per object)."""
    import fsspec

    protocol = url.split("://", 1)[0]
    try:
        fs, root = fsspec.core.url_to_fs(url, **cfg.storage_options)
        fs.invalidate_cache()  # fsspec keeps filesystems and their listings per process: see changes now
        if any(ch in root for ch in "*?["):
            infos = [i for i in fs.glob(root, detail=True).values() if i["type"] == "file"]
        else:
            info = fs.info(root)
            infos = list(fs.find(root, detail=True).values()) if info["type"] == "directory" else [info]
    except ImportError as e:
        raise ConfigError(f"data.paths: {url} needs fsspec's {protocol}:// backend ({e}); "
                          "pip install 'lmforge[cloud]'") from None
    except FileNotFoundError:
        raise ConfigError(f"data.paths: {url} does not exist") from None
    except Exception as e:  # credentials, endpoint, network: each backend raises its own types
        raise ConfigError(f"data.paths: cannot read {url}: {type(e).__name__}: {e}") from None
    infos = [i for i in infos if not Path(i["name"]).name.startswith(".")]
    if not infos:
        raise ConfigError(f"data.paths: {url} matches no files")
    out = []
    for info in sorted(infos, key=lambda i: i["name"]):
        version = next((str(info[k]) for k in _VERSION_KEYS if info.get(k)), "")
        key = hashlib.sha256(f"{protocol}://{info['name']}|{version}|{info.get('size')}".encode()).hexdigest()[:20]
        local = cfg.resolved_cache_dir() / "remote" / key / Path(info["name"]).name
        local.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(local.parent) + ".lock"):
            if not local.is_file():
                tmp = local.with_name(local.name + ".part")
                try:
                    fs.get_file(info["name"], str(tmp))
                except Exception as e:
                    raise ConfigError(f"data.paths: cannot fetch {protocol}://{info['name']}: {e}") from None
                os.replace(tmp, local)
        out.append(local)
    return out


def load_hub_dataset(cfg: DataConfig, cache: Path):
    """data.dataset (a Hub id or a local dataset repository) with its config, split and data_files, as
    one datasets.Dataset; offline (HF_HUB_OFFLINE=1) it is read from the datasets cache."""
    import datasets

    try:
        ds = datasets.load_dataset(cfg.dataset, cfg.dataset_config, split=cfg.split,
                                   data_files=cfg.data_files or None, cache_dir=str(cache),
                                   storage_options=cfg.storage_options or None)
    except Exception as e:  # datasets raises many types: unknown dataset/config/split, offline, bad files
        what = cfg.dataset + (f" (config {cfg.dataset_config})" if cfg.dataset_config else "")
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ConfigError(f"data.dataset: cannot load {what}, split {cfg.split!r}: {type(e).__name__}: {first}") from None
    return ds


# A file of these formats is read as UTF-8 by `datasets`, which fails on a bad byte without naming
# the file; parquet has its own binary layout (checked by its footer); arrow and tokens are not screened.
_SCREENED_FORMATS = ("text", "json", "parquet")
_SCAN_CHUNK = 1 << 20


def _first_bad_byte(path: Path) -> str | None:
    """Why `path` is not UTF-8 text (its first bad byte and that byte's offset), or None. Read in
    chunks through an incremental decoder, so a large file never sits in memory whole."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0  # bytes of the file before this chunk
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_SCAN_CHUNK), b""):
            nul = chunk.find(b"\0")
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as e:
                # e.object is the decoder's carried-over bytes of an unfinished character + this chunk
                at = offset + len(chunk) - len(e.object) + e.start
                if nul < 0 or offset + nul > at:
                    return f"invalid UTF-8 byte 0x{e.object[e.start]:02x} at byte offset {at} ({e.reason})"
            if nul >= 0:  # valid UTF-8, but no text file holds one
                return f"NUL byte at byte offset {offset + nul}: a binary file"
            offset += len(chunk)
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError as e:
            return f"truncated UTF-8 character at byte offset {offset - len(e.object) + e.start} (end of file)"
    return None


def _unreadable_parquet(path: Path) -> str | None:
    import pyarrow.parquet as pq

    try:
        pq.read_metadata(path)  # the footer only: cheap, and what a truncated or foreign file lacks
    except Exception as e:  # pyarrow raises ArrowInvalid, OSError, ... for a bad file
        return f"not a readable parquet file ({e})"
    return None


def _bad_files(cfg: DataConfig, files: list[Path], fmt: str) -> dict[str, str]:
    """file -> why it is bad, for the files that are. Cached by the files' paths, sizes and mtimes
    (as the prepared data are): every rank start re-stats the corpus but reads it only once."""
    h = hashlib.sha256(fmt.encode())
    for f in files:
        st = f.stat()
        h.update(f"{f}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    cached = cfg.resolved_cache_dir() / "screened" / f"{h.hexdigest()[:20]}.json"
    cached.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(cached) + ".lock"):
        if cached.is_file():
            return json.loads(cached.read_text())
        check = _unreadable_parquet if fmt == "parquet" else _first_bad_byte
        bad = {str(f): why for f in files if (why := check(f)) is not None}
        tmp = cached.with_suffix(".tmp")
        tmp.write_text(json.dumps(bad))
        os.replace(tmp, cached)
    return bad


def screen_files(cfg: DataConfig, files: list[Path], fmt: str, log=None) -> list[Path]:
    """The files to read: text, json(l) and parquet files that `datasets` would fail on (undecodable
    or binary; an unreadable parquet) are a ConfigError naming the file and byte (data.on_bad_file=
    error), or left out with a warning (skip)."""
    if fmt not in _SCREENED_FORMATS:
        return files
    bad = _bad_files(cfg, files, fmt)
    if not bad:
        return files
    (first, why), more = next(iter(bad.items())), len(bad) - 1
    others = f" (and {more} other bad file(s))" if more else ""
    if cfg.on_bad_file == "error":
        raise ConfigError(f"data.paths: {first}: {why}{others}; fix or remove it, or set data.on_bad_file=skip "
                          "to leave such files out")
    log = log or logging.getLogger(__name__)
    for f, why in bad.items():
        log.warning(f"data.on_bad_file=skip: leaving out {f}: {why}")
    good = [f for f in files if str(f) not in bad]
    if not good:
        raise ConfigError(f"data.paths: every file is bad, e.g. {first}: {why}")
    return good


def _identity(files: list[Path]) -> list[str]:
    """What identifies a corpus version: each file's path, size and mtime."""
    return [f"{f}|{(st := f.stat()).st_size}|{st.st_mtime_ns}" for f in files]


def _fingerprint(cfg: DataConfig, identity: list[str], fmt: str) -> str:
    h = hashlib.sha256()
    for line in identity:
        h.update(f"{line}\n".encode())
    tok_id = "trained:%d" % cfg.vocab_size
    if cfg.tokenizer:
        tok_dir = Path(cfg.tokenizer).expanduser()
        tok_file = tok_dir / "tokenizer.json"
        tok_id = hashlib.sha256(tok_file.read_bytes()).hexdigest() if tok_file.is_file() else str(tok_dir)
    h.update(json.dumps([fmt, cfg.text_field, cfg.holdout, cfg.min_doc_chars, tok_id, 2]).encode())
    return h.hexdigest()[:20]


def _load_documents(files: list[Path], fmt: str, cfg: DataConfig, hf_cache: Path):
    """A datasets.Dataset with a `text` column, one row per document."""
    import datasets

    str_files = [str(f) for f in files]
    if fmt == "text":
        ds = datasets.load_dataset("text", data_files=str_files, sample_by="document", split="train",
                                   cache_dir=str(hf_cache))
        field = "text"
    elif fmt in ("json", "parquet"):
        ds = datasets.load_dataset(fmt, data_files=str_files, split="train", cache_dir=str(hf_cache))
        field = cfg.text_field
    elif fmt == "arrow":
        parts = []
        for f in files:
            d = datasets.load_from_disk(str(f))
            if isinstance(d, datasets.DatasetDict):
                if "train" not in d:
                    raise ConfigError(f"data.paths: {f} is a DatasetDict without a 'train' split ({list(d)})")
                d = d["train"]
            parts.append(d)
        ds = datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]
        field = cfg.text_field
    else:
        raise AssertionError(fmt)
    return _text_column(ds, field)


def _text_column(ds, field: str):
    if field not in ds.column_names:
        raise ConfigError(f"data.text_field: column {field!r} not in the data (columns: {ds.column_names})")
    ds = ds.select_columns([field])
    return ds.rename_column(field, "text") if field != "text" else ds


def documents(cfg: DataConfig, log=None) -> tuple[list[str], str, "Callable[[], object]"]:
    """One source's (identity, kind, loader): what versions it (file stats, or the datasets
    fingerprint of data.dataset), its file type ("dataset" for data.dataset), and a function that
    returns its documents as a datasets.Dataset with a `text` column (not called for kind tokens)."""
    cache = cfg.resolved_cache_dir() / "hf_datasets"
    if cfg.dataset:
        ds = load_hub_dataset(cfg, cache)
        ident = [f"dataset|{cfg.dataset}|{cfg.dataset_config}|{cfg.split}|{ds._fingerprint}"]
        return ident, "dataset", lambda: _text_column(ds, cfg.text_field)
    files, fmt = resolve_files(cfg)
    if fmt == "tokens":
        return _identity(files), fmt, lambda: files
    files = screen_files(cfg, files, fmt, log)  # the fingerprint covers the files used, not those left out
    return _identity(files), fmt, lambda: _load_documents(files, fmt, cfg, cache)


def _split(ds, cfg: DataConfig):
    """Document-level held-out split by a hash of the document's index (stable, no leakage)."""
    ds = ds.filter(lambda t: t is not None and len(t) >= max(1, cfg.min_doc_chars), input_columns="text")
    if len(ds) == 0:
        raise ConfigError(f"data: no documents left after filtering (data.min_doc_chars={cfg.min_doc_chars})")
    cut = int(cfg.holdout * 10_000)
    is_val = np.array([zlib.crc32(str(i).encode()) % 10_000 < cut for i in range(len(ds))])
    if not is_val.any():
        is_val[-1] = True  # tiny corpora: hold out at least one document
    if is_val.all():
        raise ConfigError("data: the corpus is too small to split into training and held-out documents")
    return ds.select(np.flatnonzero(~is_val)), ds.select(np.flatnonzero(is_val))


# --------------------------------------------------------------------------- tokenizer

def _train_tokenizer(train_ds, vocab_size: int, out: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS_TOKEN], show_progress=True,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())

    def batches(n=256):
        for i in range(0, len(train_ds), n):
            yield train_ds[i:i + n]["text"]

    tok.train_from_iterator(batches(), trainer=trainer, length=len(train_ds))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS_TOKEN, bos_token=EOS_TOKEN,
                                   unk_token=EOS_TOKEN, pad_token=EOS_TOKEN)
    fast.save_pretrained(str(out))
    return fast


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    p = Path(path).expanduser()
    if not p.exists():
        raise ConfigError(f"data.tokenizer: {p} does not exist")
    try:
        tok = AutoTokenizer.from_pretrained(str(p), local_files_only=True)
    except Exception as e:  # transformers raises many types for an unusable directory
        raise ConfigError(f"data.tokenizer: cannot load a tokenizer from {p}: {e}") from None
    if tok.eos_token_id is None:
        raise ConfigError(f"data.tokenizer: {p} has no EOS token; packing needs one between documents")
    return tok


# --------------------------------------------------------------------------- token files

def tokenize_documents(texts: list[str], tok) -> list[list[int]]:
    """Each document's token ids with EOS after it: the one tokenization of pretraining data, a plain
    function over a batch of documents (datasets.map here; another engine can map it too)."""
    eos = tok.eos_token_id
    return [ids + [eos] for ids in tok(list(texts), add_special_tokens=False)["input_ids"]]



def token_dtype(tok) -> type:
    return np.uint16 if len(tok) <= np.iinfo(np.uint16).max else np.uint32


def write_token_file(chunks, total: int, dtype, out: Path) -> int:
    """Write `total` tokens, given as consecutive 1-D arrays, into the .npy `out` (atomically)."""
    tmp = out.with_name(out.name + ".tmp.npy")
    arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=(total,))
    pos = 0
    for flat in chunks:
        arr[pos:pos + len(flat)] = flat
        pos += len(flat)
    if pos != total:
        raise AssertionError(f"{out}: wrote {pos} tokens of {total}")
    arr.flush()
    del arr
    os.replace(tmp, out)
    return total


def _write_tokens(ds, tok, out: Path, num_proc: int, desc: str) -> int:
    dtype = token_dtype(tok)

    def encode(batch):
        ids = tokenize_documents(batch["text"], tok)
        return {"ids": ids, "n": [len(x) for x in ids]}

    enc = ds.map(encode, batched=True, num_proc=num_proc if num_proc > 1 else None,
                 remove_columns=["text"], desc=f"tokenizing {desc}")
    chunks = (np.fromiter((t for ids in batch["ids"] for t in ids), dtype=dtype)
              for batch in enc.iter(batch_size=1024))
    return write_token_file(chunks, int(np.sum(enc["n"])), dtype, out)


def prepare(cfg: DataConfig, log=None, write_tokens=_write_tokens) -> PreparedData:
    """Find or build the tokenizer and token files for this one source; safe to call from every rank.
    `write_tokens(ds, tok, out, num_proc, desc) -> tokens` encodes and writes one split (Ray Data's in
    launcher/ray_prepare.py; the result is the same file, byte for byte)."""
    if cfg.mixture:
        raise ValueError("data.prepare takes one source: prepare_sources(cfg) prepares a mixture's")
    identity, fmt, load = documents(cfg, log)
    if fmt == "tokens":
        return _prepare_pretokenized(cfg, load())
    root = cfg.resolved_cache_dir()
    out = root / "data" / _fingerprint(cfg, identity, fmt)
    out.mkdir(parents=True, exist_ok=True)
    meta_path = out / "meta.json"
    with FileLock(str(out / ".lock")):
        if not meta_path.is_file():
            if log:
                log.info(f"preparing data: {len(identity)} file(s) ({fmt}) → {out}")
            train_ds, val_ds = _split(load(), cfg)
            tok_dir = out / "tokenizer"
            tok = load_tokenizer(cfg.tokenizer) if cfg.tokenizer else _train_tokenizer(train_ds, cfg.vocab_size, tok_dir)
            if cfg.tokenizer:
                tok.save_pretrained(str(tok_dir))
            n_train = write_tokens(train_ds, tok, out / "train.npy", cfg.num_proc, "train")
            n_val = write_tokens(val_ds, tok, out / "val.npy", cfg.num_proc, "held-out")
            meta = dict(format=fmt, files=len(identity), train_docs=len(train_ds), val_docs=len(val_ds),
                        train_tokens=n_train, val_tokens=n_val, vocab_size=len(tok), eos_id=tok.eos_token_id)
            tmp = meta_path.with_suffix(".tmp")
            tmp.write_text(json.dumps(meta, indent=1))
            os.replace(tmp, meta_path)  # meta.json last: its presence means the cache is complete
    meta = json.loads(meta_path.read_text())
    return PreparedData(out / "tokenizer", out / "train.npy", out / "val.npy", meta["vocab_size"], meta["eos_id"], meta)


def _prepare_pretokenized(cfg: DataConfig, files: list[Path]) -> PreparedData:
    if not cfg.tokenizer:
        raise ConfigError("data.format=tokens needs data.tokenizer (the tokenizer that made the ids)")
    if len(files) != 1:
        raise ConfigError(f"data.format=tokens takes one .npy file, got {len(files)}")
    tok = load_tokenizer(cfg.tokenizer)
    arr = np.load(files[0], mmap_mode="r")
    if arr.ndim != 1 or arr.dtype.kind not in "ui":
        raise ConfigError(f"data.paths: {files[0]} must be a 1-D integer array, got {arr.dtype} {arr.shape}")
    # The held-out split is the tail of the stream: the file is already flattened.
    root = cfg.resolved_cache_dir() / "data" / _fingerprint(cfg, _identity(files), "tokens")
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / ".lock")):
        if not (root / "meta.json").is_file():
            cut = int(len(arr) * (1 - cfg.holdout))
            for name, part in (("train.npy", arr[:cut]), ("val.npy", arr[cut:])):
                np.save(root / name, np.asarray(part))
            tok.save_pretrained(str(root / "tokenizer"))
            (root / "meta.json").write_text(json.dumps(dict(format="tokens", train_tokens=cut,
                                                            val_tokens=len(arr) - cut, vocab_size=len(tok),
                                                            eos_id=tok.eos_token_id)))
    meta = json.loads((root / "meta.json").read_text())
    return PreparedData(root / "tokenizer", root / "train.npy", root / "val.npy", meta["vocab_size"], meta["eos_id"], meta)


def prepare_sources(cfg: DataConfig, log=None, write_tokens=_write_tokens) -> list[PreparedData]:
    """Every source's token files (data.mixture's entries, or the one source), all with one
    tokenizer: data.tokenizer, else a BPE trained on the training documents of all of them."""
    sources = cfg.sources()
    if not cfg.mixture:
        return [prepare(cfg, log, write_tokens)]
    tokenizer = cfg.tokenizer or str(_mixture_tokenizer(cfg, sources, log))
    return [prepare(s.model_copy(update={"tokenizer": tokenizer}), log, write_tokens) for s in sources]


def _mixture_tokenizer(cfg: DataConfig, sources: list[DataConfig], log) -> Path:
    """A tokenizer trained on the training split of every source, cached by their identities."""
    found = [documents(s, log) for s in sources]
    if any(fmt == "tokens" for _, fmt, _ in found):
        raise ConfigError("data.mixture: a source of format tokens needs data.tokenizer (the tokenizer that made "
                          "its ids), which every source then shares")
    h = hashlib.sha256(json.dumps([[ident, fmt, s.text_field, s.holdout, s.min_doc_chars]
                                   for (ident, fmt, _), s in zip(found, sources)] + [cfg.vocab_size]).encode())
    out = cfg.resolved_cache_dir() / "tokenizers" / h.hexdigest()[:20]
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + ".lock"):
        if not (out / "tokenizer.json").is_file():
            import datasets

            if log:
                log.info(f"training a {cfg.vocab_size}-token BPE tokenizer on {len(sources)} sources → {out}")
            train = datasets.concatenate_datasets([_split(load(), s)[0] for (_, _, load), s in zip(found, sources)])
            _train_tokenizer(train, cfg.vocab_size, out)
    return out


# --------------------------------------------------------------------------- packing and sampling

class PackedTokens:
    """Fixed-length sequences over a flat token file: sequence i is tokens[i*L : i*L + L + 1]
    (input = first L, target = last L). Documents are already separated by EOS, so no padding."""

    def __init__(self, path: Path, seq_len: int):
        self.tokens = np.load(path, mmap_mode="r")
        self.seq_len = seq_len
        self.n = (len(self.tokens) - 1) // seq_len
        if self.n < 1:
            raise ConfigError(f"data: {path.name} holds {len(self.tokens)} tokens, fewer than "
                              f"data.seq_len+1={seq_len + 1}; use more data or a shorter seq_len")

    def __len__(self) -> int:
        return self.n

    @property
    def tokens_per_row(self) -> int:
        """Every sequence is full: data.seq_len tokens (throughput counts these)."""
        return self.seq_len

    def batch(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        L = self.seq_len
        rows = np.stack([self.tokens[i * L:i * L + L + 1] for i in indices]).astype(np.int64)
        t = torch.from_numpy(rows)
        return t[:, :-1], t[:, 1:]


class ShardedSampler:
    """Deterministic global order (a seeded permutation per epoch) cut into global batches; a
    data-parallel rank takes its own contiguous micro-batch slices of each. Ranks therefore see
    disjoint samples, an epoch covers every sequence once, and the whole state is one integer:
    `consumed` (global samples handed out), saved in checkpoints."""

    def __init__(self, n: int, seed: int, dp_rank: int, dp_size: int, micro_batch: int, grad_accum: int,
                 consumed: int = 0):
        self.n, self.seed = n, seed
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.micro, self.accum = micro_batch, grad_accum
        self.consumed = consumed
        self._perm_epoch, self._perm = -1, None

    @property
    def global_batch(self) -> int:
        return self.micro * self.dp_size * self.accum

    def _index(self, g: int) -> int:
        epoch, i = divmod(g, self.n)
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng(self.seed + epoch).permutation(self.n)
            self._perm_epoch = epoch
        return int(self._perm[i])

    def next_step(self) -> list[list[int]]:
        """Index lists of this rank's micro batches for the next optimizer step; advances `consumed`."""
        base = self.consumed
        micro_batches = []
        for m in range(self.accum):
            start = base + (m * self.dp_size + self.dp_rank) * self.micro
            micro_batches.append([self._index(g) for g in range(start, start + self.micro)])
        self.consumed += self.global_batch
        return micro_batches

    def state_dict(self) -> dict:
        return {"consumed": self.consumed, "seed": self.seed, "n": self.n}

    def load_state_dict(self, state: dict) -> None:
        self.consumed = int(state["consumed"])


def eval_indices(n: int, batches: int, micro: int, dp_rank: int, dp_size: int) -> list[list[int]]:
    """Fixed held-out micro batches for this rank (the same at every evaluation), wrapping if short."""
    return [[(b * dp_size * micro + dp_rank * micro + i) % n for i in range(micro)] for b in range(batches)]


# --------------------------------------------------------------------------- mixtures

class ConcatRows:
    """Several row sets (e.g. one PackedTokens per mixture source) as one: global row i is row
    i - offsets[k] of part k. With `interleave` (held-out data) row j is row j // m of part j % m
    instead, wrapping, so the fixed evaluation batches cover every source alike."""

    def __init__(self, parts: list, interleave: bool = False):
        self.parts, self.interleave = parts, interleave
        self.sizes = [len(p) for p in parts]
        self.offsets = np.cumsum([0] + self.sizes)

    def __len__(self) -> int:
        return len(self.parts) * max(self.sizes) if self.interleave else int(self.offsets[-1])

    @property
    def tokens_per_row(self) -> float:
        return float(np.mean([p.tokens_per_row for p in self.parts]))

    def locate(self, i: int) -> tuple[int, int]:
        """(part, row in that part) of global row i."""
        if self.interleave:
            k = i % len(self.parts)
            return k, (i // len(self.parts)) % self.sizes[k]
        k = int(np.searchsorted(self.offsets, i, side="right")) - 1
        return k, i - int(self.offsets[k])

    def batch(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        # rows of equal length (packed sequences): each part's rows fetched at once, then put back in order
        where = [self.locate(int(i)) for i in indices]
        inputs, targets, order = [], [], []
        for k in sorted({k for k, _ in where}):
            mine = [j for j, (kk, _) in enumerate(where) if kk == k]
            x, y = self.parts[k].batch([where[j][1] for j in mine])
            inputs.append(x)
            targets.append(y)
            order.extend(mine)
        back = torch.from_numpy(np.argsort(np.asarray(order)))
        return torch.cat(inputs)[back], torch.cat(targets)[back]


class MixtureSampler:
    """The ShardedSampler of a mixture: rows laid out source after source (`sizes`), each global
    sample drawn from the source furthest below its weight so far (the deficit rule: after n samples
    every source has within one sample of weight x n), and within a source in a seeded permutation
    per pass over it (a small source with a large weight repeats). The order depends on nothing but
    the state, the weights and the seed, so every rank computes the same global batch and takes its
    own micro-batch slices of it; the state (samples consumed per source) rides in checkpoints."""

    def __init__(self, sizes: list[int], weights: list[float], seed: int, dp_rank: int, dp_size: int,
                 micro_batch: int, grad_accum: int, names: list[str] | None = None):
        self.sizes, self.seed = [int(n) for n in sizes], seed
        self.weights = np.asarray(weights, dtype=np.float64) / float(np.sum(weights))
        self.names = names or [str(i) for i in range(len(sizes))]
        self.offsets = np.cumsum([0] + self.sizes)
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.micro, self.accum = micro_batch, grad_accum
        self.counts = np.zeros(len(sizes), dtype=np.int64)  # samples drawn from each source (all ranks)
        self._perms: dict[int, tuple[int, np.ndarray]] = {}

    @property
    def global_batch(self) -> int:
        return self.micro * self.dp_size * self.accum

    @property
    def consumed(self) -> int:
        return int(self.counts.sum())

    def _row(self, k: int, c: int) -> int:
        """Global row of source k's c-th sample."""
        epoch, i = divmod(c, self.sizes[k])
        if self._perms.get(k, (None,))[0] != epoch:
            self._perms[k] = (epoch, np.random.default_rng([self.seed, k, epoch]).permutation(self.sizes[k]))
        return int(self.offsets[k]) + int(self._perms[k][1][i])

    def next_step(self) -> list[list[int]]:
        """Index lists of this rank's micro batches for the next optimizer step; advances the state."""
        rows = []
        for _ in range(self.global_batch):
            k = int(np.argmax(self.weights * (self.consumed + 1) - self.counts))
            rows.append(self._row(k, int(self.counts[k])))
            self.counts[k] += 1
        return [rows[(m * self.dp_size + self.dp_rank) * self.micro:][:self.micro] for m in range(self.accum)]

    def shares(self) -> dict[str, float]:
        """Each source's share of the samples drawn so far (what training consumed)."""
        total = max(1, self.consumed)
        return {name: float(c) / total for name, c in zip(self.names, self.counts)}

    def state_dict(self) -> dict:
        return {"consumed": self.consumed, "counts": self.counts.tolist(), "seed": self.seed, "n": self.sizes,
                "weights": self.weights.tolist()}

    def load_state_dict(self, state: dict) -> None:
        if "counts" not in state or len(state["counts"]) != len(self.sizes):
            raise ConfigError(f"the checkpoint's data position is not one of this {len(self.sizes)}-source mixture "
                              f"(state {sorted(state)}); resume with the data it was written with")
        self.counts = np.asarray(state["counts"], dtype=np.int64)
