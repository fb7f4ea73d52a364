"""The named random streams draw what the run drew before they were named (so checkpoints of earlier runs
resume exactly), and no two streams of one position coincide."""

from __future__ import annotations

import numpy as np
import torch

from sdxl_pivotal import rng

SEED, EPOCH, INDEX = 1234, 3, 5


def draws(generator: np.random.Generator) -> list[int]:
    return generator.integers(0, 2**62, 8).tolist()


def test_streams_keep_their_historical_keys():
    assert draws(rng.sample_rng(SEED, EPOCH, INDEX)) == draws(np.random.default_rng([SEED, EPOCH, INDEX]))
    assert draws(rng.class_sample_rng(SEED, EPOCH, INDEX)) == draws(np.random.default_rng([SEED, EPOCH, INDEX, 1]))
    assert draws(rng.caption_rng(SEED, EPOCH, INDEX)) == draws(np.random.default_rng([SEED, EPOCH, INDEX, 2]))
    assert draws(rng.cached_crop_rng(SEED, INDEX, True)) == draws(np.random.default_rng([SEED, INDEX, 3, 1]))
    assert draws(rng.dylora_rank_rng(SEED, INDEX)) == draws(np.random.default_rng([SEED, INDEX, 0, 4]))
    order = torch.randperm(50, generator=rng.epoch_order_generator(SEED, EPOCH))
    assert (
        order.tolist() == torch.randperm(50, generator=torch.Generator().manual_seed(SEED * 100_003 + EPOCH)).tolist()
    )
    state = np.random.SeedSequence([SEED, EPOCH, INDEX]).generate_state(1, dtype=np.uint64)[0]
    assert rng.step_seed(SEED, EPOCH, INDEX) == int(state)
    state = np.random.SeedSequence([SEED, INDEX]).generate_state(1, dtype=np.uint64)[0]
    assert rng.class_image_seed(SEED, INDEX) == int(state)


def test_streams_of_one_position_differ():
    streams = [
        rng.sample_rng(SEED, EPOCH, INDEX),
        rng.class_sample_rng(SEED, EPOCH, INDEX),
        rng.caption_rng(SEED, EPOCH, INDEX),
        rng.cached_crop_rng(SEED, INDEX, False),
        rng.cached_crop_rng(SEED, INDEX, True),
        rng.dylora_rank_rng(SEED, EPOCH),
        rng.sample_rng(SEED, EPOCH, int(rng.Tag.DYLORA_RANK)),  # a 3-entry key of the same numbers
    ]
    assert len({tuple(draws(stream)) for stream in streams}) == len(streams)
    assert rng.step_seed(SEED, 1, 0) != rng.step_seed(SEED, 1, 1) != rng.step_seed(SEED, 2, 0)
