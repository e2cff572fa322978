"""Seeded blocks of torch's global RNG stay reproducible when two threads run them at once (no Ray)."""

from __future__ import annotations

import threading

import torch

from dp4tl_ray.global_rng import seeded


def _draws(seed: int, rounds: int) -> list[list[float]]:
    out = []
    for _ in range(rounds):
        with seeded(seed):
            block = []
            for _ in range(20):  # many small draws: an unguarded block would interleave with the other thread's
                block.append(float(torch.rand(1)))
            out.append(block)
    return out


def test_concurrent_seeded_blocks_draw_what_they_draw_alone():
    alone = {s: _draws(s, 1)[0] for s in (1, 2)}
    results: dict[int, list[list[float]]] = {}
    threads = [threading.Thread(target=lambda s=s: results.__setitem__(s, _draws(s, 200))) for s in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(block == alone[s] for s in (1, 2) for block in results[s])


def test_a_seeded_block_leaves_the_callers_stream_untouched():
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    with seeded(0):
        torch.rand(5)
    assert torch.equal(torch.rand(3), expected)
