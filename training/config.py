"""The one typed config tree of a run, its YAML loader with dotted overrides, and the DeepSpeed
config built from it.

    lmforge config configs/debug.yaml train.lr=1e-3 --nproc 2   # print the resolved tree + DS JSON

Every setting lives here exactly once. The DeepSpeed JSON files in ds_configs/ hold only ZeRO and
communication keys; `build_ds_config` fills batch sizes, accumulation, clipping, precision, optimizer
and schedule from this tree. A JSON may set those to "auto" (ecosystem JSONs do) or to the run's own
value; a different value is refused, naming both. This module imports nothing else of lmforge's
but the task registry (training/tasks/, when validating: it names the tasks and each one's rules).
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
import math
import os
import re
import sysconfig
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

# configs/ and ds_configs/ sit beside training/ in a checkout and beside lmforge/training in a wheel.
PACKAGE_ROOT = Path(__file__).resolve().parents[1]
DS_CONFIG_DIR = PACKAGE_ROOT / "ds_configs"
CONFIG_DIR = PACKAGE_ROOT / "configs"


class ConfigError(ValueError):
    """A bad config: the message names the key and what is allowed. The CLI exits 2 on it."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


# Size presets for Llama-architecture models. vocab_size is filled from the tokenizer unless given.
MODEL_PRESETS: dict[str, dict[str, Any]] = {
    # ~0.2M params: tests and the debug recipe (finishes in seconds on a CPU).
    "llama-debug": dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512),
    # ~5M params with a 4k vocabulary: the embedded demo.
    "llama-demo": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                       num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=1024),
    # Llama-3.2-1B shapes.
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                     num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                     rope_theta=500000.0, tie_word_embeddings=True),
    # Llama-2-7B shapes.
    "llama-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                     num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096),
}


class ModelConfig(_Section):
    preset: str | None = Field("llama-debug", description="size preset: " + ", ".join(MODEL_PRESETS))
    path: str | None = Field(None, description="Hugging Face model (the task's auto class): a local directory or a "
                                               "Hub id org/name[@revision]")
    init_from: str | None = Field(None, description="fine-tune from weights: a Hugging Face model (local directory or "
                                                    "Hub id org/name[@revision]) or an lmforge run directory / "
                                                    "checkpoint (step_N; consolidated once)")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) of a Hub id in model.path / "
                                                   "model.init_from; `org/name@revision` says the same")
    trust_remote_code: bool = Field(False, description="allow models whose config.json has auto_map (code from their "
                                                       "repository, run on load); refused otherwise")
    pretrained: bool = Field(True, description="with `path`: load its weights (false: its config only, random init)")
    overrides: dict[str, Any] = Field(default_factory=dict, description="keys set on the HF config, e.g. num_hidden_layers")
    attention: Literal["auto", "flash_attention_2", "sdpa", "eager"] = Field(
        "auto", description="auto: flash_attention_2 on CUDA with flash_attn installed, else sdpa")

    @model_validator(mode="after")
    def _one_source(self) -> "ModelConfig":
        if self.init_from is not None and self.path is not None:
            raise ValueError("set model.init_from (weights to fine-tune) or model.path (a model to build), not both")
        if self.path is None and self.preset is None and self.init_from is None:
            raise ValueError("set model.preset, model.path or model.init_from")
        if self.path is not None or self.init_from is not None:
            self.__dict__["preset"] = None  # a path wins over the default preset
        elif self.preset not in MODEL_PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; allowed: {', '.join(MODEL_PRESETS)}")
        return self


# data.format values that name the shape of sft records (json/jsonl/parquet rows), not a file type.
ROW_SCHEMAS = ("alpaca", "sharegpt", "messages")


def is_url(path: str) -> bool:
    """A path fsspec reads from a remote filesystem (s3://, gs://, hf://, https://, ...)."""
    return "://" in path and not path.startswith("file://")


class MixtureSource(_Section):
    """One entry of data.mixture: a weight, and the source keys of `data` it sets for itself (unset:
    inherited from `data`; the values are checked as data's own)."""
    weight: float = Field(..., gt=0, description="this source's share of the training samples (weights are normalised)")
    name: str | None = Field(None, description="the source's name in metrics (data/share/NAME); default its index")
    paths: list[str] | None = Field(None, description="as data.paths")
    dataset: str | None = Field(None, description="as data.dataset")
    dataset_config: str | None = Field(None, description="as data.dataset_config")
    split: str | None = Field(None, description="as data.split")
    data_files: list[str] | None = Field(None, description="as data.data_files")
    format: str | None = Field(None, description="as data.format")
    text_field: str | None = Field(None, description="as data.text_field")
    prompt_field: str | None = Field(None, description="as data.prompt_field")
    response_field: str | None = Field(None, description="as data.response_field")
    messages_field: str | None = Field(None, description="as data.messages_field")
    min_doc_chars: int | None = Field(None, ge=0, description="as data.min_doc_chars")
    storage_options: dict[str, Any] | None = Field(None, description="as data.storage_options")


