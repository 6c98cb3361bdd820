"""Knowledge distillation: train a student against a frozen teacher's next-token distributions, the
healing step after structured pruning (Minitron). Set `distill.teacher` in any pretrain/sft run:

    lmforge prune exports/debug --out exports/debug-pruned --mlp 0.5
    lmforge train configs/heal.yaml --nproc 2 model.init_from=exports/debug-pruned distill.teacher=exports/debug

The loss on each micro batch is (1 - alpha) * CE + alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T))
over the same target positions (-100 targets count in neither). The T^2 keeps the KL term's gradients
on the scale of the cross entropy's as T changes (Hinton et al. 2015).

Imports nothing of lmforge's but config (preflight runs it in the launcher, which never imports DeepSpeed).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
import torch.nn.functional as F

from .config import ConfigError, DistillConfig

IGNORE = -100


def teacher_dir(cfg: DistillConfig) -> Path:
    p = Path(cfg.teacher).expanduser()
    if not (p / "config.json").is_file():
        raise ConfigError(f"distill.teacher: {p} is not a Hugging Face model directory (no config.json); "
                          "`lmforge export RUN --out DIR` makes one from an lmforge run")
    return p


def check_teacher(cfg: DistillConfig, student_conf, student_tokenizer) -> None:
    """Preflight: the teacher is a causal LM whose logits index the same vocabulary as the student's
    (same vocab_size, same token → id map), or the KL between them would compare unrelated tokens."""
    from transformers import AutoConfig, AutoTokenizer
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    path = teacher_dir(cfg)
    conf = AutoConfig.from_pretrained(str(path), local_files_only=True)
    archs = getattr(conf, "architectures", None) or []
    if conf.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or (
            archs and not any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs)):
        raise ConfigError(f"distill.teacher: {path} is not a causal language model ({', '.join(archs) or conf.model_type})")
    if conf.vocab_size != student_conf.vocab_size:
        raise ConfigError(f"distill.teacher: {path} has vocab_size {conf.vocab_size}, the student "
                          f"{student_conf.vocab_size}: their logits must index the same vocabulary")
    try:
        teacher_vocab = AutoTokenizer.from_pretrained(str(path), local_files_only=True).get_vocab()
    except (OSError, ValueError) as e:
        raise ConfigError(f"distill.teacher: {path} has no loadable tokenizer ({e})") from None
    if teacher_vocab != student_tokenizer.get_vocab():
        differ = len(set(teacher_vocab.items()) ^ set(student_tokenizer.get_vocab().items()))
        raise ConfigError(f"distill.teacher: {path}'s tokenizer differs from the student's ({differ} token/id pairs "
                          "differ): distillation needs the student's own tokenizer (the model it was pruned from)")


@contextlib.contextmanager
def _without_zero3():
    """transformers builds every model under deepspeed.zero.Init while an HfDeepSpeedConfig of stage 3
    is alive (model.build keeps one for the student); the teacher must stay a plain, whole module."""
    from transformers.integrations import deepspeed as hf_ds

    saved = hf_ds._hf_deepspeed_config_weak_ref
    hf_ds._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_ds._hf_deepspeed_config_weak_ref = saved


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor,
            temperature: float) -> torch.Tensor:
    """T^2 * KL(p_teacher || p_student), averaged over the positions whose target is not -100."""
    keep = targets != IGNORE
    s = F.log_softmax(student_logits[keep].float() / temperature, dim=-1)
    t = F.log_softmax(teacher_logits[keep].float() / temperature, dim=-1)
    kl = F.kl_div(s, t, log_target=True, reduction="sum") / keep.sum().clamp(min=1)
    return kl * temperature ** 2


class Distiller:
    """The teacher and the blended loss. One full copy of the teacher per rank, in eval mode, without
    gradients, in the training dtype on the rank's device, and not wrapped by DeepSpeed (so ZeRO never
    partitions it): fine for the sizes we heal (a pruned model and its source, both fitting a device
    beside the student's partition). A teacher too large for that would need DeepSpeed inference
    sharding (deepspeed.init_inference), which this does not do."""

    def __init__(self, cfg: DistillConfig, device: torch.device, dtype: torch.dtype, attention: str):
        from transformers import AutoModelForCausalLM

        self.alpha, self.temperature = cfg.alpha, cfg.temperature
        with _without_zero3():
            teacher = AutoModelForCausalLM.from_pretrained(str(teacher_dir(cfg)), dtype=dtype, local_files_only=True,
                                                           attn_implementation=attention)
        teacher.config.use_cache = False
        self.teacher = teacher.to(device).eval().requires_grad_(False)
        self.path = teacher_dir(cfg)
        self._kd = torch.zeros(2, dtype=torch.float64, device=device)  # summed KL term, micro batches

    def blend(self, ce: torch.Tensor, student_logits: torch.Tensor, targets: torch.Tensor, model_inputs: dict) -> torch.Tensor:
        """The loss to back-propagate: the teacher sees the same micro batch (same kwargs: position
        ids of packed SFT rows, attention masks)."""
        with torch.no_grad():
            teacher_logits = self.teacher(**model_inputs).logits
        kd = kd_loss(student_logits, teacher_logits, targets, self.temperature)
        self._kd += torch.stack([kd.detach().double(), torch.ones((), dtype=torch.float64, device=kd.device)])
        return (1 - self.alpha) * ce + self.alpha * kd

    def pop_mean(self) -> float:
        """The KL term averaged over every rank's micro batches since the last call (a collective:
        every rank calls it once per step)."""
        total = self._kd.clone()
        torch.distributed.all_reduce(total)
        self._kd.zero_()
        return (total[0] / total[1].clamp(min=1)).item()
