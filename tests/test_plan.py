"""The embedded SDXL-base configs and the memory planner."""

from __future__ import annotations

import pytest
import torch

from sdxl_pivotal.configs import SDXL_BASE, models_from_configs


def test_embedded_configs_give_sdxl_base_parameter_counts():
    """Parameter counts of stabilityai/stable-diffusion-xl-base-1.0 as published (external oracle): a wrong value in
    any config changes them."""
    with torch.device("meta"):
        models = models_from_configs(SDXL_BASE)
    counts = {name: sum(p.numel() for p in model.parameters()) for name, model in models.items()}
    assert counts == {
        "unet": 2_567_463_684,
        "vae": 83_653_863,
        "text_encoder": 123_060_480,
        "text_encoder_2": 694_659_840,
    }
    assert models["unet"].config.cross_attention_dim == 768 + 1280
    assert models["vae"].config.scaling_factor == 0.13025


@pytest.mark.slow
def test_planner_sizes_weights_and_trainable_numbers_of_the_tiny_model(tiny_model):
    """The fake run's weights are the model's (counted independently from the saved files), and its trainable
    numbers those of the trainer's LoRA plus the new token rows."""
    from safetensors import safe_open

    from sdxl_pivotal.plan import estimate, parse_plan_args

    _, args = parse_plan_args(
        [
            "--pretrained_model_name_or_path",
            str(tiny_model),
            "--instance_prompt",
            "a photo of TOK dog",
            "--resolution",
            "64",
            "--train_batch_size",
            "1",
            "--rank",
            "4",
            "--train_text_encoder_ti",
        ]
    )
    result = estimate(args)
    file_bytes = 0
    for path in tiny_model.glob("*/*.safetensors"):
        with safe_open(str(path), "pt") as f:
            file_bytes += sum(_numel(f, key) * 4 for key in f.keys())  # noqa: SIM118 (safe_open is no dict)
    # fp32 weights as saved, plus the LoRA, the 2 new rows per encoder, and (text encoders) 2 resized rows
    assert file_bytes < result.weights < file_bytes * 1.1
    assert result.peak > result.weights
    assert result.trainable_numbers > 2 * (32 + 32)


def _numel(f, key) -> int:
    size = 1
    for n in f.get_slice(key).get_shape():
        size *= n
    return size


@pytest.mark.slow
def test_planner_proposes_a_change_that_fits(tiny_model):
    from sdxl_pivotal.plan import estimate, parse_plan_args, propose

    gpu, args = parse_plan_args(
        [
            "--gpu_memory",
            "1",
            "--pretrained_model_name_or_path",
            str(tiny_model),
            "--instance_prompt",
            "a TOK",
            "--resolution",
            "64",
            "--train_batch_size",
            "2",
        ]
    )
    assert gpu == 1.0
    base = estimate(args)
    # A budget between the estimate with 8-bit Adam and without it: the cheapest change proposed is 8-bit Adam.
    with_8bit = estimate(parse_plan_args(["--use_8bit_adam", *_argv(args)])[1])
    assert with_8bit.peak < base.peak
    budget = (base.needed + with_8bit.needed) / 2
    ((changes, result),) = propose(args, budget)
    assert [c.name for c in changes] == ["--use_8bit_adam"] and result.fits(budget)


def _argv(args) -> list[str]:
    return [
        "--pretrained_model_name_or_path",
        args.pretrained_model_name_or_path,
        "--instance_prompt",
        args.instance_prompt,
        "--resolution",
        str(args.resolution),
        "--train_batch_size",
        str(args.train_batch_size),
    ]


