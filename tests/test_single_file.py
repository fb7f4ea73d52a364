"""`tools merge --format single_file`: one SDXL checkpoint in Stability AI's original layout, read back by diffusers'
own single-file loader (`from_single_file` with a local config, offline) into the merged pipeline's exact weights;
every key of the file is read by that conversion; the new tokens go beside it; real SDXL's key names and shapes."""

from __future__ import annotations

import types
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from test_formats import PARTS, assert_outputs_equal, fresh_pipeline, outputs
from test_tools import PIVOTAL_PROMPT, pivotal_kohya_file, random_lora_pipeline, tools

from sdxl_pivotal.formats import load_for_diffusers, save_kohya_lora
from sdxl_pivotal.formats.architecture import empty_sdxl_models
from sdxl_pivotal.formats.single_file import CLIP_G_PREFIX, TOKEN_EMBEDDING_KEYS, sgm_state_dict
from sdxl_pivotal.tiny import PRESETS, build_tiny_sdxl_pipeline
from sdxl_pivotal.tokens import PivotalTokens

MODELS = ("unet", "vae", "text_encoder", "text_encoder_2")

# stabilityai/stable-diffusion-xl-base-1.0's vae/config.json (the entries that shape the model).
SDXL_VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[128, 256, 512, 512],
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=32,
    sample_size=1024,
)

# Keys and shapes of sd_xl_base_1.0.safetensors, written out by hand: SAI's UNet slots (resamplers, skip
# connections), LDM's VAE (decoder levels numbered from the bottom, attention as 1x1 convs), CLIP-L in
# transformers' names, OpenCLIP-G's fused in_proj and x @ P projection. `ln_final.weight` is the key
# AUTOMATIC1111 recognises SDXL by.
SDXL_KEYS = {
    "model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
    "model.diffusion_model.input_blocks.3.0.op.weight": (320, 320, 3, 3),
    "model.diffusion_model.input_blocks.4.0.skip_connection.weight": (640, 320, 1, 1),
    "model.diffusion_model.input_blocks.8.1.transformer_blocks.9.attn2.to_k.weight": (1280, 2048),
    "model.diffusion_model.label_emb.0.0.weight": (1280, 2816),
    "model.diffusion_model.middle_block.1.proj_in.weight": (1280, 1280),
    "model.diffusion_model.middle_block.2.emb_layers.1.weight": (1280, 1280),
    "model.diffusion_model.output_blocks.2.2.conv.weight": (1280, 1280, 3, 3),
    "model.diffusion_model.output_blocks.5.2.conv.weight": (640, 640, 3, 3),
    "model.diffusion_model.output_blocks.8.0.skip_connection.weight": (320, 640, 1, 1),
    "model.diffusion_model.out.2.weight": (4, 320, 3, 3),
    "first_stage_model.encoder.down.1.block.0.nin_shortcut.weight": (256, 128, 1, 1),
    "first_stage_model.encoder.down.1.downsample.conv.weight": (256, 256, 3, 3),
    "first_stage_model.encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
    "first_stage_model.decoder.mid.attn_1.proj_out.weight": (512, 512, 1, 1),
    "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight": (128, 256, 1, 1),
    "first_stage_model.decoder.up.3.upsample.conv.weight": (512, 512, 3, 3),
    "first_stage_model.decoder.up.0.block.2.conv2.weight": (128, 128, 3, 3),
    "first_stage_model.quant_conv.weight": (8, 8, 1, 1),
    "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight": (49408, 768),
    "conditioner.embedders.0.transformer.text_model.encoder.layers.11.mlp.fc2.weight": (768, 3072),
    "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": (768,),
    "conditioner.embedders.1.model.token_embedding.weight": (49408, 1280),
    "conditioner.embedders.1.model.positional_embedding": (77, 1280),
    "conditioner.embedders.1.model.transformer.resblocks.0.mlp.c_fc.weight": (5120, 1280),
    "conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight": (3840, 1280),
    "conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_bias": (3840,),
    "conditioner.embedders.1.model.transformer.resblocks.31.ln_2.bias": (1280,),
    "conditioner.embedders.1.model.text_projection": (1280, 1280),
    "conditioner.embedders.1.model.ln_final.weight": (1280,),
}


def diffusers_conversion(checkpoint: dict[str, torch.Tensor], models) -> dict[str, dict[str, torch.Tensor]]:
    """The state dicts diffusers' single-file loader makes of `checkpoint` for `models` (anything with the four
    models), by the conversion functions `from_single_file` calls for each."""
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        convert_open_clip_checkpoint,
    )

    clip_l = convert_ldm_clip_checkpoint(checkpoint)
    if not hasattr(models.text_encoder, "text_model"):  # transformers 5's CLIPTextModel, as diffusers does
        clip_l = {key.removeprefix("text_model."): value for key, value in clip_l.items()}
    return {
        "unet": convert_ldm_unet_checkpoint(checkpoint, models.unet.config),
        "vae": convert_ldm_vae_checkpoint(checkpoint, models.vae.config),
        "text_encoder": clip_l,
        "text_encoder_2": convert_open_clip_checkpoint(models.text_encoder_2, checkpoint, prefix=CLIP_G_PREFIX),
    }


