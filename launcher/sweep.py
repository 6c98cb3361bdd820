"""Hyper-parameter sweeps: Ray Tune over whole (small) training runs, ASHA early stopping on the
held-out loss, a results table sorted by it and the best config written out.

    lmforge sweep configs/debug.yaml --param train.lr=loguniform:1e-4:3e-3 \\
        --param train.warmup=choice:50,100 --trials 8 [--address HOST:PORT] [key=value …]

Parameter specs: loguniform:LO:HI, uniform:LO:HI, randint:LO:HI (HI exclusive), choice:A,B,…
Each trial is one single-rank run of the same `main(cfg)` in its own Ray actor
(launch.cpus_per_worker / gpus_per_worker each), under <run_dir>/trials/<trial id>; it reports
every evaluation to Tune, and ASHA stops the trials whose eval loss trails at each rung. Results:
<run_dir>/sweep_results.md (sorted by final eval loss) and <run_dir>/best_config.yaml.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any


from lmforge.training.config import Config, ConfigError, dump_config, parse_value, set_key, validate

DISTRIBUTIONS = ("loguniform", "uniform", "randint", "choice")


def parse_param(spec: str):
    """'train.lr=loguniform:1e-4:3e-3' → ('train.lr', tune domain)."""
    from ray import tune

    if "=" not in spec or ":" not in spec.split("=", 1)[1]:
        raise ConfigError(f"--param {spec!r} is not KEY=DIST:ARGS (e.g. train.lr=loguniform:1e-4:3e-3)")
    key, dist_args = spec.split("=", 1)
    dist, args = dist_args.split(":", 1)
    if dist not in DISTRIBUTIONS:
        raise ConfigError(f"--param {spec!r}: unknown distribution {dist!r}; allowed: {', '.join(DISTRIBUTIONS)}")
    try:
        if dist == "choice":
            return key, tune.choice([parse_value(v) for v in args.split(",")])
        lo, hi = (parse_value(v) for v in args.split(":"))
        return key, {"loguniform": tune.loguniform, "uniform": tune.uniform, "randint": tune.randint}[dist](lo, hi)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"--param {spec!r}: {e}") from None


def _trial_config(base: dict, params: dict[str, Any], run_dir: str) -> Config:
    tree = copy.deepcopy(base)
    for key, value in params.items():
        set_key(tree, key, value)
    return validate(set_key(tree, "run_dir", run_dir))


def _trial(tune_config: dict) -> None:
    from ray import tune

    from lmforge.training.train import main

    trial_dir = Path(tune_config["root"]) / "trials" / tune.get_context().get_trial_id()
    cfg = _trial_config(tune_config["base"], tune_config["params"], str(trial_dir))
    main(cfg, report=tune.report)


def sweep(cfg: Config, specs: list[str], trials: int) -> int:
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from lmforge.launcher.ray import session
    from lmforge.training.preflight import get_logger, preflight

    log = get_logger(0)
    params = dict(parse_param(s) for s in specs)
    if not params:
        raise ConfigError("give at least one --param KEY=DIST:ARGS")
    cfg = cfg.with_absolute_paths()  # trials run in directories of Tune's choosing
    root = Path(cfg.run_dir)
    base = cfg.to_dict()
    # every swept key must exist and accept a sampled value, before any trial starts
    _trial_config(base, {k: d.sample() for k, d in params.items()}, str(root / "probe"))
    prepared = preflight(cfg, 1, log)  # data prepared once, Hub ids pinned, before any trial
    cfg = prepared.pinned
    base = cfg.to_dict()
    with session(cfg, log):
        resources = {"CPU": cfg.launch.cpus_per_worker, "GPU": cfg.launch.gpus_per_worker}
        total = cfg.total_steps(len(prepared.data.train))
        tuner = tune.Tuner(
            tune.with_resources(_trial, resources),
            param_space={"base": base, "root": str(root), "params": params},
            tune_config=tune.TuneConfig(
                num_samples=trials, metric="eval/loss", mode="min",
                scheduler=ASHAScheduler(time_attr="step", max_t=total,
                                        grace_period=max(1, min(cfg.eval.interval or total, total)),
                                        reduction_factor=2)),
            run_config=tune.RunConfig(name="tune", storage_path=str(root), verbose=0),
        )
        results = tuner.fit()
        rows = []
        for r in results:
            if r.metrics and "eval/loss" in r.metrics:
                rows.append((r.metrics["eval/loss"], r.metrics.get("eval/ppl", float("nan")),
                             r.metrics.get("step", 0), r.config["params"], r.path))
        if not rows:
            errors = [str(r.error) for r in results if r.error]
            log.error("no trial reported an eval loss" + (f": {errors[0]}" if errors else ""))
            return 1
        rows.sort(key=lambda row: row[0])
        keys = list(params)
        lines = ["| trial | eval/loss | eval/ppl | step | " + " | ".join(keys) + " |",
                 "|---|---|---|---|" + "---|" * len(keys)]
        for loss, ppl, step, p, path in rows:
            lines.append(f"| {Path(path).name} | {loss:.4f} | {ppl:.2f} | {step} | "
                         + " | ".join(f"{p[k]:.4g}" if isinstance(p[k], float) else str(p[k]) for k in keys) + " |")
        table = "\n".join(lines)
        (root / "sweep_results.md").write_text(table + "\n")
        best = _trial_config(base, rows[0][3], str(root / "best"))
        dump_config(best, root / "best_config.yaml")
        print(table)
        log.info(f"best: eval loss {rows[0][0]:.4f} with {rows[0][3]}; config: {root / 'best_config.yaml'}")
        return 0

