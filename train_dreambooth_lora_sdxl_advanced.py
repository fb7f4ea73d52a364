#!/usr/bin/env python
"""SDXL DreamBooth LoRA with pivotal tuning.

    accelerate launch train_dreambooth_lora_sdxl_advanced.py --pretrained_model_name_or_path ... --flags

The flags are those of diffusers' advanced script (see README.md); the work happens in `sdxl_pivotal/`.
"""

import sys

from sdxl_pivotal.args import parse_args
from sdxl_pivotal.errors import InputError


def main() -> None:
    try:
        args = parse_args()
        # Imported after the flags are checked, so a bad command line fails before torch/diffusers load.
        from sdxl_pivotal.train import train

        train(args)
    except InputError as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
