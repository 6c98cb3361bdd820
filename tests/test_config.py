"""Config tree, overrides, DeepSpeed JSON building and the one-line errors (no ranks started)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from conftest import DEBUG, lmforge
from lmforge.training.config import (CONFIG_DIR, DS_CONFIG_DIR, ConfigError, build_ds_config, incompatible_keys,
                                     load_config, slurm_time_seconds)

ALL_CONFIGS = sorted(CONFIG_DIR.glob("*.yaml"))
ALL_DS = sorted(DS_CONFIG_DIR.glob("*.json"))


def test_recipes_are_shipped():
    names = {p.stem for p in ALL_CONFIGS}
    assert {"debug", "demo", "pretrain_1b", "pretrain_7b"} <= names
    assert {p.stem for p in ALL_DS} >= {"zero1", "zero2", "zero3", "zero3_offload"}


@pytest.mark.parametrize("path", ALL_CONFIGS, ids=lambda p: p.name)
def test_every_recipe_validates_and_builds_a_ds_config(path):
    cfg = load_config(path)
    world = 8 if "pretrain" in path.name else 2
    ds = build_ds_config(cfg, world, "bf16" if "pretrain" in path.name else "fp32")
    assert ds["train_batch_size"] == cfg.train.global_batch_size
    assert (ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * world
            == cfg.train.global_batch_size)
    assert ds["zero_optimization"]["stage"] == cfg.parallel.zero_stage


@pytest.mark.parametrize("path", ALL_DS, ids=lambda p: p.name)
def test_every_ds_config_holds_only_zero_and_comm_keys(path):
    ds = json.loads(path.read_text())
    stage = ds["zero_optimization"]["stage"]
    offload = "offload" in path.stem
    cfg = load_config(DEBUG, [f"parallel.ds_config={path}", f"parallel.zero_stage={stage}",
                              f"parallel.offload_optimizer={str(offload).lower()}",
                              f"parallel.offload_params={str(offload).lower()}"])
    built = build_ds_config(cfg, 2, "fp32")
    assert built["zero_optimization"]["stage"] == stage
    assert not {"optimizer", "scheduler", "train_batch_size", "fp16", "bf16"} & set(ds)


def test_overrides_are_typed_and_nested():
    cfg = load_config(DEBUG, ["train.lr=1e-3", "parallel.zero_stage=2", "model.overrides.num_hidden_layers=3",
                              "data.paths=[a.txt, b.txt]"])
    assert cfg.train.lr == 1e-3 and cfg.parallel.zero_stage == 2
    assert cfg.model.overrides == {"num_hidden_layers": 3}
    assert cfg.data.paths == ["a.txt", "b.txt"]


def test_derived_defaults_live_under_run_dir():
    cfg = load_config(DEBUG, ["run_dir=/x/y"])
    assert cfg.checkpoint_dir == Path("/x/y/checkpoints") and cfg.tensorboard_dir == Path("/x/y/tensorboard")


def test_steps_from_tokens_and_accumulation():
    cfg = load_config(DEBUG, ["train.steps=null", "train.tokens=51200"])
    assert cfg.total_steps() == 51200 // (8 * 64)
    assert cfg.grad_accum(1) == 2 and cfg.grad_accum(2) == 1


def test_steps_from_epochs_and_warmup_from_ratio():
    from lmforge.training.engine import lr_lambda

    cfg = load_config(DEBUG, ["train.steps=null", "train.epochs=2.5", "train.warmup=0", "train.warmup_ratio=0.1"])
    with pytest.raises(ConfigError, match="train.epochs: the steps follow from the training rows"):
        cfg.total_steps()
    assert cfg.total_steps(train_rows=100) == 32  # ceil(2.5 * 100 / 8)
    assert cfg.warmup_steps(32) == 3
    f = lr_lambda(cfg, 32)
    assert [round(f(s), 4) for s in range(4)] == [round(1 / 3, 4), round(2 / 3, 4), 1.0, 1.0]
    assert load_config(DEBUG, ["train.warmup=50"]).warmup_steps(30) == 30  # never past the end


def test_mixture_entries_inherit_and_survive_a_round_trip(tmp_path):
    """An entry's own keys win, the rest come from `data`; config.yaml (and the absolute-path copy a
    Ray worker gets) keep which keys an entry set, so a reloaded entry still inherits."""
    cfg = load_config(DEBUG, ["data.text_field=body", "data.mixture=[{weight: 3, name: web, paths: [s3://b/web]}, "
                                                      "{weight: 1, dataset: org/books, text_field: text}]"])
    web, books = cfg.data.sources()
    assert (web.paths, web.dataset, web.text_field) == (["s3://b/web"], None, "body")
    assert (books.paths, books.dataset, books.text_field) == ([], "org/books", "text")
    assert cfg.data.weights() == [0.75, 0.25] and cfg.data.source_names() == ["web", "1"]
    for again in (load_config(None, [f"{k}={json.dumps(v)}" for k, v in cfg.to_dict().items()]),
                  cfg.with_absolute_paths(tmp_path)):
        assert [s.model_dump() for s in again.data.sources()] == [s.model_dump() for s in cfg.data.sources()]


@pytest.mark.parametrize("override,expected", [
    (["train.lrr=1"], "unknown key train.lrr; did you mean train.lr?"),
    (["trian.lr=1"], "unknown key trian; did you mean train?"),
    (["parallel.zero_stage=4"], "parallel.zero_stage: Input should be 1, 2 or 3"),
    (["train.precision=fp8"], "train.precision: Input should be 'auto', 'fp32', 'bf16' or 'fp16'"),
    (["train.steps=null"], "set one of train.steps, train.tokens and train.epochs"),
    (["train.epochs=2"], "train.steps and train.epochs are both set; set one"),
    (["train.warmup=5", "train.warmup_ratio=0.1"], "train.warmup and train.warmup_ratio are both set; set one"),
    (["train.warmup_ratio=1.5"], "train.warmup_ratio: Input should be less than 1"),
    (["train.global_batch_size=10"], "train.global_batch_size (10) is not a multiple of train.micro_batch_size (4)"),
    (["model.preset=llama-3b"], "unknown preset 'llama-3b'"),
    (["data.paths=[]"], "set data.paths (files or URLs), data.dataset (a Hugging Face dataset) or data.mixture"),
    (["data.dataset=org/name"], "set data.paths or data.dataset, not both"),
    (["data.data_files=[a.jsonl]"], "data.data_files selects files of data.dataset"),
    (["data.mixture=[{weight: 0.7}, {weight: 0.3, format: csv}]"], "data.mixture[1]: format: Input should be"),
    (["data.mixture=[{weight: 0}]"], "data.mixture.0.weight: Input should be greater than 0"),
    (["data.mixture=[{weight: 1, colour: red}]"], "unknown key data.mixture.0.colour"),
    (["data.mixture=[{weight: 1}]", "data.eval_paths=[x.jsonl]"], "data.eval_paths is not combined with data.mixture"),
    (["task=classification", "data.mixture=[{weight: 1}]"], "data.mixture: task=classification reads one source; "
                                                            "mixtures are for pretrain and sft"),
    (["parallel.zero_stage=2", "parallel.offload_params=true"], "parallel.offload_params needs parallel.zero_stage=3"),
    (["train.lr"], "is not key=value"),
])
def test_bad_values_name_the_key(override, expected):
    with pytest.raises(ConfigError) as err:
        load_config(DEBUG, override)
    assert expected in str(err.value)


def test_global_batch_must_divide_by_micro_times_dp():
    cfg = load_config(DEBUG, ["train.global_batch_size=12"])
    with pytest.raises(ConfigError, match=r"not divisible by train.micro_batch_size \(4\) x data-parallel size \(2\) = 8"):
        build_ds_config(cfg, 2, "fp32")


HF_ZERO3_AUTO = Path(__file__).parent / "fixtures" / "hf_zero3_auto.json"  # as the HF Trainer docs ship it


def test_ecosystem_json_with_auto_keys_is_filled_from_the_run_config():
    cfg = load_config(DEBUG, [f"parallel.ds_config={HF_ZERO3_AUTO}", "train.schedule=constant", "train.grad_clip=0.5"])
    ds = build_ds_config(cfg, 2, "fp32")
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (
        cfg.train.global_batch_size, cfg.train.micro_batch_size, cfg.grad_accum(2))
    assert ds["gradient_clipping"] == 0.5
    assert ds["fp16"]["enabled"] is False and ds["bf16"]["enabled"] is False
    assert ds["fp16"]["loss_scale_window"] == 1000  # the JSON's loss-scale details stay
    assert not {"optimizer", "scheduler"} & set(ds)  # lmforge passes its own to deepspeed.initialize
    zero = ds["zero_optimization"]
    assert "reduce_bucket_size" not in zero and "offload_optimizer" not in zero and zero["overlap_comm"] is True
    assert "auto" not in json.dumps(ds)
    assert build_ds_config(cfg, 2, "bf16")["bf16"]["enabled"] is True


@pytest.mark.parametrize("edit,overrides,expected", [
    ({"train_batch_size": 32}, [], "sets train_batch_size=32 but train.global_batch_size=8"),
    ({"gradient_accumulation_steps": 4}, [], "sets gradient_accumulation_steps=4 but train.global_batch_size / "
                                             "(train.micro_batch_size x data-parallel size)=1"),
    ({"bf16": {"enabled": True}}, [], "sets bf16.enabled=true but train.precision (resolved: fp32)=false"),
    ({"optimizer": {"type": "Lion", "params": {"lr": "auto"}}}, [], "sets optimizer.type=\"Lion\" but train.optimizer=\"adamw\""),
    ({"optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}}, [], "sets optimizer.params.lr=0.001 but train.lr=0.0003"),
    ({"optimizer": {"type": "AdamW", "params": {"torch_adam": True}}}, [], "sets optimizer.params.torch_adam=true, which"),
    ({}, ["train.schedule=cosine"], "sets scheduler.type=\"WarmupLR\" but train.schedule=\"cosine\""),
    ({"zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}}}, ["train.schedule=constant"],
     "sets zero_optimization.offload_param but parallel.offload_params=false"),
])
def test_ds_config_value_that_conflicts_with_the_run_config_names_both(tmp_path, edit, overrides, expected):
    ds = json.loads(HF_ZERO3_AUTO.read_text())
    ds.update(edit)
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(ds))
    cfg = load_config(DEBUG, [f"parallel.ds_config={path}", "train.schedule=constant", "train.lr=3e-4", *overrides])
    with pytest.raises(ConfigError) as err:
        build_ds_config(cfg, 2, "fp32")
    assert expected in str(err.value) and str(path) in str(err.value)


def test_ds_config_with_train_epochs_builds_before_the_data_and_refuses_a_step_count_it_cannot_check(tmp_path):
    """train.epochs: the steps are known only once the data are prepared; the DeepSpeed config is built
    before that (driver preflight), so "auto" schedule lengths pass and explicit ones are refused."""
    epochs = ["train.steps=null", "train.epochs=1", "train.warmup=0", "train.warmup_ratio=0.1", "train.schedule=constant"]
    cfg = load_config(DEBUG, [f"parallel.ds_config={HF_ZERO3_AUTO}", *epochs])
    assert build_ds_config(cfg, 2, "fp32")["train_batch_size"] == cfg.train.global_batch_size
    assert build_ds_config(load_config(DEBUG, epochs), 2, "fp32")["train_batch_size"] == cfg.train.global_batch_size
    ds = json.loads(HF_ZERO3_AUTO.read_text())
    ds["scheduler"]["params"]["total_num_steps"] = 100
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(ds))
    with pytest.raises(ConfigError, match=r"sets scheduler.params.total_num_steps=100, which this run derives from "
                                          r"the prepared data \(train.steps / train.tokens / train.epochs\)"):
        build_ds_config(load_config(DEBUG, [f"parallel.ds_config={path}", *epochs]), 2, "fp32")


def test_ds_config_explicit_values_equal_to_the_run_config_are_accepted(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 3}, "train_batch_size": 8, "gradient_clipping": 1.0,
                                "bf16": {"enabled": False}, "optimizer": {"type": "AdamW", "params": {"lr": 3e-4}}}))
    cfg = load_config(DEBUG, [f"parallel.ds_config={path}", "train.lr=3e-4", "train.grad_clip=1.0"])
    assert build_ds_config(cfg, 2, "fp32")["train_batch_size"] == 8


def test_ds_config_stage_must_agree(tmp_path):
    cfg = load_config(DEBUG, [f"parallel.ds_config={DS_CONFIG_DIR / 'zero2.json'}"])
    with pytest.raises(ConfigError, match="sets zero_optimization.stage=2 but parallel.zero_stage=3"):
        build_ds_config(cfg, 2, "fp32")


def test_incompatible_keys_ignore_lr_and_steps():
    a = load_config(DEBUG).to_dict()
    b = load_config(DEBUG, ["train.lr=1", "train.steps=99", "model.overrides.num_hidden_layers=3"]).to_dict()
    assert list(incompatible_keys(a, b)) == ["model.overrides"]


def test_cli_config_prints_tree_and_ds_json():
    out = lmforge("config", DEBUG, "train.lr=0.01", "--nproc", "2").stdout
    tree, ds = out.split("# DeepSpeed config")
    assert yaml.safe_load(tree)["train"]["lr"] == 0.01
    ds = json.loads(ds)
    assert ds["gradient_accumulation_steps"] == 1 and ds["zero_optimization"]["stage"] == 3


def test_cli_bad_key_exits_2_with_one_line():
    proc = lmforge("config", DEBUG, "train.lrr=1", check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "lmforge: config error: unknown key train.lrr; did you mean train.lr?"


def test_cli_train_bad_key_exits_2_before_any_rank(tmp_path):
    proc = lmforge("train", DEBUG, f"run_dir={tmp_path / 'r'}", "checkpoint.intervall=3", "--nproc", "2", check=False)
    assert proc.returncode == 2
    assert "unknown key checkpoint.intervall; did you mean checkpoint.interval?" in proc.stderr
    assert not (tmp_path / "r").exists()  # nothing written half


def test_runtime_is_chosen_in_one_place_and_refuses_gpu_only_settings_on_cpu():
    import torch

    from lmforge.training.dist import select_runtime

    if torch.cuda.is_available():
        pytest.skip("CPU-path test")
    rt = select_runtime()
    assert (rt.device_type, rt.backend, rt.precision, rt.attention) == ("cpu", "gloo", "fp32", "sdpa")
    with pytest.raises(ValueError, match="train.precision=bf16 needs CUDA"):
        select_runtime(precision="bf16")
    with pytest.raises(ValueError, match="flash_attention_2 needs CUDA and the flash-attn package"):
        select_runtime(attention="flash_attention_2")
    proc = lmforge("config", DEBUG, "train.precision=bf16", check=False)
    assert proc.returncode == 2 and "train.precision=bf16 needs CUDA" in proc.stderr


@pytest.mark.gpu
def test_gpu_runtime_selects_nccl_bf16():
    import importlib.util

    from lmforge.training.dist import select_runtime

    rt = select_runtime()
    assert rt.device_type == "cuda" and rt.backend == "nccl" and rt.precision in ("bf16", "fp16", "fp32")
    assert rt.attention == ("flash_attention_2" if importlib.util.find_spec("flash_attn") else "sdpa")


# Every key's documentation: tests/test_docs_site.py (docs/reference/config.md is generated from the schema).


def test_driver_side_never_imports_deepspeed(data_cache):
    """The launcher validates everything (config, data, model config, resume point) without
    importing DeepSpeed: only ranks do (ray#50406, and a driver on a GPU-less head node)."""
    code = f"""
import sys
from lmforge.launcher import cli, local, ray, slurm, sweep
from lmforge.training.config import load_config
from lmforge.training.dist import get_logger
from lmforge.training.train import preflight
preflight(load_config({str(DEBUG)!r}, ["data.cache_dir={data_cache}"]), 2, get_logger(0))
print("deepspeed" in sys.modules)
"""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "False"


def test_relative_paths_are_resolved_for_remote_ranks(tmp_path):
    (tmp_path / "models/m").mkdir(parents=True)  # a model name that is not on disk is a Hub id (test_hub.py)
    cfg = load_config(DEBUG, ["run_dir=runs/x", "data.paths=[data/*.jsonl, '{stdlib}/json/*.py', /abs/a.txt]",
                              "data.cache_dir=cache", "model.path=models/m"])
    a = cfg.with_absolute_paths(tmp_path)
    assert a.run_dir == str(tmp_path / "runs/x") and a.model.path == str(tmp_path / "models/m")
    assert a.data.paths == [str(tmp_path / "data/*.jsonl"), "{stdlib}/json/*.py", "/abs/a.txt"]
    assert a.data.cache_dir == str(tmp_path / "cache") and a.checkpoint_dir == tmp_path / "runs/x/checkpoints"


@pytest.mark.parametrize("value, seconds", [("90", 5400), ("4:00:00", 14400), ("30:15", 1815), ("2-0", 172800),
                                            ("1-12:30", 131400), ("1-00:00:10", 86410), ("UNLIMITED", None)])
def test_slurm_time_formats(value, seconds):
    assert slurm_time_seconds(value) == seconds


def test_slurm_time_stays_a_string_from_yaml_and_overrides(tmp_path):
    # PyYAML alone reads 4:00:00 as the base-60 integer 14400 (= 10 days if handed to sbatch as minutes)
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(DEBUG.read_text() + "slurm:\n  time: 4:00:00\n")
    assert load_config(cfg_file).slurm.time == "4:00:00"
    assert load_config(DEBUG, ["slurm.time=1:30:00"]).slurm.time == "1:30:00"
    assert load_config(DEBUG, ["slurm.time=90"]).slurm.time == "90"
    with pytest.raises(ConfigError, match=r"slurm.time: '4h' is not a Slurm time"):
        load_config(DEBUG, ["slurm.time=4h"])


def test_slurm_workers_come_from_the_allocation():
    from lmforge.launcher.slurm import resolve

    cfg = resolve(load_config(DEBUG, ["slurm.nodes=2", "slurm.gpus_per_node=4"]))
    assert cfg.launch.workers == 8 and cfg.launch.gpus_per_worker == 1
    with pytest.raises(ConfigError, match=r"launch.workers=3 but slurm.nodes x ranks per node = 2 x 4 = 8"):
        resolve(load_config(DEBUG, ["slurm.nodes=2", "slurm.gpus_per_node=4", "launch.workers=3"]))


@pytest.mark.parametrize("text,key,lines", [
    ("train:\n  lr: 1.0e-3\nmodel:\n  preset: llama-debug\ntrain:\n  steps: 5\n", "train", (5, 1)),
    ("train:\n  lr: 1.0e-3\n  steps: 5\n\n  lr: 2.0e-3\n", "train.lr", (5, 2)),
    ("data:\n  paths: [a.txt]\nmodel:\n  overrides: {x: 1, x: 2}\n", "model.overrides.x", (4, 4)),
], ids=["top-level", "nested", "flow-mapping"])
def test_duplicate_yaml_keys_are_refused(tmp_path, text, key, lines):
    path = tmp_path / "dup.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == f"{path}: duplicate key {key!r} at line {lines[0]} (first at line {lines[1]})"


def test_yaml_merge_keys_may_override():
    from lmforge.training.config import yaml_load

    assert yaml_load("base: &b {lr: 1, steps: 2}\ntrain:\n  <<: *b\n  lr: 3\n")["train"] == {"lr": 3, "steps": 2}


def test_cli_duplicate_key_exits_2_with_one_line(tmp_path):
    recipe = DEBUG.read_text()
    path = tmp_path / "dup.yaml"
    path.write_text(recipe + "train:\n  steps: 5\n")  # a second train: block after the recipe's own
    first, last = recipe.splitlines().index("train:") + 1, len(recipe.splitlines()) + 1
    proc = lmforge("config", path, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (f"lmforge: config error: {path}: duplicate key 'train' at line {last} "
                                   f"(first at line {first})")
