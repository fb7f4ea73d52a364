"""The DreamBooth paper's metrics (Ruiz et al., 2023, https://arxiv.org/abs/2208.12242) for real subjects.

With feature models given by Hub id or folder (transformers; safetensors; never remote code):
- DINO: mean cosine similarity of ViT-S/16 DINO [CLS] embeddings, generated vs real subject images;
- CLIP-I: the same with CLIP image embeddings;
- CLIP-T: mean cosine similarity of CLIP image and prompt embeddings (prompts with the class noun, no TOK);
- PRES: DINO similarity of class-prompt samples to the real subject (lower: less of the subject leaked into
  the class);
- DIV: mean pairwise DINO dissimilarity (1 - cosine) of samples of one prompt (the paper uses LPIPS, whose
  weights are not in transformers; this is our stand-in).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from PIL import Image

DINO_MODEL = "facebook/dino-vits16"
CLIP_MODEL = "openai/clip-vit-base-patch32"


@dataclass
class FeatureModels:
    dino: torch.nn.Module
    dino_processor: object
    clip: torch.nn.Module
    clip_processor: object


def load_feature_models(dino: str = DINO_MODEL, clip: str = CLIP_MODEL) -> FeatureModels:
    from transformers import AutoImageProcessor, AutoModel, AutoProcessor, CLIPModel

    return FeatureModels(
        dino=AutoModel.from_pretrained(dino, use_safetensors=True).eval(),
        dino_processor=AutoImageProcessor.from_pretrained(dino),
        clip=CLIPModel.from_pretrained(clip, use_safetensors=True).eval(),
        clip_processor=AutoProcessor.from_pretrained(clip),
    )


def normalized(features: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(features.float(), dim=-1)


@torch.no_grad()
def dino_embeddings(models: FeatureModels, images: list[Image.Image]) -> torch.Tensor:
    inputs = models.dino_processor(images=[im.convert("RGB") for im in images], return_tensors="pt")
    return normalized(models.dino(pixel_values=inputs["pixel_values"]).last_hidden_state[:, 0])


@torch.no_grad()
def clip_image_embeddings(models: FeatureModels, images: list[Image.Image]) -> torch.Tensor:
    inputs = models.clip_processor(images=[im.convert("RGB") for im in images], return_tensors="pt")
    return normalized(models.clip.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output)


@torch.no_grad()
def clip_text_embeddings(models: FeatureModels, prompts: list[str]) -> torch.Tensor:
    inputs = models.clip_processor(text=prompts, return_tensors="pt", padding=True)
    features = models.clip.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    return normalized(features.pooler_output)


def mean_similarity(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean cosine similarity over all pairs of rows of two normalised embedding sets."""
    return float((a @ b.T).mean())


def paper_metrics(
    models: FeatureModels,
    real: list[Image.Image],
    samples: dict[str, list[Image.Image]],
    class_samples: list[Image.Image],
) -> dict[str, float]:
    """DINO, CLIP-I, CLIP-T, PRES and DIV of `samples` ({prompt with the class noun: images}) against `real`."""
    if any(len(images) < 2 for images in samples.values()):
        raise ValueError("paper_metrics needs at least two samples per prompt (DIV compares pairs).")
    generated = [image for images in samples.values() for image in images]
    real_dino, real_clip = dino_embeddings(models, real), clip_image_embeddings(models, real)
    clip_t = [
        mean_similarity(clip_image_embeddings(models, images), clip_text_embeddings(models, [prompt]))
        for prompt, images in samples.items()
    ]
    div = []
    for images in samples.values():
        embeddings = dino_embeddings(models, images)
        div += [1 - float(embeddings[i] @ embeddings[j]) for i, j in itertools.combinations(range(len(images)), 2)]
    return {
        "dino": mean_similarity(dino_embeddings(models, generated), real_dino),
        "clip_i": mean_similarity(clip_image_embeddings(models, generated), real_clip),
        "clip_t": sum(clip_t) / len(clip_t),
        "pres": mean_similarity(dino_embeddings(models, class_samples), real_dino),
        "div": sum(div) / len(div),
    }
