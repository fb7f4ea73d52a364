"""The kohya LoRA file (A1111 / ComfyUI): SAI names checked against hand-written tables and diffusers' own
SAI converter, golden keys of the real SDXL architecture, exact round trips through diffusers' kohya loader,
our reverse conversion, and `load_for_diffusers` on every file we write."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from peft import LoHaConfig, LoraConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from peft_layers import adapter_layers
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from sdxl_pivotal.adapters import (
    TEXT_ENCODER_ATTENTION_PROJECTIONS,
    UNET_ATTENTION_PROJECTIONS,
    add_adapters,
)
from sdxl_pivotal.args import parse_args
from sdxl_pivotal.checkpoints import PARAMS_FILE
from sdxl_pivotal.export import LORA_WEIGHTS_NAME, embeddings_file_name
from sdxl_pivotal.formats import (
    empty_sdxl_models,
    kohya_state_dict,
    kohya_to_peft,
    load_for_diffusers,
    save_diffusers_lora,
    save_kohya_lora,
)
from sdxl_pivotal.formats.kohya import embedding_name, kohya_file_name, split_bundled_embeddings
from sdxl_pivotal.formats.names import (
    UNetLayout,
    adaptable_module_paths,
    kohya_module_names,
    sai_unet_path,
    sai_unet_table,
)
from sdxl_pivotal.models import (
    load_sdxl,
)
from sdxl_pivotal.tokens import PivotalTokens, add_new_tokens

PARTS = ("unet", "text_encoder", "text_encoder_2")

# SDXL's sgm UNet, written out by hand: diffusers block -> SAI block.
SDXL_SAI_BLOCKS = {
    "conv_in": "input_blocks.0.0",
    "down_blocks.0.resnets.0": "input_blocks.1.0",
    "down_blocks.0.resnets.1": "input_blocks.2.0",
    "down_blocks.0.downsamplers.0.conv": "input_blocks.3.0.op",
    "down_blocks.1.resnets.0": "input_blocks.4.0",
    "down_blocks.1.attentions.0": "input_blocks.4.1",
    "down_blocks.1.resnets.1": "input_blocks.5.0",
    "down_blocks.1.attentions.1": "input_blocks.5.1",
    "down_blocks.1.downsamplers.0.conv": "input_blocks.6.0.op",
    "down_blocks.2.resnets.0": "input_blocks.7.0",
    "down_blocks.2.attentions.0": "input_blocks.7.1",
    "down_blocks.2.resnets.1": "input_blocks.8.0",
    "down_blocks.2.attentions.1": "input_blocks.8.1",
    "mid_block.resnets.0": "middle_block.0",
    "mid_block.attentions.0": "middle_block.1",
    "mid_block.resnets.1": "middle_block.2",
    "up_blocks.0.resnets.0": "output_blocks.0.0",
    "up_blocks.0.attentions.0": "output_blocks.0.1",
    "up_blocks.0.resnets.1": "output_blocks.1.0",
    "up_blocks.0.attentions.1": "output_blocks.1.1",
    "up_blocks.0.resnets.2": "output_blocks.2.0",
    "up_blocks.0.attentions.2": "output_blocks.2.1",
    "up_blocks.0.upsamplers.0.conv": "output_blocks.2.2.conv",
    "up_blocks.1.resnets.0": "output_blocks.3.0",
    "up_blocks.1.attentions.0": "output_blocks.3.1",
    "up_blocks.1.resnets.1": "output_blocks.4.0",
    "up_blocks.1.attentions.1": "output_blocks.4.1",
    "up_blocks.1.resnets.2": "output_blocks.5.0",
    "up_blocks.1.attentions.2": "output_blocks.5.1",
    "up_blocks.1.upsamplers.0.conv": "output_blocks.5.2.conv",
    "up_blocks.2.resnets.0": "output_blocks.6.0",
    "up_blocks.2.resnets.1": "output_blocks.7.0",
    "up_blocks.2.resnets.2": "output_blocks.8.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_out": "out.2",
}
SAI_RESNET_LAYERS = {
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}

# What A1111 (extensions-builtin/Lora) and ComfyUI (comfy/lora.py) match in an SDXL LoRA: `lora_unet_` + the
# sgm UNet's module path, `lora_te1_`/`lora_te2_` + transformers' CLIP path, "_" for ".". SDXL's sgm attention
# blocks and their transformer depths:
SDXL_TRANSFORMER_DEPTHS = {
    "input_blocks_4_1": 2,
    "input_blocks_5_1": 2,
    "input_blocks_7_1": 10,
    "input_blocks_8_1": 10,
    "middle_block_1": 10,
    "output_blocks_0_1": 10,
    "output_blocks_1_1": 10,
    "output_blocks_2_1": 10,
    "output_blocks_3_1": 2,
    "output_blocks_4_1": 2,
    "output_blocks_5_1": 2,
}
SDXL_CLIP_LAYERS = {"lora_te1": 12, "lora_te2": 32}
KOHYA_TENSORS = {"lora_down.weight", "lora_up.weight", "alpha"}


def accepted_unet_attention_modules() -> set[str]:
    projections = ("to_q", "to_k", "to_v", "to_out_0")
    return {
        f"lora_unet_{block}_transformer_blocks_{i}_attn{a}_{projection}"
        for block, depth in SDXL_TRANSFORMER_DEPTHS.items()
        for i in range(depth)
        for a in (1, 2)
        for projection in projections
    }


def accepted_clip_attention_modules() -> set[str]:
    projections = ("q_proj", "k_proj", "v_proj", "out_proj")
    return {
        f"{prefix}_text_model_encoder_layers_{i}_self_attn_{projection}"
        for prefix, layers in SDXL_CLIP_LAYERS.items()
        for i in range(layers)
        for projection in projections
    }


@pytest.fixture
def sdxl_models() -> dict[str, torch.nn.Module]:
    """SDXL base's UNet and text encoders on the meta device (no weights, real module tree)."""
    return empty_sdxl_models()


