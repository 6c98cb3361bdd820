"""lmforge's preference losses equal TRL's own code on the same log-probabilities: DPO's sigmoid, ipo
and hinge against DPOTrainer._compute_loss, simpo against CPOTrainer (loss_type="simpo"), ORPO against
ORPOTrainer, the reward model's loss against RewardTrainer.compute_loss, and sequence_logps against
TRL's get_batch_logps; both the pure functions (training/tasks/preference.py) and the tasks' terms().

    nice -n 10 .venv/bin/python -m pytest -q tests/test_units_preference_losses.py --durations=0

TRL's real methods run on a trainer made without __init__ (cls.__new__: no model, dataset or
Accelerator to build), with the attributes each method reads set by hand and a one-process
accelerator (gather = identity). The model is a fake returning fixed random logits; for DPO it
returns what TRL's fused LM head (trl.trainer.utils.add_fused_lm_head) returns — per-token
log-probs of the next-token labels, zero where the label is -100 — computed with TRL's
selective_log_softmax. Tolerance: |ours - TRL's| <= 1e-6 + 1e-6 * |TRL's| (absolute 1e-6, relative
1e-6 for the large summed log-probs).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

# TRL once per module (its trainers import peft, bitsandbytes, datasets: seconds)
from trl.experimental.cpo.cpo_trainer import CPOTrainer
from trl.experimental.orpo.orpo_trainer import ORPOTrainer
from trl.trainer.dpo_trainer import DPOTrainer
from trl.trainer.reward_trainer import RewardTrainer
from trl.trainer.utils import FusedCausalLMOutput, selective_log_softmax

# every lmforge name this file uses (one place to follow a rename)
from lmforge.training.config import load_config
from lmforge.training.tasks import dpo, orpo, reward
from lmforge.training.tasks.common import IGNORE
from lmforge.training.tasks.preference import STATS, dpo_losses, orpo_terms, reward_losses, sequence_logps

DEBUG = Path(__file__).resolve().parents[1] / "configs" / "debug.yaml"
PAIRS, T, VOCAB = 4, 12, 16
SEEDS = (0, 1, 2)
DTYPES = (torch.float32, torch.float64)
BETAS = (0.1, 2.0)
ACCELERATOR = SimpleNamespace(device=torch.device("cpu"), gather=lambda x: x, gather_for_metrics=lambda x: x)


def close(ours, theirs, what: str) -> None:
    ours, theirs = torch.as_tensor(ours, dtype=torch.float64), torch.as_tensor(theirs, dtype=torch.float64)
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-6, msg=lambda m: f"{what}: {m}")


def trainer(cls, **attrs):
    """A TRL trainer without __init__: its real methods, reading only the attributes set here."""
    t = cls.__new__(cls)
    for k, v in {"accelerator": ACCELERATOR, "model": torch.nn.Linear(1, 1).train(), "_tp_size": 1,
                 "_total_train_tokens": 0, "_metrics": {"train": defaultdict(list), "eval": defaultdict(list)},
                 "aux_loss_enabled": False, "is_encoder_decoder": False, **attrs}.items():
        setattr(t, k, v)
    return t


def batch(seed: int, dtype: torch.dtype) -> SimpleNamespace:
    """PAIRS pairs as 2*PAIRS rows of T+1 tokens [chosen..., rejected...]: a prompt of 1-4 tokens, an answer
    of 1..rest, padding after; logits for every position, the labels = the answer tokens (TRL's unshifted
    convention: position t's logits predict token t+1). lmforge's view of the same batch is `ours`."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (2 * PAIRS, T + 1), generator=g)
    answer = torch.zeros(2 * PAIRS, T + 1, dtype=torch.bool)
    attention = torch.zeros(2 * PAIRS, T + 1, dtype=torch.long)
    for row in range(2 * PAIRS):
        p = int(torch.randint(1, 5, (), generator=g))
        a = int(torch.randint(1, T + 2 - p, (), generator=g))
        answer[row, p:p + a], attention[row, :p + a] = True, 1
    logits = (3 * torch.randn(2 * PAIRS, T + 1, VOCAB, generator=g, dtype=torch.float64)).to(dtype)
    ref_logits = (3 * torch.randn(2 * PAIRS, T + 1, VOCAB, generator=g, dtype=torch.float64)).to(dtype)
    labels = ids.masked_fill(~answer, IGNORE)
    # the reference model's summed log-probs (TRL's own function, as DPOTrainer's precompute_ref_log_probs)
    ref = ORPOTrainer.get_batch_logps(ref_logits, labels)
    return SimpleNamespace(ids=ids, answer=answer, attention=attention, logits=logits, labels=labels,
                           ref_chosen=ref[:PAIRS], ref_rejected=ref[PAIRS:],
                           # lmforge: inputs are tokens 0..T-1, targets (PairExamples.batch) pre-shifted
                           our_logits=logits[:, :T], our_labels=labels[:, 1:],
                           our_ref=torch.stack([ref[:PAIRS], ref[PAIRS:]], dim=1))


def rows(x: SimpleNamespace, pairs: list[int]) -> SimpleNamespace:
    """The same batch cut to some pairs (chosen rows, then their rejected rows)."""
    idx = torch.tensor(pairs + [PAIRS + j for j in pairs])
    out = SimpleNamespace(**{k: v[idx] for k, v in vars(x).items() if k not in ("ref_chosen", "ref_rejected", "our_ref")})
    out.ref_chosen, out.ref_rejected, out.our_ref = x.ref_chosen[pairs], x.ref_rejected[pairs], x.our_ref[pairs]
    return out


class FusedHeadModel:
    """What a model patched by TRL's add_fused_lm_head returns with fused_lm_head=True, for fixed logits."""

    def __init__(self, logits: torch.Tensor):
        self.logits = logits

    def __call__(self, input_ids, attention_mask=None, labels=None, fused_lm_head=False, use_cache=None):
        assert fused_lm_head and input_ids.shape == self.logits.shape[:2]
        logits, target = self.logits[:, :-1], labels[:, 1:]
        mask = target != -100
        logps = selective_log_softmax(logits, target.clamp(min=0)).masked_fill(~mask, 0)
        return FusedCausalLMOutput(
            log_probs=logps, entropy=torch.zeros_like(logps),
            mean_logits=logits.mean(-1).masked_fill(~mask, 0),
            is_top1=(logits.argmax(-1) == target) & mask, label_mask=mask)


def trl_dpo(loss: str, beta: float, x: SimpleNamespace) -> tuple[torch.Tensor, dict[str, float]]:
    """DPOTrainer._compute_loss on the batch (precomputed reference log-probs): (loss, logged metrics)."""
    t = trainer(DPOTrainer, beta=beta, loss_types=[loss], loss_weights=[1.0], f_divergence_type="reverse_kl",
                ld_alpha=None, precompute_ref_logps=True, use_weighting=False, label_smoothing=0.0)
    inputs = {"input_ids": x.ids, "attention_mask": x.attention, "completion_mask": x.answer.long(),
              "ref_chosen_logps": x.ref_chosen, "ref_rejected_logps": x.ref_rejected}
    value = DPOTrainer._compute_loss(t, FusedHeadModel(x.logits), inputs, return_outputs=False)
    return value, {k: v[-1] for k, v in t._metrics["train"].items()}


# --------------------------------------------------------------------------- log-probs

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seed", SEEDS)
def test_sequence_logps_equal_trl(seed, dtype):
    x = batch(seed, dtype)
    sums, counts = sequence_logps(x.our_logits, x.our_labels)
    close(sums, ORPOTrainer.get_batch_logps(x.logits, x.labels), "summed log-probs")
    close(sums / counts, ORPOTrainer.get_batch_logps(x.logits, x.labels, average_log_prob=True), "mean log-probs")
    assert counts.tolist() == x.answer.sum(1).tolist()
    # and TRL's per-token log-probs of the fused head (what DPOTrainer sums)
    close(sums, FusedHeadModel(x.logits)(x.ids, labels=x.labels, fused_lm_head=True).log_probs.sum(1),
          "summed fused-head log-probs")


# --------------------------------------------------------------------------- DPO: sigmoid, ipo, hinge

@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("loss", ["sigmoid", "ipo", "hinge"])
def test_dpo_losses_equal_trl(loss, dtype, beta):
    for seed in SEEDS:
        x = batch(seed, dtype)
        # the log-probs TRL's _compute_loss sums (the fused head's per-token values)
        logps = FusedHeadModel(x.logits)(x.ids, labels=x.labels, fused_lm_head=True).log_probs.sum(1)
        n = x.answer.sum(1)
        losses, chosen_reward, rejected_reward = dpo_losses(loss, beta, logps[:PAIRS], logps[PAIRS:], x.ref_chosen,
                                                            x.ref_rejected, n[:PAIRS], n[PAIRS:])
        assert losses.dtype == dtype
        value, metrics = trl_dpo(loss, beta, x)
        where = f"{loss} beta={beta} seed={seed} {dtype}"
        close(losses.mean(), value, f"{where}: loss")
        close(chosen_reward.mean(), metrics["rewards/chosen"], f"{where}: rewards/chosen")
        close(rejected_reward.mean(), metrics["rewards/rejected"], f"{where}: rewards/rejected")
        close((chosen_reward - rejected_reward).mean(), metrics["rewards/margins"], f"{where}: rewards/margins")
        close((chosen_reward > rejected_reward).double().mean(), metrics["rewards/accuracies"], f"{where}: accuracies")
        for j in range(PAIRS):  # each pair's loss alone (eval/loss averages per pair)
            close(losses[j], trl_dpo(loss, beta, rows(x, [j]))[0], f"{where}: pair {j}")


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("loss", ["sigmoid", "ipo", "hinge"])
def test_dpo_task_terms_equal_trl(monkeypatch, loss, beta):
    """dpo.TASK.terms on the logits and PairExamples-style targets == DPOTrainer._compute_loss."""
    monkeypatch.setattr(dpo.TASK, "settings", load_config(DEBUG, ["task=dpo", f"dpo.loss={loss}", f"dpo.beta={beta}"]))
    for seed in SEEDS:
        x = batch(seed, torch.float32)
        terms = dpo.TASK.terms(x.our_logits, {"labels": x.our_labels, "ref": x.our_ref})
        value, metrics = trl_dpo(loss, beta, x)
        where = f"{loss} beta={beta} seed={seed}"
        close(terms.loss, value, f"{where}: loss")
        close(terms.losses.mean(), value, f"{where}: per-pair losses")
        for ours, theirs in (("chosen_reward", "rewards/chosen"), ("rejected_reward", "rewards/rejected"),
                             ("reward_margin", "rewards/margins"), ("reward_accuracy", "rewards/accuracies"),
                             ("chosen_logp", "logps/chosen"), ("rejected_logp", "logps/rejected")):
            close(STATS[ours](terms).mean(), metrics[theirs], f"{where}: {ours} vs TRL's {theirs}")


# --------------------------------------------------------------------------- SimPO (TRL's CPOTrainer)

def cpo_trainer(beta: float, gamma: float):
    return trainer(CPOTrainer, loss_type="simpo", beta=beta, simpo_gamma=gamma, label_smoothing=0.0, alpha=0.0,
                   cpo_alpha=0.0, pad_token_id=0)


def pair_batch(x: SimpleNamespace, attention: torch.Tensor) -> dict:
    """TRL's tokenized pair batch (CPO/ORPO): chosen_* and rejected_* of equal length."""
    return {f"{side}_{k}": v[sl] for side, sl in (("chosen", slice(0, PAIRS)), ("rejected", slice(PAIRS, None)))
            for k, v in (("input_ids", x.ids), ("attention_mask", attention), ("labels", x.labels))}


def logits_model(logits):
    return lambda input_ids, attention_mask=None, use_cache=None: SimpleNamespace(logits=logits)


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_simpo_equals_trl(dtype, beta):
    for seed in SEEDS:
        x = batch(seed, dtype)
        gamma = 0.5 + seed  # 0.5 (the default), 1.5, 2.5
        t = cpo_trainer(beta, gamma)
        mean = ORPOTrainer.get_batch_logps(x.logits, x.labels, average_log_prob=True)  # TRL passes means to simpo
        trl_losses, trl_chosen, trl_rejected = CPOTrainer.cpo_loss(t, mean[:PAIRS], mean[PAIRS:])
        sums, n = ORPOTrainer.get_batch_logps(x.logits, x.labels), x.answer.sum(1)
        losses, chosen, rejected = dpo_losses("simpo", beta, sums[:PAIRS], sums[PAIRS:], None, None,
                                              n[:PAIRS], n[PAIRS:], simpo_gamma=gamma)
        where = f"simpo beta={beta} gamma={gamma} seed={seed} {dtype}"
        close(losses, trl_losses, f"{where}: losses")
        close(chosen, trl_chosen, f"{where}: chosen rewards")
        close(rejected, trl_rejected, f"{where}: rejected rewards")


@pytest.mark.parametrize("beta", BETAS)
def test_simpo_task_terms_equal_trl(monkeypatch, beta):
    """dpo.TASK.terms with dpo.loss=simpo == CPOTrainer.get_batch_loss_metrics (its forward, cpo_alpha 0)."""
    cfg = load_config(DEBUG, ["task=dpo", "dpo.loss=simpo", f"dpo.beta={beta}", "dpo.simpo_gamma=0.7"])
    monkeypatch.setattr(dpo.TASK, "settings", cfg)
    for seed in SEEDS:
        x = batch(seed, torch.float32)
        terms = dpo.TASK.terms(x.our_logits, {"labels": x.our_labels, "ref": None})
        value, metrics = CPOTrainer.get_batch_loss_metrics(cpo_trainer(beta, 0.7), logits_model(x.logits),
                                                           pair_batch(x, x.attention))
        where = f"simpo beta={beta} seed={seed}"
        close(terms.loss, value, f"{where}: loss")
        close(terms.chosen_reward.mean(), metrics["rewards/chosen"], f"{where}: rewards/chosen")
        close(terms.rejected_reward.mean(), metrics["rewards/rejected"], f"{where}: rewards/rejected")
        close(terms.chosen_score.mean(), metrics["logps/chosen"], f"{where}: score vs TRL's mean logps/chosen")
        close(STATS["reward_accuracy"](terms).mean(), metrics["rewards/accuracies"], f"{where}: accuracies")


# --------------------------------------------------------------------------- ORPO

@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_orpo_terms_equal_trl(dtype, beta):
    t = trainer(ORPOTrainer, beta=beta)
    for seed in SEEDS:
        x = batch(seed, dtype)
        mean = ORPOTrainer.get_batch_logps(x.logits, x.labels, average_log_prob=True)
        # and log-probs near 0 (where log(1 - p) needs log1mexp's other branch)
        for c, r in ((mean[:PAIRS], mean[PAIRS:]), (mean[:PAIRS] / 50, mean[PAIRS:] / 7)):
            odds, chosen, rejected, log_odds = orpo_terms(beta, c, r)
            trl_losses, trl_chosen, trl_rejected, trl_ratio, trl_log_odds = ORPOTrainer.odds_ratio_loss(t, c, r)
            where = f"orpo beta={beta} seed={seed} {dtype}"
            close(odds, trl_losses, f"{where}: beta * log sigmoid(log odds)")
            close(chosen, trl_chosen, f"{where}: chosen rewards")
            close(rejected, trl_rejected, f"{where}: rejected rewards")
            close(log_odds.mean(), trl_log_odds, f"{where}: mean log odds")
            close(odds.mean() / beta, trl_ratio, f"{where}: mean log sigmoid(log odds)")


@pytest.mark.parametrize("beta", BETAS)
def test_orpo_task_terms_equal_trl(monkeypatch, beta):
    """orpo.TASK.terms == ORPOTrainer.get_batch_loss_metrics (NLL(chosen) - mean odds terms) when TRL's NLL
    covers the same tokens: TRL's counts every attended chosen token, the prompt's too (its
    concatenated_forward: labels = input_ids where attention_mask), lmforge's the answer tokens only, so
    TRL gets the answers' attention mask here."""
    monkeypatch.setattr(orpo.TASK, "settings", load_config(DEBUG, ["task=orpo", f"orpo.beta={beta}"]))
    for seed in SEEDS:
        x = batch(seed, torch.float32)
        terms = orpo.TASK.terms(x.our_logits, {"labels": x.our_labels, "ref": None})
        t = trainer(ORPOTrainer, beta=beta, padding_value=0)
        value, metrics = ORPOTrainer.get_batch_loss_metrics(t, logits_model(x.logits), pair_batch(x, x.answer.long()))
        where = f"orpo beta={beta} seed={seed}"
        close(terms.loss, value, f"{where}: loss")
        close(terms.chosen_reward.mean(), metrics["rewards/chosen"], f"{where}: rewards/chosen")
        close(terms.rejected_reward.mean(), metrics["rewards/rejected"], f"{where}: rewards/rejected")
        close(STATS["reward_accuracy"](terms).mean(), metrics["rewards/accuracies"], f"{where}: accuracies")
        close(terms.chosen_score.mean(), metrics["logps/chosen"], f"{where}: score vs TRL's mean logps/chosen")
        close(terms.rejected_score.mean(), metrics["logps/rejected"], f"{where}: score vs TRL's mean logps/rejected")
        nll = -terms.chosen_logp.sum() / x.answer[:PAIRS].sum()
        close(nll, metrics["nll_loss"], f"{where}: NLL of the chosen answers")


# --------------------------------------------------------------------------- reward model

@pytest.mark.parametrize("dtype", DTYPES)
def test_reward_loss_equals_trl(dtype):
    for seed in SEEDS:
        g = torch.Generator().manual_seed(seed)
        scores = (4 * torch.randn(2 * PAIRS, 1, generator=g, dtype=torch.float64)).to(dtype)
        x = batch(seed, dtype)
        t = trainer(RewardTrainer, args=SimpleNamespace(center_rewards_coefficient=None))
        inputs = {"input_ids": x.ids, "attention_mask": x.attention}
        value = RewardTrainer.compute_loss(t, lambda **kw: SimpleNamespace(logits=scores), inputs)
        metrics = {k: v[-1] for k, v in t._metrics["train"].items()}
        where = f"reward seed={seed} {dtype}"
        close(reward_losses(scores[:PAIRS, 0], scores[PAIRS:, 0]).mean(), value, f"{where}: loss")
        if dtype == torch.float32:  # the task (model logits in the training precision)
            terms = reward.TASK.terms(scores, {"labels": None, "ref": None})
            close(terms.loss, value, f"{where}: task loss")
            close(STATS["accuracy"](terms).mean(), metrics["accuracy"], f"{where}: accuracy")
            close(STATS["reward_margin"](terms).mean(), metrics["margin"], f"{where}: margin")
