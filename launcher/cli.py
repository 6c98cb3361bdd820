"""The `lmforge` command.

    lmforge train configs/demo.yaml [dotted.key=value …] [--nproc N]
    lmforge launch --on ray configs/debug.yaml [--address HOST:PORT] [--workers N]
    lmforge launch --on slurm configs/debug.yaml --nodes 2 [--gpus-per-node 8 --partition P --time 4:00:00
                   --account A] [--dry-run | --follow]
    lmforge config configs/debug.yaml train.lr=1e-3 [--nproc N]    # resolved tree + DeepSpeed JSON
    lmforge prepare configs/demo.yaml [--on ray [--address HOST:PORT]]  # build the tokenizer + token cache
    lmforge plan configs/pretrain_7b.yaml --nodes 2 --gpus-per-node 8 --gpu-memory 80GiB [--json]
    lmforge export runs/debug --out exports/debug [--which latest|best] [--max-shard-size 2GB]
    lmforge export exports/debug --format gguf --quant q8_0 --out exports/debug-q8_0.gguf  # or --format onnx [--int8]
    lmforge compress exports/debug --recipe w4a16 --out exports/debug-w4a16       # make compress-env once
    lmforge prune exports/debug --mlp 0.5 --out exports/debug-mlp50                 # then heal: configs/heal.yaml
    lmforge report exports/debug-w4a16 exports/debug-q8_0.gguf --baseline exports/debug --gate 'ppl<=+5%'
    lmforge serve exports/debug-w8a8 [--check]            # vLLM's OpenAI server on 127.0.0.1 (make vllm-env once)
    lmforge verify runs/debug [runs/other/checkpoints/step_20 …]   # sizes + content hashes; exit 1 if any is broken
    lmforge status runs/debug [runs/x …] [--json]   # progress, ETA, last checkpoint, health; exit 1 if unhealthy

Every command validates the whole config first; a bad key or value prints one line naming it and
exits 2 before any rank starts. The driver never imports DeepSpeed: ranks do, in
lmforge.training.train.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path

from lmforge.launcher import LaunchError
from lmforge.training import startup
from lmforge.training.config import Config, ConfigError, build_ds_config, load_config

EXIT_CONFIG = 2


def _default_nproc() -> int:
    import torch

    return torch.cuda.device_count() or 1


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML run config (see configs/)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.lr=3e-4")


def cmd_config(args) -> int:
    from lmforge.training.preflight import select_runtime

    cfg = load_config(args.config, args.overrides)
    nproc = args.nproc or cfg.launch.workers or _default_nproc()
    runtime = select_runtime(cfg)
    ds = build_ds_config(cfg, nproc, runtime.precision)
    print(f"# resolved config ({runtime.describe()}, {nproc} rank(s), "
          f"gradient accumulation {cfg.grad_accum(cfg.data_parallel_size(nproc))}, "
          f"{f'steps from train.epochs={cfg.train.epochs:g} of the prepared rows' if cfg.train.epochs else f'{cfg.total_steps()} steps'})")
    print(f"# checkpoints: {cfg.checkpoint_dir}  tensorboard: {cfg.tensorboard_dir}")
    print(cfg.to_yaml())
    print("# DeepSpeed config")
    print(json.dumps(ds, indent=2))
    return 0


@contextlib.contextmanager
def _stdout_to_stderr():
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def cmd_prepare(args) -> int:
    """The task's prepare, as preflight runs it: pretrain's tokenizer and token files; a record task's
    tokenized examples (checks labels, template, columns)."""
    from lmforge.training.preflight import get_logger, prepare_data, resolve_ids

    cfg, _ = resolve_ids(_load_with_flags(args))
    with _stdout_to_stderr():  # the tokenizer trainer prints progress on fd 1; stdout stays JSON
        if cfg.launch.backend == "ray":  # token files encoded across the cluster; what follows finds them
            from lmforge.launcher import ray_prepare

            ray_prepare.prepare(cfg, get_logger(0))
        prepared, _ = prepare_data(cfg, get_logger(0))
    print(json.dumps(prepared.summary, indent=1))
    return 0


def _load_with_flags(args) -> Config:
    """Flags are sugar for launch.* keys, so each setting still lives in one place (the tree)."""
    flags = {"launch.backend": getattr(args, "on", None), "launch.address": getattr(args, "address", None),
             "launch.workers": getattr(args, "nproc", None)}
    flags.update({f"slurm.{key}": getattr(args, key, None)
                  for key in ("nodes", "gpus_per_node", "partition", "time", "account")})
    return load_config(args.config, list(args.overrides) + [f"{k}={v}" for k, v in flags.items() if v is not None])


def cmd_launch(args) -> int:
    cfg = _load_with_flags(args)
    if cfg.launch.backend == "ray":
        from lmforge.launcher import ray as ray_launcher

        return ray_launcher.launch(cfg)
    if cfg.launch.backend == "slurm":
        from lmforge.launcher import slurm

        return slurm.launch(cfg, dry_run=getattr(args, "dry_run", False), follow_log=getattr(args, "follow", False))
    from lmforge.launcher import local

    nproc = cfg.launch.workers or _default_nproc()
    ctx = local.fork_server(cfg, nproc)  # imports the ranks' modules while preflight runs
    startup.mark("forkserver")
    from lmforge.launcher.base import prepared  # torch, transformers: after the forkserver's start
    from lmforge.training.preflight import get_logger

    # All validation (data included) happens here, before any rank or GPU is started; one job per
    # run directory (a second is refused naming the holder).
    with prepared(cfg, nproc, get_logger(0), absolute=False) as cfg:
        return local.launch(cfg, Path(cfg.run_dir) / "config.yaml", nproc, ctx)


def cmd_plan(args) -> int:
    from lmforge.tools import plan

    cfg = load_config(args.config, args.overrides)
    hw = plan.hardware(cfg, args.nodes, args.gpus_per_node, args.gpu_memory, args.gpu, args.peak_tflops,
                       args.mfu, args.runtime_overhead)
    est = plan.estimate(cfg, hw=hw, vocab_size=args.vocab_size)
    rec = plan.recommend(cfg, hw, vocab_size=args.vocab_size)
    if args.json:
        print(json.dumps(plan.plan_dict(est, rec), indent=1))
    else:
        print(plan.format_table(est, rec))
    return 0


def cmd_export(args) -> int:
    from lmforge.tools.export import export

    with _stdout_to_stderr():
        out = export(args.path, args.out, args.which, args.max_shard_size, args.overwrite, args.format, args.quant,
                     args.int8)
    print(out)
    return 0


def cmd_verify(args) -> int:
    from lmforge.tools.verify import verify_checkpoints

    return verify_checkpoints(args.paths)


def cmd_sweep(args) -> int:
    from lmforge.launcher.sweep import sweep

    return sweep(_load_with_flags(args), args.param, args.trials)


def _train_args(p: argparse.ArgumentParser) -> None:
    _add_config_args(p)
    p.add_argument("--nproc", type=int, default=None, help="ranks = launch.workers (default: number of GPUs, else 1)")


def _launch_args(p: argparse.ArgumentParser) -> None:
    _add_config_args(p)
    p.add_argument("--on", choices=["local", "ray", "slurm"], default=None, help="= launch.backend (default: local)")
    p.add_argument("--address", default=None, help="= launch.address: Ray cluster (default $RAY_ADDRESS, else a local Ray)")
    p.add_argument("--nproc", "--workers", dest="nproc", type=int, default=None, help="= launch.workers")
    g = p.add_argument_group("Slurm (--on slurm); each flag sets the slurm.* key of the same name")
    g.add_argument("--nodes", type=int, default=None, help="= slurm.nodes")
    g.add_argument("--gpus-per-node", type=int, default=None, help="= slurm.gpus_per_node (one rank per GPU)")
    g.add_argument("--partition", default=None, help="= slurm.partition")
    g.add_argument("--time", default=None, help="= slurm.time, e.g. 4:00:00")
    g.add_argument("--account", default=None, help="= slurm.account")
    g.add_argument("--dry-run", action="store_true", help="print the sbatch script, submit nothing")
    g.add_argument("--follow", action="store_true", help="tail the job's log until it ends; exit with its status")


def _prepare_args(p: argparse.ArgumentParser) -> None:
    _add_config_args(p)
    p.add_argument("--on", choices=["local", "ray"], default=None,
                   help="= launch.backend: ray encodes the documents with Ray Data across the cluster")
    p.add_argument("--address", default=None, help="= launch.address: Ray cluster (default $RAY_ADDRESS, else a local Ray)")


def _sweep_args(p: argparse.ArgumentParser) -> None:
    _add_config_args(p)
    p.add_argument("--param", action="append", default=[], metavar="KEY=DIST:ARGS",
                   help="e.g. train.lr=loguniform:1e-4:3e-3, train.warmup=choice:50,100")
    p.add_argument("--trials", type=int, default=4)
    p.add_argument("--address", default=None, help="= launch.address")


def _config_args(p: argparse.ArgumentParser) -> None:
    _add_config_args(p)
    p.add_argument("--nproc", type=int, default=None, help="ranks to resolve gradient accumulation for")


def _plan_args(p: argparse.ArgumentParser) -> None:
    _add_config_args(p)
    p.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    p.add_argument("--gpus-per-node", type=int, default=None, help="ranks per node (default launch.workers, else 1)")
    p.add_argument("--gpu-memory", default=None, help="memory per GPU, e.g. 80GiB; none: plan CPU ranks (process memory)")
    p.add_argument("--gpu", default=None, help="GPU name for the peak TFLOP/s table, e.g. H100, A100")
    p.add_argument("--peak-tflops", type=float, default=None, help="per-device peak TFLOP/s (default logging.peak_tflops)")
    p.add_argument("--mfu", type=float, default=None, help="assumed model FLOPs utilisation (default 0.4)")
    p.add_argument("--runtime-overhead", default=None, help="fixed per-rank memory before the model, e.g. 1GiB")
    p.add_argument("--vocab-size", type=int, default=None, help="tokenizer size (default: data.tokenizer's, else data.vocab_size)")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def cmd_status(args) -> int:
    from lmforge.tools import status

    return status.main(args)


def _status_args(p: argparse.ArgumentParser) -> None:
    from lmforge.tools import status

    status.add_args(p)


def _verify_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("paths", nargs="+", metavar="CHECKPOINT",
                   help="a step_N checkpoint, or a run directory / its checkpoints/ (all its step_N checkpoints)")
    p.set_defaults(overrides=[])


def _export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", help="run directory, its checkpoints/, a step_N checkpoint, or (with --format gguf/onnx) "
                                "a Hugging Face directory lmforge wrote")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--which", choices=["latest", "best"], default="latest",
                   help="with a run directory: newest checkpoint, or the early-stopping best")
    p.add_argument("--max-shard-size", default="2GB", help="safetensors shard size (transformers' save_pretrained)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--format", choices=["hf", "gguf", "onnx"], default="hf",
                   help="hf: transformers/vLLM directory; gguf: one file for llama.cpp/Ollama; onnx: ONNX Runtime")
    p.add_argument("--quant", default=None, help="with --format gguf: f32, f16 (default), q8_0 or q4_k_m")
    p.add_argument("--int8", action="store_true", help="with --format onnx: int8 weights (onnxruntime quantize_dynamic)")
    p.set_defaults(overrides=[])


# One table from command to function: (function, its arguments, help). The tools after training
# (tools/compress, prune, report, serve) each add their own row through register(sub), keeping their
# heavy imports (torch, llm-compressor, onnxruntime) until they run.
COMMANDS = {
    "train": (cmd_launch, _train_args, "train with N ranks on this machine (or where launch.backend says)"),
    "launch": (cmd_launch, _launch_args, "train on this machine (--on local), a Ray cluster (--on ray) or Slurm (--on slurm)"),
    "sweep": (cmd_sweep, _sweep_args, "Ray Tune sweep over whole runs (ASHA on eval loss)"),
    "config": (cmd_config, _config_args, "print the resolved config tree and the DeepSpeed JSON"),
    "prepare": (cmd_prepare, _prepare_args, "build the tokenizer and token cache for a config's data (--on ray: Ray Data)"),
    "plan": (cmd_plan, _plan_args, "per-rank memory, tokens/s and a layout that fits, from the config alone"),
    "export": (cmd_export, _export_args, "a run or checkpoint -> a Hugging Face directory (adapters merged), GGUF or ONNX"),
    "verify": (cmd_verify, _verify_args, "check checkpoints' files against their manifests (sizes and content hashes)"),
    "status": (cmd_status, _status_args, "how runs are doing: step, loss, tokens/s, ETA, last checkpoint, health"),
}
TOOLS = ("compress", "prune", "report", "serve")
# The arguments that name a model directory: a Hub id there is resolved to its snapshot directory
# (training/hub.py) before the command runs, so the tools themselves only ever see local paths.
HUB_INPUTS = {"export": ("path",), "compress": ("path",), "prune": ("path",), "report": ("artifacts", "baseline")}


def _resolve_hub_inputs(args) -> None:
    from lmforge.training.hub import tool_input

    for name in HUB_INPUTS.get(args.command, ()):
        value, arg = getattr(args, name), f"lmforge {args.command} {name}"
        resolved = [tool_input(v, arg) for v in value] if isinstance(value, list) else tool_input(value, arg)
        setattr(args, name, resolved)


def build_parser() -> argparse.ArgumentParser:
    import importlib

    parser = argparse.ArgumentParser(prog="lmforge", description="Distributed LLM training on DeepSpeed ZeRO.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (func, add_args, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        add_args(p)
        p.set_defaults(func=func)
    for tool in TOOLS:
        importlib.import_module(f"lmforge.tools.{tool}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # Overrides may come before or after --flags (argparse stops filling a positional list at the
    # first option), so the leftovers that look like key=value join the overrides.
    args, rest = parser.parse_known_args(argv)
    stray = [r for r in rest if "=" not in r or r.startswith("-")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    args.overrides = list(getattr(args, "overrides", [])) + rest
    startup.mark("driver imports")  # Python's start, this module's imports and the tools' registration
    try:
        _resolve_hub_inputs(args)
        return args.func(args)
    except ConfigError as e:
        print(f"lmforge: config error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    except LaunchError as e:
        print(f"lmforge: launch error: {e}", file=sys.stderr)
        return EXIT_CONFIG


def entry() -> None:
    """The `lmforge` console script: main(), then, after a training job, exit without finalising the
    interpreter. The driver's torch, transformers and tokenizers take ~1.3 s to tear down (each test
    and each sbatch step pays it); by then the ranks are gone, the run directory released, and what
    the driver wrote was written in `with` blocks. atexit handlers still run (multiprocessing's, Ray's)."""
    import atexit
    import logging

    code = main()
    if sys.argv[1:2] not in (["train"], ["launch"]):
        sys.exit(code)
    atexit._run_exitfuncs()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    entry()
