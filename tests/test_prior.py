"""Prior preservation in the loss: class images share the UNet call, their loss is weighted apart."""

from __future__ import annotations

import pytest
import torch

from sdxl_pivotal.adapters import add_adapters
from sdxl_pivotal.args import parse_args
from sdxl_pivotal.data import DreamBoothDataset, ImageRecord, collate, load_records
from sdxl_pivotal.models import load_sdxl
from sdxl_pivotal.prompts import PromptEncoder
from sdxl_pivotal.train import batch_loss


@pytest.mark.parametrize("snr_gamma", [None, "5"])
def test_prior_loss_enters_gradients_linearly(tiny_model, demo_images, tmp_path, snr_gamma):
    """loss = instance loss + w * prior loss, so the LoRA gradient is g(0) + w * (g(1) - g(0))."""
    extra = ["--snr_gamma", snr_gamma] if snr_gamma else []
    args = parse_args(
        [
            *("--pretrained_model_name_or_path", str(tiny_model), "--instance_data_dir", str(demo_images)),
            *("--instance_prompt", "a photo of TOK toy", "--output_dir", str(tmp_path / "o"), "--resolution", "64"),
            *extra,
        ]
    )
    parts = load_sdxl(args)
    torch.manual_seed(0)
    add_adapters(parts, args)
    with torch.no_grad():  # give the LoRA up-projections values, so every LoRA weight gets a gradient
        for name, param in parts.unet.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.01)
    records = load_records(args)
    class_records = [ImageRecord(caption="a photo of a toy", path=r.path) for r in reversed(records)]
    dataset = DreamBoothDataset(records, args, seed=0, class_records=class_records)
    batch = collate([dataset[(0, 0)], dataset[(0, 1)]])
    assert batch.num_prior == 2 and batch.captions[2:] == ["a photo of a toy"] * 2 and len(batch.pixel_values) == 4
    encoder = PromptEncoder([parts.tokenizer, parts.tokenizer_2], [parts.text_encoder, parts.text_encoder_2], None)
    params = [p for p in parts.unet.parameters() if p.requires_grad]

    def loss_and_gradient(weight: float) -> tuple[float, torch.Tensor]:
        args.prior_loss_weight = weight
        loss = batch_loss(parts, parts.unet, encoder, batch, torch.Generator().manual_seed(7), args)
        grads = torch.autograd.grad(loss, params)
        return loss.item(), torch.cat([g.flatten() for g in grads])

    (l0, g0), (l1, g1), (lw, gw) = loss_and_gradient(0.0), loss_and_gradient(1.0), loss_and_gradient(2.5)
    assert l1 > l0 and lw == pytest.approx(l0 + 2.5 * (l1 - l0), rel=1e-5)
    assert (g1 - g0).abs().max() > 0, "the class images contribute a gradient"
    torch.testing.assert_close(gw, g0 + 2.5 * (g1 - g0), rtol=1e-4, atol=1e-7)


def test_training_with_prior_preservation_generates_then_reuses_class_images(run_training, tmp_path, monkeypatch):
    from sdxl_pivotal import train as train_module

    class_dir = tmp_path / "class"
    flags = (
        *("--with_prior_preservation", "--class_prompt", "a photo of a toy", "--class_data_dir", str(class_dir)),
        *("--num_class_images", "3", "--sample_batch_size", "2", "--max_train_steps", "2", "--overwrite_output_dir"),
        *("--train_text_encoder_ti", "--prior_loss_weight", "0.5"),
    )
    loads = []
    real_loader = train_module.load_generation_pipeline

    def counting_loader(*args, **kwargs):
        loads.append(1)
        pipeline = real_loader(*args, **kwargs)
        pipeline.set_progress_bar_config(disable=True)
        return pipeline

    monkeypatch.setattr(train_module, "load_generation_pipeline", counting_loader)
    captions = []
    real_loss = train_module.batch_loss

    def recording_loss(parts, unet, encoder, batch, *args, **kwargs):
        captions.append((batch.captions, batch.num_prior))
        return real_loss(parts, unet, encoder, batch, *args, **kwargs)

    monkeypatch.setattr(train_module, "batch_loss", recording_loss)
    out = run_training(tmp_path / "run", *flags)
    generated = sorted(class_dir.glob("*.png"))
    assert len(generated) == 3 and loads == [1]
    assert captions[0] == (["a photo of <s0><s1> toy"] * 2 + ["a photo of a toy"] * 2, 2)

    before = [p.read_bytes() for p in generated]
    run_training(tmp_path / "run", *flags)
    assert loads == [1], "a second run reuses the class images without loading a pipeline"
    assert [p.read_bytes() for p in sorted(class_dir.glob("*.png"))] == before
    assert (out / "pytorch_lora_weights.safetensors").exists()