class DataConfig(_Section):
    paths: list[str] = Field(default_factory=list, description="files, directories or globs, local or fsspec URLs (s3://, "
                             "gs://, hf://, https://; fetched once into the cache); `{stdlib}` is Python's standard library directory")
    dataset: str | None = Field(None, description="a Hugging Face dataset instead of paths: a Hub id or a local dataset "
                                                  "repository directory, read by datasets.load_dataset")
    dataset_config: str | None = Field(None, description="with `dataset`: its configuration (subset) name")
    split: str = Field("train", description="with `dataset`: the split to read, e.g. train or train[:10%]")
    data_files: list[str] = Field(default_factory=list, description="with `dataset`: data_files passed to "
                                                                    "load_dataset (files of the repository)")
    storage_options: dict[str, Any] = Field(default_factory=dict, description="fsspec options for URL paths and "
                                            "`dataset`, e.g. {endpoint_url: http://127.0.0.1:9000} for an S3-compatible "
                                            "server (credentials: the backend's environment, never here)")
    mixture: list["MixtureSource"] = Field(default_factory=list, description="several sources sampled by weight "
                                           "(pretrain, sft): [{weight, paths or dataset, ...}]; an entry inherits the "
                                           "keys above that it does not set")
    format: Literal["auto", "text", "json", "parquet", "arrow", "tokens", "alpaca", "sharegpt", "messages"] = Field(
        "auto", description="text: one document per file; json/jsonl/parquet: one per row; arrow: datasets.save_to_disk; "
                            "tokens: a 1-D .npy of token ids. sft only: alpaca (instruction/input/output/system), "
                            "sharegpt (conversations of from/value), messages (OpenAI [{role, content}]): json/jsonl/"
                            "parquet rows of that shape (file type from the extension); auto/json/parquet/arrow: "
                            "the shape is detected from the first record's keys")
    text_field: str = Field("text", description="column holding the text (json/parquet/arrow)")
    tokenizer: str | None = Field(None, description="tokenizer: a local directory or a Hub id org/name[@revision]; unset: "
                                                    "train a byte-level BPE on the training split")
    vocab_size: int = Field(8192, ge=260, description="vocabulary of the locally trained tokenizer")
    seq_len: int = Field(256, ge=8, description="tokens per training sequence (documents are packed, EOS between)")
    holdout: float = Field(0.02, gt=0.0, lt=0.5, description="fraction of documents held out for evaluation")
    min_doc_chars: int = Field(1, ge=0, description="documents shorter than this are dropped")
    cache_dir: str | None = Field(None, description="tokenizer/token cache; default $LMFORGE_CACHE or ~/.cache/lmforge")
    num_proc: int = Field(1, ge=1, description="processes for tokenization")
    # Fine-tuning tasks (task: sft | classification | ner) read records, not documents:
    eval_paths: list[str] = Field(default_factory=list, description="held-out records for a fine-tuning task; "
                                                                    "empty: `holdout` of data.paths, split by record")
    label_field: str | None = Field(None, description="classification: the label column (default label); ner: the "
                                                      "BIO tag list column (default tags)")
    words_field: str = Field("tokens", description="ner: the column holding each record's words")
    prompt_field: str = Field("prompt", description="sft: prompt column (records with prompt/response)")
    response_field: str = Field("response", description="sft: response column")
    messages_field: str = Field("messages", description="sft: chat column ([{role, content}, ...]); used when present")
    chat_template: str | None = Field(None, description="sft: a named template (chatml, llama-3, mistral-instruct), a "
                                                        "Jinja file, or inline Jinja; default the tokenizer's, else "
                                                        "lmforge's built-in one")
    packing: bool = Field(True, description="sft: pack several records per sequence; attention and loss never "
                                            "cross a record boundary (position_ids restart per record)")
    on_bad_file: Literal["error", "skip"] = Field(
        "error", description="a text/json(l) file that is not UTF-8 text (binary, undecodable) or a parquet file "
                             "without a readable footer: error names it with the byte offset before any rank starts "
                             "(exit 2); skip leaves it out with a warning")

    @model_validator(mode="after")
    def _one_source(self) -> "DataConfig":
        if any(not p.strip() for p in self.paths):
            raise ValueError("data.paths has an empty path")
        if self.mixture:
            if self.eval_paths:
                raise ValueError("data.eval_paths is not combined with data.mixture: each source holds out "
                                 "data.holdout of its own data")
            for i in range(len(self.mixture)):
                self.source(i)  # validates the entry with what it inherits
            return self
        if self.paths and self.dataset:
            raise ValueError("set data.paths or data.dataset, not both")
        if not self.paths and not self.dataset:
            raise ValueError("set data.paths (files or URLs), data.dataset (a Hugging Face dataset) or data.mixture")
        if self.data_files and not self.dataset:
            raise ValueError("data.data_files selects files of data.dataset; with data.paths list the files there")
        return self

    def sources(self) -> list["DataConfig"]:
        """The sources of this run: the mixture's entries (each with what it inherits), or this config."""
        return [self.source(i) for i in range(len(self.mixture))] if self.mixture else [self]

    def weights(self) -> list[float]:
        """Each source's share of the training samples (sums to 1)."""
        if not self.mixture:
            return [1.0]
        total = sum(e.weight for e in self.mixture)
        return [e.weight / total for e in self.mixture]

    def source(self, i: int) -> "DataConfig":
        """Mixture entry i as a one-source DataConfig: the entry's keys over the top-level ones."""
        entry = self.mixture[i]
        own = entry.model_dump(exclude={"weight", "name"}, exclude_none=True)
        if ("paths" in own or "dataset" in own) and not ("paths" in own and "dataset" in own):
            # an entry names its own data: it does not inherit the top level's other kind of source
            own.setdefault("paths", [])
            own.setdefault("dataset", None)
        tree = {**self.model_dump(exclude={"mixture"}), **own}
        try:
            return DataConfig.model_validate(tree)
        except ValidationError as e:
            raise ValueError(f"data.mixture[{i}]: " + _format_error(e)) from None

    def source_names(self) -> list[str]:
        """A short name per source for metrics: the entry's `name`, else its index."""
        return [e.name or str(i) for i, e in enumerate(self.mixture)] if self.mixture else ["0"]

    def expanded_paths(self, paths: list[str] | None = None) -> list[str]:
        """data.paths (or the given list, e.g. eval_paths) with {stdlib} and ~ expanded (URLs as they are)."""
        stdlib = sysconfig.get_paths()["stdlib"]
        return [p if is_url(p) else os.path.expanduser(p.replace("{stdlib}", stdlib))
                for p in (self.paths if paths is None else paths)]

    def resolved_cache_dir(self) -> Path:
        if self.cache_dir:
            return Path(self.cache_dir).expanduser()
        return Path(os.environ.get("LMFORGE_CACHE", "~/.cache/lmforge")).expanduser()


DataConfig.model_rebuild()


class TrainConfig(_Section):
    steps: int | None = Field(None, ge=1, description="optimizer steps (or give `tokens` or `epochs`)")
    tokens: int | None = Field(None, ge=1, description="training tokens; steps = tokens / (global_batch_size * seq_len)")
    epochs: float | None = Field(None, gt=0, description="passes over the training rows (of all mixture sources); "
                                                         "steps = ceil(epochs * rows / global_batch_size)")
    micro_batch_size: int = Field(8, ge=1, description="sequences per rank per forward pass")
    global_batch_size: int = Field(16, ge=1, description="sequences per optimizer step; accumulation is derived")
    optimizer: Literal["adamw", "adamw_8bit", "paged_adamw_8bit", "lion_8bit"] = Field(
        "adamw", description="adamw: torch AdamW (DeepSpeed CPUAdam under optimizer offload); adamw_8bit, "
                             "paged_adamw_8bit (CUDA; plain 8-bit on CPU), lion_8bit: bitsandbytes, ~2 (Lion ~1) "
                             "bytes of state per parameter instead of 8")
    lr: float = Field(3e-4, gt=0, description="peak learning rate")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="final lr as a fraction of lr")
    warmup: int = Field(0, ge=0, description="linear warmup steps")
    warmup_ratio: float | None = Field(None, ge=0, lt=1, description="warmup as a fraction of the steps (instead of "
                                                                    "`warmup`): round(warmup_ratio * steps)")
    schedule: Literal["cosine", "linear", "constant"] = Field("cosine", description="decay after warmup")
    weight_decay: float = Field(0.1, ge=0, description="AdamW decoupled weight decay (not on norms/biases)")
    betas: tuple[float, float] = Field((0.9, 0.95), description="Adam betas")
    eps: float = Field(1e-8, gt=0, description="Adam epsilon")
    grad_clip: float = Field(1.0, ge=0, description="max global grad norm; 0 disables")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field("auto", description="auto: bf16 on CUDA that supports it, else fp32")
    activation_checkpointing: bool = Field(False, description="recompute each layer's activations in backward "
                                                             "(non-reentrant): less memory, ~30% more compute")
    seed: int = Field(1234, description="seeds model init, data order and every RNG")
    on_nonfinite: Literal["skip", "rollback", "stop"] = Field(
        "rollback", description="a step with a non-finite loss or grad norm updates nothing; after max_nonfinite "
                                "in a row: skip keeps going (and stops only if the next max_nonfinite fail too), "
                                "rollback reloads the newest checkpoint and skips the data since it, stop exits 76")
    max_nonfinite: int = Field(3, ge=1, description="non-finite (or spiking) steps in a row before on_nonfinite acts")
    spike_threshold: float | None = Field(None, gt=1, description="a loss above this times the median of the last "
                                                                  "100 steps counts as a bad step; unset: off")

    @model_validator(mode="after")
    def _steps_or_tokens(self) -> "TrainConfig":
        given = [f"train.{k}" for k in ("steps", "tokens", "epochs") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"{' and '.join(given)} are both set; set one" if given
                             else "set one of train.steps, train.tokens and train.epochs")
        if self.warmup and self.warmup_ratio is not None:
            raise ValueError("train.warmup and train.warmup_ratio are both set; set one")
        if self.global_batch_size % self.micro_batch_size:
            raise ValueError(f"train.global_batch_size ({self.global_batch_size}) is not a multiple of "
                             f"train.micro_batch_size ({self.micro_batch_size})")
        return self


