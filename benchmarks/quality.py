"""DreamBooth quality on the tiny world: a table over training configurations, several seeds per cell.

    python benchmarks/quality.py --steps 200 --seeds 0 1 --configs lora pivotal 'pivotal+prior (demo)' te-lora

Each configuration trains the demo subject (`world.write_subject_images`, "TOK circle") on the pretrained
tiny SDXL with the real trainer (`quality.train_subject`: the demo's recipe plus the configuration's flags),
loads the result with `load_for_diffusers`, and scores images from fixed sampling seeds with
`sdxl_pivotal.quality` (subject fidelity, prompt fidelity, class drift, class subject fidelity, diversity).
The base model's row uses the same prompts and seeds. Cells are mean ± standard deviation over the training
seeds. Prints a Markdown table (and writes it to `--output` if given). With `--dino DIR_OR_ID --clip DIR_OR_ID`
(e.g. facebook/dino-vits16, openai/clip-vit-base-patch32) the DreamBooth paper's DINO, CLIP-I, CLIP-T, PRES
and DIV (`sdxl_pivotal.paper_metrics`) are added.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sdxl_pivotal.paper_metrics import load_feature_models, paper_metrics
from sdxl_pivotal.quality import (
    MIN_SNR_FLAGS,
    PIVOTAL_FLAGS,
    WORLD_PROMPTS,
    image_grid,
    load_pipeline,
    prior_flags,
    read_instance_images,
    sample,
    score,
    subject_histogram,
    train_subject,
    world_accuracy,
)
from sdxl_pivotal.tiny import pretrained_resolution, save_tiny_sdxl
from sdxl_pivotal.world import write_subject_images


def configurations(class_dir: Path) -> dict[str, tuple[str, ...]]:
    prior, snr = prior_flags(class_dir), MIN_SNR_FLAGS
    return {
        "lora": snr,
        "lora+prior": (*snr, *prior),
        "pivotal": (*snr, *PIVOTAL_FLAGS),
        "pivotal+prior (demo)": (*snr, *PIVOTAL_FLAGS, *prior),
        "te-lora": (*snr, "--train_text_encoder", "--text_encoder_lr", "1e-4"),
        "pivotal+prior prodigy": (*snr, *PIVOTAL_FLAGS, *prior, "--optimizer", "prodigy", "--learning_rate", "1"),
        "pivotal+prior no-min-snr": (*PIVOTAL_FLAGS, *prior),
        "pivotal+prior rank 4": (*snr, *PIVOTAL_FLAGS, *prior, "--rank", "4"),
        "pivotal+prior rank 16": (*snr, *PIVOTAL_FLAGS, *prior, "--rank", "16"),
        "pivotal+prior rank 32": (*snr, *PIVOTAL_FLAGS, *prior, "--rank", "32"),
    }


METRICS = ("subject_fidelity", "prompt_fidelity", "class_drift", "class_subject_fidelity", "diversity")
PAPER_METRICS = ("dino", "clip_i", "clip_t", "pres", "div")


def cell(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="*", default=["lora", "pivotal", "pivotal+prior (demo)", "te-lora"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1], help="training seeds")
    parser.add_argument("--sample_seeds", type=int, default=4, help="sampling seeds per prompt (0..N-1)")
    parser.add_argument("--steps", nargs="+", type=int, default=[200], help="training steps (a row per count)")
    parser.add_argument("--work_dir", default=None, help="keep runs here (default: a temporary folder)")
    parser.add_argument("--output", default=None, help="also write the table to this file")
    parser.add_argument("--base_grid", default=None, help="write the base model's world samples here (PNG)")
    parser.add_argument("--dino", default=None, help="also the paper's metrics: DINO model id or folder")
    parser.add_argument("--clip", default=None, help="CLIP model id or folder (with --dino)")
    options = parser.parse_args()
    if bool(options.dino) != bool(options.clip):
        parser.error("--dino and --clip go together (the paper's metrics need both models).")

    work = Path(options.work_dir or tempfile.mkdtemp(prefix="quality-"))
    model = save_tiny_sdxl(work / "tiny-sdxl", pretrained=True)
    images = write_subject_images(work / "images", size=pretrained_resolution())
    all_configs = configurations(work / "class-images")
    unknown = sorted(set(options.configs) - set(all_configs))
    if unknown:
        parser.error(f"unknown --configs {unknown}; choose from {sorted(all_configs)}")
    reference = subject_histogram(read_instance_images(images))
    sample_seeds = list(range(options.sample_seeds))
    base_pipe, _ = load_pipeline(model)
    accuracy, world_rows = world_accuracy(base_pipe, sample_seeds)
    print(
        f"base model draws the prompt's background {accuracy['background']:.0%}, shape colour "
        f"{accuracy['shape_color']:.0%}, shape {accuracy['shape']:.0%}, all three {accuracy['all']:.0%} of the "
        f"time ({len(WORLD_PROMPTS)} prompts x {len(sample_seeds)} seeds)"
    )
    if options.base_grid:
        image_grid(world_rows, [p.removeprefix("a photo of ") for p in WORLD_PROMPTS]).save(options.base_grid)
    base = sample(base_pipe, "TOK", sample_seeds)
    features = load_feature_models(options.dino, options.clip) if options.dino else None
    metrics = (*METRICS, *PAPER_METRICS) if features else METRICS

    def evaluate(samples) -> dict[str, float]:
        values = score(samples, base, reference).as_dict()
        if features:
            # Prompts with the class noun in place of the identifier, as the paper scores CLIP-T.
            with_class = {p.replace("TOK ", ""): images for p, images in samples.subject.items()}
            class_images = [image for images in samples.classes.values() for image in images]
            values |= paper_metrics(features, read_instance_images(images), with_class, class_images)
        return values

    rows = {"base model": {m: [v] for m, v in evaluate(base).items()}}
    for name, steps in itertools.product(options.configs, options.steps):
        row = name if len(options.steps) == 1 else f"{name}, {steps} steps"
        results: dict[str, list[float]] = {m: [] for m in metrics}
        for seed in options.seeds:
            run = work / f"{name.replace(' ', '_')}-{steps}-seed{seed}"
            train_subject(model, images, run, steps, seed, "--overwrite_output_dir", *all_configs[name])
            pipe, tok = load_pipeline(model, run)
            for metric, value in evaluate(sample(pipe, tok, sample_seeds)).items():
                results[metric].append(value)
            print(row, seed, {m: round(v[-1], 3) for m, v in results.items()}, flush=True)
        rows[row] = results
    header = "| configuration | " + " | ".join(metrics) + " |"
    lines = [header, "|" + "---|" * (len(metrics) + 1)]
    lines += [f"| {name} | " + " | ".join(cell(r[m]) for m in metrics) + " |" for name, r in rows.items()]
    table = "\n".join(lines)
    print(table)
    if options.output:
        Path(options.output).write_text(table + "\n")


if __name__ == "__main__":
    main()
