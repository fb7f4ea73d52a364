"""A procedural image world for the tiny SDXL: flat shapes on flat backgrounds, with captions, from a seed.

Every scene is one shape (circle, square, triangle, star) of one colour at a random size and position on a
background of another colour, captioned "a photo of a red circle on a blue background". The pretrained tiny
SDXL (`sdxl_pivotal.pretrain_world`) learned this world; the demo subject (`write_subject_images`), a pink
and cyan "bullseye" circle, is not in it. Because the scenes are known, the detectors here read a generated
image directly: background colour (near the border), subject mask (what differs from it), the subject's colours
and the mask's shape.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 70, 210),
    "yellow": (235, 210, 40),
    "white": (240, 240, 240),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle", "star")
# The demo subject's colours: in no scene of the world.
SUBJECT_COLORS: dict[str, tuple[int, int, int]] = {"pink": (250, 110, 190), "cyan": (40, 215, 225)}


@dataclass(frozen=True)
class Scene:
    shape: str
    color: str
    background: str
    center: tuple[float, float]  # fractions of the image size
    radius: float  # fraction of the image size
    angle: float  # degrees

    @property
    def caption(self) -> str:
        return f"a photo of a {self.color} {self.shape} on a {self.background} background"


def random_scene(rng: np.random.Generator) -> Scene:
    """A random scene: shape, colour and a different background colour, size and position."""
    color, background = rng.choice(list(COLORS), size=2, replace=False)
    radius = float(rng.uniform(0.2, 0.36))
    center = (float(rng.uniform(radius, 1 - radius)), float(rng.uniform(radius, 1 - radius)))
    return Scene(str(rng.choice(SHAPES)), str(color), str(background), center, radius, float(rng.uniform(0, 360)))


def shape_polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    """The outline of a square, triangle or star of circumradius `r`, rotated by `angle` degrees."""
    corners = {"square": 4, "triangle": 3, "star": 10}[shape]
    points = []
    for k in range(corners):
        theta = np.deg2rad(angle) + 2 * np.pi * k / corners
        rk = r * 0.45 if shape == "star" and k % 2 else r
        points.append((cx + rk * np.cos(theta), cy + rk * np.sin(theta)))
    return points


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, angle: float, fill) -> None:
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        draw.polygon(shape_polygon(shape, cx, cy, r, angle), fill=fill)


def jitter(color: tuple[int, int, int], rng: np.random.Generator, amount: int = 12) -> tuple[int, int, int]:
    """A colour moved by up to `amount` per channel, so the world is not exactly eight RGB values."""
    return tuple(int(np.clip(c + rng.integers(-amount, amount + 1), 0, 255)) for c in color)


def render(scene: Scene, size: int, rng: np.random.Generator) -> Image.Image:
    """Draw `scene` at `size`x`size` pixels (supersampled 4x for smooth edges)."""
    big = size * 4
    image = Image.new("RGB", (big, big), jitter(COLORS[scene.background], rng))
    draw = ImageDraw.Draw(image)
    cx, cy, r = scene.center[0] * big, scene.center[1] * big, scene.radius * big
    draw_shape(draw, scene.shape, cx, cy, r, scene.angle, jitter(COLORS[scene.color], rng))
    return image.resize((size, size), Image.Resampling.LANCZOS)


def world_batch(seed: int, count: int, size: int) -> tuple[list[Image.Image], list[str]]:
    """`count` random scenes rendered at `size` px and their captions; the same for the same seed."""
    rng = np.random.default_rng(seed)
    scenes = [random_scene(rng) for _ in range(count)]
    return [render(s, size, rng) for s in scenes], [s.caption for s in scenes]


def random_color(rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(c) for c in rng.integers(0, 256, size=3))


def autoencoder_batch(seed: int, count: int, size: int) -> list[Image.Image]:
    """Images for training the VAE: one to three shapes of any colours and sizes on a background of any colour.

    Wider than the world (whose colours are the six named ones), so the VAE encodes any flat colour and nested
    shapes too, such as a demo subject it will see later.
    """
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(count):
        big = size * 4
        image = Image.new("RGB", (big, big), random_color(rng))
        draw = ImageDraw.Draw(image)
        for _ in range(int(rng.integers(1, 4))):
            r = rng.uniform(0.06, 0.36) * big
            cx, cy = rng.uniform(0, big, size=2)
            draw_shape(draw, str(rng.choice(SHAPES)), cx, cy, r, rng.uniform(0, 360), random_color(rng))
        images.append(image.resize((size, size), Image.Resampling.LANCZOS))
    return images


def all_captions() -> list[str]:
    """Every caption the world can produce."""
    return [
        Scene(shape, color, background, (0.5, 0.5), 0.2, 0).caption
        for shape in SHAPES
        for color in COLORS
        for background in COLORS
        if color != background
    ]


def render_subject(size: int, background: str, center, radius: float, rng: np.random.Generator) -> Image.Image:
    """The demo subject: a pink disc with a cyan ring and a pink centre (a bullseye), on `background`."""
    big = size * 4
    image = Image.new("RGB", (big, big), jitter(COLORS[background], rng))
    draw = ImageDraw.Draw(image)
    cx, cy, r = center[0] * big, center[1] * big, radius * big
    for fraction, name in ((1.0, "pink"), (0.66, "cyan"), (0.33, "pink")):
        draw_shape(draw, "circle", cx, cy, r * fraction, 0, jitter(SUBJECT_COLORS[name], rng, 6))
    return image.resize((size, size), Image.Resampling.LANCZOS)


def write_subject_images(output_dir: str | Path, count: int = 6, size: int = 64, seed: int = 0) -> Path:
    """Write `count` photos of the demo subject (varied backgrounds, positions, sizes) and a `metadata.jsonl`.

    Captions are "a photo of TOK circle on a <colour> background"; the class is "circle".
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    backgrounds = ["blue", "black", "yellow", "white"]  # green and red stay unseen, to test prompt fidelity
    rows = []
    for i in range(count):
        background = backgrounds[i % len(backgrounds)]
        radius = float(rng.uniform(0.22, 0.32))
        center = (float(rng.uniform(radius, 1 - radius)), float(rng.uniform(radius, 1 - radius)))
        name = f"subject_{i:02d}.png"
        render_subject(size, background, center, radius, rng).save(output_dir / name)
        rows.append({"file_name": name, "text": f"a photo of TOK circle on a {background} background"})
    with open(output_dir / "metadata.jsonl", "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    return output_dir


# --- detectors -------------------------------------------------------------------------------------------

PALETTE: dict[str, tuple[int, int, int]] = {**COLORS, **SUBJECT_COLORS}


def nearest_colors(pixels: np.ndarray) -> np.ndarray:
    """Index into `PALETTE` of the nearest palette colour of each RGB pixel (N, 3)."""
    palette = np.array(list(PALETTE.values()), dtype=np.float32)
    distances = ((pixels[:, None, :].astype(np.float32) - palette[None]) ** 2).sum(-1)
    return distances.argmin(1)


@dataclass(frozen=True)
class Reading:
    """What the detectors read in one image."""

    background: str  # nearest palette colour of a ring just inside the border
    foreground_fraction: float  # share of pixels that differ from the background
    histogram: np.ndarray  # share of each palette colour among foreground pixels (sums to 1, or all 0)
    centroid: tuple[float, float]  # of the foreground mask, fractions of the size
    shape: str  # "circle", "triangle", "square", "star" or "other" (`mask_shape`); "" with no foreground

    @property
    def color(self) -> str:
        """The foreground's dominant palette colour ("" when there is no foreground)."""
        return list(PALETTE)[int(self.histogram.argmax())] if self.histogram.sum() else ""


def read_image(image: Image.Image, threshold: float = 60.0, inset: float = 0.05) -> Reading:
    """Read background colour, foreground mask and foreground colours of a world-like image.

    The background is the median of a ring `inset` of the size inside the edge: generated images often have a
    darker or tinted frame of a pixel or two (the VAE's borders), which the outermost rows would read. The
    foreground is what lies inside that ring, differs from the background by more than `threshold` (RGB
    distance) and is not nearest to the background's own palette colour (generated backgrounds are shaded)."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    k = round(inset * min(pixels.shape[:2]))
    ring = np.concatenate([pixels[k, k:-k], pixels[-k - 1, k:-k], pixels[k:-k, k], pixels[k:-k, -k - 1]])
    background_rgb = np.median(ring, axis=0)
    background_index = int(nearest_colors(background_rgb[None])[0])
    nearest = nearest_colors(pixels.reshape(-1, 3)).reshape(pixels.shape[:2])
    mask = (np.sqrt(((pixels - background_rgb) ** 2).sum(-1)) > threshold) & (nearest != background_index)
    mask[:k], mask[-k:], mask[:, :k], mask[:, -k:] = False, False, False, False  # the frame is not the shape
    histogram = np.zeros(len(PALETTE))
    centroid, shape = (0.5, 0.5), ""
    if mask.any():
        counts = np.bincount(nearest[mask], minlength=len(PALETTE))
        histogram = counts / counts.sum()
        ys, xs = np.nonzero(mask)
        centroid = (float(xs.mean() / mask.shape[1]), float(ys.mean() / mask.shape[0]))
        shape = mask_shape(mask)
    background = list(PALETTE)[background_index]
    return Reading(background, float(mask.mean()), histogram, centroid, shape)


SHAPE_OF_HARMONIC = {3: "triangle", 4: "square", 5: "star"}


def mask_shape(mask: np.ndarray, bins: int = 48, round_below: float = 0.06) -> str:
    """The shape a foreground mask draws, from its radial profile r(theta): the farthest mask pixel from the
    centroid in each of `bins` directions. A circle's profile is flat; a triangle's, square's and star's
    (5 points) repeat 3, 4 and 5 times per turn, so the strongest of the first Fourier harmonics names the
    shape; a weak one (relative amplitude below `round_below`) means a circle, any other harmonic "other".
    On rendered scenes the amplitude is <= 0.01 for circles and >= 0.13 for the rest (tests/test_world.py)."""
    ys, xs = np.nonzero(mask)
    dy, dx = ys - ys.mean(), xs - xs.mean()
    direction = ((np.arctan2(dy, dx) + np.pi) / (2 * np.pi) * bins).astype(int) % bins
    profile = np.zeros(bins)
    np.maximum.at(profile, direction, np.hypot(dx, dy))
    if profile.mean() == 0:
        return "circle"  # one pixel
    amplitude = 2 * np.abs(np.fft.rfft(profile - profile.mean())) / (bins * profile.mean())
    harmonic = int(np.argmax(amplitude[1:7])) + 1
    if amplitude[harmonic] < round_below:
        return "circle"
    return SHAPE_OF_HARMONIC.get(harmonic, "other")


def histogram_intersection(a: np.ndarray, b: np.ndarray) -> float:
    """Overlap of two colour histograms: 1 for the same mix of colours, 0 for no colour in common."""
    return float(np.minimum(a, b).sum())
