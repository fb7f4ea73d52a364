"""An embedded SDXL-architecture pipeline (random or world-trained weights), and a demo image set.

Nothing can be downloaded here, so tests, the demo and the benchmarks build their own SDXL: the same
components and topology as `stabilityai/stable-diffusion-xl-base-1.0` (three UNet levels, cross-attention
in the lower two, `text_time` micro-conditioning, CLIP-L + CLIP-G/bigG text encoders, an 8x VAE, SDXL's
Euler scheduler), only narrower. The CLIP tokenizers' vocab and merges are written by code.

    python -m sdxl_pivotal.tiny --output_dir tiny-sdxl [--preset tiny|small] [--demo_images demo-images]
    python -m sdxl_pivotal.tiny --pretrained --output_dir tiny-world [--subject_images subject-images]

`--pretrained` gives the same architecture with weights trained on the procedural world of
`sdxl_pivotal.world` (shipped in `sdxl_pivotal/assets/tiny-world/`), so it draws "a red circle on a blue
background" at 64 px.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

# Per-preset sizes. "tiny": a training step at 128 px takes a fraction of a second on a laptop CPU.
# "small": about 50 M UNet parameters, for benchmarks at 256 px.
PRESETS: dict[str, dict] = {
    "tiny": dict(
        unet_channels=(32, 64, 64),
        unet_heads=(2, 4, 4),
        transformer_layers=(1, 1, 1),
        text_hidden=(32, 32),
        text_layers=4,
        vae_channels=(16, 16, 32, 32),
    ),
    "small": dict(
        unet_channels=(64, 128, 320),
        unet_heads=(1, 2, 5),
        transformer_layers=(1, 2, 2),
        text_hidden=(64, 96),
        text_layers=4,
        vae_channels=(32, 32, 64, 64),
    ),
}

# Words that get full BPE merges in the tiny vocabulary, so common prompts tokenize into few tokens.
_VOCAB_WORDS = tuple(
    (
        "a photo of the in on with and dog cat man woman "
        "person face style painting portrait tok sks red blue green yellow toy "
        "figure close up standing sitting background white black outdoors "
    ).split()
)
# Merged too in the world-trained model's vocabulary (its shape names); not in the random model's, whose weights
# (drawn after the embedding matrix, sized by the vocabulary) the tests were written against.
WORLD_VOCAB_WORDS = ("circle", "square", "triangle", "star")

# The world-trained weights (`python -m sdxl_pivotal.pretrain_world`); see its README for the recipe and cost.
PRETRAINED_DIR = Path(__file__).parent / "assets" / "tiny-world"

SDXL_SCHEDULER_CONFIG = dict(
    beta_end=0.012,
    beta_schedule="scaled_linear",
    beta_start=0.00085,
    interpolation_type="linear",
    num_train_timesteps=1000,
    prediction_type="epsilon",
    sample_max_value=1.0,
    set_alpha_to_one=False,
    skip_prk_steps=True,
    steps_offset=1,
    timestep_spacing="leading",
    trained_betas=None,
    use_karras_sigmas=False,
)


def _bytes_to_unicode() -> list[str]:
    """The 256 printable characters GPT-2/CLIP BPE uses to stand for the 256 byte values."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    codes, extra = [], 0
    for byte in range(256):
        if byte in printable:
            codes.append(byte)
        else:
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


def write_clip_vocab(folder: Path, extra_words: tuple[str, ...] = ()) -> tuple[Path, Path]:
    """Write a small but complete CLIP BPE vocabulary (`vocab.json`, `merges.txt`) into `folder`.

    Every byte is a token (alone and as a word end `</w>`), so any text tokenizes; the words of
    `_VOCAB_WORDS` and then `extra_words` are merged left to right into whole-word tokens.
    """
    chars = _bytes_to_unicode()
    vocab: list[str] = chars + [c + "</w>" for c in chars]
    merges: list[str] = []
    for word in _VOCAB_WORDS + extra_words:
        symbols = [*word[:-1], word[-1] + "</w>"]
        merged = symbols[0]
        for nxt in symbols[1:]:
            rule = f"{merged} {nxt}"
            merged = merged + nxt
            if rule not in merges:
                merges.append(rule)
                vocab.append(merged)
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    vocab_file, merges_file = folder / "vocab.json", folder / "merges.txt"
    vocab_file.write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False))
    merges_file.write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return vocab_file, merges_file


