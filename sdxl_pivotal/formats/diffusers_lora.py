"""diffusers' LoRA file (`pytorch_lora_weights.safetensors`) as PEFT state and config per pipeline part.

Its keys are `<part>.<module path>.<tensor>`, where diffusers' `save_lora_weights` renames some of PEFT's tensors
(`lora.down.weight`, `lora_linear_layer.down.weight`, ...) and keeps others (`lora_A.weight`,
`lora_magnitude_vector`); its metadata (`lora_adapter_metadata`) holds each part's LoRA config. Reading undoes the
renaming with diffusers' own converters, as its loaders do; a file without configs gets diffusers' convention
(alpha = rank, per module). Writing goes through `save_lora_weights`, as the trainer's export does, with PEFT's
tensor names.

The first text encoder's keys are written as every published SDXL LoRA writes them, under `text_model.`
(`text_encoder.text_model.encoder.layers.0...`), whichever transformers layout is installed (transformers 5's
`CLIPTextModel` has no `text_model` level); reading with `models` maps them onto those models' layout. Metadata is
written in a fixed order (sorted sets and keys), so the same adapters give the same bytes.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Mapping
from pathlib import Path

import torch
from peft import LoraConfig, PeftConfig

from ..export import LORA_WEIGHTS_NAME, atomic_path
from ..safetensors_order import sort_metadata
from .families import PeftLora, live_peft, peft_modules
from .names import canonical_clip_path, clip_path_in, layout_free_clip_pattern

DIFFUSERS_PARTS = ("unet", "text_encoder", "text_encoder_2")
TEXT_ENCODER_PARTS = ("text_encoder", "text_encoder_2")


def is_diffusers_lora(state: Mapping[str, torch.Tensor]) -> bool:
    """Whether every key of a (non-empty) state belongs to one of the pipeline's parts, as in diffusers' files."""
    return bool(state) and all(key.split(".", 1)[0] in DIFFUSERS_PARTS for key in state)


def diffusers_lora_metadata(metadata: Mapping[str, str]) -> dict | None:
    """The LoRA configs of a diffusers LoRA file ({"unet.r": 4, ...}), None for a file without them."""
    from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY

    return json.loads(metadata[LORA_ADAPTER_METADATA_KEY]) if LORA_ADAPTER_METADATA_KEY in metadata else None


def diffusers_to_peft(
    state: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str],
    models: Mapping[str, torch.nn.Module] | None = None,
) -> dict[str, PeftLora]:
    """A diffusers LoRA file's tensors and metadata as PEFT LoRAs, by part. With `models` ({part: model}), the text
    encoders' module paths are those of each model's transformers layout; without, the file's (`text_model.`)."""
    configs = diffusers_lora_metadata(metadata)
    loras = {}
    for part in DIFFUSERS_PARTS:
        own = _part_entries(state, part)
        if own:
            peft_state = _peft_keys(part, own)
            lora = PeftLora(peft_state, _peft_config(peft_state, _part_entries(configs, part)))
            loras[part] = in_layout_of(models[part], part, lora) if models and part in models else lora
    return loras


def in_layout_of(model: torch.nn.Module, part: str, lora: PeftLora) -> PeftLora:
    """The adapter of the pipeline's `part` with text-encoder module paths as `model` names them (a file may use
    either transformers layout) and a config that matches either."""
    if part not in TEXT_ENCODER_PARTS:
        return lora
    state = {clip_path_in(model, key): value for key, value in lora.state.items()}
    return PeftLora(state, PeftConfig.from_peft_type(**config_metadata(part, lora.config)))


def _part_entries(entries: Mapping | None, part: str) -> dict:
    """The entries of `part` ("unet.x" -> "x"), none of the other parts'."""
    return {
        key.removeprefix(f"{part}."): value for key, value in (entries or {}).items() if key.startswith(f"{part}.")
    }


