"""DreamBooth quality on the tiny world, measured on generated images as a user would see them.

A run's output is loaded into a diffusers pipeline with `formats.load.load_for_diffusers` (the one loader),
images are generated from fixed seeds, and the world's detectors (`sdxl_pivotal.world`) score them:

- subject fidelity: overlap of the foreground colour histogram of "TOK" samples with the instance images'
  (1: the subject's pink and cyan in its proportions; 0: none of its colours);
- prompt fidelity: share of "TOK on a <colour> background" samples whose background is that colour, for
  backgrounds the instance images never show;
- language drift: how far the class prompt's samples moved from the base model's (RMS pixel distance in
  [0, 1], same seeds), and how subject-like they became (their subject fidelity);
- diversity: mean RMS distance between samples of one prompt (0 would be copies of one image).

    python -m sdxl_pivotal.quality --model demo-output/tiny-sdxl --lora demo-output/tok-circle \
        --instance_dir demo-output/images --output demo-output/before_after.png

writes a before/after grid (rows in pairs, base then trained, per prompt; same seeds) and prints the scores.
"""

from __future__ import annotations

import argparse
import itertools
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from .tiny import pretrained_resolution
from .world import histogram_intersection, read_image

# Instance images show blue, black, yellow and white backgrounds (`world.write_subject_images`).
SUBJECT_PROMPTS = (
    "a photo of TOK circle on a green background",
    "a photo of TOK circle on a red background",
)
CLASS_PROMPTS = ("a photo of a circle", "a photo of a circle on a green background")
HELD_OUT_BACKGROUNDS = ("green", "red")


def load_pipeline(base_model: str | Path, run_dir: str | Path | None = None):
    """The base pipeline with a run's LoRA and embeddings loaded (none for `run_dir=None`); and the string that
    stands for TOK ("<s0><s1>" after pivotal tuning, else "TOK")."""
    from diffusers import StableDiffusionXLPipeline

    from .formats.load import load_for_diffusers

    pipe = StableDiffusionXLPipeline.from_pretrained(str(base_model))
    pipe.set_progress_bar_config(disable=True)
    tokens = load_for_diffusers(pipe, run_dir) if run_dir is not None else []
    return pipe, "".join(tokens) or "TOK"


@torch.no_grad()
def generate(pipe, prompt: str, seeds: list[int], steps: int = 20, guidance_scale: float = 5.0) -> list[Image.Image]:
    """One image per seed for `prompt` (a batch, one generator per seed, so each image depends on its seed only)."""
    generators = [torch.Generator().manual_seed(seed) for seed in seeds]
    return pipe(
        prompt,
        num_images_per_prompt=len(seeds),
        generator=generators,
        num_inference_steps=steps,
        guidance_scale=guidance_scale,
    ).images


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.float32) / 255


def rms_distance(a: Image.Image, b: Image.Image) -> float:
    """Root-mean-square pixel distance in [0, 1] (images resized to `a`'s size)."""
    return float(np.sqrt(((pixels(a) - pixels(b.resize(a.size))) ** 2).mean()))


def subject_histogram(instance_images: list[Image.Image]) -> np.ndarray:
    """The instance images' mean foreground colour histogram."""
    return np.mean([read_image(image).histogram for image in instance_images], axis=0)


def subject_fidelity(images: list[Image.Image], reference: np.ndarray) -> float:
    return float(np.mean([histogram_intersection(read_image(image).histogram, reference) for image in images]))


def diversity(images: list[Image.Image]) -> float:
    return float(np.mean([rms_distance(a, b) for a, b in itertools.combinations(images, 2)]))


@dataclass
class Samples:
    """Generated images: {prompt template: [one per seed]}."""

    subject: dict[str, list[Image.Image]]
    classes: dict[str, list[Image.Image]]


