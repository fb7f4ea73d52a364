"""SDXL as one checkpoint file in Stability AI's original (SGM) layout, the file AUTOMATIC1111, Forge and ComfyUI load.

`sd_xl_base_1.0.safetensors` holds the four models side by side:

    model.diffusion_model.*                the UNet, in SAI's block numbering (`names.sai_unet_table`)
    first_stage_model.*                    the VAE, in LDM's names (`encoder.down.0.block.1`, `mid.attn_1.q`, the
                                           attention projections as 1x1 convolutions)
    conditioner.embedders.0.transformer.*  CLIP ViT-L, in transformers' names under `text_model.`
    conditioner.embedders.1.model.*        OpenCLIP ViT-bigG, in open_clip's names: one `in_proj` per attention
                                           (q, k, v stacked), `positional_embedding`, and `text_projection` applied
                                           as `x @ P`, the transpose of transformers' Linear weight

`sgm_state_dict` maps a diffusers pipeline's models there. The UNet and VAE tables follow the models' configs
(levels, layers per level, which levels have attention), so they hold for any SDXL-shaped model, the tiny one
included; a parameter the tables do not place is an error, never dropped. Tokenizers are not in such a file: its
embedding matrices have exactly the tokenizers' vocabulary, so new tokens (pivotal tuning) travel beside it as an
embeddings file (`new_token_embeddings`).

The other direction is diffusers' `from_single_file` (`diffusers.loaders.single_file_utils`), the tests' oracle.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..tokens import EMBEDDING_KEYS
from .names import UNetLayout, canonical_clip_path, sai_unet_path, sai_unet_table

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_L_PREFIX = "conditioner.embedders.0.transformer."
CLIP_G_PREFIX = "conditioner.embedders.1.model."

# A VAE resnet keeps diffusers' layer names except its shortcut.
_VAE_RESNET_LAYERS = {"conv_shortcut": "nin_shortcut"}
# The VAE's mid-block attention: diffusers' Linear projections are LDM's 1x1 convolutions.
_VAE_ATTENTION_LAYERS = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
# Paths both layouts share, outside the levels.
_VAE_SAME_PATHS = (
    "encoder.conv_in",
    "encoder.conv_out",
    "decoder.conv_in",
    "decoder.conv_out",
    "quant_conv",
    "post_quant_conv",
)

# OpenCLIP's names for transformers' CLIP paths (under `text_model.`); whole parameters where open_clip stores
# a bare tensor.
_OPEN_CLIP_TOP_LEVEL = {
    "text_model.embeddings.token_embedding": "token_embedding",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm": "ln_final",
    "text_projection.weight": "text_projection",
}
_OPEN_CLIP_LAYER = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
    "self_attn.out_proj": "attn.out_proj",
}
_QKV = ("q_proj", "k_proj", "v_proj")
TOKEN_EMBEDDING_KEYS = (
    f"{CLIP_L_PREFIX}text_model.embeddings.token_embedding.weight",
    f"{CLIP_G_PREFIX}token_embedding.weight",
)
TEXT_ENCODERS = (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2"))


def sgm_state_dict(pipe, new_tokens: int = 0) -> dict[str, torch.Tensor]:
    """The UNet, VAE and both text encoders of the diffusers SDXL pipeline `pipe` under their single-file names,
    the last `new_tokens` rows of both token embeddings left out (see `new_token_embeddings`).

    Tensors are the models' own where the layout allows (views), new ones where it differs (fused in_proj, the
    transposed projection). The models hold plain weights (a LoRA fused and unloaded); ValueError for a UNet, VAE or
    CLIP-G parameter the tables do not place."""
    state = {
        **unet_state(pipe.unet),
        **vae_state(pipe.vae),
        **clip_l_state(pipe.text_encoder),
        **open_clip_state(pipe.text_encoder_2),
    }
    for key in TOKEN_EMBEDDING_KEYS:
        state[key] = state[key][: state[key].shape[0] - new_tokens]
    return state


def unet_state(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The UNet's parameters under `model.diffusion_model.` + their SAI paths."""
    table = sai_unet_table(UNetLayout.from_config(unet.config))
    return {UNET_PREFIX + renamed(key, table, "UNet"): value for key, value in unet.state_dict().items()}


