"""Held-out evaluation: mean token loss and perplexity over fixed held-out batches.

    lmforge train configs/debug.yaml eval.interval=10 eval.batches=4

Every rank evaluates its own disjoint micro batches (under ZeRO-3 all ranks must run the forward
pass anyway, to gather parameters); the summed loss and token count are all-reduced.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def token_loss(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1), reduction=reduction)


def model_inputs(inputs: torch.Tensor, targets: torch.Tensor, device, groups=None) -> tuple[dict, torch.Tensor]:
    """A micro batch of packed tokens as model keyword arguments and targets on the device: this
    rank's sequence-parallel chunk and its global position ids (`groups`: parallel.RankGroups). (The pretrain
    task's model_inputs; record tasks batch their own, training/tasks/common.py.)"""
    positions = None
    if groups is not None:
        inputs, targets, positions = groups.chunk(inputs, targets)
    return ({"input_ids": inputs.to(device), "position_ids": positions.to(device) if positions is not None else None},
            targets.to(device))


@torch.no_grad()
def evaluate(engine, data, batches: list[list[int]], device: torch.device, groups=None) -> dict[str, float]:
    """`groups` (parallel.RankGroups): sequence-parallel peers evaluate their chunk of the same sequences
    and tensor-parallel peers the same batch; the token-weighted sums give the global mean either way."""
    was_training = engine.module.training
    engine.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for indices in batches:
        kwargs, targets = model_inputs(*data.batch(indices), device, groups)
        logits = engine(**kwargs).logits
        total[0] += token_loss(logits, targets, reduction="sum").double()
        total[1] += targets.numel()
    torch.distributed.all_reduce(total)
    engine.train(was_training)
    loss = (total[0] / total[1]).item()
    return {"eval/loss": loss, "eval/ppl": math.exp(min(loss, 50.0))}