def test_fused_adamw_reaches_torch_and_matches_the_default():
    import argparse

    from sdxl_pivotal.args import build_parser
    from sdxl_pivotal.optim import create_optimizer

    def run(fused: bool) -> torch.Tensor:
        args: argparse.Namespace = build_parser().parse_args(
            ["--pretrained_model_name_or_path", "x", "--instance_prompt", "x"] + (["--adam_fused"] if fused else [])
        )
        torch.manual_seed(0)
        weight = torch.nn.Parameter(torch.randn(16, 8))
        optimizer = create_optimizer(args, [{"params": [weight], "lr": 1e-2, "weight_decay": 1e-4}])
        assert optimizer.defaults["fused"] is (True if fused else None)
        for _ in range(3):
            (weight.square().sum() + weight.sum()).backward()
            optimizer.step()
            optimizer.zero_grad()
        return weight.detach()

    fused, default = run(True), run(False)
    assert not torch.equal(fused, torch.randn(16, 8))
    torch.testing.assert_close(fused, default, rtol=1e-6, atol=1e-7)


def test_channels_last_unet_gives_the_same_prediction(tiny_model):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_model, subfolder="unet")
    torch.manual_seed(0)
    sample = torch.randn(1, 4, 8, 8)
    hidden = torch.randn(1, 77, unet.config.cross_attention_dim)
    added = {"text_embeds": torch.randn(1, 32), "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}
    with torch.no_grad():
        expected = unet(sample, 10, hidden, added_cond_kwargs=added).sample
        unet.to(memory_format=torch.channels_last)
        assert unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
        got = unet(sample, 10, hidden, added_cond_kwargs=added).sample
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_compiled_transformer_blocks_give_the_same_loss_and_gradients(tiny_model):
    """--compile: regional torch.compile of the UNet's transformer blocks (with their LoRA) changes no number
    beyond float rounding, forward or backward."""
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    def loss_and_grads(compiled: bool):
        torch.manual_seed(0)
        unet = UNet2DConditionModel.from_pretrained(tiny_model, subfolder="unet")
        unet.requires_grad_(False)
        unet.add_adapter(
            LoraConfig(r=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights="gaussian")
        )
        if compiled:
            unet.compile_repeated_blocks()
            block = unet.down_blocks[1].attentions[0].transformer_blocks[0]
            assert block._compiled_call_impl is not None
        torch.manual_seed(1)
        sample = torch.randn(2, 4, 8, 8)
        hidden = torch.randn(2, 77, unet.config.cross_attention_dim)
        added = {"text_embeds": torch.randn(2, 32), "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2)}
        loss = unet(sample, 10, hidden, added_cond_kwargs=added).sample.square().mean()
        loss.backward()
        grads = {n: p.grad for n, p in unet.named_parameters() if p.requires_grad}
        return loss.detach(), grads

    loss, grads = loss_and_grads(compiled=True)
    expected_loss, expected_grads = loss_and_grads(compiled=False)
    torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == expected_grads.keys() and any(g.abs().sum() > 0 for g in grads.values())
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_random_pipeline_folder_loads_as_the_benchmark_loads_sdxl(tiny_model, tmp_path, monkeypatch):
    """The benchmark's model folder (written by `save_random_sdxl`, here from the tiny configs instead of SDXL's) loads
    through the trainer's `load_sdxl` with the benchmark's flags: fp16 variant files and the separate VAE folder."""
    from sdxl_pivotal.args import build_parser
    from sdxl_pivotal.configs import save_random_sdxl
    from sdxl_pivotal.models import load_sdxl

    folder = save_random_sdxl(tmp_path / "model", torch.device("cpu"), source=tiny_model)
    assert (folder / "unet" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    vae = str(folder / "vae-fp16-fix")
    flags = ["--pretrained_model_name_or_path", str(folder), "--instance_prompt", "x", "--variant", "fp16"]
    args = build_parser().parse_args([*flags, "--pretrained_vae_model_name_or_path", vae])
    parts = load_sdxl(args)
    assert list(parts.unet.config.block_out_channels) == [32, 64, 64]
    assert next(parts.unet.parameters()).dtype == torch.float32  # fp16 files, upcast on load as from the Hub
    assert parts.tokenizer("a photo of TOK dog").input_ids[0] == parts.tokenizer.bos_token_id