def test_sai_names_match_hand_written_sdxl_table(sdxl_models):
    unet = sdxl_models["unet"]
    names = kohya_module_names("unet", unet)
    assert set(names) == set(adaptable_module_paths(unet)), "every Linear and Conv2d of SDXL has a kohya name"
    checked = 0
    for path in names:
        block = next((b for b in SDXL_SAI_BLOCKS if path == b or path.startswith(b + ".")), None)
        assert block is not None, path
        rest = path.removeprefix(block).lstrip(".")
        if ".resnets." in block:
            rest = SAI_RESNET_LAYERS[rest]
        expected = ".".join(filter(None, [SDXL_SAI_BLOCKS[block], rest]))
        assert names[path] == "lora_unet_" + expected.replace(".", "_"), path
        checked += ".attentions." in block
    # Per transformer block 4 + 4 attention projections and 2 feed-forward layers; per attention block proj_in/out.
    assert checked == 10 * sum(SDXL_TRANSFORMER_DEPTHS.values()) + 2 * len(SDXL_TRANSFORMER_DEPTHS)


def test_sai_names_are_what_diffusers_reads_sai_checkpoints_with(sdxl_models):
    """diffusers' single-file loader (SAI checkpoint -> diffusers) turns our SAI names of every SDXL UNet
    parameter back into the original diffusers names."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    unet = sdxl_models["unet"]
    table = sai_unet_table(UNetLayout.from_config(unet.config))
    state = unet.state_dict()
    sai_checkpoint = {}
    for key, tensor in state.items():
        module, parameter = key.rsplit(".", 1)
        sai_checkpoint[f"model.diffusion_model.{sai_unet_path(module, table)}.{parameter}"] = tensor
    converted = convert_ldm_unet_checkpoint(sai_checkpoint, unet.config)
    assert converted.keys() == state.keys()
    assert all(converted[key] is state[key] for key in state)


def test_sdxl_kohya_keys_are_those_a1111_and_comfyui_accept(sdxl_models):
    """The trainer's default targets on the real SDXL (UNet and both encoders): exactly the accepted modules,
    each with lora_down / lora_up / a scalar alpha, the module part without dots."""
    sdxl_models["unet"].add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=list(UNET_ATTENTION_PROJECTIONS)))
    for part in ("text_encoder", "text_encoder_2"):
        sdxl_models[part].add_adapter(LoraConfig(r=4, target_modules=list(TEXT_ENCODER_ATTENTION_PROJECTIONS)))
    state = kohya_state_dict(sdxl_models)
    by_module: dict[str, set[str]] = {}
    for key in state:
        module, tensor = key.split(".", 1)
        by_module.setdefault(module, set()).add(tensor)
    assert set(by_module) == accepted_unet_attention_modules() | accepted_clip_attention_modules()
    assert all(tensors == KOHYA_TENSORS for tensors in by_module.values())
    assert all(re.fullmatch(r"lora_(unet|te1|te2)_[a-z0-9_]+", module) for module in by_module)
    down, up = "lora_unet_middle_block_1_transformer_blocks_9_attn2_to_k.lora_down.weight", "lora_up.weight"
    assert state[down].shape == (4, 2048) and state[down.replace("lora_down.weight", up)].shape == (1280, 4)
    assert state["lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.alpha"].shape == ()
    assert float(state["lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.alpha"]) == 8.0
    assert float(state["lora_te2_text_model_encoder_layers_31_self_attn_out_proj.alpha"]) == 8.0  # PEFT's default


# Trained runs on the tiny model, and the same models rebuilt from a checkpoint.


def trained_parts(tiny_model: Path, demo_images: Path, run: Path, step: int, *flags: str):
    """The trained models of `run`, rebuilt from its checkpoint at `step` (LoRA and new token rows exactly)."""
    argv = ["--pretrained_model_name_or_path", str(tiny_model), "--instance_data_dir", str(demo_images)]
    args = parse_args([*argv, "--instance_prompt", "a photo of TOK toy", "--output_dir", str(run / "x"), *flags])
    parts = load_sdxl(args)
    add_adapters(parts, args)
    tokens = None
    if args.train_text_encoder_ti:
        tokens = PivotalTokens.from_flags(args.token_abstraction, args.num_new_tokens_per_abstraction)
        add_new_tokens([parts.tokenizer, parts.tokenizer_2], [parts.text_encoder, parts.text_encoder_2], tokens, None)
    saved = load_file(run / f"checkpoint-{step}" / PARAMS_FILE)
    for part in PARTS:
        own = {key.split(".", 1)[1]: value for key, value in saved.items() if key.startswith(part + ".")}
        assert not getattr(parts, part).load_state_dict(own, strict=False).unexpected_keys
    return parts, tokens


def fresh_pipeline(tiny_model: Path):
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline.from_pretrained(tiny_model)


def outputs(models, prompt: str = "a photo of TOK toy") -> tuple[torch.Tensor, ...]:
    """UNet noise prediction on fixed inputs, and both encoders' outputs for `prompt` (a pipeline, or SDXLParts)."""
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    conditions = torch.randn(1, 77, 64, generator=torch.Generator().manual_seed(1))
    pooled = torch.randn(1, 32, generator=torch.Generator().manual_seed(2))
    added = {"text_embeds": pooled, "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}
    ids, ids_2 = (
        tokenizer(prompt, padding="max_length", max_length=77, return_tensors="pt").input_ids
        for tokenizer in (models.tokenizer, models.tokenizer_2)
    )
    with torch.no_grad():
        return (
            models.unet(latents, 500, encoder_hidden_states=conditions, added_cond_kwargs=added).sample,
            models.text_encoder(ids).last_hidden_state,
            models.text_encoder_2(ids_2).text_embeds,
        )


def assert_outputs_equal(
    actual: tuple[torch.Tensor, ...], expected: tuple[torch.Tensor, ...], atol: float = 1e-6
) -> None:
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=atol)


