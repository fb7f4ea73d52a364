"""What are you training? Each preset sets the concept sentence, where it goes in captions, the rank, the number of
steps from the number of images, repeats, prior preservation and pivotal tuning. Every value stays editable."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Preset:
    concept: str  # the instance prompt; TOK is the new token
    caption_position: str  # "before" or "after" the captioner's text
    rank: int
    steps_per_image: int
    min_steps: int
    max_steps: int
    prior_preservation: bool = False
    class_prompt: str = ""

    def steps(self, num_images: int) -> int:
        """Optimizer steps: images x the preset's multiplier, clamped to its range."""
        return min(self.max_steps, max(self.min_steps, num_images * self.steps_per_image))


PRESETS = {
    "object": Preset("a photo of TOK", "before", rank=8, steps_per_image=100, min_steps=400, max_steps=1500),
    "style": Preset("in the style of TOK", "after", rank=16, steps_per_image=120, min_steps=600, max_steps=2000),
    "character": Preset("TOK, a character", "before", rank=16, steps_per_image=100, min_steps=500, max_steps=1500),
    "face": Preset(
        "a photo of TOK person",
        "before",
        rank=16,
        steps_per_image=150,
        min_steps=800,
        max_steps=2400,
        prior_preservation=True,
        class_prompt="a photo of a person",
    ),
    "custom": Preset("TOK", "before", rank=8, steps_per_image=100, min_steps=400, max_steps=1500),
}


def repeats(num_images: int) -> int:
    """Repeats per epoch so that an epoch holds about 30 images: few photos repeat more."""
    return max(1, min(10, math.ceil(30 / max(1, num_images))))


def preset_settings(name: str, num_images: int) -> dict:
    """The trainer settings (parser `dest` -> value) a preset chooses for `num_images` images."""
    preset = PRESETS[name]
    return {
        "instance_prompt": preset.concept,
        "rank": preset.rank,
        "max_train_steps": preset.steps(num_images),
        "repeats": repeats(num_images),
        "with_prior_preservation": preset.prior_preservation,
        "class_prompt": preset.class_prompt or None,
        "train_text_encoder_ti": True,
        "token_abstraction": "TOK",
    }
