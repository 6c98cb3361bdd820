"""ORPO: odds-ratio preference optimisation, reference-free: the NLL of the chosen answers (SFT)
minus orpo.beta times the mean log-sigmoid of the log odds ratio chosen vs rejected (TRL's ORPO,
mean log-probs per answer token).

    lmforge train configs/sft_pref.yaml --nproc 2      # after configs/demo.yaml; or start from any causal LM
    lmforge train configs/orpo.yaml --nproc 2
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .preference import PreferenceTask, Terms, orpo_terms, sequence_logps

if TYPE_CHECKING:
    import torch


class Orpo(PreferenceTask):
    name = "orpo"
    recipe = "configs/orpo.yaml"

    def terms(self, logits: torch.Tensor, targets: dict) -> Terms:
        logps, n = sequence_logps(logits, targets["labels"])
        b = len(logps) // 2
        mean = logps / n.clamp(min=1)
        odds, chosen_reward, rejected_reward, _ = orpo_terms(self.settings.orpo.beta, mean[:b], mean[b:])
        # cross entropy over every chosen ANSWER token: TRL's ORPOTrainer also counts the prompt's tokens;
        # lmforge trains on answers only, as its SFT does (the odds terms are TRL's exactly)
        nll = -logps[:b].sum() / n[:b].sum().clamp(min=1)
        return Terms(nll - odds.mean(), (-mean[:b] - odds).detach(), chosen_reward, rejected_reward,
                     mean[:b].detach(), mean[b:].detach(), logps[:b], logps[b:])


TASK = Orpo()