def build_clip_tokenizers(vocab_dir: Path | None = None):
    """SDXL's two CLIP tokenizers: over `vocab_dir`'s `vocab.json` and `merges.txt` when given (the shipped
    world-trained model's), else over the small vocabulary written by code (`write_clip_vocab`)."""
    import tempfile

    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        if vocab_dir is None:
            vocab_file, merges_file = write_clip_vocab(Path(tmp))
        else:
            vocab_file, merges_file = Path(vocab_dir) / "vocab.json", Path(vocab_dir) / "merges.txt"
        tokenizer = CLIPTokenizer(vocab=str(vocab_file), merges=str(merges_file), model_max_length=77)
        # SDXL's second tokenizer pads with "!" instead of the end-of-text token.
        tokenizer_2 = CLIPTokenizer(vocab=str(vocab_file), merges=str(merges_file), model_max_length=77, pad_token="!")
    return tokenizer, tokenizer_2


def build_tiny_sdxl_pipeline(preset: str = "tiny", seed: int = 0, vocab_dir: Path | None = None):
    """Build an SDXL `StableDiffusionXLPipeline` with random weights, deterministic for a given seed; the
    tokenizers as `build_clip_tokenizers(vocab_dir)`."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    p = PRESETS[preset]
    tokenizer, tokenizer_2 = build_clip_tokenizers(vocab_dir)
    special = dict(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        max_position_embeddings=77,
        num_hidden_layers=p["text_layers"],
        num_attention_heads=4,
    )
    hidden_1, hidden_2 = p["text_hidden"]
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            hidden_size=hidden_1,
            intermediate_size=4 * hidden_1,
            hidden_act="quick_gelu",
            pad_token_id=tokenizer.pad_token_id,
            **special,
        )
    )
    text_encoder_2 = CLIPTextModelWithProjection(
        CLIPTextConfig(
            hidden_size=hidden_2,
            intermediate_size=4 * hidden_2,
            hidden_act="gelu",
            projection_dim=hidden_2,
            pad_token_id=tokenizer_2.pad_token_id,
            **special,
        )
    )
    addition_time_embed_dim = 8
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=p["unet_channels"],
        layers_per_block=2,
        attention_head_dim=p["unet_heads"],
        transformer_layers_per_block=p["transformer_layers"],
        # SDXL: the UNet sees both encoders' hidden states concatenated, and the pooled CLIP-G output
        # plus six Fourier-embedded micro-conditioning numbers (original size, crop, target size).
        cross_attention_dim=hidden_1 + hidden_2,
        addition_embed_type="text_time",
        addition_time_embed_dim=addition_time_embed_dim,
        projection_class_embeddings_input_dim=6 * addition_time_embed_dim + hidden_2,
        use_linear_projection=True,
        norm_num_groups=32,
    )
    vae_channels = p["vae_channels"]
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(vae_channels),
        block_out_channels=vae_channels,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=128,
        scaling_factor=0.13025,
    )
    scheduler = EulerDiscreteScheduler.from_config(SDXL_SCHEDULER_CONFIG)
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
    )


def pretrained_resolution(weights_dir: str | Path = PRETRAINED_DIR) -> int:
    """The image size (px) the world-trained tiny SDXL learned at (its `recipe.json`): train and sample at it."""
    return json.loads((Path(weights_dir) / "recipe.json").read_text())["resolution"]


def build_pretrained_tiny_sdxl(weights_dir: str | Path = PRETRAINED_DIR):
    """The tiny SDXL with the weights `sdxl_pivotal.pretrain_world` exported (it draws the procedural world).

    The components are built as `build_tiny_sdxl_pipeline` builds them, with the exported tokenizer files, then
    take the fp16 weights (as float32); the VAE's `scaling_factor` and the UNet's native size come from
    `recipe.json`.
    """
    from safetensors.torch import load_file

    weights_dir = Path(weights_dir)
    recipe = json.loads((weights_dir / "recipe.json").read_text())
    pipe = build_tiny_sdxl_pipeline(recipe["preset"], vocab_dir=weights_dir)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        state = {k: v.float() for k, v in load_file(weights_dir / f"{name}.safetensors").items()}
        getattr(pipe, name).load_state_dict(state)
        getattr(pipe, name).eval()  # as `from_pretrained` gives them: built modules start in training mode
    pipe.vae.register_to_config(scaling_factor=recipe["vae_scaling_factor"])
    pipe.unet.register_to_config(sample_size=recipe["resolution"] // pipe.vae_scale_factor)
    return pipe


def save_tiny_sdxl(output_dir: str | Path, preset: str = "tiny", seed: int = 0, pretrained: bool = False) -> Path:
    """Build the pipeline (random weights, or with `pretrained` the world-trained ones) and `save_pretrained` it
    (safetensors) into `output_dir`; return the folder."""
    output_dir = Path(output_dir)
    pipe = build_pretrained_tiny_sdxl() if pretrained else build_tiny_sdxl_pipeline(preset, seed)
    pipe.save_pretrained(output_dir, safe_serialization=True)
    return output_dir


def write_demo_images(output_dir: str | Path, count: int = 6, seed: int = 0) -> Path:
    """Write `count` photos of one synthetic "subject" (a red toy figure) plus a `metadata.jsonl`.

    Sizes and aspect ratios vary, as phone photos do; the folder works both as `--instance_data_dir`
    and as a datasets ImageFolder (`--dataset_name DIR --caption_column text`).
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    sizes = [(160, 160), (192, 144), (144, 192), (200, 150), (176, 176), (150, 210), (256, 192)]
    backgrounds = ["green outdoors", "blue background", "white background", "yellow background"]
    rows = []
    for i in range(count):
        w, h = sizes[i % len(sizes)]
        bg_name = backgrounds[i % len(backgrounds)]
        bg = {"green": (60, 140, 70), "blue": (50, 90, 170), "white": (235, 235, 235)}.get(
            bg_name.split()[0], (220, 200, 60)
        )
        noise = rng.integers(-12, 12, size=(h, w, 3))
        image = Image.fromarray(np.clip(np.array(bg) + noise, 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(image)
        cx, cy = w * rng.uniform(0.35, 0.65), h * rng.uniform(0.4, 0.6)
        s = min(w, h) * rng.uniform(0.18, 0.26)
        draw.ellipse([cx - s * 0.6, cy - s * 1.9, cx + s * 0.6, cy - s * 0.7], fill=(200, 40, 40))
        draw.rectangle([cx - s, cy - s * 0.7, cx + s, cy + s * 1.2], fill=(210, 30, 30))
        draw.ellipse([cx - s * 0.3, cy - s * 1.5, cx - s * 0.1, cy - s * 1.3], fill=(10, 10, 10))
        draw.ellipse([cx + s * 0.1, cy - s * 1.5, cx + s * 0.3, cy - s * 1.3], fill=(10, 10, 10))
        name = f"toy_{i:02d}.png"
        image.save(output_dir / name)
        rows.append({"file_name": name, "text": f"a photo of TOK toy figure, {bg_name}"})
    with open(output_dir / "metadata.jsonl", "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    return output_dir


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--output_dir", default="tiny-sdxl", help="where to save the pipeline")
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--pretrained",
        action="store_true",
        help=f"the world-trained tiny weights ({pretrained_resolution()} px) instead of random ones",
    )
    parser.add_argument("--demo_images", default=None, help="also write the demo image set (a toy figure) here")
    parser.add_argument(
        "--subject_images", default=None, help="also write the world demo subject (TOK circle) images here"
    )
    args = parser.parse_args()
    if args.pretrained and args.preset != "tiny":
        parser.error("--pretrained exists for --preset tiny only.")
    folder = save_tiny_sdxl(args.output_dir, args.preset, args.seed, pretrained=args.pretrained)
    print(f"saved a {'pretrained' if args.pretrained else 'random'} {args.preset} SDXL pipeline to {folder}")
    if args.demo_images:
        print(f"wrote demo images to {write_demo_images(args.demo_images)}")
    if args.subject_images:
        from .world import write_subject_images

        folder = write_subject_images(args.subject_images, size=pretrained_resolution())
        print(f"wrote subject images to {folder}")


if __name__ == "__main__":
    main()