def test_kohya_file_loads_in_diffusers_like_the_diffusers_file(run_training, tiny_model, demo_images, tmp_path):
    """diffusers' own kohya loader on our kohya file = diffusers' loader on our diffusers file = the trained
    model; with text-encoder LoRA and alpha != rank, and for the UNet alone."""
    flags = ("--rank", "4", "--lora_alpha", "16", "--train_text_encoder")
    lr = (
        "--learning_rate",
        "1e-2",
        "--text_encoder_lr",
        "1e-2",
        "--max_train_steps",
        "1",
        "--checkpointing_steps",
        "1",
    )
    run = run_training(tmp_path / "run", *flags, *lr)
    parts, _ = trained_parts(tiny_model, demo_images, run, 1, *flags)
    models = {part: getattr(parts, part) for part in PARTS}
    kohya_file = save_kohya_lora(tmp_path / "kohya", models, "run", str(tiny_model))
    unet_only = save_kohya_lora(tmp_path / "kohya-unet", {"unet": parts.unet}, "run", str(tiny_model))
    diffusers_unet_only = save_diffusers_lora(tmp_path / "diffusers-unet", {"unet": parts.unet})

    trained = outputs(parts)
    base = outputs(fresh_pipeline(tiny_model))
    assert all(not torch.allclose(t, b, atol=1e-4) for t, b in zip(trained, base, strict=True)), "LoRA has effect"
    cases = [(kohya_file, run, trained), (unet_only, diffusers_unet_only, (trained[0], *base[1:]))]
    for kohya, diffusers, expected in cases:
        from_kohya, from_diffusers = fresh_pipeline(tiny_model), fresh_pipeline(tiny_model)
        from_kohya.load_lora_weights(str(kohya))
        from_diffusers.load_lora_weights(str(diffusers))
        assert_outputs_equal(outputs(from_kohya), outputs(from_diffusers))
        assert_outputs_equal(outputs(from_diffusers), expected)
    ours = fresh_pipeline(tiny_model)
    assert load_for_diffusers(ours, kohya_file) == []
    assert_outputs_equal(outputs(ours), trained)

    with safe_open(str(kohya_file), framework="pt") as file:
        metadata = file.metadata()
    assert all(isinstance(value, str) for value in metadata.values())
    assert metadata["ss_base_model_version"] == "sdxl_base_v1-0"
    assert metadata["ss_network_module"] == "networks.lora"
    assert (metadata["ss_network_dim"], float(metadata["ss_network_alpha"])) == ("4", 16.0)
    assert (metadata["ss_output_name"], metadata["ss_sd_model_name"]) == ("run", str(tiny_model))
    assert "lora_adapter_metadata" not in metadata, "diffusers would apply it to kohya names"


