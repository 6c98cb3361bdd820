"""Reward models: a causal LM with a one-output head (AutoModelForSequenceClassification, num_labels
1) trained with the Bradley–Terry loss -log sigmoid(r(chosen) - r(rejected)) on preference pairs
(TRL's RewardTrainer). A row is the whole conversation as the chat template renders it, and the
score is read at its last token that is not the pad id (pad == EOS in most tokenizers, so before a
final EOS): where plain transformers reads it from the exported model and tokenizer (which carries
the run's template), and where TRL's RewardTrainer trains it.

    lmforge train configs/reward.yaml --nproc 2
    lmforge export runs/reward --out /tmp/rm
    # tok = AutoTokenizer.from_pretrained("/tmp/rm"); rm = AutoModelForSequenceClassification.from_pretrained("/tmp/rm")
    # text = tok.apply_chat_template(conversation, tokenize=False)   # the template writes any BOS itself
    # rm(**tok(text, return_tensors="pt", add_special_tokens=False)).logits[0, 0]
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
