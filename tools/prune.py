"""`lmforge prune`: structured pruning that really shrinks a model (the Minitron recipe). Whole MLP
channels, whole attention key/value groups and whole layers are removed and the kept slices copied
into a freshly built, smaller model of the same architecture (Llama, Mistral or Qwen2, whose q/k/v
biases are cut with their rows: tools/architectures.py), so the file, the memory and every forward
pass shrink with it.
(Unstructured and 2:4 sparsity do neither on CPU in this stack: their zeros are stored and multiplied.)

    lmforge prune exports/debug --out exports/debug-pruned --mlp 0.5               # half the MLP channels
    lmforge prune exports/debug --out exports/p --heads 0.5 --layers 0.75 --score activation
    lmforge train configs/heal.yaml --nproc 2 model.init_from=exports/debug-pruned distill.teacher=exports/debug
    lmforge export runs/heal --out exports/debug-healed                            # then: lmforge report

KEEP is the fraction kept of each dimension. Importance comes from calibration tokens of the run's own
training split (the lmforge_run.yaml the directory carries, or --data CONFIG):
- MLP channels (--mlp): activation = mean |act_fn(gate(x)) * up(x)| per channel (what down_proj reads);
  magnitude = the L2 norm of the channel's gate row, up row and down column. Every layer keeps its own
  top channels, the same number in each layer (the config has one intermediate_size).
- Attention (--heads): whole key/value groups, so the model stays GQA with the same query heads per
  key/value head; activation = mean L2 norm of the group's attention output (what o_proj reads),
  magnitude = the norm of its q/k/v rows (and biases) and o columns. head_dim stays as it was, and so
  does the config's attention window (Mistral's sliding_window; Qwen2's layer types, cut with the layers).
- Depth (--layers): block importance 1 - cos(hidden in, hidden out) (ShortGPT / Minitron), always from
  calibration tokens; the least important layers go.
All scores come from one pass over the unpruned model. The output is a Hugging Face directory
(safetensors, tokenizer, generation config, lmforge_run.yaml) plus pruning.json: what was removed, the
scores, parameters and bytes before and after. A pruned model has lost quality: heal it with a short
distillation run from the unpruned one (configs/heal.yaml), on the same engine as any training run.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

from lmforge.tools import architectures, artifact
from lmforge.training.config import Config, ConfigError, load_config

SCORES = ("activation", "magnitude")
MAX_SHARD_SIZE = "2GB"  # as lmforge export's default


@dataclass(frozen=True)
class Keep:
    """Fractions kept per dimension (None: untouched)."""
    mlp: float | None = None
    heads: float | None = None
    layers: float | None = None

    def check(self) -> None:
        given = {flag: v for flag, v in (("--mlp", self.mlp), ("--heads", self.heads), ("--layers", self.layers))
                 if v is not None}
        if not given:
            raise ConfigError("nothing to prune: give --mlp, --heads and/or --layers (the fraction to keep)")
        for flag, v in given.items():
            if not (0.0 < v <= 1.0) or math.isnan(v):
                raise ConfigError(f"{flag} {v}: the fraction to keep must be in (0, 1]")


@dataclass
class Plan:
    """How many of each unit the pruned model keeps, resolved against the model's config."""
    channels: int    # MLP channels per layer
    groups: int      # key/value groups per layer (each with num_attention_heads/num_key_value_heads query heads)
    layers: int
    of_channels: int
    of_groups: int
    of_layers: int
    needs_calibration: bool = False


def _count(keep: float | None, total: int, flag: str, unit: str) -> int:
    if keep is None:
        return total
    n = math.floor(keep * total + 0.5)
    if n < 1:
        raise ConfigError(f"{flag} {keep}: keeps {keep} x {total} {unit} = 0; at least one must stay "
                          f"(the smallest keep here is {0.5 / total:.3g})")
    return n


def plan(conf, keep: Keep, score: str) -> Plan:
    groups = conf.num_key_value_heads
    p = Plan(channels=_count(keep.mlp, conf.intermediate_size, "--mlp", "MLP channels"),
             groups=_count(keep.heads, groups, "--heads", "key/value head groups"),
             layers=_count(keep.layers, conf.num_hidden_layers, "--layers", "layers"),
             of_channels=conf.intermediate_size, of_groups=groups, of_layers=conf.num_hidden_layers)
    p.needs_calibration = p.layers < p.of_layers or (score == "activation" and (
        p.channels < p.of_channels or p.groups < p.of_groups))
    return p


