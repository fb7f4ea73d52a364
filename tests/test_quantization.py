"""--quantize_unet: the frozen UNet's Linear weights stored in int8 / fp8 (torchao), the LoRA in float32 on top."""

from __future__ import annotations

import copy

import pytest
import torch
from run_helpers import assert_same_tensors, lora_file, train_until_first_checkpoint
from safetensors.torch import load_file

from sdxl_pivotal.models import load_sdxl
from sdxl_pivotal.quantization import QuantizedLinear, is_frozen_linear, parameter_bytes
from sdxl_pivotal.train import prepare_models
from tests.test_training import base_args

pytest.importorskip("torchao")


def _prepared_unet(tiny_model, demo_images, tmp_path, *flags: str):
    args = base_args(tiny_model, demo_images, tmp_path / "out", "--rank", "4", *flags)
    parts = load_sdxl(args)
    prepare_models(parts, args, None, 0, torch.device("cpu"), torch.float32)
    return parts.unet


def _unet_inputs(unet):
    torch.manual_seed(1)
    sample = torch.randn(2, 4, 8, 8)
    hidden = torch.randn(2, 77, unet.config.cross_attention_dim, requires_grad=True)
    added = {"text_embeds": torch.randn(2, 32), "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2)}
    return sample, hidden, added


def _lora_b_weights_nonzero(unet) -> None:
    """LoRA's B starts at zero; give it values so that the A gradients are not zero either."""
    torch.manual_seed(2)
    for name, param in unet.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.05)


def test_int8_unet_stores_linear_weights_in_one_byte_rounded_to_the_nearest_step(tiny_model, demo_images, tmp_path):
    reference = _prepared_unet(tiny_model, demo_images, tmp_path)
    quantized = _prepared_unet(tiny_model, demo_images, tmp_path, "--quantize_unet", "int8")
    frozen = {path: m for path, m in reference.named_modules() if is_frozen_linear(m)}
    assert len(frozen) > 50
    for path, module in quantized.named_modules():
        if path in frozen:
            assert isinstance(module, QuantizedLinear) and module.weight.qdata.dtype == torch.int8, path
        elif "lora_" in path and isinstance(module, torch.nn.Linear):  # the adapters: plain float32, trained
            assert type(module.weight) is torch.nn.Parameter and module.weight.dtype == torch.float32, path
            assert module.weight.requires_grad

    # Bytes held: the measured storages against a count from the layers' shapes (1 byte per frozen Linear weight,
    # one float32 scale and one int8 zero point per output row; everything else float32 as before).
    linear_numbers = sum(m.weight.numel() for m in frozen.values())
    rows = sum(m.out_features for m in frozen.values())
    expected = parameter_bytes(reference) - 4 * linear_numbers + linear_numbers + rows * (4 + 1)
    assert parameter_bytes(quantized) == expected < parameter_bytes(reference) - 2.9 * linear_numbers

    # Each weight is rounded to the nearest of 255 steps of its row's largest magnitude / 127.5 (symmetric int8).
    for path, module in frozen.items():
        weight = module.weight.detach()
        step = weight.abs().amax(dim=1, keepdim=True) / 127.5
        error = (quantized.get_submodule(path).weight.dequantize() - weight).abs()
        assert (error <= step / 2 * 1.001 + 1e-12).all(), path

    # Forward and backward equal those of float32 layers holding the dequantised weights (float rounding apart):
    # the quantised layers compute x W^T + b and its gradients with W as stored, the custom backward included.
    dequantized = copy.deepcopy(reference)
    for path in frozen:
        dequantized.get_submodule(path).weight.data = quantized.get_submodule(path).weight.dequantize()
    for unet in (reference, quantized, dequantized):
        _lora_b_weights_nonzero(unet)
    (base, _, _), (out, grads, hidden_grad), (expected_out, expected_grads, expected_hidden) = (
        _prediction_and_gradients(unet) for unet in (reference, quantized, dequantized)
    )
    torch.testing.assert_close(out, expected_out, rtol=1e-5, atol=1e-6)
    assert grads.keys() == expected_grads.keys() and len(grads) > 20
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], rtol=1e-4, atol=1e-8, msg=name)
    assert hidden_grad.abs().sum() > 0
    torch.testing.assert_close(hidden_grad, expected_hidden, rtol=1e-4, atol=1e-9)
    # And the rounding moves the prediction a little: a fraction of a percent (printed, for the record).
    error = ((out - base).norm() / base.norm()).item()
    print(f"int8 vs float32 weights: relative change of the UNet's prediction {error:.2e}")
    assert 0 < error < 0.02


