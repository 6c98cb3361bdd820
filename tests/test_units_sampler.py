"""The sampler's saved position on 2 in-process gloo ranks (tests/harness.py): the state rank 0 writes
into client.json resumes every rank's exact sequence of micro batches, across epoch boundaries; the
ranks' samples are disjoint and an epoch covers the data once. End to end (bitwise losses after a
SIGKILL and resume) in tests/test_train.py."""

from __future__ import annotations

import json

import torch

from harness import run_ranks
# every lmforge name this file uses (one place to follow a rename)
from lmforge.training.data import ShardedSampler

N, SEED, MICRO, ACCUM = 50, 7, 3, 2   # global batch 3 x 2 ranks x 2 = 12: an epoch ends mid-step
BEFORE, AFTER = 5, 9                  # steps before the save, steps after it (3 epochs in all)


def save_and_resume() -> dict:
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    sampler = ShardedSampler(N, SEED, rank, world, MICRO, ACCUM)
    head = [sampler.next_step() for _ in range(BEFORE)]
    # what checkpoint.save puts in client.json: rank 0's state, written once, read by every rank
    state = [json.loads(json.dumps(sampler.state_dict()))]
    torch.distributed.broadcast_object_list(state, src=0)
    tail = [sampler.next_step() for _ in range(AFTER)]
    resumed = ShardedSampler(N, SEED, rank, world, MICRO, ACCUM)
    resumed.load_state_dict(state[0])
    return {"own_state": sampler.state_dict(), "state": state[0], "head": head, "tail": tail,
            "resumed": [resumed.next_step() for _ in range(AFTER)]}


def test_saved_position_resumes_every_ranks_exact_sequence():
    r0, r1 = run_ranks(save_and_resume, 2)
    for r in (r0, r1):
        assert r["resumed"] == r["tail"]
        assert len(r["tail"]) == AFTER and all(len(step) == ACCUM and all(len(mb) == MICRO for mb in step)
                                               for step in r["tail"])
    assert r0["state"] == {"consumed": BEFORE * MICRO * ACCUM * 2, "seed": SEED, "n": N}
    assert r0["own_state"] == r1["own_state"]  # the position is global: any rank's state is the same
    # the ranks' micro batches interleave into one global order in which each epoch covers the data once
    flat = []
    for s0, s1 in zip(r0["head"] + r0["tail"], r1["head"] + r1["tail"]):
        for m in range(ACCUM):  # the global order: rank 0's micro batch, then rank 1's, per accumulation step
            flat += s0[m] + s1[m]
    for epoch in range(len(flat) // N):
        assert sorted(flat[epoch * N:(epoch + 1) * N]) == list(range(N))
    assert flat[:N] != flat[N:2 * N]  # every epoch has its own order
