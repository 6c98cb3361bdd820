"""Resume on another layout: a checkpoint whose SavedLayout (world size, ZeRO stage, AutoTP or
Ulysses SP degree) differs from the run's (checkpoint.layout_change) is converted once, by rank 0,
to DeepSpeed's universal format in `step_N_universal/` beside it (checkpoint.derived_dir), and
loaded through DeepSpeed's universal load path; what cannot convert is refused in preflight
(`unsupported`). What resumes, and each place DeepSpeed 0.19.8 needs help:
docs/deepspeed_workarounds.md.

    lmforge train configs/debug.yaml --nproc 2 train.steps=40     # kill it after step_20 …
    lmforge train configs/debug.yaml --nproc 1 train.steps=40     # … continues on 1 rank
    pytest tests/test_universal.py -m "not slow"                  # layout_change, refusals, bnb round trip
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import re
import shutil
from argparse import Namespace
from pathlib import Path

import numpy as np
import torch

from .. import checkpoint
from ..config import Config

FORMAT = 2  # 2: made loadable by every ZeRO stage (make_stage_neutral); a format-1 conversion is redone
BNB_BLOCKSIZE = 256  # bitsandbytes' 8-bit optimizers quantize their state in blocks of 256
_BNB_WRAP = "__bnb_optimizer_quant_state__"  # bnb's state_dict() nests its quant state under this key


def is_converted(ckpt: Path) -> bool:
    """A complete conversion of exactly this checkpoint (same manifest), in this FORMAT, exists beside it."""
    out = checkpoint.derived_dir(ckpt, "universal")
    if checkpoint.verify(out) is not None:
        return False
    try:
        manifest = json.loads((out / "manifest.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return manifest.get("source") == checkpoint.source_id(ckpt) and manifest.get("format") == FORMAT


# --------------------------------------------------------------------------- bitsandbytes state

def _inner_optimizer_state(sd: dict) -> dict:
    """The client optimizer's state_dict inside a DeepSpeed *_optim_states.pt (ZeRO-1/2 and ZeRO-3
    keep it under different keys)."""
    osd = sd["optimizer_state_dict"]
    for key in ("base_optimizer_state", "optimizer_state_dict"):
        inner = osd.get(key)
        if isinstance(inner, dict) and "state" in inner:
            return inner
    raise ValueError("no client optimizer state in this DeepSpeed optimizer file "
                     f"(keys {sorted(osd)}); elastic ZeRO checkpoints are not supported")


def _bnb_state(entry: dict) -> dict:
    return {**{k: v for k, v in entry.items() if k != _BNB_WRAP}, **entry.get(_BNB_WRAP, {})}


def is_bnb_state(entry: dict) -> bool:
    return isinstance(entry, dict) and "state1" in _bnb_state(entry)


def dequantize_bnb_entry(entry: dict) -> dict:
    """One bnb parameter state (8-bit blockwise or 32-bit) → {step, exp_avg, exp_avg_sq} in fp32,
    the only state DeepSpeed's converter knows (docs/deepspeed_workarounds.md#bnb-state).
    One-state optimizers (Lion) get a zero exp_avg_sq, which the converter requires and
    `requantize_bnb_state` drops again."""
    import bitsandbytes.functional as F

    s = _bnb_state(entry)

    def moment(i: int) -> torch.Tensor | None:
        q = s.get(f"state{i}")
        if q is None:
            return None
        if q.dtype == torch.uint8:
            return F.dequantize_blockwise(q, absmax=s[f"absmax{i}"], code=s[f"qmap{i}"],
                                          blocksize=BNB_BLOCKSIZE).float()
        return q.float().clone()

    m1, m2 = moment(1), moment(2)
    extra = sorted(set(s) - {"step", "state1", "state2", "absmax1", "absmax2", "qmap1", "qmap2", "unorm_vec"})
    if extra:  # e.g. percentile clipping's gnorm_vec: not representable in the universal format
        raise ValueError(f"bitsandbytes optimizer state {extra} cannot be converted to the universal format")
    return {"step": s.get("step", 0), "exp_avg": m1, "exp_avg_sq": m2 if m2 is not None else torch.zeros_like(m1)}


def _prepared_input(ckpt: Path, scratch: Path) -> tuple[Path, int]:
    """The folder ds_to_universal can read: `ckpt` itself, or `scratch` holding its DeepSpeed files
    (linked) except those it cannot read as written:
      - a bitsandbytes optimizer's shards, with their state dequantized
        (docs/deepspeed_workarounds.md#bnb-state);
      - the model states of a Ulysses SP ZeRO-1/2 checkpoint, which record the SP degree as the
        TP degree: rewritten with the real one (docs/deepspeed_workarounds.md#sp-recorded-as-tp).
    Returns the folder and how many parameter states were dequantized."""
    from deepspeed.checkpoint.constants import CHECKPOINT_PARALLEL_DIMS, CHECKPOINT_TP_DEGREE

    layout = checkpoint.SavedLayout.read(ckpt)
    bnb = _has_bnb_state(ckpt)
    relabel = layout.sequence > 1 and layout.zero_stage < 3
    if not (bnb or relabel):
        return ckpt, 0
    scratch.mkdir(parents=True)
    count = 0
    for f in sorted(ckpt.iterdir()):
        if bnb and f.name.endswith("_optim_states.pt"):
            sd = torch.load(f, map_location="cpu", weights_only=False)
            inner = _inner_optimizer_state(sd)
            for k, entry in list(inner["state"].items()):
                if is_bnb_state(entry):
                    inner["state"][k] = dequantize_bnb_entry(entry)
                    count += 1
            torch.save(sd, scratch / f.name)
        elif relabel and f.name.endswith("_model_states.pt"):
            sd = torch.load(f, map_location="cpu", weights_only=False)
            if isinstance(sd.get(CHECKPOINT_PARALLEL_DIMS), dict):
                sd[CHECKPOINT_PARALLEL_DIMS][CHECKPOINT_TP_DEGREE] = layout.tensor
            torch.save(sd, scratch / f.name)
        elif f.name.endswith(("_optim_states.pt", "_model_states.pt")):
            os.symlink(f.resolve(), scratch / f.name)
    return scratch, count


def _has_bnb_state(ckpt: Path) -> bool:
    first = next(iter(sorted(ckpt.glob("*_optim_states.pt"))), None)
    if first is None:
        return False
    sd = torch.load(first, map_location="cpu", weights_only=False)
    return any(is_bnb_state(e) for e in _inner_optimizer_state(sd)["state"].values())


def quantize_blockwise(x: torch.Tensor, code: torch.Tensor, blocksize: int = BNB_BLOCKSIZE):
    """x (1-D fp32) → (uint8 codes, fp32 absmax per block) for bnb's blockwise dynamic maps.
    Unlike F.quantize_blockwise, a block's scale uses the map's asymmetric range, so dequantize →
    quantize on the same blocks gives back the same codes (docs/deepspeed_workarounds.md#bnb-state)."""
    n = x.numel()
    blocks = -(-n // blocksize)
    padded = torch.zeros(blocks * blocksize, dtype=torch.float32, device=x.device)
    padded[:n] = x.reshape(-1).float()
    b = padded.view(blocks, blocksize)
    code = code.to(device=x.device, dtype=torch.float32)
    absmax = b.clamp(min=0).amax(1) / code.max()
    if code.min() < 0:
        absmax = torch.maximum(absmax, (-b).clamp(min=0).amax(1) / -code.min())
    scaled = b / torch.where(absmax > 0, absmax, torch.ones_like(absmax))[:, None]
    idx = torch.bucketize(scaled.reshape(-1), (code[1:] + code[:-1]) / 2)  # nearest code (map is sorted)
    return idx[:n].to(torch.uint8), absmax


def _owners(optimizer, zero_optimizer=None) -> dict[int, tuple[int, int]]:
    """id(param) → (group index, index in group) for every parameter the optimizer steps. ZeRO-3
    empties the param groups between steps, so its partitions are added from the ZeRO optimizer's
    own bookkeeping (docs/deepspeed_workarounds.md#bnb-state)."""
    owners = {id(p): (g, i) for g, group in enumerate(optimizer.param_groups) for i, p in enumerate(group["params"])}
    flats = getattr(zero_optimizer, "fp32_partitioned_groups_flat", None) or []
    to_group = getattr(zero_optimizer, "sub_group_to_group_id", {}) or {}
    for sub, flat in enumerate(flats):
        if flat is not None and id(flat) not in owners:
            owners[id(flat)] = (to_group.get(sub, 0), 0)
    return owners


@torch.no_grad()
def requantize_bnb_state(optimizer, zero_optimizer=None) -> int:
    """After DeepSpeed's universal load put fp32 exp_avg/exp_avg_sq (and step) into a bnb
    optimizer's state: rebuild bnb's own state from them. Returns the parameters converted."""
    converted = 0
    owners = _owners(optimizer, zero_optimizer)
    for p, state in list(optimizer.state.items()):
        if not isinstance(state, dict) or "exp_avg" not in state:
            continue
        if id(p) not in owners:
            raise RuntimeError(f"optimizer state for a {tuple(p.shape)} tensor that no parameter group holds")
        gindex, pindex = owners[id(p)]
        group = optimizer.param_groups[gindex]
        m1, m2 = state.pop("exp_avg"), state.pop("exp_avg_sq", None)
        step = state.pop("step", 0)
        step = int(step.item()) if torch.is_tensor(step) else int(step)
        state.clear()
        held = group["params"]
        if pindex >= len(held) or held[pindex] is not p:
            group["params"] = [p]  # as ZeRO-3 does around each sub-group's step: bnb looks p up there
        try:
            optimizer.init_state(group, p, gindex, pindex)  # bnb's buffers (paged, 8- or 32-bit)
        finally:
            group["params"] = held
        for i, m in ((1, m1), (2, m2)):
            buf = state.get(f"state{i}")
            if buf is None or m is None:
                continue  # a one-state optimizer (Lion) has no second moment
            m = m.reshape(-1).to(buf.device)
            if buf.dtype == torch.uint8:
                q, absmax = quantize_blockwise(m, state[f"qmap{i}"])
                buf.copy_(q.view_as(buf))
                state[f"absmax{i}"].copy_(absmax)
            else:
                buf.copy_(m.view_as(buf))
        state["step"] = step
        converted += 1
    return converted


# --------------------------------------------------------------------------- conversion

_STATE_FILES = ("fp32.pt", "exp_avg.pt", "exp_avg_sq.pt")
_ZERO3_MODEL_STATES = re.compile(r"^zero_pp_rank_0_mp_rank_(\d+)_model_states\.pt$")
_ZERO12_MODEL_STATES = re.compile(r"^mp_rank_(\d+)_model_states\.pt$")


def _link(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)  # the same bytes under the name the other ZeRO stages look for
    except OSError:
        shutil.copy2(src, dst)


def _first_step(inner_state: dict):
    for entry in inner_state.values():
        entry = _bnb_state(entry) if is_bnb_state(entry) else entry
        if isinstance(entry, dict) and "step" in entry:
            return entry["step"]
    raise ValueError("the optimizer state records no step")


def make_stage_neutral(out: Path, ckpt: Path) -> None:
    """Complete DeepSpeed's conversion `out` of `ckpt` so that every ZeRO stage loads it, not only
    the one that wrote it: each stage's universal loader wants files the other's conversion lacks
    (docs/deepspeed_workarounds.md#stage-neutral)."""
    from deepspeed import __version__ as ds_version
    from deepspeed.checkpoint.constants import DS_VERSION, FP32_FLAT_GROUPS, OPTIMIZER_STATE_DICT, PARAM, PARAM_SHAPES

    names = [f.name for f in out.iterdir()]
    zero3 = {m.group(1): n for n in names if (m := _ZERO3_MODEL_STATES.match(n))}
    zero12 = {m.group(1): n for n in names if (m := _ZERO12_MODEL_STATES.match(n))}
    # weights load from zero/ under every stage: the other stage's model-states name can be a link
    for mp, name in zero3.items():
        if mp not in zero12:
            _link(out / name, out / f"mp_rank_{mp}_model_states.pt")
    for mp, name in zero12.items():
        if mp not in zero3:
            _link(out / name, out / f"zero_pp_rank_0_mp_rank_{mp}_model_states.pt")

    # the ZeRO-3 loader reads step and param groups from optimizer_state_dict, the ZeRO-1/2 one
    # wants ds_version at the top level
    zero = out / "zero"
    optim = torch.load(zero / "optimizer_state.pt", map_location="cpu", weights_only=False)
    if OPTIMIZER_STATE_DICT in optim:  # a ZeRO-3 source: its rank 0's whole optimizer state, keep only the step
        inner = optim[OPTIMIZER_STATE_DICT]
        step = _first_step(inner["state"])
        inner["state"] = {0: {"step": step}}
        optim.pop(FP32_FLAT_GROUPS, None)
    else:  # a ZeRO-1/2 source
        src = torch.load(next(iter(sorted(ckpt.glob("*_optim_states.pt")))), map_location="cpu", weights_only=False)
        step = _first_step(_inner_optimizer_state(src)["state"])
        optim[OPTIMIZER_STATE_DICT] = {"state": {0: {"step": step}}, "param_groups": optim["param_groups"]}
    optim.setdefault(DS_VERSION, ds_version)
    torch.save(optim, zero / "optimizer_state.pt")

    shapes: dict[str, torch.Size] = {}
    if zero3:  # a ZeRO-3 source's flat states get their parameter's shape (an AutoTP target slices by it)
        states = torch.load(out / zero3[min(zero3)], map_location="cpu", weights_only=False)
        for group in states[PARAM_SHAPES]:
            shapes.update(group)
    # the ZeRO-1/2 loader wants {"param": tensor} state files and a step.pt per parameter
    for folder in sorted(d for d in zero.iterdir() if d.is_dir()):
        for f in _STATE_FILES:
            path = folder / f
            if not path.is_file():
                continue
            state = torch.load(path, map_location="cpu", weights_only=False)
            if torch.is_tensor(state):
                shape = shapes.get(folder.name)
                torch.save({PARAM: state.view(shape) if shape is not None else state}, path)
        if (folder / "fp32.pt").is_file() and not (folder / "step.pt").is_file():
            torch.save(step, folder / "step.pt")


def convert(ckpt: Path, log) -> Path:
    """Convert lmforge checkpoint `ckpt` (step_N) to DeepSpeed's universal format in
    step_N_universal (reused if already converted from this very checkpoint). Single process."""
    from deepspeed.checkpoint import ds_to_universal

    out = checkpoint.derived_dir(ckpt, "universal")
    if is_converted(ckpt):
        log.info(f"universal checkpoint {out} is up to date: reusing it")
        return out
    tmp = checkpoint.temp_dir(out)
    scratch = tmp.with_name(tmp.name + "_input")
    for d in (tmp, scratch):
        if d.exists():
            shutil.rmtree(d)  # left by a crash mid-conversion
    try:
        src, dequantized = _prepared_input(ckpt, scratch)
        # inject_missing_state: a plain ZeRO-1/2 save lacks the converter's required metadata
        # (docs/deepspeed_workarounds.md#inject-missing-state)
        args = Namespace(input_folder=str(src), output_folder=str(tmp), num_extract_workers=1,
                         num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True)
        chatter = io.StringIO()  # the converter prints and draws progress bars
        try:
            with contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
                ds_to_universal.main(args)
        except BaseException as e:
            raise RuntimeError(f"DeepSpeed's universal conversion of {ckpt} failed: {type(e).__name__}: {e}\n"
                               f"{chatter.getvalue()[-3000:]}") from e
    finally:
        if scratch.exists():
            shutil.rmtree(scratch)
    make_stage_neutral(tmp, ckpt)  # loadable by every ZeRO stage (docs/deepspeed_workarounds.md#stage-neutral)
    for name in ("client.json", "config.yaml"):
        shutil.copy2(ckpt / name, tmp / name)
    source = json.loads((ckpt / "client.json").read_text())
    (tmp / "universal.json").write_text(json.dumps(
        {"source": ckpt.name, "source_world_size": source.get("world_size"),
         "source_layout": str(checkpoint.SavedLayout.read(ckpt)),
         "bnb_states_dequantized": dequantized}, indent=1))
    # the source's manifest hash makes the conversion stale once step_N is saved again (is_converted)
    checkpoint.write_manifest(tmp, source.get("step"), source=checkpoint.source_id(ckpt), format=FORMAT)
    # replaces a stale conversion; ds_to_universal's `latest_universal` named the temporary
    # directory: it now names the published one (docs/deepspeed_workarounds.md#latest-universal)
    checkpoint.publish(tmp, out, "latest_universal")
    log.info(f"converted {ckpt} to DeepSpeed's universal format: {out}"
             + (f" ({dequantized} bitsandbytes 8-bit states dequantized)" if dequantized else ""))
    return out


def convert_collective(ckpt: Path, rank: int, log) -> Path:
    """Every rank calls it: rank 0 converts (or reuses), the others receive the outcome (a
    broadcast, so a failed conversion fails every rank with rank 0's message instead of hanging
    them at a barrier). In the ranks, not the launcher: torchrun/srun starts never go through the
    launcher, and the Ray driver must not import DeepSpeed nor see the run's filesystem."""
    outcome = [None]
    if rank == 0:
        try:
            outcome[0] = str(convert(ckpt, log))
        except Exception as e:  # told to every rank below, then raised on each
            outcome[0] = RuntimeError(f"{type(e).__name__}: {e}")
    torch.distributed.broadcast_object_list(outcome, src=0)
    if isinstance(outcome[0], BaseException):
        raise RuntimeError(f"could not convert {ckpt} to a universal checkpoint: {outcome[0]}")
    return Path(outcome[0])


def reseed(cfg: Config, step: int, rank: int) -> None:
    """Per-rank RNG states do not map onto another layout: reseed from (train.seed, step, rank)
    (docs/deepspeed_workarounds.md#what-resumes)."""
    seed = int(np.random.SeedSequence([cfg.train.seed, step, rank]).generate_state(1)[0])
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _repair_optimizer_state(optimizer, path: Path) -> None:
    """Put each param group's saved hyperparameters back: ZeRO-3's universal load copies group 0's
    onto every group (the no-decay group would resume with weight decay); a no-op on ZeRO-1/2
    (docs/deepspeed_workarounds.md#zero3-param-groups)."""
    saved = torch.load(path / "zero" / "optimizer_state.pt", map_location="cpu", weights_only=False)["param_groups"]
    if len(saved) != len(optimizer.param_groups):
        raise RuntimeError(f"{path} has {len(saved)} optimizer param groups, this optimizer {len(optimizer.param_groups)}")
    for group, old in zip(optimizer.param_groups, saved):
        group.update({k: v for k, v in old.items() if k != "params"})
    # one `step` tensor each: ZeRO-3's load shares one, which Adam would advance once per group
    # (docs/deepspeed_workarounds.md#zero3-param-groups)
    for state in optimizer.state.values():
        if isinstance(state, dict) and torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()


class _NoTensorParallel:
    """The Ulysses mpu (deepspeed.runtime.sequence_parallel.parallel_state_sp), answering the
    tensor-parallel questions as what it is: no tensor parallelism."""

    def __init__(self, mpu):
        self._mpu = mpu

    def __getattr__(self, name):
        return getattr(self._mpu, name)

    def get_tensor_model_parallel_rank(self) -> int:
        return 0

    def get_tensor_model_parallel_world_size(self) -> int:
        return 1


@contextlib.contextmanager
def _sequence_parallel_is_not_tensor_parallel(zero_optimizer):
    """Under SP the tensor-parallel degree is 1: say so to DeepSpeed's ZeRO-1/2 universal loader,
    which asks the Ulysses mpu for it and fails (docs/deepspeed_workarounds.md#sp-mpu-has-no-tp)."""
    mpu = getattr(zero_optimizer, "mpu", None)
    if mpu is None or hasattr(mpu, "get_tensor_model_parallel_world_size") or hasattr(mpu, "get_slice_parallel_world_size"):
        yield
        return
    zero_optimizer.mpu = _NoTensorParallel(mpu)
    try:
        yield
    finally:
        zero_optimizer.mpu = mpu


def load(engine, ckpt: Path, cfg: Config, rank: int, log) -> dict:
    """Collective: convert `ckpt` (once) and load it through DeepSpeed's universal path. The
    engine must have been built with `checkpoint: {load_universal: true}` in its DeepSpeed config
    (train.preflight adds it when it plans this resume): DeepSpeed reads that flag at load time
    from engine._config. Returns lmforge's client state."""
    if not engine.load_universal_checkpoint():
        raise RuntimeError("universal resume needs the engine built with checkpoint.load_universal=true")
    path = convert_collective(ckpt, rank, log)
    client = json.loads((path / "client.json").read_text())
    with _sequence_parallel_is_not_tensor_parallel(engine.optimizer):
        load_path, _ = engine.load_checkpoint(str(path.parent), tag=path.name, load_optimizer_states=True,
                                              load_lr_scheduler_states=True)
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load the universal checkpoint {path}")
    base = getattr(engine.optimizer, "optimizer", engine.optimizer)  # the client optimizer inside ZeRO
    _repair_optimizer_state(base, path)
    if type(base).__module__.startswith("bitsandbytes"):
        n = requantize_bnb_state(base, engine.optimizer)
        # DeepSpeed's views of the fp32 moments would pin the 8 B/param the 8-bit optimizer saves
        # (docs/deepspeed_workarounds.md#bnb-state)
        for p in engine.module.parameters():
            mapping = getattr(p, "_hp_mapping", None)
            if mapping is not None and hasattr(mapping, "optim_fragment"):
                mapping.optim_fragment = {}
        log.info(f"re-quantized {n} bitsandbytes optimizer state(s) on this world size's partitions")
    reseed(cfg, int(client["step"]), rank)
    return client


def unsupported(change: checkpoint.LayoutChange) -> str | None:
    """Why a resume across `change` cannot go through DeepSpeed's universal format (None: it can),
    with what the user can do instead. Called in preflight, before any model is built. Everything
    measured converts except a ZeRO-3 x AutoTP source (docs/deepspeed_workarounds.md#zero3-tp-source)."""
    saved = change.saved
    if saved.tensor > 1 and saved.zero_stage == 3:
        return (f"DeepSpeed's universal conversion (ds_to_universal) cannot read a ZeRO-3 x tensor-parallel "
                f"checkpoint (it misreads how ZeRO-3 partitions the parameters that tensor parallelism "
                f"replicates), so this checkpoint resumes only on the layout that wrote it: "
                f"{saved.overrides()}. Checkpoints written with parallel.zero_stage 1 or 2 and "
                f"parallel.tensor > 1 do convert to any layout.")
    return None
