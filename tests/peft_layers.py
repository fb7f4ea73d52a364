"""Test helper: a model's PEFT adapter layers (LoRA, LoHa, LoKr, (IA)³) by module path."""

from __future__ import annotations

import torch
from peft.tuners.tuners_utils import BaseTunerLayer


def adapter_layers(model: torch.nn.Module, adapter: str = "default") -> dict[str, BaseTunerLayer]:
    """{module path: layer} for the layers of `model` that hold `adapter`."""
    return {
        path: module
        for path, module in model.named_modules()
        if isinstance(module, BaseTunerLayer) and adapter in getattr(module, "scaling", getattr(module, "ia3_l", {}))
    }