@pytest.fixture(scope="module")
def pivotal_kohya(tiny_model, tmp_path_factory) -> Path:
    return pivotal_kohya_file(tiny_model, tmp_path_factory.mktemp("pivotal"), use_dora=False)


@pytest.fixture(scope="module")
def merged(pivotal_kohya, tiny_model, tmp_path_factory) -> dict[str, Path]:
    """The pivotal kohya file (LoRA on all three models, bundled embeddings) merged at 0.7 into the tiny model,
    as one checkpoint and as a diffusers pipeline."""
    folder = tmp_path_factory.mktemp("merged")
    single, pipeline = folder / "tok-toy.safetensors", folder / "pipeline"
    assert tools("merge", pivotal_kohya, "--base", tiny_model, "--output", single, "--scale", 0.7) == 0
    assert tools("merge", pivotal_kohya, "--base", tiny_model, "--output", pipeline, "--scale", 0.7) == 0
    return {"single_file": single, "embeddings": folder / "tok-toy_emb.safetensors", "diffusers": pipeline}


def test_single_file_reads_back_as_the_merged_pipeline(merged, pivotal_kohya, tiny_model):
    """diffusers' `from_single_file` (config: the local base folder, offline) gives the merged pipeline's UNet and
    VAE bit for bit and the same outputs; with the `_emb` file beside it loaded, its text encoders encode the new
    tokens as the merged pipeline's. The checkpoint's vocabulary is the base's, its rows untouched; the `_emb`
    file holds the trained rows."""
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
    from transformers import CLIPTextModelWithProjection

    single, expected = merged["single_file"], StableDiffusionXLPipeline.from_pretrained(merged["diffusers"])
    common = dict(config=str(tiny_model), local_files_only=True)
    for part, loader in (("unet", UNet2DConditionModel), ("vae", AutoencoderKL)):
        model = loader.from_single_file(str(single), subfolder=part, **common)
        reference = getattr(expected, part).state_dict()
        assert model.state_dict().keys() == reference.keys()
        assert all(torch.equal(value, reference[key]) for key, value in model.state_dict().items()), part
    # The tiny CLIP-L and CLIP-G have one width (32); diffusers' pipeline loader tells them apart by width (real
    # SDXL: 768 and 1280) and would read CLIP-L into text_encoder_2, so this one is converted by its own function.
    checkpoint = load_file(single)
    text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(tiny_model, subfolder="text_encoder_2")
    text_encoder_2.load_state_dict(convert_open_clip_checkpoint(text_encoder_2, checkpoint, prefix=CLIP_G_PREFIX))
    pipe = StableDiffusionXLPipeline.from_single_file(str(single), text_encoder_2=text_encoder_2, **common)
    assert load_for_diffusers(pipe, merged["embeddings"]) == ["<s0>", "<s1>"]
    assert_outputs_equal(outputs(pipe, PIVOTAL_PROMPT), outputs(expected, PIVOTAL_PROMPT))
    base, bundled = fresh_pipeline(tiny_model), load_file(pivotal_kohya)
    for key, part in zip(TOKEN_EMBEDDING_KEYS, ("text_encoder", "text_encoder_2"), strict=True):
        assert torch.equal(checkpoint[key], getattr(base, part).get_input_embeddings().weight)
    embeddings = load_file(merged["embeddings"])
    assert set(embeddings) == {"clip_l", "clip_g"}
    assert all(torch.equal(embeddings[key], bundled[f"bundle_emb.tok-toy.{key}"]) for key in embeddings)


def test_every_key_of_the_file_is_read_by_diffusers(merged, tiny_model):
    """Each tensor of the checkpoint replaced by its index: diffusers' conversion gives exactly the keys and shapes
    of the four models, and its values name every index, so no key of the file goes unread."""
    checkpoint = load_file(merged["single_file"])
    tagged = {
        key: torch.full(value.shape, float(i), dtype=torch.float64)
        for i, (key, value) in enumerate(checkpoint.items())
    }
    base = fresh_pipeline(tiny_model)
    converted = diffusers_conversion(tagged, base)
    for part, state in converted.items():
        reference = getattr(base, part).state_dict()
        assert state.keys() == reference.keys(), part
        assert all(value.shape == reference[key].shape for key, value in state.items()), part
    read = torch.cat([value.flatten() for state in converted.values() for value in state.values()]).unique()
    assert read.tolist() == list(range(len(checkpoint)))


