"""DyLoRA (Valipour et al., 2023): one LoRA trained so that its leading b ranks, for every b in {unit, 2·unit, ...,
rank}, are a good LoRA of their own; `python -m sdxl_pivotal.tools extract-dylora` then cuts it into those LoRAs.

Each optimizer step trains one truncation b, drawn uniformly from the seed and the step (`rng.dylora_rank_rng`:
the same on every process, and again on resume). Truncated to b, a LoRA layer of rank r and alpha α applies
(α / b) · B[:, :b] A[:b] x: the first b rows of lora_A and columns of lora_B, at the scale of an ordinary LoRA of
rank b with the same alpha. So the rank-b file, the same alpha kept, applies what was trained (kohya's
`extract_lora_from_dylora.py` also keeps alpha). A layer whose own rank is below b keeps its rank.

Which rows a step trains: all b of them (the paper's non-frozen variant), not only the block [b - unit, b) with
the rows before it frozen (the frozen variant; kohya's networks/dylora.py, which also draws b per module and per
forward call, and applies the full-rank product at α / sqrt(r · b)). Why: every step then trains the smallest
truncation, so the rank-`unit` LoRA, the one most often extracted, gets a gradient at every step rather than one
step in rank/unit; and it needs only the one forward mask below, where freezing rows of PEFT's single tensor per
factor would need a second mask on the gradients. Rows beyond b get a zero gradient; Adam's running moments still
move them a little for a few steps after their last gradient (as in the paper's code, which also keeps one
tensor per factor).

How, on PEFT's own LoRA layers: a forward hook on each layer's `lora_A` multiplies its r output channels by a mask
m, m_i = r / b for i < b and 0 beyond; PEFT then applies lora_B and its scale α / r, which gives
(α / b) · B[:, :b] A[:b] x. The hooks stay registered for the whole run and only the masks' values change, in
place, so `--compile` sees the same modules at every step. Outside a training step the masks are 1: validation,
checkpoints and the saved files see the ordinary full-rank LoRA.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
from peft.tuners.lora import LoraLayer

from .rng import dylora_rank_rng

ADAPTER = "default"


@dataclass(frozen=True)
class NestedLayer:
    """One LoRA layer's rank and the mask its `lora_A` output is multiplied by ([r], or [r, 1, 1] for a Conv2d)."""

    rank: int
    mask: torch.Tensor


def _apply_mask(mask: torch.Tensor) -> Callable[..., torch.Tensor]:
    """A forward hook multiplying a `lora_A` output by `mask` (the mask as it is at each call)."""

    def hook(module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        return output * mask.to(output.device, output.dtype)

    return hook


class NestedRanks:
    """The LoRA layers of the trained models, trained as DyLoRA with step `unit`."""

    def __init__(self, models: Iterable[torch.nn.Module], unit: int):
        self.unit = unit
        self.layers: list[NestedLayer] = []
        for model in models:
            for module in model.modules():
                if isinstance(module, LoraLayer) and ADAPTER in module.lora_A:
                    self.layers.append(self._nest(module))
        if not self.layers:
            raise ValueError("DyLoRA found no LoRA layer to train.")
        self.max_rank = max(layer.rank for layer in self.layers)

    def _nest(self, module: LoraLayer) -> NestedLayer:
        lora_a = module.lora_A[ADAPTER]
        rank = module.r[ADAPTER]
        if rank % self.unit:
            raise ValueError(f"A LoRA layer of rank {rank} is not a multiple of the DyLoRA unit {self.unit}.")
        shape = (rank,) if isinstance(lora_a, torch.nn.Linear) else (rank, 1, 1)
        mask = torch.ones(shape, device=lora_a.weight.device)
        lora_a.register_forward_hook(_apply_mask(mask))
        return NestedLayer(rank, mask)

    @property
    def ranks(self) -> list[int]:
        """The ranks trained: unit, 2·unit, ..., the largest layer rank."""
        return list(range(self.unit, self.max_rank + 1, self.unit))

    def sampled_rank(self, seed: int, step: int) -> int:
        """The truncation optimizer step `step` trains, uniform over `ranks`."""
        return self.ranks[int(dylora_rank_rng(seed, step).integers(len(self.ranks)))]

    @contextlib.contextmanager
    def truncated(self, rank: int) -> Iterator[None]:
        """Inside: every layer applies its leading min(rank, its rank) ranks at alpha / that rank; after: full rank."""
        with torch.no_grad():
            for layer in self.layers:
                kept = min(rank, layer.rank)
                layer.mask[:kept] = layer.rank / kept
                layer.mask[kept:] = 0.0
        try:
            yield
        finally:
            with torch.no_grad():
                for layer in self.layers:
                    layer.mask.fill_(1.0)

    def training_step(self, seed: int, step: int) -> contextlib.AbstractContextManager[None]:
        """The truncation of optimizer step `step`, for its forward and backward passes."""
        return self.truncated(self.sampled_rank(seed, step))