def check_model(src: Path):
    """The source's transformers config, if it is a causal LM of an architecture this tool can rebuild
    smaller (architectures.ARCHITECTURES: the module layout it slices)."""
    conf = artifact.dense_hf_config(src, "lmforge prune")
    architectures.get(conf, str(src), "lmforge prune")
    if getattr(conf, "layer_types", None) and len(set(conf.layer_types)) > 1:
        raise ConfigError(f"{src}: mixed attention layer types {sorted(set(conf.layer_types))} are not supported")
    return conf


# --------------------------------------------------------------------------- importance

@dataclass
class Scores:
    """Per layer: MLP channel scores [I], key/value group scores [G]; per layer one block importance."""
    mlp: list = field(default_factory=list)
    groups: list = field(default_factory=list)
    layers: list[float] | None = None


def magnitude_scores(model) -> Scores:
    import torch

    conf = model.config
    hd, rep = architectures.head_dim(conf), conf.num_attention_heads // conf.num_key_value_heads
    out = Scores()
    with torch.no_grad():
        for layer in model.model.layers:
            mlp, att = layer.mlp, layer.self_attn
            sq = lambda w, dim: w.float().pow(2).sum(dim)  # noqa: E731 - squared norms along one axis

            def rows(linear):  # a row's weights and its bias (Qwen2's q/k/v; Llama's with attention_bias)
                return sq(linear.weight, 1) + (0 if linear.bias is None else linear.bias.float().pow(2))

            out.mlp.append((rows(mlp.gate_proj) + rows(mlp.up_proj) + sq(mlp.down_proj.weight, 0)).sqrt())
            q = rows(att.q_proj).view(-1, rep * hd).sum(1)             # query rows of each group's heads
            kv = (rows(att.k_proj) + rows(att.v_proj)).view(-1, hd).sum(1)
            o = sq(att.o_proj.weight, 0).view(-1, rep * hd).sum(1)     # o_proj columns those heads feed
            out.groups.append((q + kv + o).sqrt())
    return out


def activation_scores(model, tokens, batch_size: int, want_width: bool, want_layers: bool, device) -> Scores:
    """One pass over calibration rows with hooks: down_proj's input (MLP channels), o_proj's input
    (attention output per group) and each decoder layer's input vs output (block importance)."""
    import torch
    import torch.nn.functional as F
    from tqdm import tqdm

    conf = model.config
    n_layers, groups = conf.num_hidden_layers, conf.num_key_value_heads
    mlp = torch.zeros(n_layers, conf.intermediate_size, dtype=torch.float64, device=device)
    grp = torch.zeros(n_layers, groups, dtype=torch.float64, device=device)
    blk = torch.zeros(n_layers, dtype=torch.float64, device=device)
    seen = [0]
    hooks = []

    def width_hooks(i, layer):
        def on_down(_m, args):
            mlp[i] += args[0].detach().abs().sum((0, 1)).double()

        def on_o(_m, args):
            x = args[0].detach()
            grp[i] += x.reshape(*x.shape[:2], groups, -1).float().norm(dim=-1).sum((0, 1)).double()

        return [layer.mlp.down_proj.register_forward_pre_hook(on_down),
                layer.self_attn.o_proj.register_forward_pre_hook(on_o)]

    def block_hook(i, layer):
        def on_layer(_m, args, kwargs, output):
            h_in = args[0] if args else kwargs["hidden_states"]
            h_out = output[0] if isinstance(output, tuple) else output
            blk[i] += (1 - F.cosine_similarity(h_in.float(), h_out.float(), dim=-1)).sum().double()

        return [layer.register_forward_hook(on_layer, with_kwargs=True)]

    for i, layer in enumerate(model.model.layers):
        hooks += (width_hooks(i, layer) if want_width else []) + (block_hook(i, layer) if want_layers else [])
    try:
        with torch.no_grad():
            for start in tqdm(range(0, len(tokens), batch_size), desc="calibration", unit="batch"):
                batch = tokens[start:start + batch_size].to(device)
                model(input_ids=batch, use_cache=False)
                seen[0] += batch.numel()
    finally:
        for h in hooks:
            h.remove()
    n = max(seen[0], 1)
    return Scores(mlp=list((mlp / n).cpu()) if want_width else [], groups=list((grp / n).cpu()) if want_width else [],
                  layers=(blk / n).cpu().tolist() if want_layers else None)


def _top(scores, k: int):
    import torch

    return torch.sort(torch.topk(scores, k).indices).values  # kept units in their original order


# --------------------------------------------------------------------------- the smaller model

def smaller_config(conf, p: Plan):
    new = conf.__class__.from_dict(conf.to_dict())
    new.intermediate_size = p.channels
    rep = conf.num_attention_heads // conf.num_key_value_heads
    new.num_key_value_heads = p.groups
    new.num_attention_heads = p.groups * rep
    # otherwise derived as hidden_size / heads, which pruning heads would change (Qwen2's config has no
    # head_dim of its own; its attention reads one when set)
    new.head_dim = architectures.head_dim(conf)
    new.num_hidden_layers = p.layers
    if getattr(conf, "layer_types", None):
        new.layer_types = conf.layer_types[:p.layers]  # one type for all (check_model)
    return new