@pytest.fixture(scope="module")
def dora_pipeline(tiny_model):
    """The tiny pipeline with random DoRA adapters on all three models (Linear and Conv2d layers), per-module
    ranks and alphas, and magnitudes moved away from their initial values."""
    pipe = fresh_pipeline(tiny_model)
    torch.manual_seed(0)
    dora = dict(r=4, lora_alpha=8.0, use_dora=True, init_lora_weights=False)
    unet_patterns = dict(rank_pattern={"attn1.to_v": 2}, alpha_pattern={"attn2.to_k": 2.0})
    configs = {
        "unet": LoraConfig(
            target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1"], **unet_patterns, **dora
        ),
        "text_encoder": LoraConfig(target_modules=["q_proj", "v_proj", "fc1"], alpha_pattern={"fc1": 3.0}, **dora),
        "text_encoder_2": LoraConfig(target_modules=["k_proj", "out_proj"], **dora),
    }
    for part, config in configs.items():
        model = getattr(pipe, part)
        model.add_adapter(config)
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if "lora_magnitude_vector" in name:
                    parameter.mul_(torch.rand_like(parameter) + 0.5)
    return pipe


def test_kohya_to_peft_inverts_the_export(dora_pipeline, tiny_model):
    models = {part: getattr(dora_pipeline, part) for part in PARTS}
    state = kohya_state_dict(models)
    # LyCORIS' shapes with wd_on_output: [out, 1] for a Linear, [out, 1, 1, 1] for a Conv2d.
    assert state["lora_unet_input_blocks_4_1_proj_in.dora_scale"].shape == (64, 1)
    assert state["lora_unet_output_blocks_8_0_in_layers_2.dora_scale"].shape == (32, 1, 1, 1)
    loras = kohya_to_peft(state, models)
    for part, model in models.items():
        original = get_peft_model_state_dict(model, save_embedding_layers=False)
        assert loras[part].state.keys() == original.keys()
        assert all(torch.equal(loras[part].state[key], original[key]) for key in original)
        rebuilt = getattr(fresh_pipeline(tiny_model), part)
        rebuilt.add_adapter(loras[part].config)
        set_peft_model_state_dict(rebuilt, loras[part].state)
        layers, rebuilt_layers = adapter_layers(model), adapter_layers(rebuilt)
        assert layers.keys() == rebuilt_layers.keys()
        for path, layer in layers.items():
            assert (layer.r, layer.scaling) == (rebuilt_layers[path].r, rebuilt_layers[path].scaling), path
    assert adapter_layers(models["unet"])["down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"].scaling == {
        "default": 0.5
    }