def sample(pipe, tok: str, seeds: list[int], steps: int = 20) -> Samples:
    """The benchmark's images from one pipeline; `tok` replaces TOK in the subject prompts."""
    subject = {p: generate(pipe, p.replace("TOK", tok), seeds, steps) for p in SUBJECT_PROMPTS}
    classes = {p: generate(pipe, p, seeds, steps) for p in CLASS_PROMPTS}
    return Samples(subject, classes)


@dataclass
class Quality:
    subject_fidelity: float
    prompt_fidelity: float
    class_drift: float
    class_subject_fidelity: float
    diversity: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def score(samples: Samples, base: Samples, reference: np.ndarray) -> Quality:
    """Score `samples` against the instance images' histogram and the base model's samples (same seeds)."""
    subject_images = [image for images in samples.subject.values() for image in images]
    honoured = [
        read_image(image).background == background
        for template, background in zip(SUBJECT_PROMPTS, HELD_OUT_BACKGROUNDS, strict=True)
        for image in samples.subject[template]
    ]
    drift = [
        rms_distance(after, before)
        for template in CLASS_PROMPTS
        for after, before in zip(samples.classes[template], base.classes[template], strict=True)
    ]
    class_images = [image for images in samples.classes.values() for image in images]
    return Quality(
        subject_fidelity=subject_fidelity(subject_images, reference),
        prompt_fidelity=float(np.mean(honoured)),
        class_drift=float(np.mean(drift)),
        class_subject_fidelity=subject_fidelity(class_images, reference),
        diversity=float(np.mean([diversity(images) for images in samples.subject.values()])),
    )


def read_instance_images(folder: str | Path) -> list[Image.Image]:
    return [Image.open(path).convert("RGB") for path in sorted(Path(folder).glob("*.png"))]


def evaluate(
    base_model: str | Path, run_dir: str | Path, instance_dir: str | Path, seeds: list[int], steps: int = 20
) -> dict[str, Quality]:
    """{"base": the base model's quality, "trained": the run's}, from the same seeds and prompts."""
    reference = subject_histogram(read_instance_images(instance_dir))
    base_pipe, _ = load_pipeline(base_model)
    base = sample(base_pipe, "TOK", seeds, steps)
    trained_pipe, tok = load_pipeline(base_model, run_dir)
    trained = sample(trained_pipe, tok, seeds, steps)
    return {"base": score(base, base, reference), "trained": score(trained, base, reference)}


# Prompts for the base model's own check: does it draw what the world's captions ask?
WORLD_PROMPTS = (
    "a photo of a red circle on a blue background",
    "a photo of a yellow star on a black background",
    "a photo of a white square on a green background",
    "a photo of a blue triangle on a yellow background",
    "a photo of a green circle on a white background",
    "a photo of a black square on a red background",
)


def world_accuracy(pipe, seeds: list[int], prompts=WORLD_PROMPTS) -> tuple[dict[str, float], list[list[Image.Image]]]:
    """Share of samples whose detected background, shape colour, shape, and all three are the prompt's; and the
    samples (per prompt)."""
    rows, hits = [], {"background": [], "shape_color": [], "shape": [], "all": []}
    for prompt in prompts:
        words = prompt.split()  # "a photo of a <colour> <shape> on a <background> background"
        images = generate(pipe, prompt, seeds)
        rows.append(images)
        for reading in map(read_image, images):
            found = (reading.background == words[8], reading.color == words[4], reading.shape == words[5])
            for name, hit in zip(hits, (*found, all(found)), strict=True):
                hits[name].append(hit)
    return {name: float(np.mean(values)) for name, values in hits.items()}, rows


# The demo's training recipe (examples/demo.sh) as flags of the training script; configurations add to it.
SUBJECT_TRAINING_FLAGS = (
    "--instance_prompt", "a photo of TOK circle", "--caption_column", "text",
    "--resolution", str(pretrained_resolution()), "--train_batch_size", "2", "--repeats", "4", "--rank", "8",
    "--learning_rate", "1e-3", "--lr_scheduler", "constant", "--lr_warmup_steps", "10",
    "--report_to", "none",
)  # fmt: skip
MIN_SNR_FLAGS = ("--snr_gamma", "5")
PIVOTAL_FLAGS = ("--train_text_encoder_ti", "--text_encoder_lr", "1e-3")


