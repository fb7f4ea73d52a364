"""Aspect-ratio buckets: train each photo at a size close to its own shape instead of a centre square.

Buckets are (width, height) pairs, multiples of `step`, with about resolution² pixels. Each image goes to the
bucket whose aspect ratio is closest to its own; every batch comes from one bucket (see `data.StepPlan`).
Small images are not upscaled unless asked: their bucket shrinks to what they cover.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from typing import NamedTuple

logger = logging.getLogger(__name__)


class Size(NamedTuple):
    """A picture's size in pixels, named so that the two orders never mix: PIL and the buckets speak
    (width, height), SDXL's micro-conditioning and image tensors (height, width): `size.hw`."""

    width: int
    height: int

    @property
    def hw(self) -> tuple[int, int]:
        """(height, width), the order of SDXL's time ids and of tensor shapes."""
        return self.height, self.width


def make_buckets(resolution: int, min_side: int, max_side: int, step: int) -> list[Size]:
    """For every width from `min_side` to `max_side`, the tallest height (a multiple of `step`, within the
    side limits) with at most resolution² pixels; sorted by aspect ratio."""
    max_area = resolution * resolution
    buckets = set()
    for width in range(min_side, max_side + 1, step):
        height = min(max_side, (max_area // width) // step * step)
        if height >= min_side:
            buckets.add(Size(width, height))
    return sorted(buckets, key=lambda size: size.width / size.height)


def assign_bucket(image_size: Size, buckets: list[Size], step: int, upscale: bool) -> Size:
    """The bucket for an image of `image_size`: closest aspect ratio (in log scale, so 2:1 and 1:2 are equally
    far from 1:1). Without `upscale`, an image smaller than that bucket gets the largest bucket of the same
    shape that it covers, rounded down to `step`."""
    width, height = image_size
    log_ratio = math.log(width / height)
    bucket = min(buckets, key=lambda b: (abs(math.log(b.width / b.height) - log_ratio), -b.width * b.height))
    shrink = min(width / bucket.width, height / bucket.height)
    if upscale or shrink >= 1.0:
        return bucket
    return Size(
        max(step, int(bucket.width * shrink) // step * step), max(step, int(bucket.height * shrink) // step * step)
    )


def log_bucket_table(sizes: list[Size]) -> None:
    """One log line per bucket in use: size, aspect ratio, number of images."""
    counts = Counter(sizes)
    lines = [f"  {w:>5} x {h:<5} (aspect {w / h:.2f}): {n} image(s)" for (w, h), n in sorted(counts.items())]
    logger.info("Aspect-ratio buckets (%d in use):\n%s", len(counts), "\n".join(lines))
