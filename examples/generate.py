"""Generate an image with a trained LoRA, loaded by the trainer's one loader (`load_for_diffusers`: any file of a
run, every adapter family, the pivotal-tuning embeddings).

    python examples/generate.py --model stabilityai/stable-diffusion-xl-base-1.0 --lora OUTPUT_DIR \
        --prompt "a photo of <s0><s1> dog" --output sample.png
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from diffusers import StableDiffusionXLPipeline

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository's package, installed or not
from sdxl_pivotal.formats import load_for_diffusers
from sdxl_pivotal.prompts import pipeline_embeddings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="base SDXL pipeline (Hub id or folder)")
    parser.add_argument("--lora", required=True, help="training output folder, a checkpoint, or one of their files")
    parser.add_argument("--prompt", required=True, help="with the new tokens themselves, e.g. <s0><s1>")
    parser.add_argument("--output", default="sample.png")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--resolution", type=int, default=None, help="default: the UNet's native size")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--max_token_length",
        type=int,
        default=None,
        choices=(150, 225),
        help="the run's --max_token_length: prompts up to that many tokens, encoded as training encoded them "
        "(diffusers' pipeline alone truncates at 77)",
    )
    args = parser.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.float32
    pipe = StableDiffusionXLPipeline.from_pretrained(args.model, dtype=dtype)
    tokens = load_for_diffusers(pipe, args.lora)
    if tokens:
        print(f"new tokens: {' '.join(tokens)}")
    pipe.to(device)
    size = args.resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor
    text = {"prompt": args.prompt}
    if args.max_token_length:
        text = pipeline_embeddings(pipe, args.prompt, None, args.max_token_length, None)
    image = pipe(
        **text,
        num_inference_steps=args.steps,
        height=size,
        width=size,
        generator=torch.Generator(device).manual_seed(args.seed),
    ).images[0]
    image.save(args.output)
    print(f"saved {args.output}")


if __name__ == "__main__":
    main()
