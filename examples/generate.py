"""Generate an image with a trained LoRA, loaded the way a diffusers user loads it.

    python examples/generate.py --model stabilityai/stable-diffusion-xl-base-1.0 --lora OUTPUT_DIR \
        --prompt "a photo of TOK dog" --output sample.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from diffusers import StableDiffusionXLPipeline
from safetensors.torch import load_file


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="base SDXL pipeline (Hub id or folder)")
    parser.add_argument("--lora", required=True, help="training output folder (with pytorch_lora_weights.safetensors)")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--output", default="sample.png")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--resolution", type=int, default=None, help="default: the UNet's native size")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.float32
    pipe = StableDiffusionXLPipeline.from_pretrained(args.model, dtype=dtype).to(device)
    pipe.load_lora_weights(args.lora)
    # Pivotal tuning: the new tokens <s0>, <s1>, ... and their embeddings for both text encoders.
    for embeddings in Path(args.lora).glob("*_emb.safetensors"):
        state = load_file(embeddings)
        tokens = [f"<s{i}>" for i in range(len(state["clip_l"]))]
        pipe.load_textual_inversion(
            state["clip_l"], token=tokens, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer
        )
        pipe.load_textual_inversion(
            state["clip_g"], token=tokens, text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2
        )
    size = args.resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor
    image = pipe(
        args.prompt,
        num_inference_steps=args.steps,
        height=size,
        width=size,
        generator=torch.Generator(device).manual_seed(args.seed),
    ).images[0]
    image.save(args.output)
    print(f"saved {args.output}")


if __name__ == "__main__":
    main()
