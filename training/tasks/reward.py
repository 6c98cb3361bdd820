"""Reward models: a causal LM with a one-output head (AutoModelForSequenceClassification, num_labels
1) trained with the Bradley–Terry loss -log sigmoid(r(chosen) - r(rejected)) on preference pairs
(TRL's RewardTrainer). The score is read at the last token of prompt + answer; the exported model
scores any text with plain transformers.

    lmforge train configs/reward.yaml --nproc 2
    lmforge export runs/reward --out /tmp/rm   # AutoModelForSequenceClassification.from_pretrained("/tmp/rm")
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .preference import PreferenceTask, Terms, reward_losses

if TYPE_CHECKING:
    import torch


class Reward(PreferenceTask):
    name = "reward"
    recipe = "configs/reward.yaml"
    causal = False
    auto_model = "AutoModelForSequenceClassification"
    peft_task_type = "SEQ_CLS"
    logps = False

    def head_labels(self) -> list[str]:
        return ["reward"]  # one output: the scalar reward

    def terms(self, logits: torch.Tensor, targets: dict) -> Terms:
        scores = logits.float().squeeze(-1)
        b = len(scores) // 2
        losses = reward_losses(scores[:b], scores[b:])
        c, r = scores[:b].detach(), scores[b:].detach()
        return Terms(losses.mean(), losses.detach(), c, r, c, r)


TASK = Reward()