def test_load_for_diffusers_is_exact_for_dora_and_per_module_alpha(dora_pipeline, tiny_model, tmp_path):
    """A DoRA LoRA with per-module ranks and alphas loads with the source's exact behaviour from the kohya file
    (diffusers' `load_lora_weights` drops its `dora_scale` and per-module alphas) and, for the text encoders,
    from the diffusers file (with transformers 5, `load_lora_weights` leaves their DoRA magnitudes unloaded)."""
    models = {part: getattr(dora_pipeline, part) for part in PARTS}
    expected = outputs(dora_pipeline)
    kohya = fresh_pipeline(tiny_model)
    load_for_diffusers(kohya, save_kohya_lora(tmp_path, models, "dora", "base"))
    # The file's ComfyUI-form magnitudes m ⊙ ‖W‖ / ‖W + ΔW‖ are rounded to float32 once (1 ulp).
    assert_outputs_equal(outputs(kohya), expected, atol=1e-5)

    encoders = {part: models[part] for part in ("text_encoder", "text_encoder_2")}
    diffusers = fresh_pipeline(tiny_model)
    base_unet = outputs(diffusers)[0]
    load_for_diffusers(diffusers, save_diffusers_lora(tmp_path, encoders))
    assert_outputs_equal(outputs(diffusers), (base_unet, *expected[1:]))


def test_pivotal_embeddings_bundle_and_every_file_loads(run_training, tiny_model, demo_images, tmp_path):
    flags = ("--train_text_encoder_ti", "--rank", "4")
    lr = (
        "--learning_rate",
        "1e-2",
        "--text_encoder_lr",
        "1e-1",
        "--max_train_steps",
        "1",
        "--checkpointing_steps",
        "1",
    )
    run = run_training(tmp_path / "tok-toy", *flags, *lr)
    parts, tokens = trained_parts(tiny_model, demo_images, run, 1, *flags)
    encoders = [parts.text_encoder, parts.text_encoder_2]
    embeddings_file = run / embeddings_file_name(run)
    embeddings = load_file(embeddings_file)
    assert torch.equal(embeddings["clip_l"], encoders[0].get_input_embeddings().new_rows)
    assert torch.equal(embeddings["clip_g"], encoders[1].get_input_embeddings().new_rows)
    name, unet = "tok-toy", {"unet": parts.unet}
    bundled = save_kohya_lora(tmp_path / "bundled", unet, name, "base", embeddings, tokens)
    unbundled = save_kohya_lora(tmp_path / "plain", unet, name, "base", embeddings, tokens, bundle=False)

    lora, bundles = split_bundled_embeddings(load_file(bundled))
    assert bundles.keys() == {name} and all(torch.equal(bundles[name][k], v) for k, v in embeddings.items())
    assert lora.keys() == load_file(unbundled).keys()
    with pytest.raises(ValueError, match="Invalid LoRA checkpoint"):
        fresh_pipeline(tiny_model).load_lora_weights(str(bundled))  # diffusers refuses `bundle_emb.*` keys

    prompt = "a photo of <s0><s1> toy"
    expected = outputs(parts, prompt)
    for files in ([run], [bundled], [unbundled, embeddings_file], [run / LORA_WEIGHTS_NAME, embeddings_file]):
        pipe = fresh_pipeline(tiny_model)
        assert [token for file in files for token in load_for_diffusers(pipe, file)] == ["<s0>", "<s1>"]
        assert_outputs_equal(outputs(pipe, prompt), expected)


