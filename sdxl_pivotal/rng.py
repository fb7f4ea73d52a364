"""Every random stream of a run, named in one place.

Each stream is a pure function of the run's seed and its position in the run (epoch, sample, step, process,
class image), never of what was drawn before: a resumed run draws exactly what the uninterrupted run drew, and
two processes never share a stream. Streams keyed by the same position are told apart by a tag (`Tag`). The
keys below are what every earlier run drew from; changing one changes the data order, the crops or the noise
of every run, so exact resume from existing checkpoints would no longer hold.
"""

from __future__ import annotations

from enum import IntEnum

import numpy as np
import torch

# The epoch's permutation of the samples is seeded with seed x EPOCH_SEED_STRIDE + epoch (a prime stride).
EPOCH_SEED_STRIDE = 100_003


class Tag(IntEnum):
    """The last entry of a numpy seed key, telling apart streams of the same (seed, epoch, sample)."""

    CLASS_SAMPLE = 1  # crop and flip of the class image paired with a sample (prior preservation)
    CAPTION = 2  # caption shuffle and dropout of a sample
    CACHED_CROP = 3  # --cache_latents: the one crop of a record for the whole run
    DYLORA_RANK = 4  # --adapter dylora: the rank an optimizer step trains


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """Crop and flip of sample `index` in `epoch` (with cached latents: its flip)."""
    return np.random.default_rng([seed, epoch, index])


def class_sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """Crop and flip of the class image paired with sample `index` in `epoch`."""
    return np.random.default_rng([seed, epoch, index, int(Tag.CLASS_SAMPLE)])


def caption_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """Caption shuffle and dropout of sample `index` in `epoch`."""
    return np.random.default_rng([seed, epoch, index, int(Tag.CAPTION)])


def cached_crop_rng(seed: int, index: int, is_class: bool) -> np.random.Generator:
    """The run's one crop of record `index` (instance or class) for the latent cache."""
    return np.random.default_rng([seed, index, int(Tag.CACHED_CROP), int(is_class)])


def dylora_rank_rng(seed: int, step: int) -> np.random.Generator:
    """The rank optimizer step `step` trains (--adapter dylora): one draw for all processes, which train the same
    truncation together. Keyed (seed, step, 0, tag) like a sample's stream of sample 0 with a tag of its own (a
    3-entry key would coincide with `sample_rng`'s: numpy ignores trailing zeros of a key)."""
    return np.random.default_rng([seed, step, 0, int(Tag.DYLORA_RANK)])


def epoch_order_generator(seed: int, epoch: int) -> torch.Generator:
    """The permutation of the samples in `epoch` (and, with buckets, of the batches)."""
    return torch.Generator().manual_seed(seed * EPOCH_SEED_STRIDE + epoch)


def _derived_seed(*key: int) -> int:
    return int(np.random.SeedSequence(list(key)).generate_state(1, dtype=np.uint64)[0])


def step_seed(seed: int, step: int, process_index: int) -> int:
    """All randomness of one optimizer step on one process: VAE sampling, noise, timesteps, dropout."""
    return _derived_seed(seed, step, process_index)


def class_image_seed(seed: int, index: int) -> int:
    """Generation of class image `index` (prior preservation), whichever process and batch makes it."""
    return _derived_seed(seed, index)


def drawn_seed() -> int:
    """A fresh seed for a run without --seed (logged and stored in its checkpoints)."""
    return int(np.random.SeedSequence().generate_state(1)[0])