class ParallelConfig(_Section):
    zero_stage: Literal[1, 2, 3] = Field(3, description="DeepSpeed ZeRO stage: 1 optimizer state, 2 + gradients, 3 + parameters partitioned")
    offload_optimizer: bool = Field(False, description="ZeRO-Offload: optimizer state and step on the CPU")
    offload_params: bool = Field(False, description="ZeRO-Infinity parameter offload to CPU (stage 3 only)")
    ds_config: str | None = Field(None, description="DeepSpeed JSON with ZeRO/communication keys only; default ds_configs/zero<stage>.json")
    sequence: int = Field(1, ge=1, description="Ulysses sequence-parallel degree (DeepSpeed's HF integration): "
                                               "each sequence split across this many ranks; needs sdpa/flash attention")
    tensor: int = Field(1, ge=1, description="AutoTP tensor-parallel degree (DeepSpeed tensor_parallel.autotp_size); "
                                             "the ranks of a group see the same batch")

    @model_validator(mode="after")
    def _offload(self) -> "ParallelConfig":
        if self.offload_params and self.zero_stage != 3:
            raise ValueError("parallel.offload_params needs parallel.zero_stage=3")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("parallel.offload_optimizer needs parallel.zero_stage >= 1")
        if self.sequence > 1 and self.tensor > 1:
            raise ValueError("parallel.sequence and parallel.tensor cannot both be > 1: DeepSpeed's Ulysses and "
                             "AutoTP groups are not composed (and not tested together); pick one")
        return self


class CheckpointConfig(_Section):
    dir: str | None = Field(None, description="default <run_dir>/checkpoints")
    interval: int = Field(100, ge=0, description="steps between checkpoints; 0: only at the end")
    keep: int = Field(3, ge=1, description="newest checkpoints kept")
    resume: str = Field("auto", description="auto: continue from the newest complete checkpoint; never: start "
                                            "fresh; step_N or a checkpoint's path: roll back to it (the newer "
                                            "checkpoints move to checkpoints/superseded-<time>/ when this run "
                                            "publishes its first)")
    allow_config_change: bool = Field(False, description="resume even if model/data/batch keys changed")
    # `async` is a Python keyword: the field is async_, the key everywhere else (YAML, overrides, dumps) async
    async_: bool = Field(False, alias="async", description="a save stalls the loop only while the model states "
                         "are copied to host memory; the write, hashing and publish run in a background thread per "
                         "rank (training/checkpoint/background.py), the next optimizer step waits for the optimizer "
                         "state's files (written from the live tensors); the next save, a stop and the end wait for it")

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=(),
                              validate_by_name=True, validate_by_alias=True, serialize_by_alias=True)

    @field_validator("resume")
    @classmethod
    def _resume(cls, v: str) -> str:
        if v not in ("auto", "never") and not re.fullmatch(r"step_\d+", v) and "/" not in v:
            raise ValueError(f"checkpoint.resume={v!r}: give auto, never, step_N (under checkpoint.dir) or a "
                             "checkpoint's path (with a /, e.g. runs/x/checkpoints/step_10)")
        return v


class DistConfig(_Section):
    timeout_s: int = Field(1800, ge=10, description="a collective that waits this long fails the job (torch "
                                                   "process-group timeout)")
    hang_timeout_s: int = Field(1800, ge=0, description="no step, evaluation or save finished for this long: every "
                                                        "rank writes its stacks to <run_dir>/hang-<time>/rank_N.txt and "
                                                        "the job exits 77; 0: off")
    lock_stale_s: int = Field(300, ge=10, description="a run-directory lock whose holder on another host has not "
                                                      "renewed it for this long is taken over (a dead holder on this "
                                                      "host at once)")


class EarlyStoppingConfig(_Section):
    metric: str | None = Field(None, description="stop when this eval metric stops improving, e.g. eval/loss, "
                                                 "eval/accuracy, eval/entity_f1; unset: never stop early")
    mode: Literal["auto", "min", "max"] = Field("auto", description="auto: min for loss/ppl, max otherwise")
    patience: int = Field(3, ge=1, description="evaluations without improvement before stopping")
    min_delta: float = Field(0.0, ge=0, description="an improvement must exceed this")

    def minimize(self) -> bool:
        if self.mode != "auto":
            return self.mode == "min"
        return self.metric is not None and self.metric.rsplit("/", 1)[-1] in ("loss", "ppl")


class EvalConfig(_Section):
    interval: int = Field(100, ge=0, description="steps between evaluations; 0: only before and after training")
    batches: int = Field(10, ge=1, description="pretrain: held-out micro batches per rank per evaluation "
                                               "(fine-tuning tasks evaluate their whole eval split)")
    generate: int = Field(16, ge=0, description="sft: held-out prompts answered by greedy generation for BLEU")
    max_new_tokens: int = Field(32, ge=1, description="sft: tokens generated per prompt")
    early_stopping: EarlyStoppingConfig = Field(default_factory=EarlyStoppingConfig, description="early stopping on "
                                                "an eval metric; the best checkpoint is marked in checkpoints/best.json")


class LoggingConfig(_Section):
    backends: list[Literal["tensorboard", "jsonl", "wandb", "mlflow"]] = Field(
        ["tensorboard", "jsonl"], min_length=1,
        description="where rank 0 sends metrics: TensorBoard event files, <run_dir>/metrics.jsonl (lmforge status and "
                    "export read it), Weights & Biases (its usual environment: WANDB_MODE=offline, WANDB_ENTITY, "
                    "WANDB_API_KEY), MLflow (logging.mlflow_tracking_uri); `pip install -e '.[track]'` for the last two")
    project: str = Field("lmforge", min_length=1, description="the W&B project and the MLflow experiment")
    mlflow_tracking_uri: str | None = Field(
        None, description="MLflow tracking URI (a server, sqlite:///mlflow.db, file:///path/mlruns); default $MLFLOW_TRACKING_URI, "
                          "else MLflow's own default")
    dir: str | None = Field(None, description="TensorBoard directory; default <run_dir>/tensorboard")
    interval: int = Field(1, ge=1, description="steps between logged scalars")
    peak_tflops: float | None = Field(None, gt=0, description="per-device peak TFLOP/s for MFU; default from the GPU table, none on CPU")
    progress: bool = Field(True, description="progress bar on rank 0")


