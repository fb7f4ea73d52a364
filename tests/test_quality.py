"""The quality scores (on images whose answer is known), and short DreamBooth runs on the world-trained tiny SDXL:
the subject must be learned, and prior preservation (or new tokens) must keep the class prompt from drifting."""

from __future__ import annotations

import numpy as np
import pytest

from sdxl_pivotal import quality, world

STEPS = 200
SUBJECT_MARGIN = 0.3
DRIFT_MARGIN = 0.05
PRIOR_MARGIN = 0.3


def subject_at(background: str, seed: int):
    rng = np.random.default_rng(seed)
    return world.render_subject(64, background, (0.4 + 0.05 * seed, 0.5), 0.25, rng)


def test_scores_read_what_the_images_show(tmp_path):
    reference = quality.subject_histogram(quality.read_instance_images(world.write_subject_images(tmp_path)))
    scenes, _ = world.world_batch(seed=1, count=8, size=64)
    honouring = {
        p: [subject_at(bg, s) for s in range(4)]
        for p, bg in zip(quality.SUBJECT_PROMPTS, ("green", "red"), strict=True)
    }
    ignoring = {p: [subject_at("blue", s) for s in range(4)] for p in quality.SUBJECT_PROMPTS}
    classes = {p: scenes[4 * i : 4 * i + 4] for i, p in enumerate(quality.CLASS_PROMPTS)}
    base = quality.Samples({p: scenes[:4] for p in quality.SUBJECT_PROMPTS}, classes)

    learned = quality.score(quality.Samples(honouring, classes), base, reference)
    assert learned.subject_fidelity > 0.85 and learned.prompt_fidelity == 1.0
    assert learned.class_drift == 0.0 and learned.class_subject_fidelity < 0.1
    assert learned.diversity > 0.05
    assert quality.score(quality.Samples(ignoring, classes), base, reference).prompt_fidelity == 0.0
    unlearned = quality.score(base, base, reference)
    assert unlearned.subject_fidelity < 0.1

    leaked = {p: [subject_at("green", s) for s in range(4)] for p in quality.CLASS_PROMPTS}
    drifted = quality.score(quality.Samples(honouring, leaked), base, reference)
    assert drifted.class_drift > 0.1 and drifted.class_subject_fidelity > 0.85
    copies = {p: [subject_at("green", 0)] * 4 for p in quality.SUBJECT_PROMPTS}
    assert quality.score(quality.Samples(copies, classes), base, reference).diversity == 0.0


@pytest.fixture(scope="module")
def subject_runs(tmp_path_factory):
    """STEPS-step runs on the pretrained tiny SDXL, scored from the same sampling seeds, and the base model's:
    the demo's recipe (pivotal tuning, min-SNR, prior preservation), pivotal tuning without prior preservation,
    and DreamBooth's own setting (a UNet LoRA on "TOK circle", TOK an ordinary word) with and without it."""
    from sdxl_pivotal.tiny import pretrained_resolution, save_tiny_sdxl

    tmp_path = tmp_path_factory.mktemp("subject-runs")
    model = save_tiny_sdxl(tmp_path / "base", pretrained=True)
    images = world.write_subject_images(tmp_path / "images", size=pretrained_resolution())
    reference = quality.subject_histogram(quality.read_instance_images(images))
    seeds = [0, 1, 2, 3]
    base = quality.sample(quality.load_pipeline(model)[0], "TOK", seeds)
    prior = quality.prior_flags(tmp_path / "class-images")
    pivotal = (*quality.MIN_SNR_FLAGS, *quality.PIVOTAL_FLAGS)
    runs = {
        "demo": (*pivotal, *prior),
        "pivotal": pivotal,
        "lora": quality.MIN_SNR_FLAGS,
        "lora+prior": (*quality.MIN_SNR_FLAGS, *prior),
    }
    scores = {"base": quality.score(base, base, reference)}
    for name, flags in runs.items():
        run = quality.train_subject(model, images, tmp_path / name, STEPS, 0, *flags)
        pipe, tok = quality.load_pipeline(model, run)
        assert tok == ("<s0><s1>" if "--train_text_encoder_ti" in flags else "TOK")
        scores[name] = quality.score(quality.sample(pipe, tok, seeds), base, reference)
    print({name: q.as_dict() for name, q in scores.items()})
    return scores


@pytest.mark.slow
def test_short_run_learns_the_subject(subject_runs):
    # Measured (seed 0, 128 px base): base 0.006; demo 0.506, pivotal 0.459, lora 0.446 (margin 0.44).
    for name in ("demo", "pivotal", "lora"):
        assert subject_runs[name].subject_fidelity > subject_runs["base"].subject_fidelity + SUBJECT_MARGIN, name


@pytest.mark.slow
def test_prior_preservation_reduces_language_drift(subject_runs):
    """DreamBooth's claim, in its own setting: the identifier is an ordinary word before the class noun, so a UNet
    LoRA drags the class prompt towards the subject; the class images hold it back. Measured (seed 0, 128 px
    base): class subject fidelity 0.720 -> 0.169 (base model 0.026). The class samples' pixel drift does not fall
    (0.292 -> 0.295), and with pivotal tuning the class images do not lower the small leak either (0.028 without,
    0.069 with): both reported in benchmarks/README.md, not asserted."""
    drifted, held = subject_runs["lora"], subject_runs["lora+prior"]
    assert held.class_subject_fidelity < drifted.class_subject_fidelity - PRIOR_MARGIN


@pytest.mark.slow
def test_pivotal_tokens_keep_the_class_prompt_apart(subject_runs):
    """New tokens carry the subject, so the class prompt (which has none of them) moves far less than with an
    ordinary word. Measured (seed 0, 128 px base): class subject fidelity 0.028 vs 0.720, class drift 0.162 vs
    0.292."""
    assert subject_runs["pivotal"].class_subject_fidelity < subject_runs["lora"].class_subject_fidelity - DRIFT_MARGIN
    assert subject_runs["pivotal"].class_drift < subject_runs["lora"].class_drift