def prior_flags(class_dir: str | Path, count: int = 12) -> tuple[str, ...]:
    return (
        "--with_prior_preservation", "--class_prompt", CLASS_PROMPTS[0], "--class_data_dir", str(class_dir),
        "--num_class_images", str(count), "--sample_batch_size", "6",
    )  # fmt: skip


def train_subject(
    base_model: str | Path, instance_dir: str | Path, output_dir: str | Path, steps: int, seed: int, *flags: str
) -> Path:
    """Train on the subject in this process with the real trainer: `SUBJECT_TRAINING_FLAGS` plus `flags` (the
    demo adds `MIN_SNR_FLAGS`, `PIVOTAL_FLAGS` and `prior_flags`)."""
    from accelerate.state import AcceleratorState, GradientState

    from .args import parse_args
    from .train import train

    argv = [
        "--pretrained_model_name_or_path", str(base_model), "--dataset_name", str(instance_dir),
        "--output_dir", str(output_dir), "--max_train_steps", str(steps), "--checkpointing_steps", str(steps + 1),
        "--seed", str(seed), *SUBJECT_TRAINING_FLAGS, *flags,
    ]  # fmt: skip
    try:
        train(parse_args(argv))
    finally:
        # accelerate keeps process-wide singletons; reset them so runs are independent.
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
    return Path(output_dir)


def image_grid(rows: list[list[Image.Image]], labels: list[str], cell: int = 128) -> Image.Image:
    """Rows of equal-size images, each row with a text label on its left; images smaller than `cell` px are
    enlarged by a whole factor (nearest neighbour: the pixels stay visible)."""
    scale = max(1, cell // rows[0][0].size[1])
    width, height = rows[0][0].size[0] * scale, rows[0][0].size[1] * scale
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_width = 8 + max(int(draw.textlength(label)) for label in labels)
    grid = Image.new("RGB", (label_width + width * max(len(r) for r in rows), height * len(rows)), "white")
    draw = ImageDraw.Draw(grid)
    for r, (row, label) in enumerate(zip(rows, labels, strict=True)):
        draw.text((4, r * height + height // 2 - 5), label, fill="black")
        for c, image in enumerate(row):
            grid.paste(image.resize((width, height), Image.Resampling.NEAREST), (label_width + c * width, r * height))
    return grid


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="base pipeline folder")
    parser.add_argument("--lora", required=True, help="training output folder")
    parser.add_argument("--instance_dir", required=True, help="the instance images (for the scores)")
    parser.add_argument("--output", default="before_after.png")
    parser.add_argument("--seeds", type=int, default=4, help="images per prompt (seeds 0..N-1)")
    args = parser.parse_args()

    seeds = list(range(args.seeds))
    base_pipe, _ = load_pipeline(args.model)
    base = sample(base_pipe, "TOK", seeds)
    trained_pipe, tok = load_pipeline(args.model, args.lora)
    trained = sample(trained_pipe, tok, seeds)

    rows, labels = [], []
    for name, before, after in [
        *((p, base.subject[p], trained.subject[p]) for p in base.subject),
        *((p, base.classes[p], trained.classes[p]) for p in base.classes),
    ]:
        rows += [before, after]
        labels += [f"base:    {name}", f"trained: {name.replace('TOK', tok)}"]
    image_grid(rows, labels).save(args.output)
    reference = subject_histogram(read_instance_images(args.instance_dir))
    scores = {"base": score(base, base, reference).as_dict(), "trained": score(trained, base, reference).as_dict()}
    print(json.dumps(scores, indent=1))
    print(f"saved {args.output}")


if __name__ == "__main__":
    main()