def sliced_state(state: dict, conf, kept_layers: list[int], channels: dict, groups: dict) -> dict:
    """The source state dict cut to the kept layers (renumbered), MLP channels and key/value groups.
    channels/groups: old layer index → kept indices (absent: keep all)."""
    import torch

    hd, rep = architectures.head_dim(conf), conf.num_attention_heads // conf.num_key_value_heads

    def rows(idx, width):  # unit indices → the weight rows they own
        return (idx[:, None] * width + torch.arange(width)).reshape(-1)

    out = {}
    renumber = {old: new for new, old in enumerate(kept_layers)}
    for key, t in state.items():
        if not key.startswith("model.layers."):
            out[key] = t
            continue
        _, _, index, rest = key.split(".", 3)
        i = int(index)
        if i not in renumber:
            continue
        name = f"model.layers.{renumber[i]}.{rest}"
        ch, g = channels.get(i), groups.get(i)
        module, _, kind = rest.rpartition(".")
        # q/k/v/gate/up: output rows, of the weight and of the bias; o/down: input columns of the weight
        # only (their bias belongs to the hidden size, which pruning keeps)
        if ch is not None and module in ("mlp.gate_proj", "mlp.up_proj"):
            t = t[ch]
        elif ch is not None and module == "mlp.down_proj" and kind == "weight":
            t = t[:, ch]                    # input columns
        elif g is not None and module == "self_attn.q_proj":
            t = t[rows(g, rep * hd)]
        elif g is not None and module in ("self_attn.k_proj", "self_attn.v_proj"):
            t = t[rows(g, hd)]
        elif g is not None and module == "self_attn.o_proj" and kind == "weight":
            t = t[:, rows(g, rep * hd)]
        out[name] = t.contiguous()
    return out


def param_count(model) -> int:
    return sum(p.numel() for p in model.parameters())  # tied weights once


# --------------------------------------------------------------------------- the command

def prune(src: str | Path, out: str | Path, keep: Keep, score: str = "activation", calibration_samples: int | None = None,
          seq_len: int | None = None, data: str | None = None, overwrite: bool = False, batch_size: int = 8,
          log=print) -> dict:
    """Prune `src` into `out`; returns what pruning.json records."""
    keep.check()
    if score not in SCORES:
        raise ConfigError(f"--score {score!r}: one of {', '.join(SCORES)}")
    if calibration_samples is not None and calibration_samples < 1:
        raise ConfigError(f"--calibration-samples {calibration_samples}: at least 1")
    src = Path(src)
    artifact.check_out(out, overwrite)
    conf = check_model(src)
    p = plan(conf, keep, score)
    if not p.needs_calibration:
        artifact.refuse_unused("width pruning with --score magnitude reads no calibration data",
                               calibration_samples=calibration_samples, seq_len=seq_len)
    calibration_samples = 128 if calibration_samples is None else calibration_samples
    run_cfg: Config | None = load_config(data) if data else (artifact.run_config(src) if p.needs_calibration
                                                             or (src / artifact.RUN_CONFIG).is_file() else None)
    if run_cfg is not None:
        artifact.require_causal(run_cfg, "lmforge prune")

    with artifact.atomic_output(out, overwrite) as tmp:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokens = (artifact.calibration_tokens(run_cfg, calibration_samples, seq_len,
                                              getattr(conf, "max_position_embeddings", None), conf.vocab_size)
                  if p.needs_calibration else None)
        t0 = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(str(src), dtype="auto", local_files_only=True).eval()
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        want_width = score == "activation" and (p.channels < p.of_channels or p.groups < p.of_groups)
        scores = magnitude_scores(model) if score == "magnitude" else Scores()
        if p.needs_calibration:
            measured = activation_scores(model.to(device), tokens, batch_size, want_width, p.layers < p.of_layers,
                                         device)
            model.cpu()
            scores = Scores(measured.mlp or scores.mlp, measured.groups or scores.groups, measured.layers)
        t_score = time.perf_counter() - t0

        # Depth first: the least important blocks go; width is then cut in the layers that stay.
        kept_layers = (sorted(_top(torch.tensor(scores.layers), p.layers).tolist()) if p.layers < p.of_layers
                       else list(range(p.of_layers)))
        channels = {i: _top(scores.mlp[i], p.channels) for i in kept_layers} if p.channels < p.of_channels else {}
        groups = {i: _top(scores.groups[i], p.groups) for i in kept_layers} if p.groups < p.of_groups else {}
        new_conf = smaller_config(conf, p)
        state = sliced_state(model.state_dict(), conf, kept_layers, channels, groups)
        small = AutoModelForCausalLM.from_config(new_conf, dtype=model.dtype)
        small.load_state_dict(state, strict=True)  # every weight of the smaller model comes from the source
        small.generation_config = model.generation_config
        small.save_pretrained(str(tmp), max_shard_size=MAX_SHARD_SIZE)
        AutoTokenizer.from_pretrained(str(src), local_files_only=True).save_pretrained(str(tmp))
        artifact.carry(src, tmp)
        if data and run_cfg is not None:
            artifact.write_run_config(run_cfg, tmp)  # the data calibration (and healing) came from
        record = _record(src, tmp, conf, new_conf, model, small, p, score, kept_layers, channels, groups, scores,
                         calibration_samples if p.needs_calibration else 0, tokens, t_score)
        (tmp / "pruning.json").write_text(json.dumps(record, indent=1))
    log(f"pruned {src} -> {out}: {record['params_before']:,} -> {record['params_after']:,} parameters "
        f"({100 * record['params_after'] / record['params_before']:.1f}%), {record['bytes_before']:,} -> "
        f"{record['bytes_after']:,} bytes; scoring {t_score:.1f} s")
    return record


