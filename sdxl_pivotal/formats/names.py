"""The one name table between our models' module paths and the kohya LoRA names that A1111 and ComfyUI read.

kohya names a LoRA module `<prefix>_<path with "_" for ".">`, where the prefix says which model it adapts
(`lora_unet`, `lora_te1` for CLIP-L, `lora_te2` for CLIP-G) and the path is the module's path in the original
checkpoint: for the SDXL UNet, Stability AI's (sgm/ldm) layout (`input_blocks.4.1.transformer_blocks.0.attn1.to_q`),
for the text encoders transformers' CLIP with its `text_model.` level (`text_model.encoder.layers.0.self_attn.q_proj`).

The export maps each module path to its kohya name (`kohya_module_names`); the import inverts that same mapping
(`modules_by_kohya_name`), so the two directions cannot disagree.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass

import torch

KOHYA_PREFIXES = {"unet": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}

# Outside the down/mid/up blocks: diffusers path -> SAI path.
_UNET_TOP_LEVEL = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}

# Inside a resnet SAI names the layers by their place in its Sequential containers; inside an attention block
# (Transformer2DModel) both layouts use the same names.
_RESNET_LAYERS = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}

# Modules a LoRA can adapt; their kohya names are the ones an exporter may need.
_ADAPTABLE = (torch.nn.Linear, torch.nn.Conv2d)


@dataclass(frozen=True)
class UNetLayout:
    """What the SAI block numbering depends on: resnets per level, and which levels have attention blocks."""

    layers_per_block: int
    down_attention: tuple[bool, ...]
    up_attention: tuple[bool, ...]

    @classmethod
    def from_config(cls, config: Mapping) -> UNetLayout:
        """The layout of a diffusers `UNet2DConditionModel` config."""
        if not isinstance(config["layers_per_block"], int):
            raise ValueError("SAI (kohya) names need one `layers_per_block` for all UNet levels.")
        return cls(
            config["layers_per_block"],
            tuple("Attn" in block for block in config["down_block_types"]),
            tuple("Attn" in block for block in config["up_block_types"]),
        )


@functools.lru_cache
def sai_unet_table(layout: UNetLayout) -> dict[str, str]:
    """diffusers UNet path -> SAI path, for every block (whole attention blocks, resnets layer by layer).

    SAI numbers the down path's slots `input_blocks.{k}` (slot 0: conv_in; then per level its resnets and, except
    at the last level, the downsampler) and the up path's `output_blocks.{k}` (per level layers_per_block + 1
    resnets, the upsampler sharing the last slot); a slot holds `.0` a resnet, `.1` its attention block.
    """
    slots = layout.layers_per_block + 1
    last = len(layout.down_attention) - 1
    table = dict(_UNET_TOP_LEVEL)
    for i, has_attention in enumerate(layout.down_attention):
        for j in range(layout.layers_per_block):
            table |= _resnet_entries(f"down_blocks.{i}.resnets.{j}", f"input_blocks.{slots * i + j + 1}.0")
            if has_attention:
                table[f"down_blocks.{i}.attentions.{j}"] = f"input_blocks.{slots * i + j + 1}.1"
        if i < last:
            table[f"down_blocks.{i}.downsamplers.0.conv"] = f"input_blocks.{slots * (i + 1)}.0.op"
    table |= _resnet_entries("mid_block.resnets.0", "middle_block.0")
    table["mid_block.attentions.0"] = "middle_block.1"
    table |= _resnet_entries("mid_block.resnets.1", "middle_block.2")
    for i, has_attention in enumerate(layout.up_attention):
        for j in range(slots):
            table |= _resnet_entries(f"up_blocks.{i}.resnets.{j}", f"output_blocks.{slots * i + j}.0")
            if has_attention:
                table[f"up_blocks.{i}.attentions.{j}"] = f"output_blocks.{slots * i + j}.1"
        if i < last:
            table[f"up_blocks.{i}.upsamplers.0.conv"] = (
                f"output_blocks.{slots * i + slots - 1}.{2 if has_attention else 1}.conv"
            )
    return table


def _resnet_entries(path: str, sai_path: str) -> dict[str, str]:
    """A resnet and each of its layers: diffusers path -> SAI path."""
    return {path: sai_path} | {f"{path}.{layer}": f"{sai_path}.{sai}" for layer, sai in _RESNET_LAYERS.items()}


def sai_unet_path(path: str, table: Mapping[str, str]) -> str | None:
    """The SAI path of the diffusers UNet module `path` (its longest prefix in `table`, renamed), or None."""
    parts = path.split(".")
    for end in range(len(parts), 0, -1):
        prefix = ".".join(parts[:end])
        if prefix in table:
            return ".".join([table[prefix], *parts[end:]])
    return None


def canonical_clip_path(path: str) -> str:
    """A CLIP text-encoder path under `text_model.`, as kohya, diffusers' SDXL files and published LoRAs write it
    whatever the transformers version (transformers 5's `CLIPTextModel` has no `text_model` level;
    `CLIPTextModelWithProjection` has)."""
    if path.startswith("text_model.") or path.split(".", 1)[0] == "text_projection":
        return path
    return f"text_model.{path}"


def clip_path_in(model: torch.nn.Module, path: str) -> str:
    """A CLIP text-encoder path (either layout) as `model` names it: under `text_model.` if the model has that
    level, else without it."""
    if hasattr(model, "text_model"):
        return canonical_clip_path(path)
    return path.removeprefix("text_model.")


def layout_free_clip_pattern(pattern: str) -> str:
    """A PEFT config entry (a module name or path, a `rank_pattern` key) that matches the same CLIP module in
    either layout: PEFT matches entries as path suffixes, so a path without `text_model.` matches both."""
    return pattern.removeprefix("text_model.")


def canonical_module_path(part: str, path: str) -> str:
    """A module path of the pipeline's `part` as kohya writes it (text encoders under `text_model.`), so paths
    from files written with either transformers layout find the same module."""
    return path if part == "unet" else canonical_clip_path(path)


def adaptable_module_paths(model: torch.nn.Module) -> list[str]:
    """Paths of the model's Linear and Conv2d layers, seen through PEFT's wrappers (`x.base_layer` is `x`)."""
    paths = []
    for path, module in model.named_modules():
        if isinstance(module, _ADAPTABLE) and not any(part.startswith("lora_") for part in path.split(".")):
            paths.append(path.removesuffix(".base_layer"))
    return paths


def kohya_module_names(part: str, model: torch.nn.Module) -> dict[str, str]:
    """{module path: kohya name} for every adaptable module of `model`, which is the pipeline's `part`
    ("unet", "text_encoder" or "text_encoder_2"). UNet modules outside SAI's layout get no name."""
    if part == "unet":
        table = sai_unet_table(UNetLayout.from_config(model.config))
        original = {path: sai_unet_path(path, table) for path in adaptable_module_paths(model)}
    else:
        original = {path: canonical_clip_path(path) for path in adaptable_module_paths(model)}
    prefix = KOHYA_PREFIXES[part]
    return {path: f"{prefix}_{name.replace('.', '_')}" for path, name in original.items() if name is not None}


def modules_by_kohya_name(models: Mapping[str, torch.nn.Module]) -> dict[str, tuple[str, str]]:
    """The inverse of `kohya_module_names` over `models` ({part: model}): {kohya name: (part, module path)}."""
    index: dict[str, tuple[str, str]] = {}
    for part, model in models.items():
        for path, name in kohya_module_names(part, model).items():
            if name in index:
                raise ValueError(f"{part}.{path} and {'.'.join(index[name])} would share the kohya name {name}")
            index[name] = (part, path)
    return index
