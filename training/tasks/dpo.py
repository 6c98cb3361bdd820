"""Direct preference optimisation on (prompt, chosen, rejected) pairs: dpo.loss sigmoid (DPO), ipo,
hinge against a reference model, or simpo without one. The reference is the starting model: its
log-probs of every pair computed once and cached with the data (dpo.reference=cached), or, with
LoRA, the model with its adapters disabled each step (dpo.reference=base).

    lmforge train configs/demo.yaml --nproc 2 && lmforge train configs/sft_pref.yaml --nproc 2   # the SFT model
    lmforge train configs/dpo.yaml --nproc 2
    lmforge train configs/dpo.yaml --nproc 2 dpo.loss=simpo dpo.beta=2.0
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..config import Config
from .common import TaskData
from .preference import PreferenceTask, Terms, cached_reference, dpo_losses, sequence_logps

if TYPE_CHECKING:
    import torch


class Dpo(PreferenceTask):
    name = "dpo"
    recipe = "configs/dpo.yaml"

    def __init__(self):
        super().__init__()
        self._base = None  # dpo.reference=base: the peft model, whose disabled adapters give the reference

    def validate(self, cfg: Config) -> None:
        super().validate(cfg)
        if cfg.dpo.reference == "base":
            if cfg.dpo.loss == "simpo":
                raise ValueError("dpo.reference=base: dpo.loss=simpo uses no reference model; leave dpo.reference "
                                 "at cached")
            if cfg.finetune.method == "full":
                raise ValueError("dpo.reference=base is the model with its adapters disabled: it needs "
                                 "finetune.method lora, qlora or adalora (with full fine-tuning use dpo.reference=cached)")

    def prepare_run(self, engine, data: TaskData, cfg: Config, groups, device, log) -> None:
        super().prepare_run(engine, data, cfg, groups, device, log)
        self._base = None
        if cfg.dpo.loss == "simpo":
            log.info(f"dpo: loss simpo (beta {cfg.dpo.beta:g}, gamma {cfg.dpo.simpo_gamma:g}), no reference model")
        elif cfg.dpo.reference == "base":
            self._base = engine.module
            log.info(f"dpo: loss {cfg.dpo.loss} (beta {cfg.dpo.beta:g}); reference: the base model (adapters disabled)")
        else:
            log.info(f"dpo: loss {cfg.dpo.loss} (beta {cfg.dpo.beta:g}); reference: the starting model's cached log-probs")
            cached_reference(self, engine, data, cfg, groups, device, log)

    def model_inputs(self, inputs: dict, targets: dict, device, groups=None) -> tuple[dict, dict]:
        import torch

        kwargs, targets = super().model_inputs(inputs, targets, device, groups)
        if self._base is not None:
            with torch.no_grad(), self._base.disable_adapter():
                logps, _ = sequence_logps(self._base(**kwargs).logits, targets["labels"])
            b = len(logps) // 2
            targets["ref"] = torch.stack([logps[:b], logps[b:]], dim=1)
        return kwargs, targets

    def terms(self, logits: torch.Tensor, targets: dict) -> Terms:
        cfg = self.settings.dpo
        logps, n = sequence_logps(logits, targets["labels"])
        b = len(logps) // 2
        ref = targets["ref"]
        ref_c, ref_r = (ref[:, 0], ref[:, 1]) if ref is not None else (None, None)
        losses, chosen_reward, rejected_reward = dpo_losses(cfg.loss, cfg.beta, logps[:b], logps[b:], ref_c, ref_r,
                                                            n[:b], n[b:], cfg.simpo_gamma)
        # what the model itself prefers: its log-prob of each answer (simpo: per token, as its loss)
        score = logps / n.clamp(min=1) if cfg.loss == "simpo" else logps
        return Terms(losses.mean(), losses.detach(), chosen_reward, rejected_reward, score[:b].detach(),
                     score[b:].detach(), logps[:b], logps[b:])


TASK = Dpo()
