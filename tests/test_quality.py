"""The quality scores (on images whose answer is known), and short DreamBooth runs on the world-trained tiny SDXL:
the subject must be learned; that prior preservation reduces class drift is not reproduced (a strict xfail)."""

from __future__ import annotations

import numpy as np
import pytest

from sdxl_pivotal import quality, world

STEPS = 200
SUBJECT_MARGIN = 0.1


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
    """The demo's recipe (pivotal tuning, min-SNR) for STEPS steps on the pretrained tiny SDXL, with and without
    prior preservation; scores from the same sampling seeds, and the base model's."""
    from sdxl_pivotal.tiny import save_tiny_sdxl

    tmp_path = tmp_path_factory.mktemp("subject-runs")
    model = save_tiny_sdxl(tmp_path / "base", pretrained=True)
    images = world.write_subject_images(tmp_path / "images")
    reference = quality.subject_histogram(quality.read_instance_images(images))
    seeds = [0, 1, 2, 3]
    base = quality.sample(quality.load_pipeline(model)[0], "TOK", seeds)
    recipe = (*quality.MIN_SNR_FLAGS, *quality.PIVOTAL_FLAGS)
    prior = quality.prior_flags(tmp_path / "class-images")
    scores = {"base": quality.score(base, base, reference)}
    for name, flags in (("prior", (*recipe, *prior)), ("no prior", recipe)):
        run = quality.train_subject(model, images, tmp_path / name, STEPS, 0, *flags)
        pipe, tok = quality.load_pipeline(model, run)
        assert tok == "<s0><s1>"
        scores[name] = quality.score(quality.sample(pipe, tok, seeds), base, reference)
    print(scores)
    return scores


@pytest.mark.slow
def test_short_run_learns_the_subject(subject_runs):
    # Measured: base 0.112, with or without prior preservation 0.298 (200 steps).
    for name in ("prior", "no prior"):
        assert subject_runs[name].subject_fidelity > subject_runs["base"].subject_fidelity + SUBJECT_MARGIN, name


@pytest.mark.slow
@pytest.mark.xfail(
    strict=True,
    reason="Not reproduced on the shipped tiny base: class drift is 0.135 with prior preservation and 0.108 "
    "without (200 steps); see benchmarks/README.md. Strict: passes here only if that changes, then drop the mark.",
)
def test_prior_preservation_reduces_class_drift(subject_runs):
    assert subject_runs["prior"].class_drift < subject_runs["no prior"].class_drift
