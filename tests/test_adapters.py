"""The adapter families (LoRA, DoRA, LoHa, LoKr; with convolutions), their placement, training and files.

The files are checked against `lycoris_reference.py`, our own reconstruction of ΔW from the published formulas:
for every adapted module, the weight the UIs compute from the kohya file equals the weight PEFT applies.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from lycoris_reference import comfyui_weight, module_delta
from peft import inject_adapter_in_model, set_peft_model_state_dict
from peft_layers import adapter_layers
from run_helpers import lora_file, train_until_first_checkpoint
from safetensors import safe_open
from safetensors.torch import load_file

from sdxl_pivotal.adapters import add_adapters, unet_adapter_plan, unet_parameters_by_lr_scale
from sdxl_pivotal.args import parse_args
from sdxl_pivotal.checkpoints import complete_checkpoints
from sdxl_pivotal.errors import InputError
from sdxl_pivotal.formats import diffusers_to_peft, kohya_to_peft, save_diffusers_lora, save_kohya_lora
from sdxl_pivotal.formats.kohya import DORA_FORM_KEY, kohya_modules
from sdxl_pivotal.formats.load import load_for_diffusers
from sdxl_pivotal.formats.names import modules_by_kohya_name
from sdxl_pivotal.models import load_sdxl

PARTS = ("unet", "text_encoder", "text_encoder_2")

# Each family with convolutions, per-block ranks and text-encoder adapters; and the options that change shapes.
FAMILIES = {
    "lora": (
        "--conv_rank",
        "2",
        "--conv_alpha",
        "1",
        "--lora_alpha",
        "3",
        "--unet_block_ranks",
        "down=2,up_blocks.0=8",
    ),
    "dora": ("--use_dora", "--conv_rank", "2", "--lora_target", "attn_ff"),
    "loha": ("--adapter", "loha", "--conv_rank", "2", "--lora_target", "all_linear"),
    "loha_tucker": ("--adapter", "loha", "--conv_rank", "2", "--use_effective_conv2d"),
    "lokr": ("--adapter", "lokr", "--conv_rank", "2", "--unet_block_ranks", "mid=16"),
    "lokr_decomposed": (
        *("--adapter", "lokr", "--rank", "2", "--conv_rank", "2", "--decompose_both", "--lokr_factor", "4"),
        "--use_effective_conv2d",
    ),
}


def flags_for(tiny_model: Path, demo_images: Path, tmp_path: Path, *extra: str):
    return parse_args(
        [
            *("--pretrained_model_name_or_path", str(tiny_model), "--instance_data_dir", str(demo_images)),
            *("--instance_prompt", "a photo of TOK toy", "--output_dir", str(tmp_path / "out"), *extra),
        ]
    )


def random_adapters(tiny_model, demo_images, tmp_path, *flags: str) -> dict[str, torch.nn.Module]:
    """The tiny SDXL's three models with our adapters for `flags` (and the text encoders'), every adapter tensor
    random (PEFT starts some at zero), DoRA magnitudes moved off their start."""
    args = flags_for(tiny_model, demo_images, tmp_path, *flags, "--train_text_encoder")
    parts = load_sdxl(args)
    torch.manual_seed(0)
    add_adapters(parts, args)
    models = {part: getattr(parts, part) for part in PARTS}
    with torch.no_grad():
        for model in models.values():
            for name, parameter in model.named_parameters():
                if "magnitude" in name:
                    parameter.mul_(1 + 0.2 * torch.randn_like(parameter))
                elif parameter.requires_grad:
                    parameter.copy_(0.3 * torch.randn_like(parameter))
    return models


def applied_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """{module path: the weight PEFT applies} for each adapted module: the base weight with the adapter merged."""
    merged = copy.deepcopy(model)
    weights = {}
    for path, layer in adapter_layers(merged).items():
        layer.merge(adapter_names=["default"])
        weights[path] = layer.get_base_layer().weight.detach().clone()
    return weights


def base_models(tiny_model, demo_images, tmp_path) -> dict[str, torch.nn.Module]:
    parts = load_sdxl(flags_for(tiny_model, demo_images, tmp_path))
    return {part: getattr(parts, part) for part in PARTS}


@pytest.mark.parametrize("family", FAMILIES)
def test_kohya_tensors_rebuild_the_weights_peft_applies(family, tiny_model, demo_images, tmp_path):
    """For every adapted module, the weight the UIs compute from the kohya file (our reconstruction from the
    published formulas, DoRA as ComfyUI applies it) equals the weight PEFT applies."""
    models = random_adapters(tiny_model, demo_images, tmp_path, *FAMILIES[family])
    path = save_kohya_lora(tmp_path, models, "run", "base")
    state = load_file(path)
    index = modules_by_kohya_name(models)
    modules = kohya_modules(state)
    expected = {part: applied_weights(model) for part, model in models.items()}
    assert {index[name] for name in modules} == {(p, path) for p, weights in expected.items() for path in weights}
    assert any(index[name][1].endswith("conv1") for name in modules), "convolutions are adapted"
    for name, tensors in modules.items():
        part, module_path = index[name]
        layer = models[part].get_submodule(module_path)
        base = layer.get_base_layer().weight.detach()
        rebuilt = comfyui_weight(tensors, base)
        torch.testing.assert_close(rebuilt.float(), expected[part][module_path], rtol=1e-5, atol=1e-6, msg=name)
        if family != "dora":  # A1111 (no DoRA: see the README)
            a1111 = base.double() + module_delta(tensors, base.shape)
            torch.testing.assert_close(a1111.float(), expected[part][module_path], rtol=1e-5, atol=1e-6, msg=name)
    with safe_open(str(path), framework="pt") as file:
        assert (DORA_FORM_KEY in file.metadata()) == (family == "dora")


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("file_format", ["kohya", "diffusers"])
def test_files_load_back_into_peft(family, file_format, tiny_model, demo_images, tmp_path):
    """Both files, read back into PEFT configs and states and injected into fresh models, give every module the
    weight the trained adapters apply."""
    models = random_adapters(tiny_model, demo_images, tmp_path, *FAMILIES[family])
    fresh = base_models(tiny_model, demo_images, tmp_path)
    if file_format == "kohya":
        path = save_kohya_lora(tmp_path, models, "run", "base")
        with safe_open(str(path), framework="pt") as file:
            metadata = file.metadata()
        loras = kohya_to_peft(load_file(path), fresh, metadata)
    else:
        path = save_diffusers_lora(tmp_path, models)
        with safe_open(str(path), framework="pt") as file:
            metadata = file.metadata()
        loras = diffusers_to_peft(load_file(path), metadata, fresh)
    assert set(loras) == set(PARTS)
    for part, lora in loras.items():
        assert type(lora.config) is type(models[part].peft_config["default"])
        inject_adapter_in_model(lora.config, fresh[part])
        result = set_peft_model_state_dict(fresh[part], lora.state)
        assert not result.unexpected_keys
        expected, actual = applied_weights(models[part]), applied_weights(fresh[part])
        assert actual.keys() == expected.keys()
        for module_path, weight in expected.items():
            torch.testing.assert_close(actual[module_path], weight, rtol=1e-6, atol=1e-7, msg=module_path)


TRAINED = {
    "lora_conv": ("--conv_rank", "4", "--unet_block_ranks", "down=2", "--unet_block_lr", "mid=0.5,up=2"),
    "dora_conv": ("--use_dora", "--conv_rank", "4"),
    "loha": ("--adapter", "loha", "--conv_rank", "4", "--mixed_precision", "bf16", "--module_dropout", "0.1"),
    "lokr": ("--adapter", "lokr", "--conv_rank", "4", "--train_text_encoder_ti", "--rank_dropout", "0.1"),
}


@pytest.mark.parametrize("family", TRAINED)
def test_each_adapter_trains_lowers_the_loss_and_resumes_exactly(
    family, run_training, tiny_model, demo_images, tmp_path, monkeypatch
):
    from test_training import base_args, eval_loss, pipeline_parts

    flags = (*TRAINED[family], "--learning_rate", "1e-2", "--lr_scheduler", "cosine", "--checkpointing_steps", "3")
    out = run_training(tmp_path / "full", *flags, "--max_train_steps", "24")

    pipe, parts = pipeline_parts(tiny_model)
    args = base_args(tiny_model, demo_images, tmp_path / "eval", *TRAINED[family])
    before = eval_loss(parts, args)
    load_for_diffusers(pipe, out, adapter_name="trained")
    assert adapter_layers(pipe.unet, "trained"), "the adapters load"
    after = eval_loss(parts, args)
    assert after < 0.98 * before, (before, after)

    # Stop right after checkpoint-3 of a 6-step run; resume: the same weights as the run without the stop.
    short = (*flags, "--max_train_steps", "6")
    uninterrupted = run_training(tmp_path / "six", *short)
    train_until_first_checkpoint(run_training, monkeypatch, tmp_path / "resumed", *short)
    assert [p.name for p in complete_checkpoints(tmp_path / "resumed")] == ["checkpoint-3"]
    run_training(tmp_path / "resumed", *short, "--resume_from_checkpoint", "latest")
    resumed, expected = lora_file(tmp_path / "resumed"), lora_file(uninterrupted)
    assert resumed.keys() == expected.keys()
    assert all(torch.equal(resumed[key], expected[key]) for key in expected)


def plan_for(tiny_model, demo_images, tmp_path, *flags: str):
    args = flags_for(tiny_model, demo_images, tmp_path, *flags)
    return unet_adapter_plan(load_sdxl(args).unet, args), args


def test_presets_and_conv_rank_choose_the_modules(tiny_model, demo_images, tmp_path):
    attn, _ = plan_for(tiny_model, demo_images, tmp_path)
    attn_ff, _ = plan_for(tiny_model, demo_images, tmp_path, "--lora_target", "attn_ff")
    linear, _ = plan_for(tiny_model, demo_images, tmp_path, "--lora_target", "all_linear")
    conv, _ = plan_for(tiny_model, demo_images, tmp_path, "--conv_rank", "8", "--conv_alpha", "2")
    assert all(path.endswith(("to_q", "to_k", "to_v", "to_out.0")) for path in attn)
    assert set(attn) < set(attn_ff) < set(linear)
    assert {p for p in attn_ff if p not in attn} and all(".ff.net." in p for p in attn_ff if p not in attn)
    assert any(p.endswith("time_emb_proj") for p in linear) and any(p.endswith("proj_in") for p in linear)
    convs = {p: m for p, m in conv.items() if p not in attn}
    assert any(p.endswith("conv1") for p in convs) and any("downsamplers" in p for p in convs)
    assert any(p.endswith("conv_shortcut") for p in convs), "1x1 projections of the resnets too"
    assert all((m.rank, m.alpha) == (8, 2.0) for m in convs.values())
    assert "conv_in" not in conv and "conv_out" not in conv


def test_regex_and_blocks_narrow_the_targets(tiny_model, demo_images, tmp_path):
    regex, _ = plan_for(tiny_model, demo_images, tmp_path, "--lora_target_regex", r"up_blocks\.0\..*attn2\.to_[kv]")
    assert regex and all(p.startswith("up_blocks.0.") and p.endswith(("attn2.to_k", "attn2.to_v")) for p in regex)
    blocks, _ = plan_for(
        tiny_model, demo_images, tmp_path, "--conv_rank", "2", "--lora_unet_blocks", "up_blocks.1.resnets.0"
    )
    assert blocks and all(p.startswith("up_blocks.1.resnets.0.") for p in blocks)
    with pytest.raises(InputError, match="matches no Linear or Conv2d"):
        plan_for(tiny_model, demo_images, tmp_path, "--lora_target_regex", "to_q")


def test_block_ranks_and_learning_rates(tiny_model, demo_images, tmp_path):
    flags = ("--rank", "4", "--lora_alpha", "2", "--unet_block_ranks", "down=2,up=8,up_blocks.0.attentions.1=0")
    plan, args = plan_for(tiny_model, demo_images, tmp_path, *flags, "--unet_block_lr", "mid=0.5,down=0")
    assert not any(p.startswith(("down_blocks.", "up_blocks.0.attentions.1.")) for p in plan), "rank or lr 0: none"
    assert {m.rank for p, m in plan.items() if p.startswith("up_blocks.")} == {8}
    assert {(m.rank, m.alpha, m.lr_scale) for p, m in plan.items() if p.startswith("mid_block.")} == {(4, 2.0, 0.5)}
    assert {m.alpha for p, m in plan.items() if p.startswith("up_blocks.")} == {4.0}, "alpha / rank kept per block"

    parts = load_sdxl(args)
    add_adapters(parts, args)
    layers = adapter_layers(parts.unet)
    assert set(layers) == set(plan)
    assert all(layer.r["default"] == plan[path].rank for path, layer in layers.items())
    assert all(layer.scaling["default"] == 0.5 for layer in layers.values())
    groups = unet_parameters_by_lr_scale(parts.unet, plan)
    assert set(groups) == {0.5, 1.0}
    assert sum(p.numel() for ps in groups.values() for p in ps) == sum(
        p.numel() for p in parts.unet.parameters() if p.requires_grad
    )


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (("--adapter", "loha", "--use_dora"), "--use_dora is a LoRA variant"),
        (("--adapter", "lokr", "--lora_dropout", "0.1"), "use --rank_dropout and --module_dropout"),
        (("--rank_dropout", "0.1"), "is for --adapter loha or lokr"),
        (("--lokr_factor", "4"), "are for --adapter lokr"),
        (("--adapter", "lokr", "--lokr_factor", "0"), "must be -1"),
        (("--conv_alpha", "2"), "--conv_alpha needs --conv_rank"),
        (("--lora_target", "attn_ff", "--lora_target_regex", "x"), "not both"),
        (
            (
                "--lora_target_regex",
                "(",
            ),
            "is not a regex",
        ),
        (("--unet_block_ranks", "left=2"), "is not a UNet block"),
        (("--unet_block_ranks", "down=1.5"), "whole numbers"),
        (("--unet_block_lr", "down=-1"), "non-negative number"),
        (("--unet_block_conv_ranks", "down=2"), "needs --conv_rank"),
    ],
)
def test_bad_adapter_flags_fail_before_loading(tiny_model, demo_images, tmp_path, flags, message):
    with pytest.raises(InputError, match=message):
        flags_for(tiny_model, demo_images, tmp_path, *flags)


def test_block_flag_naming_a_missing_block_fails(tiny_model, demo_images, tmp_path):
    with pytest.raises(InputError, match=r"no adaptable module in 'up_blocks\.9'"):
        plan_for(tiny_model, demo_images, tmp_path, "--unet_block_ranks", "up_blocks.9=4")
