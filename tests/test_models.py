"""LoRA placement and optimizer construction."""

from __future__ import annotations

import sys
from types import SimpleNamespace

import pytest
import torch

from sdxl_pivotal.adapters import add_adapters
from sdxl_pivotal.args import parse_args
from sdxl_pivotal.models import load_sdxl
from sdxl_pivotal.optim import create_optimizer, parameter_groups


def args_for(tiny_model, demo_images, tmp_path, *extra):
    return parse_args(
        [
            *("--pretrained_model_name_or_path", str(tiny_model), "--instance_data_dir", str(demo_images)),
            *("--instance_prompt", "TOK", "--output_dir", str(tmp_path / "out"), *extra),
        ]
    )


def adapted_modules(model: torch.nn.Module) -> set[str]:
    return {
        name.removesuffix(".lora_A.default") for name, _ in model.named_modules() if name.endswith(".lora_A.default")
    }


def test_default_targets_every_unet_attention_projection(tiny_model, demo_images, tmp_path):
    parts = load_sdxl(args_for(tiny_model, demo_images, tmp_path))
    expected = {
        name
        for name, _ in parts.unet.named_modules()
        if name.endswith((".to_q", ".to_k", ".to_v", ".to_out.0")) and ".attentions." in name
    }
    add_adapters(parts, args_for(tiny_model, demo_images, tmp_path))
    assert adapted_modules(parts.unet) == expected and len(expected) > 0
    assert not adapted_modules(parts.text_encoder), "text encoders get LoRA only with --train_text_encoder"
    trainable = [n for n, p in parts.unet.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


@pytest.mark.parametrize(
    ("flags", "blocks"),
    [
        (("--use_blora",), ("up_blocks.0.attentions.0.", "up_blocks.0.attentions.1.")),
        (
            ("--lora_unet_blocks", "unet.down_blocks.2.attentions.1, mid_block.attentions.0"),
            ("down_blocks.2.attentions.1.", "mid_block.attentions.0."),
        ),
    ],
)
def test_block_selection_adapts_only_those_blocks(tiny_model, demo_images, tmp_path, flags, blocks):
    args = args_for(tiny_model, demo_images, tmp_path, *flags)
    parts = load_sdxl(args)
    add_adapters(parts, args)
    adapted = adapted_modules(parts.unet)
    assert adapted and all(name.startswith(blocks) for name in adapted)
    assert all(any(name.startswith(b) for name in adapted) for b in blocks), "every named block is adapted"


def test_unknown_block_lists_the_real_ones(tiny_model, demo_images, tmp_path):
    args = args_for(tiny_model, demo_images, tmp_path, "--lora_unet_blocks", "up_blocks.7.attentions.0")
    parts = load_sdxl(args)
    with pytest.raises(
        ValueError,
        match=r"no block 'up_blocks.7.attentions.0'.*unet.mid_block.attentions.0, unet.up_blocks.0.attentions.0",
    ):
        add_adapters(parts, args)


def test_dora_and_alpha_reach_peft(tiny_model, demo_images, tmp_path):
    args = args_for(tiny_model, demo_images, tmp_path, "--use_dora", "--rank", "2", "--lora_alpha", "7")
    parts = load_sdxl(args)
    add_adapters(parts, args)
    config = parts.unet.peft_config["default"]
    assert config.use_dora and config.r == 2 and config.lora_alpha == 7
    assert any("lora_magnitude_vector" in n for n, _ in parts.unet.named_parameters())


def optimizer_args(**overrides) -> SimpleNamespace:
    values = dict(
        optimizer="adamw",
        use_8bit_adam=False,
        adam_fused=False,
        learning_rate=1e-4,
        text_encoder_lr=5e-6,
        adam_beta1=0.9,
        adam_beta2=0.99,
        adam_epsilon=1e-8,
        adam_weight_decay=1e-4,
        adam_weight_decay_text_encoder=None,
        prodigy_beta3=None,
        prodigy_decouple=True,
        prodigy_use_bias_correction=True,
        prodigy_safeguard_warmup=True,
    )
    values.update(overrides)
    return SimpleNamespace(**values)


def test_text_encoder_group_has_its_own_lr_and_decay():
    unet_p, text_p = [torch.nn.Parameter(torch.zeros(2))], [torch.nn.Parameter(torch.zeros(2))]
    groups = parameter_groups(optimizer_args(adam_weight_decay_text_encoder=0.3), {1.0: unet_p}, text_p)
    optimizer = create_optimizer(optimizer_args(), groups)
    assert [(g["lr"], g["weight_decay"]) for g in optimizer.param_groups] == [(1e-4, 1e-4), (5e-6, 0.3)]
    # Without its own decay, the text-encoder group uses --adam_weight_decay.
    assert parameter_groups(optimizer_args(), {1.0: unet_p}, text_p)[1]["weight_decay"] == 1e-4


def test_prodigy_gets_every_flag_including_false_booleans():
    params = [torch.nn.Parameter(torch.zeros(2))]
    args = optimizer_args(optimizer="prodigy", learning_rate=1.0, prodigy_decouple=False, prodigy_beta3=0.5)
    args.prodigy_safeguard_warmup = False
    optimizer = create_optimizer(args, parameter_groups(args, {1.0: params}, [torch.nn.Parameter(torch.zeros(1))]))
    group = optimizer.param_groups[0]
    assert type(optimizer).__name__ == "Prodigy"
    assert group["decouple"] is False and group["safeguard_warmup"] is False and group["beta3"] == 0.5
    assert group["betas"] == (0.9, 0.99) and group["use_bias_correction"] is True
    assert optimizer.param_groups[1]["lr"] == 1.0, "Prodigy: the text-encoder group shares --learning_rate"


def test_8bit_adam_without_bitsandbytes_says_how_to_fix(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails as if not installed
    params = [torch.nn.Parameter(torch.zeros(2))]
    with pytest.raises(ImportError, match="pip install bitsandbytes"):
        create_optimizer(optimizer_args(use_8bit_adam=True), parameter_groups(optimizer_args(), {1.0: params}, []))