def _record(src, tmp, conf, new_conf, model, small, p: Plan, score, kept_layers, channels, groups, scores,
            n_calib, tokens, t_score) -> dict:
    def removed(kept: dict, total: int) -> dict:
        return {str(i): sorted(set(range(total)) - set(k.tolist())) for i, k in kept.items()}

    def mean(xs) -> float:
        return float(sum(xs) / len(xs)) if len(xs) else float("nan")

    def shape(c) -> dict:
        keys = ("num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size", "hidden_size",
                "vocab_size")
        return {**{k: getattr(c, k) for k in keys}, "head_dim": architectures.head_dim(c),
                "sliding_window": architectures.layer_windows(c)[0]}

    return {
        "source": str(src), "score": score,
        "calibration": {"samples": n_calib, "seq_len": int(tokens.shape[1]) if tokens is not None else None},
        "config_before": shape(conf),
        "config_after": shape(new_conf),
        "params_before": param_count(model), "params_after": param_count(small),
        "bytes_before": artifact.weight_bytes(src), "bytes_after": artifact.weight_bytes(tmp),
        "removed": {
            "layers": sorted(set(range(p.of_layers)) - set(kept_layers)),
            "mlp_channels": removed(channels, p.of_channels),   # per source layer index
            "kv_groups": removed(groups, p.of_groups),          # group g = key/value head g and its query heads
        },
        "scores": {
            "layers_block_importance": scores.layers,
            # per kept layer: mean score of the units kept and of those removed (the full vectors can be long)
            "mlp_channels": {str(i): {"kept": mean(scores.mlp[i][k]), "removed": mean(
                scores.mlp[i][sorted(set(range(p.of_channels)) - set(k.tolist()))])} for i, k in channels.items()},
            "kv_groups": {str(i): scores.groups[i].tolist() for i in groups},
        },
        "scoring_seconds": round(t_score, 3),
    }


def register(sub) -> None:
    p = sub.add_parser("prune", help="structured pruning (MLP channels, attention head groups, layers) into a "
                                     "smaller model (Llama, Mistral, Qwen2); heal it with configs/heal.yaml")
    p.add_argument("path", help="Hugging Face Llama, Mistral or Qwen2 directory (lmforge export)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--mlp", type=float, default=None, metavar="KEEP", help="fraction of MLP channels kept, (0, 1]")
    p.add_argument("--heads", type=float, default=None, metavar="KEEP",
                   help="fraction of key/value head groups kept (with their query heads), (0, 1]")
    p.add_argument("--layers", type=float, default=None, metavar="KEEP", help="fraction of layers kept, (0, 1]")
    p.add_argument("--score", choices=SCORES, default="activation",
                   help="width importance: activation on calibration tokens (Minitron) or weight magnitude; "
                        "layers are always scored by block importance on calibration tokens")
    p.add_argument("--calibration-samples", type=int, default=None, help="calibration rows (default 128)")
    p.add_argument("--seq-len", type=int, default=None, help="calibration row length (default: the run's data.seq_len)")
    p.add_argument("--data", default=None, help="training YAML whose data to calibrate on (default: the directory's "
                                                "lmforge_run.yaml)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.set_defaults(func=_cmd, overrides=[])


def _cmd(args) -> int:
    import sys

    prune(args.path, args.out, Keep(args.mlp, args.heads, args.layers), args.score, args.calibration_samples,
          args.seq_len, args.data, args.overwrite, log=lambda m: print(m, file=sys.stderr))
    print(args.out)
    return 0
