"""Sequence-parallel chunking and loss weighting, in process: RankGroups.chunk cuts a batch into chunks
that concatenate back to it with their global position ids, and on 2 in-process gloo ranks
(tests/harness.py) the token-weighted eval loss, the logged train loss and, with parallel.loss_scale,
the gradients of 2 SP ranks equal those of 1 rank on the whole batch. DeepSpeed's gradient averaging
is modelled here as loss_scale's docstring states it (over all ranks on ZeRO-3's reduce-scatter path,
over data-parallel ranks otherwise); tests/test_parallel.py checks the real engines (Ulysses SP and
AutoTP against their data-parallel twins) end to end."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import DEBUG
from harness import run_ranks
# every lmforge name this file uses (one place to follow a rename)
from lmforge.training.config import build_ds_config, load_config
from lmforge.training.data import PackedTokens, eval_indices
from lmforge.training.parallel import RankGroups, loss_scale
from lmforge.training.evaluate import evaluate, model_inputs, token_loss

VOCAB, SEQ, MICRO = 50, 16, 3
ZERO = {"zero2": (2, {}), "zero3": (3, {}), "zero3-allreduce": (3, {"reduce_scatter": False})}


def test_chunks_concatenate_back_to_the_batch_with_global_positions():
    inputs, targets = torch.arange(2 * 12).reshape(2, 12), torch.arange(2 * 12).reshape(2, 12) + 100
    assert RankGroups(0, 2).chunk(inputs, targets) == (inputs, targets, None)  # no SP: the batch itself
    for sp in (2, 3, 4):
        parts = [RankGroups(r, sp, sequence=sp).chunk(inputs, targets) for r in range(sp)]
        assert all(p[0].shape == (2, 12 // sp) for p in parts)
        for k, whole in enumerate((inputs, targets, torch.arange(12).expand(2, 12))):
            assert torch.equal(torch.cat([p[k] for p in parts], dim=1), whole)


def test_layout_groups_consecutive_ranks():
    # 4 ranks, SP 2: ranks 0,1 and 2,3 are SP peers reading the same sequences (data-parallel rank 0 and 1)
    assert [(RankGroups(r, 4, sequence=2).dp_rank, RankGroups(r, 4, sequence=2).sp_rank) for r in range(4)] == [
        (0, 0), (0, 1), (1, 0), (1, 1)]
    assert RankGroups(3, 4, sequence=2).dp_size == 2 and RankGroups(1, 2, tensor=2).dp_rank == 0
    assert RankGroups(1, 2, tensor=2).dp_size == 1 and RankGroups(1, 2, tensor=2).group == 2


class CausalLM(torch.nn.Module):
    """Per-token logits from the token and its position id: wrong (chunk-local) positions change them."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.pos, self.head = torch.nn.Embedding(VOCAB, 8), torch.nn.Embedding(SEQ, 8), torch.nn.Linear(8, VOCAB)

    def forward(self, input_ids, position_ids=None):
        if position_ids is None:
            position_ids = torch.arange(input_ids.size(1)).expand_as(input_ids)
        return SimpleNamespace(logits=self.head(torch.tanh(self.emb(input_ids) + self.pos(position_ids))))


class Engine:
    """What evaluate() uses of a DeepSpeed engine."""

    def __init__(self, module):
        self.module = module

    def __call__(self, **kwargs):
        return self.module(**kwargs)

    def eval(self):
        self.module.eval()

    def train(self, mode=True):
        self.module.train(mode)


def deepspeed_average(grad: torch.Tensor, zero: dict, layout: RankGroups) -> torch.Tensor:
    """DeepSpeed's gradient average as parallel.loss_scale describes it."""
    torch.distributed.all_reduce(grad)
    all_ranks = zero["stage"] == 3 and zero.get("reduce_scatter", True)
    return grad / (layout.world if all_ranks else layout.dp_size)


def sequence_parallel_step(tokens: str) -> dict:
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    layout = RankGroups(rank, world, sequence=world)  # every rank an SP peer (world 1: the whole batch)
    data = PackedTokens(tokens, SEQ)
    batches = eval_indices(len(data), 2, MICRO, layout.dp_rank, layout.dp_size)
    model = CausalLM()
    out = {"eval": evaluate(Engine(model), data, batches, torch.device("cpu"), layout)["eval/loss"]}
    for name, (stage, extra) in ZERO.items():
        cfg = load_config(DEBUG, [f"parallel.zero_stage={stage}", f"parallel.sequence={world}",
                                  f"train.micro_batch_size={MICRO}", f"train.global_batch_size={MICRO}"])
        ds_config = build_ds_config(cfg, world, "fp32")
        ds_config["zero_optimization"].update(extra)
        scale = loss_scale(ds_config, layout.sequence)
        model.zero_grad()
        kwargs, targets = model_inputs(*data.batch(batches[0]), torch.device("cpu"), layout)
        loss = token_loss(model(**kwargs).logits, targets)
        (loss * scale).backward()
        logged = loss.detach().double()
        torch.distributed.all_reduce(logged)  # train_step's logged loss: the mean over ranks
        out[name] = {"scale": scale, "loss": logged.item() / world,
                     "grads": {n: deepspeed_average(p.grad.clone(), ds_config["zero_optimization"], layout)
                               for n, p in model.named_parameters()}}
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    path = tmp_path_factory.mktemp("tokens") / "tokens.npy"
    np.save(path, np.random.default_rng(0).integers(0, VOCAB, size=SEQ * 40 + 1).astype(np.uint16))
    return run_ranks(sequence_parallel_step, 1, str(path))[0], run_ranks(sequence_parallel_step, 2, str(path))


def test_sp_eval_loss_is_the_token_weighted_one_rank_loss(runs):
    one, (r0, r1) = runs
    assert r0["eval"] == r1["eval"] == pytest.approx(one["eval"], rel=1e-6)


@pytest.mark.parametrize("zero", ZERO)
def test_sp_loss_and_scaled_gradients_equal_one_rank(zero, runs):
    one, (r0, r1) = runs
    assert one[zero]["scale"] == 1.0
    assert r0[zero]["scale"] == r1[zero]["scale"] == (1.0 if zero == "zero3" else 0.5)
    assert r0[zero]["loss"] == r1[zero]["loss"] == pytest.approx(one[zero]["loss"], rel=1e-6)
    for name, grad in one[zero]["grads"].items():
        assert grad.abs().sum() > 0
        for r in (r0, r1):
            torch.testing.assert_close(r[zero]["grads"][name], grad, rtol=1e-5, atol=1e-7)