_SLURM_TIME = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")


def slurm_time_seconds(value: str) -> int | None:
    """Seconds in a Slurm time limit (minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS);
    None for UNLIMITED/INFINITE. Raises ValueError on anything else."""
    if value.upper() in ("UNLIMITED", "INFINITE"):
        return None
    m = _SLURM_TIME.match(value)
    if not m:
        raise ValueError(f"{value!r} is not a Slurm time (e.g. 90, 4:00:00, 1-12:00:00)")
    days, a, b, c = m.groups()
    if days is not None:  # D-HH[:MM[:SS]]
        h, mi, se = int(a), int(b or 0), int(c or 0)
        return ((int(days) * 24 + h) * 60 + mi) * 60 + se
    if b is None:  # MM
        return int(a) * 60
    if c is None:  # MM:SS
        return int(a) * 60 + int(b)
    return (int(a) * 60 + int(b)) * 60 + int(c)  # HH:MM:SS


class SlurmConfig(_Section):
    """`lmforge launch --on slurm`: the sbatch script is rendered from these (see slurm/)."""
    runner: Literal["torchrun", "ray"] = Field(
        "torchrun", description="slurm/torchrun.sbatch (torchrun per node) or slurm/ray.sbatch (Ray cluster in the job)")
    nodes: int = Field(1, ge=1, description="nodes (--nodes)")
    gpus_per_node: int = Field(0, ge=0, description="GPUs per node (--gpus-per-node); one rank per GPU")
    procs_per_node: int | None = Field(None, ge=1, description="ranks per node; default gpus_per_node, else 1")
    cpus_per_node: int | None = Field(None, ge=1, description="CPUs per node (--cpus-per-task of the one task per node)")
    partition: str | None = Field(None, description="partition (--partition); default: the cluster's default")
    account: str | None = Field(None, description="account (--account)")
    time: str | None = Field(None, description="time limit (--time), e.g. 4:00:00; default: the partition's")
    job_name: str | None = Field(None, description="job name; default: the run_dir's name")
    signal_before: int = Field(120, ge=0, description="Slurm sends USR1 this many seconds before the time limit: "
                                                     "checkpoint, then requeue; 0: no warning")
    requeue: bool = Field(True, description="requeue the job after a USR1 checkpoint (pre-emption, time limit)")
    setup: str = Field("", description="shell lines at the top of the batch script (srun passes the environment "
                                       "to every node), e.g. 'module load cuda/12.4; source /shared/venv/bin/activate'")
    python: str | None = Field(None, description="python on the nodes; default the one running `lmforge launch`")
    rdzv_port: int = Field(29500, ge=1, le=65535, description="torchrun c10d rendezvous port on the first node")
    ray_port: int = Field(6379, ge=1, le=65535, description="Ray head port on the first node (runner=ray)")
    sbatch_args: list[str] = Field(default_factory=list, description="extra #SBATCH options, e.g. ['--exclusive', '--mem=0']")
    template: str | None = Field(None, description="your own copy of a slurm/*.sbatch template to render instead")

    @field_validator("time", mode="before")
    @classmethod
    def _check_time(cls, v):
        if v is not None:
            v = str(v)  # `slurm.time=90` (minutes) arrives as an int
            slurm_time_seconds(v)
        return v

    @property
    def ranks_per_node(self) -> int:
        return self.procs_per_node or self.gpus_per_node or 1


class LaunchConfig(_Section):
    backend: Literal["local", "ray", "slurm"] = Field(
        "local", description="where ranks run: local (torchrun on this box), ray (Ray Train) or slurm (sbatch)")
    address: str | None = Field(None, description="Ray cluster address (host:port, ray://…, auto); default $RAY_ADDRESS, else start a local Ray")
    workers: int | None = Field(None, ge=1, description="ranks (--nproc): default one per GPU (local: this box; ray: the cluster), else 1")
    cpus_per_worker: float = Field(1, gt=0, description="Ray: CPUs reserved per worker")
    gpus_per_worker: float = Field(0, ge=0, description="Ray: GPUs per worker (1 on GPU clusters)")
    strategy: Literal["SPREAD", "PACK", "STRICT_SPREAD", "STRICT_PACK"] = Field(
        "SPREAD", description="Ray placement group strategy across nodes")
    max_failures: int = Field(0, ge=-1, description="Ray: restarts after a worker/node failure (-1: unlimited); each resumes from the newest checkpoint")
    ray_auth: Literal["token", "disabled"] = Field(
        "token", description="Ray clusters lmforge starts or joins: token (a fresh token per job; an existing "
                             "cluster's from RAY_AUTH_TOKEN_PATH/RAY_AUTH_TOKEN/~/.ray/auth_token) or disabled "
                             "(anyone reaching the cluster's ports runs code as you; warned at start)")


class FinetuneConfig(_Section):
    """How the weights are adapted (peft for everything but `full`)."""
    method: Literal["full", "lora", "qlora", "adalora"] = Field(
        "full", description="full: every weight trains; lora / qlora (4-bit base, bitsandbytes) / adalora: peft "
                            "adapters only (needs model.init_from or pretrained model.path)")
    r: int = Field(8, ge=1, description="LoRA rank (AdaLoRA: the average target rank)")
    alpha: float = Field(16, gt=0, description="LoRA scaling alpha")
    dropout: float = Field(0.0, ge=0, lt=1, description="LoRA dropout")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="module names to adapt, e.g. [q_proj, v_proj]; all-linear: every linear layer "
                                  "except the output head")
    init_r: int = Field(12, ge=1, description="AdaLoRA: initial rank before pruning down to r")


class DistillConfig(_Section):
    """Knowledge distillation from a frozen teacher (healing a pruned model: configs/heal.yaml)."""
    teacher: str | None = Field(None, description="teacher: a Hugging Face causal LM (local directory or Hub id "
                                                  "org/name[@revision]) with the student's tokenizer (e.g. the "
                                                  "unpruned model); unset: no distillation")
    alpha: float = Field(0.5, ge=0, le=1, description="loss = (1 - alpha) * cross entropy + alpha * T^2 * "
                                                      "KL(teacher || student) over the same target tokens")
    temperature: float = Field(1.0, gt=0, description="T: both distributions are softmax(logits / T)")


