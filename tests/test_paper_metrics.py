"""The DreamBooth paper's metrics code path, with tiny random DINO (ViT) and CLIP models built from configs."""

from __future__ import annotations

import pytest

from sdxl_pivotal import world
from sdxl_pivotal.paper_metrics import load_feature_models, paper_metrics


@pytest.fixture(scope="module")
def feature_models(tmp_path_factory):
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPProcessor,
        CLIPTokenizer,
        ViTConfig,
        ViTImageProcessor,
        ViTModel,
    )

    from sdxl_pivotal.tiny import write_clip_vocab

    root = tmp_path_factory.mktemp("feature-models")
    vit = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32)
    ViTModel(ViTConfig(patch_size=8, **vit), add_pooling_layer=False).save_pretrained(root / "dino")
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(root / "dino")
    vocab, merges = write_clip_vocab(root / "vocab")
    tokenizer = CLIPTokenizer(vocab=str(vocab), merges=str(merges))
    text = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    config = CLIPConfig(
        text_config={**text, "vocab_size": len(tokenizer), "max_position_embeddings": 77},
        vision_config={**vit, "patch_size": 8},
        projection_dim=16,
    )
    CLIPModel(config).save_pretrained(root / "clip")
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(root / "clip")
    return load_feature_models(dino=str(root / "dino"), clip=str(root / "clip"))


def test_paper_metrics_with_tiny_feature_models(feature_models, tmp_path):
    from sdxl_pivotal.quality import read_instance_images

    real = read_instance_images(world.write_subject_images(tmp_path, count=4))
    scenes, _ = world.world_batch(seed=0, count=4, size=64)
    same = paper_metrics(feature_models, real, {"a photo of a circle": real}, class_samples=real)
    assert same["dino"] == pytest.approx(same["pres"]) and same["div"] > 0
    copies = paper_metrics(feature_models, real, {"a photo of a circle": [real[0]] * 3}, class_samples=scenes)
    assert copies["div"] == pytest.approx(0, abs=1e-6)
    # A real image against itself has similarity 1.
    itself = paper_metrics(feature_models, real[:1], {"x": [real[0]] * 2}, [real[0]])
    assert itself["dino"] == pytest.approx(1, abs=1e-5) and itself["clip_i"] == pytest.approx(1, abs=1e-5)
    with pytest.raises(ValueError, match="two samples"):
        paper_metrics(feature_models, real, {"x": real[:1]}, real)
    for value in (*same.values(), *copies.values()):
        assert -1 - 1e-6 <= value <= 2 + 1e-6
    other = paper_metrics(feature_models, real, {"a photo of a red square": scenes}, class_samples=scenes)
    assert other["clip_t"] != same["clip_t"] and other["dino"] != same["dino"]