@pytest.fixture(scope="module")
def wide_tiny_model(tmp_path_factory) -> Path:
    """The tiny SDXL with CLIP-G wider than CLIP-L (64 and 32, as SDXL's 1280 and 768), every weight moved off
    its initial value (no two norm layers alike), saved."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(PRESETS, "tiny-wide", PRESETS["tiny"] | {"text_hidden": (32, 64)})
        pipe = build_tiny_sdxl_pipeline("tiny-wide")
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for model in (getattr(pipe, name) for name in MODELS):
            for parameter in model.parameters():
                parameter.add_(0.01 * torch.randn(parameter.shape, generator=generator))
    folder = tmp_path_factory.mktemp("tiny-wide")
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def test_diffusers_pipeline_from_single_file_is_the_merged_pipeline(wide_tiny_model, tmp_path):
    """On the tiny SDXL whose encoders differ in width, as SDXL's: `StableDiffusionXLPipeline.from_single_file`
    (config: the base folder, offline) plus the `_emb` file gives every weight of the merged diffusers pipeline,
    token rows included, and the same images."""
    from diffusers import StableDiffusionXLPipeline

    lora_pipe = random_lora_pipeline(wide_tiny_model, use_dora=False)
    embeddings = {"clip_l": torch.randn(2, 32), "clip_g": torch.randn(2, 64)}
    lora = save_kohya_lora(
        tmp_path / "lora",
        {part: getattr(lora_pipe, part) for part in PARTS},
        "tok-toy",
        str(wide_tiny_model),
        embeddings,
        PivotalTokens({"TOK": ["<s0>", "<s1>"]}),
    )
    single, folder = tmp_path / "tok-toy.safetensors", tmp_path / "pipeline"
    for output in (single, folder):
        assert tools("merge", lora, "--base", wide_tiny_model, "--output", output, "--scale", 0.7) == 0
    pipe = StableDiffusionXLPipeline.from_single_file(str(single), config=str(wide_tiny_model), local_files_only=True)
    assert load_for_diffusers(pipe, tmp_path / "tok-toy_emb.safetensors") == ["<s0>", "<s1>"]
    expected = StableDiffusionXLPipeline.from_pretrained(folder)
    for name in MODELS:
        state, reference = getattr(pipe, name).state_dict(), getattr(expected, name).state_dict()
        assert state.keys() == reference.keys()
        assert all(torch.equal(value, reference[key]) for key, value in state.items()), name

    def image(pipeline) -> np.ndarray:
        generator = torch.Generator().manual_seed(0)
        common = dict(num_inference_steps=2, height=64, width=64, generator=generator, output_type="np")
        return pipeline(PIVOTAL_PROMPT, **common).images[0]

    np.testing.assert_array_equal(image(pipe), image(expected))


def test_sdxl_base_layout():
    """SDXL base's module tree (no weights): the keys and shapes of sd_xl_base_1.0.safetensors; diffusers
    recognises the file as SDXL base and converts it back to exactly the models' keys and shapes."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    models = empty_sdxl_models()
    with init_empty_weights():
        vae = AutoencoderKL(**SDXL_VAE_CONFIG)
    sdxl = types.SimpleNamespace(vae=vae, **models)
    state = sgm_state_dict(sdxl)
    assert {key: tuple(state[key].shape) for key in SDXL_KEYS if key in state} == SDXL_KEYS
    assert infer_diffusers_model_type(state) == "xl_base"
    for part, converted in diffusers_conversion(state, sdxl).items():
        reference = getattr(sdxl, part).state_dict()
        assert converted.keys() == reference.keys(), part
        assert all(value.shape == reference[key].shape for key, value in converted.items()), part
    qkv = sum(3 * 2 for key in state if key.endswith(".attn.in_proj_weight"))  # q, k, v weights and biases, fused
    assert len(state) == sum(len(getattr(sdxl, part).state_dict()) for part in MODELS) - qkv + qkv // 3


def test_merge_refuses_to_replace_a_checkpoint_or_its_embeddings(pivotal_kohya, tiny_model, tmp_path, capsys):
    """An existing checkpoint, or an existing `_emb` file beside it, is left alone without --overwrite; a
    --format that does not fit --output is refused; all before a model loads."""
    single, emb = tmp_path / "tok-toy.safetensors", tmp_path / "tok-toy_emb.safetensors"
    merge = ("merge", pivotal_kohya, "--base", tiny_model, "--output")
    for existing in (single, emb):
        existing.write_bytes(b"mine")
        assert tools(*merge, single) == 2
        assert "exists; pass --overwrite" in capsys.readouterr().err
        assert existing.read_bytes() == b"mine"
        existing.unlink()
    assert tools(*merge, tmp_path / "folder", "--format", "single_file") == 2
    assert "--format single_file writes one .safetensors file" in capsys.readouterr().err
    assert tools(*merge, single, "--format", "diffusers") == 2
    assert "--format diffusers writes a pipeline folder" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
    single.write_bytes(b"mine")
    emb.write_bytes(b"mine")
    assert tools(*merge, single, "--overwrite") == 0
    assert "model.diffusion_model.out.2.weight" in load_file(single)
    assert set(load_file(emb)) == {"clip_l", "clip_g"}