def test_file_and_embedding_names_stay_apart_from_other_outputs():
    assert kohya_file_name("tok-dog") == "tok-dog.safetensors"
    assert kohya_file_name("pytorch_lora_weights") == "pytorch_lora_weights_kohya.safetensors"
    assert kohya_file_name("optimizer") == "optimizer_kohya.safetensors"
    assert embedding_name("tok-dog v1.5") == "tok-dog_v1_5"


def test_metadata_records_tokens_and_dora(dora_pipeline, tmp_path):
    models = {part: getattr(dora_pipeline, part) for part in PARTS}
    tokens = PivotalTokens({"TOK": ["<s0>", "<s1>"], "SKS": ["<s2>", "<s3>"]})
    file = save_kohya_lora(tmp_path, models, "run", "base", tokens=tokens)
    with safe_open(str(file), framework="pt") as f:
        metadata = f.metadata()
    assert json.loads(metadata["sdxl_pivotal.tokens"]) == tokens.by_abstraction
    assert metadata["ss_training_comment"].endswith("write <s0><s1> <s2><s3> in the prompt.")
    assert metadata["ss_network_module"] == "lycoris.kohya"
    assert json.loads(metadata["ss_network_args"])["dora_wd"] == "True"


def with_text_model_level(pipe):
    """`pipe` with its first text encoder in the other transformers layout than the installed one's: under a
    `text_model.` level (transformers 4's `CLIPTextModel`; here a `CLIPTextModelWithProjection` with CLIP-L's
    weights, whose last hidden states are CLIP-L's)."""
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTextModelWithProjection

    encoder = pipe.text_encoder
    assert not hasattr(encoder, "text_model"), "the installed transformers names CLIP-L without `text_model.`"
    other = CLIPTextModelWithProjection(encoder.config)
    missing, unexpected = other.load_state_dict(
        {f"text_model.{key}": value for key, value in encoder.state_dict().items()}, strict=False
    )
    assert missing == ["text_projection.weight"] and not unexpected
    return StableDiffusionXLPipeline(**(pipe.components | {"text_encoder": other}))


TEXT_ENCODER_ADAPTERS = {
    "lora": LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    "dora": LoraConfig(
        r=4,
        target_modules=["q_proj", "v_proj"],
        rank_pattern={"encoder.layers.0.self_attn.q_proj": 2},
        alpha_pattern={"encoder.layers.1.self_attn.v_proj": 3.0},
        use_dora=True,
        init_lora_weights=False,
    ),
    "loha": LoHaConfig(
        r=4,
        target_modules=[f"encoder.layers.{i}.self_attn.k_proj" for i in range(2)],
        alpha=2.0,
        init_weights=False,
    ),
}


@pytest.mark.parametrize("family", TEXT_ENCODER_ADAPTERS)
def test_text_encoder_keys_are_canonical_and_load_in_either_layout(tiny_model, tmp_path, family):
    """The first text encoder's keys are `text_encoder.text_model.encoder...` whatever transformers is installed, as in
    published SDXL LoRAs and the second encoder's keys; files of either layout load into encoders of either layout."""
    prompt = "a photo of TOK toy"
    installed = fresh_pipeline(tiny_model)
    torch.manual_seed(0)
    installed.text_encoder.add_adapter(TEXT_ENCODER_ADAPTERS[family])
    with torch.no_grad():
        for name, parameter in installed.text_encoder.named_parameters():
            if "lora_magnitude_vector" in name:
                parameter.mul_(torch.rand_like(parameter) + 0.5)
    expected = outputs(installed, prompt)[1]
    assert not torch.allclose(expected, outputs(fresh_pipeline(tiny_model), prompt)[1], atol=1e-4)

    written = save_diffusers_lora(tmp_path / "installed", {"text_encoder": installed.text_encoder})
    keys = list(load_file(written))
    assert keys and all(key.startswith("text_encoder.text_model.encoder.layers.") for key in keys)
    # As this trainer wrote it before: the installed layout's names.
    legacy = tmp_path / "legacy.safetensors"
    with safe_open(str(written), framework="pt") as file:
        metadata = file.metadata()
    legacy_state = {key.replace(".text_model.", ".", 1): value for key, value in load_file(written).items()}
    save_file(legacy_state, legacy, metadata)
    # Written from an encoder of the other layout.
    other = with_text_model_level(fresh_pipeline(tiny_model))
    load_for_diffusers(other, written, adapter_name="default")
    other_written = save_diffusers_lora(tmp_path / "other", {"text_encoder": other.text_encoder})
    assert load_file(other_written).keys() == load_file(written).keys()

    for file in (written, legacy, other_written):
        for layout in (fresh_pipeline, lambda model: with_text_model_level(fresh_pipeline(model))):
            pipe = layout(tiny_model)
            load_for_diffusers(pipe, file)
            torch.testing.assert_close(outputs(pipe, prompt)[1], expected, rtol=1e-5, atol=1e-6)
    if family == "lora":  # diffusers' own loader reads the canonical names too, as it reads published LoRAs
        pipe = fresh_pipeline(tiny_model)
        pipe.load_lora_weights(str(written))
        torch.testing.assert_close(outputs(pipe, prompt)[1], expected, rtol=1e-5, atol=1e-6)


