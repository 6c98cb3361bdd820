"""Model parallelism, in one place: how ranks form data-, sequence- (Ulysses) and tensor-parallel
(AutoTP) groups, what each rank feeds the model, how its loss is scaled, and what DeepSpeed is
given to build the groups. Nothing else in lmforge knows how SP or TP is wired.

    lmforge train configs/debug.yaml --nproc 2 parallel.sequence=2    # Ulysses SP
    lmforge train configs/debug.yaml --nproc 2 parallel.tensor=2      # AutoTP

Consecutive ranks form the SP or TP groups, as DeepSpeed builds them; the group index is the
data-parallel rank. Ranks of one group read the same sequences.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import Config, ConfigError


@dataclass(frozen=True)
class RankGroups:
    """Where a rank sits among data-, sequence- and tensor-parallel peers."""
    rank: int
    world: int
    sequence: int = 1
    tensor: int = 1

    @classmethod
    def of(cls, cfg: Config, rank: int, world: int) -> "RankGroups":
        return cls(rank, world, cfg.parallel.sequence, cfg.parallel.tensor)

    @property
    def group(self) -> int:
        return self.sequence * self.tensor

    @property
    def dp_rank(self) -> int:
        return self.rank // self.group

    @property
    def dp_size(self) -> int:
        return self.world // self.group

    @property
    def sp_rank(self) -> int:
        return self.rank % self.sequence

    def chunk(self, inputs: torch.Tensor, targets: torch.Tensor):
        """This rank's part of a batch and its position ids. Under Ulysses SP every peer keeps chunk
        `sp_rank` of the sequence dimension with its GLOBAL position ids (without them the model
        would silently use 0..L/sp-1 for RoPE on every chunk); the targets are already shifted, so
        a chunk's loss needs nothing from its neighbours. Without SP: the batch, positions None."""
        if self.sequence == 1:
            return inputs, targets, None
        length = inputs.size(1)
        positions = torch.arange(length).expand(inputs.size(0), length)
        part = slice(self.sp_rank * length // self.sequence, (self.sp_rank + 1) * length // self.sequence)
        return inputs[:, part], targets[:, part], positions[:, part]

    def describe(self) -> str:
        if self.group == 1:
            return ""
        return (f" = {self.dp_size} data-parallel x {self.sequence} sequence-parallel x {self.tensor} "
                f"tensor-parallel")


def check_model(cfg: Config, conf) -> None:
    """Preflight: Ulysses splits attention heads over the SP ranks."""
    sp = cfg.parallel.sequence
    heads, kv_heads = getattr(conf, "num_attention_heads", None), getattr(conf, "num_key_value_heads", None)
    if sp > 1 and heads is not None and (heads % sp or (kv_heads and kv_heads % sp and sp % kv_heads)):
        raise ConfigError(f"parallel.sequence={sp} must divide the model's attention heads ({heads}) and its "
                          f"key/value heads ({kv_heads}) divide or be divided by it (Ulysses splits heads)")


def loss_scale(ds_config: dict, sequence: int) -> float:
    """Factor on each rank's chunk-mean loss so that sequence-parallel gradients equal the
    data-parallel ones. DeepSpeed averages gradients over all ranks on ZeRO-3's reduce-scatter path
    but over data-parallel ranks only on the others (ZeRO-1/2, ZeRO-3 without reduce_scatter), where
    each SP peer's chunk mean must count 1/sp (measured against the DP twin's grad norms)."""
    zero = ds_config["zero_optimization"]
    if sequence == 1 or (zero["stage"] == 3 and zero.get("reduce_scatter", True)):
        return 1.0
    return 1.0 / sequence


def zero_init_config(ds_config: dict) -> dict:
    """The DeepSpeed config that ZeRO-3's construction (zero.Init, through transformers'
    HfDeepSpeedConfig) reads. It parses it without the tensor-parallel groups and would count TP
    peers as data-parallel ranks in its batch-size check; the batch keys do not matter to it."""
    if "tensor_parallel" in ds_config:
        return {k: v for k, v in ds_config.items() if k != "train_batch_size"}
    return ds_config


def mpu(cfg: Config, model: torch.nn.Module, attention: str):
    """What deepspeed.initialize needs to build the groups (None: data parallel only). Ulysses SP
    patches transformers' attention through DeepSpeed's HF integration so each rank's chunk attends
    over the whole sequence (all-to-all over heads); AutoTP comes from the DeepSpeed config key, with
    DeepSpeed's TP mesh as the mpu so its batch-size check counts data-parallel ranks, not TP peers."""
    if cfg.parallel.sequence > 1:
        from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF

        return UlyssesSPAttentionHF.register_with_transformers(
            model_name_or_path=model, core_attn_implementation=attention,
            sequence_parallel_size=cfg.parallel.sequence, micro_batch_size=cfg.train.micro_batch_size,
            seq_length=cfg.data.seq_len, seq_length_is_variable=False)
    if cfg.parallel.tensor > 1:
        from deepspeed.utils import groups

        groups._init_tp_mesh_device(tensor_model_parallel_size=cfg.parallel.tensor)
        return groups
    return None