def vae_table(config: Mapping) -> dict[str, str]:
    """diffusers VAE path -> LDM path. LDM numbers the decoder's levels from the bottom (`up.{n-1}` is diffusers'
    `up_blocks.0`); each level's resampler sits beside its resnets, on every level but the last (encoder) / the
    first (decoder, in LDM's numbering)."""
    if not isinstance(config["layers_per_block"], int):
        raise ValueError("The single-file layout needs one `layers_per_block` for all VAE levels.")
    levels, layers = len(config["block_out_channels"]), config["layers_per_block"]
    table = {path: path for path in _VAE_SAME_PATHS}
    for i in range(levels):
        for j in range(layers):
            table |= _vae_resnet(f"encoder.down_blocks.{i}.resnets.{j}", f"encoder.down.{i}.block.{j}")
        for j in range(layers + 1):
            table |= _vae_resnet(f"decoder.up_blocks.{i}.resnets.{j}", f"decoder.up.{levels - 1 - i}.block.{j}")
        if i < levels - 1:
            table[f"encoder.down_blocks.{i}.downsamplers.0.conv"] = f"encoder.down.{i}.downsample.conv"
            table[f"decoder.up_blocks.{i}.upsamplers.0.conv"] = f"decoder.up.{levels - 1 - i}.upsample.conv"
    for part in ("encoder", "decoder"):
        table[f"{part}.conv_norm_out"] = f"{part}.norm_out"
        for j in range(2):
            table |= _vae_resnet(f"{part}.mid_block.resnets.{j}", f"{part}.mid.block_{j + 1}")
        attention = f"{part}.mid_block.attentions.0"
        table |= {f"{attention}.{layer}": f"{part}.mid.attn_1.{ldm}" for layer, ldm in _VAE_ATTENTION_LAYERS.items()}
    return table


def _vae_resnet(path: str, ldm_path: str) -> dict[str, str]:
    return {path: ldm_path} | {f"{path}.{layer}": f"{ldm_path}.{ldm}" for layer, ldm in _VAE_RESNET_LAYERS.items()}


def vae_state(vae: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The VAE's parameters under `first_stage_model.` + their LDM paths; attention projections as 1x1 convs."""
    table = vae_table(vae.config)
    state = {}
    for key, value in vae.state_dict().items():
        name = renamed(key, table, "VAE")
        if ".mid.attn_1." in name and name.endswith(".weight") and value.ndim == 2:
            value = value[:, :, None, None]
        state[VAE_PREFIX + name] = value
    return state


def clip_l_state(text_encoder: torch.nn.Module) -> dict[str, torch.Tensor]:
    """CLIP ViT-L's parameters under `conditioner.embedders.0.transformer.text_model.` (either transformers
    layout)."""
    return {CLIP_L_PREFIX + canonical_clip_path(key): value for key, value in text_encoder.state_dict().items()}


def open_clip_table(layers: int) -> dict[str, str]:
    """transformers CLIP path (under `text_model.`) -> open_clip path, but for the q/k/v projections, which
    open_clip holds fused (`open_clip_state`)."""
    table = dict(_OPEN_CLIP_TOP_LEVEL)
    for i in range(layers):
        layer, block = f"text_model.encoder.layers.{i}", f"transformer.resblocks.{i}"
        table |= {f"{layer}.{name}": f"{block}.{open_clip}" for name, open_clip in _OPEN_CLIP_LAYER.items()}
    return table


def open_clip_state(text_encoder_2: torch.nn.Module) -> dict[str, torch.Tensor]:
    """OpenCLIP ViT-bigG's parameters under `conditioner.embedders.1.model.`: per layer `attn.in_proj_weight` /
    `_bias` = q, k, v stacked along the output dimension, and `text_projection` = the Linear weight transposed."""
    state = {canonical_clip_path(key): value for key, value in text_encoder_2.state_dict().items()}
    layers = text_encoder_2.config.num_hidden_layers
    table = open_clip_table(layers)
    fused = {}
    for i in range(layers):
        attention = f"text_model.encoder.layers.{i}.self_attn"
        for kind in ("weight", "bias"):
            parts = [state.pop(f"{attention}.{projection}.{kind}") for projection in _QKV]
            fused[f"transformer.resblocks.{i}.attn.in_proj_{kind}"] = torch.cat(parts)
    for key, value in state.items():
        name = renamed(key, table, "text encoder 2")
        fused[name] = value.T.contiguous() if name == "text_projection" else value
    return {CLIP_G_PREFIX + name: value for name, value in fused.items()}


def renamed(key: str, table: Mapping[str, str], model: str) -> str:
    """`key` renamed by its longest prefix in `table`; ValueError naming the `model` if none matches."""
    name = sai_unet_path(key, table)
    if name is None:
        raise ValueError(f"The {model} parameter {key} has no place in the single-file layout.")
    return name


def new_token_embeddings(pipe, tokens: list[str]) -> dict[str, torch.Tensor]:
    """The rows of the new `tokens` as an embeddings file holds them ({"clip_l": [n, 768], "clip_g": [n, 1280]},
    float32). They must be both encoders' last rows, where diffusers' `load_textual_inversion` puts them."""
    embeddings = {}
    for key, (part, tokenizer) in zip(EMBEDDING_KEYS, TEXT_ENCODERS, strict=True):
        rows = getattr(pipe, part).get_input_embeddings().weight
        first = rows.shape[0] - len(tokens)
        if getattr(pipe, tokenizer).convert_tokens_to_ids(tokens) != list(range(first, rows.shape[0])):
            raise ValueError(f"The new tokens {tokens} are not the last rows of the {part} token embedding.")
        embeddings[key] = rows[first:].detach().float().contiguous()
    return embeddings
