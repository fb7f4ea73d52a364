"""kohya's sample prompts file (`--sample_prompts prompts.txt`): images of several prompts, each with its own
options, every `--sample_every_n_steps` steps or `--sample_every_n_epochs` epochs, and on request
(`control/sample`, see monitor.py).

One prompt per line, as kohya's sd-scripts read it: the prompt, then options each introduced by ` --`:
`--n` negative prompt, `--w` / `--h` width and height, `--s` denoising steps, `--l` guidance scale, `--d` seed.
Empty lines and lines starting with `#` are skipped. Unset options: the training resolution,
--validation_inference_steps, kohya's guidance 7.5 and the run's seed. The token abstraction (TOK) is replaced by
the new tokens. Images go to `output_dir/samples/step-N/<line>.png` and to the trackers (`samples/<line>`).
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from .errors import InputError
from .export import save_image
from .validation import live_pipeline, log_images, prompt_inputs

KOHYA_GUIDANCE_SCALE = 7.5  # kohya's default for sample images
# kohya's per-line options: letter -> (field, value pattern, conversion).
OPTIONS = {
    "n": ("negative_prompt", r".*", str),
    "w": ("width", r"\d+", int),
    "h": ("height", r"\d+", int),
    "s": ("steps", r"\d+", int),
    "l": ("guidance_scale", r"\d+\.?\d*|\.\d+", float),
    "d": ("seed", r"\d+", int),
}


@dataclass(frozen=True)
class SamplePrompt:
    """One line of the file; None: the run's default."""

    prompt: str
    negative_prompt: str | None = None
    width: int | None = None
    height: int | None = None
    steps: int | None = None
    guidance_scale: float | None = None
    seed: int | None = None


def parse_prompt_line(line: str, where: str) -> SamplePrompt:
    """`"a TOK dog --n blurry --w 1024 --d 5"` -> SamplePrompt("a TOK dog", "blurry", 1024, seed=5); `where`
    names the line in errors."""
    prompt, *options = line.split(" --")
    values: dict[str, object] = {}
    for option in options:
        letter, _, text = option.strip().partition(" ")
        if letter not in OPTIONS:
            raise InputError(
                f"{where}: unknown option --{letter}; kohya's options are --n (negative prompt), --w, --h (size), "
                "--s (steps), --l (guidance scale), --d (seed)."
            )
        field, pattern, convert = OPTIONS[letter]
        text = text.strip()
        if not re.fullmatch(pattern, text) or field in values:
            raise InputError(f"{where}: --{letter} needs one value of the right kind, got {text!r}.")
        values[field] = convert(text)
    for field in ("width", "height"):
        size = values.get(field)
        if size is not None and (size <= 0 or size % 8):
            raise InputError(f"{where}: --{field[0]} must be a positive multiple of 8 (the VAE's scale), got {size}.")
    if values.get("steps") == 0:
        raise InputError(f"{where}: --s must be at least 1.")
    if not prompt.strip():
        raise InputError(f"{where}: the line has options but no prompt.")
    return SamplePrompt(prompt.strip(), **values)


def read_sample_prompts(path: str | Path) -> list[SamplePrompt]:
    """Every prompt of the file, in order; a clear error for a missing file or a bad line."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"--sample_prompts {path}: no such file (one prompt per line, kohya's options after it).")
    lines = path.read_text(encoding="utf-8").splitlines()
    prompts = [
        parse_prompt_line(line, f"--sample_prompts {path}, line {number}")
        for number, line in enumerate(lines, start=1)
        if line.strip() and not line.lstrip().startswith("#")
    ]
    if not prompts:
        raise InputError(f"--sample_prompts {path} holds no prompt.")
    return prompts


def with_tokens(prompts: list[SamplePrompt], tokens) -> list[SamplePrompt]:
    """The prompts with the token abstractions replaced by the new tokens (pivotal tuning)."""
    if tokens is None:
        return prompts
    return [
        replace(
            p,
            prompt=tokens.substitute(p.prompt),
            negative_prompt=tokens.substitute(p.negative_prompt) if p.negative_prompt else p.negative_prompt,
        )
        for p in prompts
    ]


def is_sample_step(args: argparse.Namespace, done: int, steps_per_epoch: int) -> bool:
    """After optimizer step `done` (1-based): every --sample_every_n_steps steps, or at the end of every
    --sample_every_n_epochs-th epoch."""
    if args.sample_every_n_steps:
        return done % args.sample_every_n_steps == 0
    if args.sample_every_n_epochs:
        epoch, rest = divmod(done, steps_per_epoch)
        return rest == 0 and epoch % args.sample_every_n_epochs == 0
    return False


def make_samples(accelerator, parts, models: dict, args, prompts: list[SamplePrompt], seed: int, step: int) -> list:
    """One image per prompt with the modules being trained, saved and logged."""
    folder = Path(args.output_dir) / "samples" / f"step-{step}"
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    with live_pipeline(parts, models) as pipeline:
        for i, sample in enumerate(prompts):
            generator = torch.Generator(pipeline.device).manual_seed(seed if sample.seed is None else sample.seed)
            with torch.no_grad(), accelerator.autocast():
                image = pipeline(
                    **prompt_inputs(pipeline, args, sample.prompt, sample.negative_prompt),
                    num_inference_steps=sample.steps or args.validation_inference_steps,
                    guidance_scale=KOHYA_GUIDANCE_SCALE if sample.guidance_scale is None else sample.guidance_scale,
                    height=sample.height or args.resolution,
                    width=sample.width or args.resolution,
                    generator=generator,
                ).images[0]
            paths.append(save_image(image, folder / f"{i}.png"))
            log_images(accelerator, [image], sample.prompt, step, f"samples/{i}")
    return paths
