"""Data preparation on a Ray cluster: the documents are encoded by Ray Data across the nodes, and
the driver writes the same token files, byte for byte, as `lmforge prepare` on one machine.

    lmforge prepare configs/demo.yaml --on ray --address HEAD_IP:6379
    lmforge prepare configs/demo.yaml --on ray            # a local Ray, started here

The driver does everything but the encoding, exactly as training/data.py's prepare does: files
resolved and screened, documents loaded and split, the tokenizer loaded or trained (BPE training is
one pass over the corpus and stays here), and the cache under data.cache_dir written and locked. Only
`write_tokens` differs: each split becomes a Ray Dataset whose blocks are encoded by
`data.tokenize_documents` (the function the single-node path calls) in Ray tasks spread over the nodes,
order preserved, and the driver streams the results into `data.write_token_file`. data.cache_dir
must be on storage the later training ranks see; the Ray workers themselves never touch it.
"""

from __future__ import annotations

import collections
import time
from pathlib import Path

import numpy as np

from lmforge.training import data
from lmforge.training.config import Config, ConfigError

# Rows (documents) per Ray task: large enough that a task's start-up is small beside its encoding.
BATCH_DOCS = 256


def _encoder(tok, dtype):
    def encode(batch):  # a pyarrow.Table of documents -> one of their token ids (bytes), counts, node
        import pyarrow as pa
        import ray

        ids = data.tokenize_documents(batch.column("text").to_pylist(), tok)
        return pa.table({"ids": pa.array([np.asarray(x, dtype=dtype).tobytes() for x in ids], pa.binary()),
                         "n": pa.array([len(x) for x in ids], pa.int64()),
                         "node": pa.array([ray.get_runtime_context().get_node_id()] * len(ids), pa.string())})
    return encode


def ray_write_tokens(log, cpus: int):
    """data.prepare's `write_tokens`, encoding with Ray Data on the connected cluster."""
    import pyarrow.compute as pc
    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # the token file keeps the documents' order
    ctx.enable_progress_bars = False

    def write_tokens(ds, tok, out: Path, num_proc: int, desc: str) -> int:
        dtype = data.token_dtype(tok)
        t0 = time.perf_counter()
        # one task per block of ~BATCH_DOCS documents, and at least two per CPU so every node gets work
        table = ds.flatten_indices().data.table
        blocks = min(len(ds), max(2 * cpus, -(-len(ds) // BATCH_DOCS)))
        size = -(-len(ds) // blocks)
        rds = ray.data.from_arrow([table.slice(i, size) for i in range(0, len(ds), size)])
        enc = rds.map_batches(_encoder(tok, dtype), batch_size=None, batch_format="pyarrow").materialize()
        # the materialized blocks are read twice, locally: the token count first (the .npy header
        # holds the length), then the tokens themselves
        total = sum(pc.sum(b.column("n")).as_py() or 0
                    for b in enc.iter_batches(batch_size=None, batch_format="pyarrow"))
        per_node: collections.Counter = collections.Counter()

        def chunks():
            for batch in enc.iter_batches(batch_size=None, batch_format="pyarrow"):
                per_node.update(collections.Counter(batch.column("node").to_pylist()))
                yield np.frombuffer(b"".join(batch.column("ids").to_pylist()), dtype=dtype)

        data.write_token_file(chunks(), total, dtype, out)
        dt = time.perf_counter() - t0
        nodes = ", ".join(f"{nid[:12]}: {n}" for nid, n in sorted(per_node.items()))
        log.info(f"ray prepare {desc}: {len(ds)} documents, {total} tokens in {dt:.2f} s "
                 f"({total / dt:,.0f} tokens/s) on {len(per_node)} node(s) [{nodes}]")
        return total

    return write_tokens


def prepare(cfg: Config, log) -> list[data.PreparedData]:
    """Build (or find) cfg's tokenizer and token files (every source of a data.mixture), encoding on
    the Ray cluster of launch.address."""
    from lmforge.launcher import ray as ray_launcher
    from lmforge.training.tasks import pretrain

    if cfg.task != "pretrain":
        raise ConfigError(f"lmforge prepare --on ray builds pretraining token files; task {cfg.task} prepares "
                          "its records on one machine: drop --on ray")
    init_dir = None
    if cfg.model.init_from:
        from lmforge.training.checkpoint.consolidate import source_meta

        init_dir = source_meta(cfg.model.init_from)
    data_cfg = pretrain.data_config(cfg, init_dir)
    with ray_launcher.session(cfg, log) as nodes:
        cpus = int(sum(n["Resources"].get("CPU", 0) for n in nodes)) or 1
        return data.prepare_sources(data_cfg, log, write_tokens=ray_write_tokens(log, cpus))
