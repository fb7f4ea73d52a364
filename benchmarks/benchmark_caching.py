"""Latent and text-embedding caching: seconds per step and total run time, with and without, in one process.

    python benchmarks/benchmark_caching.py --preset tiny --steps 30 --threads 1
    python benchmarks/benchmark_caching.py --preset small --steps 12 --photo_size 1600x1200

Four runs of the real trainer on the same data and flags: no caching (VAE every step, every caption encoded
every step), text caching only (the trainer's default: each caption encoded once, then the encoders leave the
device), latents only, and both (`--cache_latents`). "No text caching" is obtained by giving the trainer a
PromptEncoder with its cache turned off; everything else is the trainer as users run it. Total time includes
model loading and building the latent cache; s/step is the median over the steps after `--warmup_steps`.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchmark_step import INSTANCE_PROMPT, enlarge_images, run_trainer

from sdxl_pivotal import train as train_module
from sdxl_pivotal.args import parse_args
from sdxl_pivotal.prompts import PromptEncoder
from sdxl_pivotal.tiny import PRESETS, save_tiny_sdxl, write_demo_images


class UncachedPromptEncoder(PromptEncoder):
    """The trainer's prompt encoder with its cache off: every caption is encoded at every step."""

    def __init__(self, tokenizers, text_encoders, clip_skip, cache=True):
        super().__init__(tokenizers, text_encoders, clip_skip, cache=False)

    def encode_all_then_offload(self, prompts):
        pass


def run(options, model: Path, images: Path, output_dir: Path, latents: bool, text: bool, device) -> dict:
    argv = [
        "--pretrained_model_name_or_path", str(model), "--instance_data_dir", str(images),
        "--instance_prompt", INSTANCE_PROMPT, "--output_dir", str(output_dir),
        "--resolution", str(options.resolution), "--train_batch_size", str(options.train_batch_size),
        "--max_train_steps", str(options.steps), "--checkpointing_steps", str(options.steps + 1),
        "--report_to", "none", "--seed", "0", "--random_flip",
    ]  # fmt: skip
    args = parse_args([*argv, "--cache_latents"] if latents else argv)
    train_module.PromptEncoder = PromptEncoder if text else UncachedPromptEncoder
    start = time.perf_counter()
    try:
        times = run_trainer(args, argparse.Namespace(warmup_steps=0, steps=options.steps), device)["trainer"]
    finally:
        train_module.PromptEncoder = PromptEncoder
    return dict(total=time.perf_counter() - start, step=statistics.median(times[options.warmup_steps :]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    parser.add_argument("--resolution", type=int, default=None, help="default: 128 for tiny, 256 for small")
    parser.add_argument("--train_batch_size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup_steps", type=int, default=3)
    parser.add_argument("--num_images", type=int, default=8)
    parser.add_argument("--photo_size", default=None, help="rewrite the images as JPEGs of WIDTHxHEIGHT")
    parser.add_argument("--threads", type=int, default=None)
    options = parser.parse_args()
    options.resolution = options.resolution or (128 if options.preset == "tiny" else 256)
    if options.threads:
        torch.set_num_threads(options.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    results = {}
    with tempfile.TemporaryDirectory(prefix="sdxl-cache-bench-") as tmp:
        tmp = Path(tmp)
        model = save_tiny_sdxl(tmp / "model", options.preset)
        images = write_demo_images(tmp / "images", count=options.num_images)
        if options.photo_size:
            enlarge_images(images, options.photo_size)
        for latents, text in [(False, False), (False, True), (True, False), (True, True)]:
            out = tmp / f"run-{latents}-{text}"
            results[latents, text] = run(options, model, images, out, latents, text, device)

    print(
        f"\n=== {options.preset}, {options.resolution} px, batch {options.train_batch_size}, "
        f"{options.steps} steps, {device} ==="
    )
    base = results[False, False]
    for (latents, text), r in results.items():
        label = f"latents {'cached' if latents else 'encoded'}, text {'cached' if text else 'encoded'}"
        print(
            f"{label:<32} {r['step']:.4f} s/step ({r['step'] / base['step']:.2f}x), "
            f"total {r['total']:.1f} s ({r['total'] / base['total']:.2f}x)"
        )


if __name__ == "__main__":
    main()