def saved_files(folder: Path) -> dict[str, bytes]:
    """Every file the run wrote, but its log of wall-clock times (`metrics.jsonl`)."""
    files = (path for path in folder.rglob("*") if path.is_file() and path.name != "metrics.jsonl")
    return {path.relative_to(folder).as_posix(): path.read_bytes() for path in files}


@pytest.mark.slow
def test_the_same_run_writes_the_same_bytes(tiny_model, demo_images, tmp_path):
    """Two identical runs, in processes with different string hashing (PEFT keeps `target_modules` as a set, whose
    order follows the hashes), write byte-identical LoRA files, kohya file, model card and checkpoint."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    runs = {}
    out = tmp_path / "tok-toy"  # one path for both runs: training_config.yaml records it
    for hash_seed in ("1", "2"):
        argv = [
            *("--pretrained_model_name_or_path", str(tiny_model), "--instance_data_dir", str(demo_images)),
            *("--instance_prompt", "a photo of TOK toy", "--output_dir", str(out), "--resolution", "64"),
            *("--train_batch_size", "2", "--max_train_steps", "1", "--checkpointing_steps", "1", "--seed", "0"),
            *("--train_text_encoder", "--lora_target", "attn_ff", "--report_to", "none"),
        ]
        env = os.environ | {"PYTHONHASHSEED": hash_seed, "OMP_NUM_THREADS": "1"}
        script = str(root / "train_dreambooth_lora_sdxl_advanced.py")
        subprocess.run([sys.executable, script, *argv], env=env, cwd=root, check=True, capture_output=True)
        runs[hash_seed] = saved_files(out)
        out.rename(tmp_path / f"run-{hash_seed}")
    assert {"pytorch_lora_weights.safetensors", "tok-toy.safetensors", "README.md"} <= runs["1"].keys()
    assert runs["1"].keys() == runs["2"].keys()
    for name, content in runs["1"].items():
        assert content == runs["2"][name], name


def test_two_saves_of_the_same_adapters_are_byte_identical(dora_pipeline, tmp_path):
    """safetensors writes its metadata in a different order at each save (a Rust HashMap): ours is sorted."""
    models = {part: getattr(dora_pipeline, part) for part in PARTS}
    tokens = PivotalTokens.from_flags("TOK", 2)
    embeddings = {"clip_l": torch.ones(2, 32), "clip_g": torch.ones(2, 64)}
    for name in ("a", "b"):
        save_diffusers_lora(tmp_path / name, models)
        save_kohya_lora(tmp_path / name, models, "run", "base", embeddings, tokens)
    first, second = saved_files(tmp_path / "a"), saved_files(tmp_path / "b")
    assert first.keys() == {LORA_WEIGHTS_NAME, "run.safetensors"} and first == second
    for content in first.values():
        header = json.loads(content[8 : 8 + int.from_bytes(content[:8], "little")])
        assert list(header["__metadata__"]) == sorted(header["__metadata__"])