def _prediction_and_gradients(unet):
    sample, hidden, added = _unet_inputs(unet)
    prediction = unet(sample, 10, hidden, added_cond_kwargs=added).sample
    prediction.square().mean().backward()
    grads = {n: p.grad for n, p in unet.named_parameters() if p.requires_grad}
    return prediction.detach(), grads, hidden.grad


def test_backward_keeps_the_quantised_weight_not_a_dequantised_copy(tiny_model, demo_images, tmp_path):
    """torchao's own weight-only linear saves a full-precision copy of the weight for the backward pass, which would
    give back the memory quantising saved; QuantizedLinear saves no tensor of a frozen weight's shape."""
    unet = _prepared_unet(tiny_model, demo_images, tmp_path, "--quantize_unet", "fp8")
    layers = [m for m in unet.modules() if isinstance(m, QuantizedLinear)]
    shapes = {shape for m in layers for shape in ((m.out_features, m.in_features), (m.in_features, m.out_features))}
    saved: list[torch.Tensor] = []

    def pack(tensor):
        saved.append(tensor)
        return tensor

    sample, hidden, added = _unet_inputs(unet)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        prediction = unet(sample, 10, hidden, added_cond_kwargs=added).sample
    assert saved  # the hook sees what autograd keeps
    copies = [t for t in saved if t.dim() == 2 and tuple(t.shape) in shapes and t.dtype == torch.float32]
    assert not copies
    prediction.square().mean().backward()
    assert hidden.grad is not None and hidden.grad.abs().sum() > 0

    # The same layer as torchao leaves it does keep one (what the swap is for).
    layer = layers[0]
    plain, saved = torch.nn.Linear(layer.in_features, layer.out_features), []
    plain.weight, plain.bias = layer.weight, layer.bias
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        plain(torch.randn(3, layer.in_features, requires_grad=True))
    assert any(t.numel() == layer.weight.numel() and t.dtype == torch.float32 for t in saved)


@pytest.mark.slow
def test_int8_pivotal_run_trains_close_to_float32_resumes_exactly_and_writes_the_same_files(
    run_training, tiny_model, tmp_path, monkeypatch
):
    """Pivotal tuning with validation during training, in int8: the LoRA after 6 steps is within the difference that
    bf16 mixed precision makes (the precision the quantisation implies: 8 bits per weight, as bf16's mantissa),
    a stop after checkpoint 3 resumes to the same weights, and the files are the float32 run's, loadable as any."""
    from diffusers import StableDiffusionXLPipeline

    from sdxl_pivotal.formats import load_for_diffusers

    flags = (
        *("--max_train_steps", "6", "--checkpointing_steps", "3", "--learning_rate", "1e-3"),
        *("--train_text_encoder_ti", "--text_encoder_lr", "1e-2", "--rank", "4"),
    )
    quantized = ("--quantize_unet", "int8")
    validation = ("--validation_prompt", "a TOK toy", "--validation_steps", "3", "--num_validation_images", "1")
    full = run_training(
        tmp_path / "int8" / "run", *flags, *quantized, *validation, "--validation_inference_steps", "2"
    )
    assert (full / "validation" / "step-3" / "0.png").is_file()
    reference_dir = run_training(tmp_path / "fp32" / "run", *flags)
    reference = lora_file(reference_dir)
    bf16 = lora_file(run_training(tmp_path / "bf16", *flags, "--mixed_precision", "bf16"))
    int8 = lora_file(full)

    assert int8.keys() == reference.keys()
    assert all(int8[k].dtype == reference[k].dtype == torch.float32 for k in reference)
    # The same files (named after the output folder, "run" in both) with the same keys.
    files = sorted(p.name for p in reference_dir.glob("*.safetensors"))
    assert len(files) == 3 and sorted(p.name for p in full.glob("*.safetensors")) == files
    for name in files:
        assert load_file(full / name).keys() == load_file(reference_dir / name).keys()

    # lora_B starts at zero: its value is what training changed.
    def distance(state) -> float:
        keys = [k for k in reference if "lora_B" in k]
        return (
            (
                sum((state[k] - reference[k]).square().sum() for k in keys)
                / sum(reference[k].square().sum() for k in keys)
            )
            .sqrt()
            .item()
        )

    print(f"relative distance of lora_B to the float32 run: int8 {distance(int8):.3f}, bf16 {distance(bf16):.3f}")
    assert 0 < distance(int8) < distance(bf16)

    train_until_first_checkpoint(run_training, monkeypatch, tmp_path / "resumed" / "run", *flags, *quantized)
    run_training(tmp_path / "resumed" / "run", *flags, *quantized, "--resume_from_checkpoint", "latest")
    assert_same_tensors(lora_file(tmp_path / "resumed" / "run"), int8)
    emb = next(full.glob("*_emb.safetensors")).name
    assert_same_tensors(load_file(tmp_path / "resumed" / "run" / emb), load_file(full / emb))

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_model)
    tokens = load_for_diffusers(pipe, full)
    assert tokens and all(t in pipe.tokenizer.get_vocab() for t in tokens)
    image = pipe("a photo of " + "".join(tokens), num_inference_steps=2, height=64, width=64, output_type="np")
    assert torch.isfinite(torch.as_tensor(image.images)).all()