def _peft_keys(part: str, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers' tensor names -> PEFT's (`lora_A.weight`, `lora_B.weight`, `lora_magnitude_vector`), with the
    conversions diffusers' UNet and text-encoder loaders apply; a part already in PEFT's names stays as it is."""
    from diffusers.utils import (
        convert_state_dict_to_diffusers,
        convert_state_dict_to_peft,
        convert_unet_state_dict_to_peft,
    )

    with contextlib.suppress(ValueError):  # PEFT's own names (LoRA, LoHa, LoKr, (IA)³): nothing to convert
        peft_modules(state)
        return dict(state)
    if part == "unet":
        return convert_unet_state_dict_to_peft(dict(state))
    return convert_state_dict_to_peft(convert_state_dict_to_diffusers(dict(state)))


def _peft_config(peft_state: Mapping[str, torch.Tensor], config: Mapping) -> LoraConfig:
    """The part's recorded LoRA config or, without one, diffusers' inferred config (ranks from the shapes)."""
    if config:
        return LoraConfig.from_peft_type(**config)
    from diffusers.utils.peft_utils import get_peft_kwargs

    ranks = {key: value.shape[1] for key, value in peft_state.items() if key.endswith("lora_B.weight")}
    return LoraConfig(**get_peft_kwargs(ranks, None, peft_state))


def save_diffusers_lora(folder: Path, models: Mapping[str, torch.nn.Module]) -> Path:
    """Write `folder/pytorch_lora_weights.safetensors` for the adapters of `models` ({"unet": ..., ...})."""
    return save_diffusers_peft(folder / LORA_WEIGHTS_NAME, {part: live_peft(model) for part, model in models.items()})


def save_diffusers_peft(path: Path, loras: Mapping[str, PeftLora]) -> Path:
    """Write `loras` ({part: PeftLora}) as a diffusers LoRA file at `path` (atomically), each part's config in the
    metadata, as `export.save_diffusers_lora` writes the trainer's.

    The tensors keep PEFT's names, which diffusers' loaders read as they are (for LoRA; LoHa, LoKr and (IA)³ files
    load with `load_for_diffusers` or PEFT). (`convert_state_dict_to_diffusers`
    renames only attention projections; a UNet LoRA that also adapts other layers then mixes `lora.down` and
    `lora_A` names, and diffusers' UNet loader, which looks at the first key only, leaves the renamed ones unloaded.)
    """
    from diffusers import StableDiffusionXLPipeline

    layers = {f"{part}_lora_layers": file_state(part, lora.state) for part, lora in loras.items()}
    metadata = {f"{part}_lora_adapter_metadata": config_metadata(part, lora.config) for part, lora in loras.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as temporary:
        StableDiffusionXLPipeline.save_lora_weights(temporary.parent, **layers, **metadata, weight_name=temporary.name)
        sort_metadata(temporary)
    return path


def file_state(part: str, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A part's PEFT tensors under the file's names: a text encoder's under `text_model.`."""
    if part not in TEXT_ENCODER_PARTS:
        return dict(state)
    return {canonical_clip_path(key): value for key, value in state.items()}


def config_metadata(part: str, config: PeftConfig) -> dict:
    """A part's PEFT config as plain, ordered values: sets (PEFT's `target_modules`, whose order changes from
    run to run) as sorted lists and, for a text encoder, module paths that match either transformers layout."""
    entries = {key: sorted(value) if isinstance(value, set) else value for key, value in config.to_dict().items()}
    if part not in TEXT_ENCODER_PARTS:
        return entries
    for key in ("target_modules", "exclude_modules", "feedforward_modules"):  # the last: (IA)³'s
        if isinstance(entries.get(key), list):
            entries[key] = sorted(layout_free_clip_pattern(name) for name in entries[key])
    for key in ("rank_pattern", "alpha_pattern"):  # not in (IA)³'s config
        if key in entries:
            entries[key] = {layout_free_clip_pattern(name): value for name, value in (entries[key] or {}).items()}
    return entries