class DpoConfig(_Section):
    """task=dpo: preference optimisation against a reference model (simpo: without one); losses as TRL's."""
    loss: Literal["sigmoid", "ipo", "hinge", "simpo"] = Field(
        "sigmoid", description="sigmoid: DPO; ipo: IPO (log-ratios averaged per token); hinge: SLiC's hinge; "
                               "simpo: SimPO, reference-free (mean log-probs, margin dpo.simpo_gamma)")
    beta: float = Field(0.1, gt=0, description="the temperature of the implicit reward beta * log(pi / pi_ref) "
                                               "(simpo: beta * mean log-prob; its paper uses 2-2.5)")
    reference: Literal["cached", "base"] = Field(
        "cached", description="cached: the starting model's log-probs of every pair, computed once before training "
                              "and cached with the data (no second model in memory); base: the model with its "
                              "adapters disabled, each step (finetune.method lora/qlora/adalora)")
    simpo_gamma: float = Field(0.5, ge=0, description="simpo: the target reward margin gamma")


class OrpoConfig(_Section):
    """task=orpo: SFT on the chosen answers plus an odds-ratio term, reference-free (TRL's ORPO)."""
    beta: float = Field(0.1, gt=0, description="lambda of the paper: loss = NLL(chosen) - beta * mean "
                                               "log sigmoid(log odds(chosen) - log odds(rejected))")