def test_without_torchao_the_flag_fails_before_anything_loads(tiny_model, demo_images, tmp_path, monkeypatch):
    import importlib.util

    from sdxl_pivotal.errors import InputError

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "torchao" else find_spec(name, *a)
    )
    with pytest.raises(InputError, match=r"--quantize_unet needs the torchao package.*pip install torchao"):
        base_args(tiny_model, demo_images, tmp_path / "out", "--quantize_unet", "fp8")
    base_args(tiny_model, demo_images, tmp_path / "out")  # without the flag torchao is not needed


@pytest.mark.slow
def test_planner_sizes_the_quantised_weights_as_the_real_model_holds_them(tiny_model, demo_images, tmp_path):
    """The fake run's weights shrink by what quantising the real UNet saves, byte for byte."""
    from sdxl_pivotal.plan import CHANGES, estimate, parse_plan_args

    argv = ["--pretrained_model_name_or_path", str(tiny_model), "--instance_prompt", "a TOK", "--resolution", "64"]
    argv += ["--train_batch_size", "1", "--rank", "4"]
    plain = estimate(parse_plan_args(argv)[1])
    quantized_args = parse_plan_args([*argv, "--quantize_unet", "int8"])[1]
    quantized = estimate(quantized_args)
    saved = parameter_bytes(_prepared_unet(tiny_model, demo_images, tmp_path)) - parameter_bytes(
        _prepared_unet(tiny_model, demo_images, tmp_path, "--quantize_unet", "int8")
    )
    assert saved > 0 and plain.weights - quantized.weights == saved
    assert quantized.peak < plain.peak and quantized.trainable_numbers == plain.trainable_numbers
    change = next(c for c in CHANGES if c.name == "--quantize_unet int8")
    assert change.apply(quantized_args) is None  # already quantised: not proposed again


@pytest.mark.parametrize("adapter", [("--use_dora",), ("--adapter", "loha")], ids=["dora", "loha"])
def test_other_adapters_train_on_the_quantised_unet_and_export(run_training, tmp_path, adapter):
    """DoRA reads the base weight (its norm, forward and at export, for ComfyUI's dora_scale), LoHa wraps the layer:
    both on int8 weights."""
    out = run_training(tmp_path / "run", "--max_train_steps", "2", "--quantize_unet", "int8", *adapter)
    state = lora_file(out)
    assert state and all(torch.isfinite(t).all() for t in state.values())
    kohya = load_file(out / "run.safetensors")
    assert any(key.endswith("dora_scale") for key in kohya) == (adapter == ("--use_dora",))