class Config(_Section):
    run_dir: str = Field("runs/debug", description="everything a run writes goes under here")
    task: str = Field("pretrain", description="what the run learns, a task of the registry in training/tasks/ (the "
                                              "task table in docs/fine-tuning.md lists them); pretrain: causal LM on "
                                              "packed documents")
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig, description="how the weights are adapted: "
                                     "every weight, or peft adapters (LoRA, QLoRA, AdaLoRA)")
    distill: DistillConfig = Field(default_factory=DistillConfig, description="knowledge distillation from a frozen "
                                   "teacher (healing a pruned model: configs/heal.yaml)")
    dpo: DpoConfig = Field(default_factory=DpoConfig, description="task=dpo: preference optimisation against a "
                           "reference model (simpo: without one); losses as TRL's")
    orpo: OrpoConfig = Field(default_factory=OrpoConfig, description="task=orpo: SFT on the chosen answers plus an "
                             "odds-ratio term, reference-free (TRL's ORPO)")
    model: ModelConfig = Field(default_factory=ModelConfig, description="the model: a size preset, a Hugging Face "
                               "model to build (model.path) or weights to fine-tune (model.init_from)")
    data: DataConfig = Field(..., description="the training data: files, URLs, a Hugging Face dataset or a mixture "
                             "of them; the tokenizer, sequence length and held-out split; a fine-tuning task's fields")
    train: TrainConfig = Field(..., description="the optimisation: how long (steps, tokens or epochs), batch sizes, "
                               "optimizer, learning-rate schedule, precision, seed, and what a non-finite step does")
    parallel: ParallelConfig = Field(default_factory=ParallelConfig, description="how the ranks share the work: "
                                     "ZeRO stage, offload, the DeepSpeed JSON, sequence and tensor parallelism")
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig, description="where checkpoints go, how "
                                         "often, how many are kept, what a run resumes from, asynchronous saves")
    dist: DistConfig = Field(default_factory=DistConfig, description="the process group's timeout, the hang watchdog "
                             "and the run-directory lock")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="held-out evaluation: how often, how much, "
                             "sft's generated answers, early stopping")
    logging: LoggingConfig = Field(default_factory=LoggingConfig, description="where rank 0 sends metrics (TensorBoard, "
                                   "metrics.jsonl, W&B, MLflow), how often, the progress bar")
    launch: LaunchConfig = Field(default_factory=LaunchConfig, description="where the ranks run (this machine, a Ray "
                                 "cluster, Slurm) and how many; Ray's placement, restarts and authentication")
    slurm: SlurmConfig = Field(default_factory=SlurmConfig, description="`lmforge launch --on slurm`: the sbatch "
                               "script is rendered from these (slurm/*.sbatch)")

    @field_validator("task", mode="before")
    @classmethod
    def _registered_task(cls, v):
        from . import tasks

        if v not in tasks.names():  # worded as pydantic words a Literal's error
            *head, last = map(repr, tasks.names())
            raise ValueError(f"Input should be {', '.join(head)} or {last}")
        return v

    @model_validator(mode="after")
    def _combinations(self) -> "Config":
        from . import tasks

        task = tasks.get(self.task)
        task.validate(self)  # the task's own rules (e.g. dpo.reference=base needs adapters)
        if self.train.optimizer != "adamw" and self.parallel.offload_optimizer:
            raise ValueError(f"train.optimizer={self.train.optimizer} keeps its 8-bit state beside the parameters; "
                             "parallel.offload_optimizer runs DeepSpeed's CPUAdam on fp32 state instead. Use one "
                             "or the other (8-bit state is already 4x smaller than AdamW's)")
        refused = [k for k in ("sequence", "tensor") if getattr(self.parallel, k) > 1 and k not in task.parallel]
        if refused and task.parallel == ("data",):
            raise ValueError(f"task={self.task} runs data-parallel only: parallel.sequence and parallel.tensor must "
                             "be 1 (sequence/tensor parallelism are for pretraining long or wide models)")
        if refused:
            raise ValueError(f"task={self.task} does not run parallel.{refused[0]} > 1 (its layouts: "
                             f"{', '.join(task.parallel)})")
        if self.data.mixture and not task.mixtures:
            *head, last = (n for n in tasks.names() if tasks.get(n).mixtures)
            raise ValueError(f"data.mixture: task={self.task} reads one source; mixtures are for {', '.join(head)} "
                             f"and {last}")
        schema = next((s.format for s in self.data.sources() if s.format in ROW_SCHEMAS), None)  # a mixture's too
        if schema and self.task != "sft":
            raise ValueError(f"data.format={schema} is a conversation schema for task=sft; this run has "
                             f"task={self.task}")
        es = self.eval.early_stopping
        if es.metric is not None:
            known = task.metrics(self)
            if es.metric not in known:
                raise ValueError(f"eval.early_stopping.metric: task {self.task} reports {', '.join(known)}; "
                                 f"got {es.metric!r}")
            if not self.eval.interval:
                raise ValueError("eval.early_stopping needs periodic evaluations: set eval.interval > 0")
        if self.distill.teacher is not None:
            if not task.causal:
                raise ValueError(f"distill.teacher: distillation matches next-token distributions, for task "
                                 f"{' or '.join(tasks.causal_names())}; this run has task={self.task}")
            if self.parallel.sequence * self.parallel.tensor > 1:
                raise ValueError("distill.teacher is not combined with parallel.sequence/tensor > 1: the teacher runs "
                                 "unsharded on the whole micro batch, while SP/TP ranks hold a chunk or a shard of it")
        method = self.finetune.method
        if method != "full":
            if not (self.model.init_from or (self.model.path and self.model.pretrained)):
                raise ValueError(f"finetune.method={method} adapts pretrained weights: set model.init_from (a local "
                                 "Hugging Face directory or an lmforge checkpoint)")
            if self.parallel.sequence * self.parallel.tensor > 1:
                raise ValueError(f"finetune.method={method} is not combined with parallel.sequence/tensor > 1")
        if method == "qlora" and self.parallel.zero_stage == 3:
            raise ValueError("finetune.method=qlora keeps the base weights in 4-bit bitsandbytes tensors, which ZeRO-3 "
                             "cannot partition here: use parallel.zero_stage 1 or 2 (the frozen 4-bit base is small)")
        if method == "adalora" and self.parallel.zero_stage == 3:
            raise ValueError("finetune.method=adalora prunes ranks by masking whole adapter weights each step, which "
                             "needs them unpartitioned: use parallel.zero_stage 1 or 2 (adapters are small)")
        if method in ("qlora", "adalora") and self.parallel.offload_optimizer:
            raise ValueError(f"finetune.method={method} is not combined with parallel.offload_optimizer")
        sp = self.parallel.sequence
        if sp > 1:
            if self.model.attention == "eager":
                raise ValueError("parallel.sequence > 1 needs model.attention sdpa or flash_attention_2 (DeepSpeed's "
                                 "Ulysses attention wraps those; eager is refused)")
            if self.data.seq_len % sp:
                raise ValueError(f"data.seq_len ({self.data.seq_len}) must be divisible by parallel.sequence ({sp})")
        return self

    # Derived locations: one setting each, defaults under run_dir.
    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.checkpoint.dir or Path(self.run_dir) / "checkpoints")

    @property
    def tensorboard_dir(self) -> Path:
        return Path(self.logging.dir or Path(self.run_dir) / "tensorboard")

    def data_parallel_size(self, world_size: int) -> int:
        """Ranks that see different data: the world divided into sequence/tensor-parallel groups."""
        group = self.parallel.sequence * self.parallel.tensor
        if world_size % group:
            raise ConfigError(f"{world_size} rank(s) cannot be split into groups of parallel.sequence x "
                              f"parallel.tensor = {group}")
        return world_size // group

    def grad_accum(self, data_parallel_size: int) -> int:
        per_step = self.train.micro_batch_size * data_parallel_size
        if self.train.global_batch_size % per_step:
            raise ConfigError(
                f"train.global_batch_size ({self.train.global_batch_size}) is not divisible by "
                f"train.micro_batch_size ({self.train.micro_batch_size}) x data-parallel size "
                f"({data_parallel_size}) = {per_step}")
        return self.train.global_batch_size // per_step

    def total_steps(self, train_rows: int | None = None) -> int:
        """Optimizer steps: train.steps, or derived from train.tokens, or from train.epochs over the
        `train_rows` training rows (sequences; known once the data are prepared)."""
        t = self.train
        if t.steps is not None:
            return t.steps
        if t.tokens is not None:
            return max(1, t.tokens // (t.global_batch_size * self.data.seq_len))
        if train_rows is None:
            raise ConfigError("train.epochs: the steps follow from the training rows, known once the data are "
                              "prepared (lmforge prepare)")
        return max(1, math.ceil(t.epochs * train_rows / t.global_batch_size))

    def warmup_steps(self, total_steps: int) -> int:
        """train.warmup, or train.warmup_ratio of the total steps; never more than the total."""
        t = self.train
        warmup = round(t.warmup_ratio * total_steps) if t.warmup_ratio is not None else t.warmup
        return min(warmup, total_steps)

    def with_absolute_paths(self, base: Path | None = None) -> "Config":
        """A copy whose relative paths are resolved against `base` (default: the current
        directory), for ranks that start elsewhere (Ray workers, Tune trials, batch jobs)."""
        from .hub import HUB_KEYS, parse

        base = base or Path.cwd()

        def absolute(p: str | None, key: str = "") -> str | None:
            if p is None or p.startswith(("/", "~", "{")) or is_url(p):
                return p
            if key in HUB_KEYS and parse(p) is not None and not (base / p).exists():
                return p  # a Hub id (training/hub.py), not a path
            return str(base / p)

        def local_dataset(d: str | None) -> str | None:
            # a Hub id ("org/name") stays as it is; a dataset directory relative to `base` is made absolute
            return absolute(d) if d is not None and (base / d).is_dir() else d

        tree = self.to_dict()
        for key in PATH_KEYS:
            section, _, name = key.rpartition(".")
            node = tree[section] if section else tree
            node[name] = absolute(node[name], key)
        for node in [tree["data"], *tree["data"]["mixture"]]:
            if node.get("paths") is not None:
                node["paths"] = [absolute(p) for p in node["paths"]]
            node["dataset"] = local_dataset(node.get("dataset"))
        tree["data"]["eval_paths"] = [absolute(p) for p in tree["data"]["eval_paths"]]
        if "/" in tree["checkpoint"]["resume"]:  # a checkpoint's path, not auto/never/step_N
            tree["checkpoint"]["resume"] = absolute(tree["checkpoint"]["resume"])
        return Config.model_validate(tree)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


PATH_KEYS = ("run_dir", "model.path", "model.init_from", "distill.teacher", "data.tokenizer", "data.cache_dir",
             "parallel.ds_config", "checkpoint.dir", "logging.dir", "slurm.template")

# Keys whose change makes an existing checkpoint a different run (model shape, tokens it saw,
# optimizer state layout). lr, steps, intervals and logging may change on resume; so may the
# parallel layout (ZeRO stage, TP/SP degree, like the world size), which checkpoint.layout_change
# reports and checkpoint/universal.py resumes through DeepSpeed's universal format.
COMPAT_KEYS = ("task", "finetune", "model", "data.paths", "data.dataset", "data.dataset_config", "data.split",
               "data.data_files", "data.mixture", "data.eval_paths", "data.label_field",
               "data.words_field", "data.prompt_field", "data.response_field", "data.messages_field",
               "data.chat_template", "data.packing", "data.format", "data.text_field", "data.tokenizer", "data.vocab_size",
               "data.seq_len", "data.holdout", "data.min_doc_chars", "train.global_batch_size",
               "train.optimizer", "train.seed")


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v and key != "model.overrides":
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def incompatible_keys(saved: dict[str, Any], current: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Compat keys whose value differs between a checkpoint's config and this run's."""
    a, b = flatten(saved), flatten(current)
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b))
            if any(k == c or k.startswith(c + ".") for c in COMPAT_KEYS) and a.get(k) != b.get(k)}


def config_hash(cfg: Config) -> str:
    compat = {k: v for k, v in flatten(cfg.to_dict()).items()
              if any(k == c or k.startswith(c + ".") for c in COMPAT_KEYS)}
    return hashlib.sha256(json.dumps(compat, sort_keys=True).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- loading

def _all_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        name = field.alias or name  # checkpoint.async
        keys.append(prefix + name)
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys += _all_keys(ann, prefix + name + ".")
    return keys


def _suggest(key: str) -> str:
    match = difflib.get_close_matches(key, _all_keys(Config), n=1, cutoff=0.6)
    return f"; did you mean {match[0]}?" if match else ""


def _format_error(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            lines.append(f"unknown key {key}{_suggest(key)}")
        elif e["type"] == "missing":
            lines.append(f"missing key {key}")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            got = f" (got {e['input']!r})" if "input" in e and not isinstance(e["input"], dict) else ""
            lines.append(f"{key}: {msg}{got}" if key and not msg.startswith(key + ".") else f"{msg}{got}")
    return "; ".join(lines)


def parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not key=value (e.g. train.lr=3e-4)")
    key, raw = item.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {item!r} has an empty key")
    return key.split("."), parse_value(raw)


_NUMBER = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


class _Loader(yaml.SafeLoader):
    """YAML without the 1.1 base-60 numbers, so `time: 4:00:00` stays the string Slurm expects
    (PyYAML would read 14400), and with 1e-3 read as a float as in YAML 1.2. A mapping that repeats
    a key is refused: PyYAML would silently keep the last one (a second `train:` block would
    replace the first whole)."""

    source: str | None = None  # the file's name, for messages

    def construct_document(self, node):
        self._refuse_duplicates(node, "", set())
        return super().construct_document(node)

    def _refuse_duplicates(self, node, path: str, seen: set[int]) -> None:
        # Checked on the node graph, before construction, where key paths and line marks are known.
        if id(node) in seen:  # an alias: checked where its anchor is
            return
        seen.add(id(node))
        if isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                self._refuse_duplicates(item, f"{path}[{i}]", seen)
        elif isinstance(node, yaml.MappingNode):
            first: dict[Any, int] = {}
            for key_node, value_node in node.value:
                # `<<: *base` exists to be overridden; a complex key (a mapping or list) is left to PyYAML
                if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node)  # compared as values: `1` and `0x1` are one key
                key_path = f"{path}.{key}" if path else str(key)
                line = key_node.start_mark.line + 1
                if key in first:
                    where = f"{self.source}: " if self.source else ""
                    raise ConfigError(f"{where}duplicate key {key_path!r} at line {line} (first at line {first[key]})")
                first[key] = line
                self._refuse_duplicates(value_node, key_path, seen)


_INT, _FLOAT = "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"
_Loader.yaml_implicit_resolvers = {k: [(tag, rx) for tag, rx in v if tag not in (_INT, _FLOAT)]
                                   for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver(_INT, re.compile(r"^(?:[-+]?0b[0-1_]+|[-+]?0o?[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|"
                                               r"[-+]?0x[0-9a-fA-F_]+)$"), list("-+0123456789"))
_Loader.add_implicit_resolver(_FLOAT, re.compile(r"^(?:[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?(?:[eE][-+]?[0-9]+)?|"
                                                 r"[-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|"
                                                 r"\.(?:nan|NaN|NAN))$"), list("-+0123456789."))


def yaml_load(text: str, source: str | os.PathLike | None = None) -> Any:
    """`text` as YAML (lmforge's dialect, see _Loader); `source` names the file in a duplicate-key error."""
    loader = _Loader(text)
    loader.source = None if source is None else str(source)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def parse_value(raw: str) -> Any:
    """A YAML scalar/list, plus 1e-3 style floats (YAML 1.1 would read them as strings)."""
    if raw == "":
        return ""
    if _NUMBER.match(raw.strip()):
        return float(raw) if any(c in raw for c in ".eE") else int(raw)
    return yaml_load(raw)


def set_key(tree: dict[str, Any], key: str, value: Any) -> dict[str, Any]:
    """Set a dotted key in a nested dict (in place; returns it)."""
    parts = key.split(".")
    node = tree
    for i, part in enumerate(parts[:-1]):
        nxt = node.setdefault(part, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"{key}: {'.'.join(parts[:i + 1])} is not a section")
        node = nxt
    node[parts[-1]] = value
    return tree


def apply_overrides(tree: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    tree = copy.deepcopy(tree)
    for item in overrides:
        parts, value = parse_override(item)
        set_key(tree, ".".join(parts), value)
    return tree


def validate(tree: dict[str, Any]) -> Config:
    try:
        return Config.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(_format_error(e)) from None


def load_config(path: str | os.PathLike | None, overrides: list[str] = ()) -> Config:
    """YAML file (or None for defaults only) + dotted overrides → a validated Config."""
    tree: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist")
        try:
            tree = yaml_load(p.read_text(), p) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {p} is not valid YAML: {e}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"config file {p} must hold a mapping at the top level")
    return validate(apply_overrides(tree, list(overrides)))


def dump_config(cfg: Config, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(cfg.to_yaml())
    os.replace(tmp, path)


# --------------------------------------------------------------------------- DeepSpeed config

# Keys the run config owns. A ds_config JSON may leave them out or set them to "auto" (as the
# Hugging Face Trainer, Axolotl and LLaMA-Factory JSONs do); lmforge fills them. An explicit value
# is accepted only if it equals the run's, so no setting lives twice with two values.
RUN_OWNED_DS_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                     "optimizer", "scheduler", "fp16", "bf16", "amp", "gradient_clipping")
AUTO = "auto"
_OPTIMIZER_TYPES = {"adamw": ("adamw", "adam"), "adamw_8bit": ("adamw", "adam"),
                    "paged_adamw_8bit": ("adamw", "adam"), "lion_8bit": ("lion",)}
# DeepSpeed's scheduler types as lmforge's schedules (engine.lr_lambda: linear warmup, then decay)
_SCHEDULER_TYPES = {"constant": "WarmupLR", "linear": "WarmupDecayLR", "cosine": "WarmupCosineLR"}


def _run_owned_values(cfg: Config, world_size: int, precision: str) -> dict[str, tuple[str, Any]]:
    """JSON key (dotted) -> (the lmforge key that owns it, its value in this run; None: known only
    once the data are prepared, for train.epochs)."""
    t = cfg.train
    total = None if t.epochs is not None else cfg.total_steps()
    warmup = cfg.warmup_steps(total) if total is not None else (None if t.warmup_ratio is not None else t.warmup)
    return {
        "train_batch_size": ("train.global_batch_size", t.global_batch_size),
        "train_micro_batch_size_per_gpu": ("train.micro_batch_size", t.micro_batch_size),
        "gradient_accumulation_steps": ("train.global_batch_size / (train.micro_batch_size x data-parallel size)",
                                        cfg.grad_accum(cfg.data_parallel_size(world_size))),
        "gradient_clipping": ("train.grad_clip", t.grad_clip),
        "fp16.enabled": (f"train.precision (resolved: {precision})", precision == "fp16"),
        "bf16.enabled": (f"train.precision (resolved: {precision})", precision == "bf16"),
        "amp.enabled": ("train.precision (lmforge never uses apex amp)", False),
        "optimizer.type": ("train.optimizer", t.optimizer),
        "optimizer.params.lr": ("train.lr", t.lr),
        "optimizer.params.betas": ("train.betas", list(t.betas)),
        "optimizer.params.eps": ("train.eps", t.eps),
        "optimizer.params.weight_decay": ("train.weight_decay", t.weight_decay),
        "scheduler.type": ("train.schedule", t.schedule),
        "scheduler.params.warmup_min_lr": ("train.warmup (linear from 0)", 0),
        "scheduler.params.warmup_max_lr": ("train.lr", t.lr),
        "scheduler.params.warmup_num_steps": ("train.warmup / train.warmup_ratio", warmup),
        "scheduler.params.total_num_steps": ("train.steps / train.tokens / train.epochs", total),
        "scheduler.params.cos_min_ratio": ("train.min_lr_ratio", t.min_lr_ratio),
    }


def _agrees(json_key: str, given: Any, ours: Any) -> bool:
    if json_key == "optimizer.type":
        return str(given).lower() in _OPTIMIZER_TYPES[ours]
    if json_key == "scheduler.type":
        return given == _SCHEDULER_TYPES[ours]
    if isinstance(given, bool) or isinstance(ours, bool):
        return given is ours
    if isinstance(ours, list):
        return isinstance(given, list) and len(given) == len(ours) and all(map(_agrees_num, given, ours))
    return _agrees_num(given, ours)


def _agrees_num(given: Any, ours: Any) -> bool:
    return isinstance(given, (int, float)) and not isinstance(given, bool) and abs(given - ours) <= 1e-12 * max(1, abs(ours))


def _json_leaves(tree: dict) -> dict[str, Any]:
    """A JSON object's values by dotted key (config.flatten; an empty object is no value)."""
    return {k: v for k, v in flatten(tree).items() if v != {}}


def _check_run_owned(ds: dict, path: Path, cfg: Config, world_size: int, precision: str) -> None:
    """Every run-owned key the JSON sets is "auto" or equal to the run's value; else a ConfigError
    naming the JSON key and the lmforge key with both values."""
    owned = _run_owned_values(cfg, world_size, precision)
    given = _json_leaves({k: ds[k] for k in RUN_OWNED_DS_KEYS if k in ds})
    for key, value in given.items():
        if value == AUTO:
            continue
        if key in owned:
            lm_key, ours = owned[key]
            if ours is None:
                raise ConfigError(f"parallel.ds_config: {path} sets {key}={json.dumps(value)}, which this run "
                                  f"derives from the prepared data ({lm_key}); make it \"auto\"")
            if not _agrees(key, value, ours):
                raise ConfigError(f"parallel.ds_config: {path} sets {key}={json.dumps(value)} but {lm_key}="
                                  f"{json.dumps(ours)}; set it in one place: \"auto\" in the JSON, or the lmforge key")
        elif key.split(".")[0] not in ("fp16", "bf16"):  # fp16/bf16 details (loss scaling) are kept
            # lmforge builds its own optimizer and schedule from train.*: a value it would not use is refused
            raise ConfigError(f"parallel.ds_config: {path} sets {key}={json.dumps(value)}, which lmforge does not "
                              "read (optimizer and schedule come from train.*); remove it or make it \"auto\"")


def load_ds_json(cfg: Config) -> tuple[dict[str, Any], Path]:
    if cfg.parallel.ds_config:
        path = Path(cfg.parallel.ds_config).expanduser()
    else:
        name = "zero3_offload" if cfg.parallel.zero_stage == 3 and (
            cfg.parallel.offload_optimizer or cfg.parallel.offload_params) else f"zero{cfg.parallel.zero_stage}"
        path = DS_CONFIG_DIR / f"{name}.json"
    if not path.is_file():
        raise ConfigError(f"parallel.ds_config: {path} does not exist")
    try:
        ds = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"parallel.ds_config: {path} is not valid JSON: {e}") from None
    if not isinstance(ds, dict):
        raise ConfigError(f"parallel.ds_config: {path} must hold a JSON object")
    stage = ds.get("zero_optimization", {}).get("stage")
    if stage is not None and stage != AUTO and stage != cfg.parallel.zero_stage:
        raise ConfigError(f"parallel.ds_config: {path} sets zero_optimization.stage={stage} but "
                          f"parallel.zero_stage={cfg.parallel.zero_stage}; keep the stage in one place")
    return ds, path


def build_ds_config(cfg: Config, world_size: int, precision: str) -> dict[str, Any]:
    """The final DeepSpeed config: ZeRO/comm keys from the JSON, everything else from `cfg`.

    `precision` is the resolved one ("fp32", "bf16" or "fp16"), chosen by dist.select_runtime.
    """
    ds, path = load_ds_json(cfg)
    _check_run_owned(ds, path, cfg, world_size, precision)
    ds = copy.deepcopy(ds)
    # lmforge passes its own optimizer and scheduler to deepspeed.initialize (engine.py) and never amp
    for key in ("optimizer", "scheduler", "amp"):
        ds.pop(key, None)
    zero = ds.setdefault("zero_optimization", {})
    # ZeRO sizes HF fills from the model's hidden size: DeepSpeed's own defaults here (it takes no "auto")
    for key in [k for k, v in zero.items() if v == AUTO]:
        del zero[key]
    zero["stage"] = cfg.parallel.zero_stage
    # parallel.offload_* switch offload on and off; a JSON offload section only supplies its
    # details (device, pin_memory, nvme_path). A user JSON that offloads while the switch is
    # off would be a second, contradicting setting: refuse it.
    for flag, section in (("offload_optimizer", "offload_optimizer"), ("offload_params", "offload_param")):
        if getattr(cfg.parallel, flag):
            zero.setdefault(section, {"device": "cpu", "pin_memory": False})
        elif section in zero:
            # device "none" (as ecosystem JSONs write "no offload") agrees with the switch being off
            if cfg.parallel.ds_config and zero[section].get("device", "none") != "none":
                raise ConfigError(f"parallel.ds_config: {path} sets zero_optimization.{section} but "
                                  f"parallel.{flag}=false; switch offload with parallel.{flag}")
            del zero[section]
    ds.update(
        train_micro_batch_size_per_gpu=cfg.train.micro_batch_size,
        gradient_accumulation_steps=cfg.grad_accum(cfg.data_parallel_size(world_size)),
        train_batch_size=cfg.train.global_batch_size,
        gradient_clipping=cfg.train.grad_clip,
        # check_grad_overflow: ZeRO-1/2 skip a bf16 step with a non-finite grad norm, as they do in
        # fp16/fp32 and ZeRO-3 always does (training/guard.py: a non-finite step updates nothing).
        # a JSON's loss-scale details (loss_scale_window, hysteresis, ...) are kept; "enabled" is lmforge's
        bf16={**ds.get("bf16", {}), "enabled": precision == "bf16", "check_grad_overflow": True},
        fp16={"initial_scale_power": 16, **ds.get("fp16", {}), "enabled": precision == "fp16"},
        # lmforge passes a torch optimizer of its own choosing (never DeepSpeed's JIT FusedAdam).
        zero_allow_untested_optimizer=True,
        steps_per_print=10**9,
        wall_clock_breakdown=False,
    )
    if cfg.parallel.sequence > 1:
        ds["sequence_parallel_size"] = cfg.parallel.sequence
    if cfg.parallel.tensor > 1:
        ds["tensor_parallel"] = {"autotp_size": cfg.parallel.tensor}
    left = [k for k, v in _json_leaves(ds).items() if v == AUTO]
    if left:
        raise ConfigError(f"parallel.ds_config: {path} sets {', '.join(left)} to \"auto\", which lmforge does not fill; "
                          "give a value")
    return ds
