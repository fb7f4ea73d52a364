"""Training images: where they come from, how each becomes a tensor, and in what order they are seen.

Sources: a plain folder (`--instance_data_dir`), or a datasets ImageFolder / Hub dataset (`--dataset_name`)
with an optional caption column. Every image is checked when the dataset is built, before any model loads; then
only its file (or a dataset's encoded bytes) is kept, and it is decoded again when a sample needs it.

Order and augmentation are pure functions of (seed, epoch, sample): the same seed gives the same batches,
and a resumed run sees exactly the batches the uninterrupted run would have seen.
"""

from __future__ import annotations

import argparse
import io
import logging
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from .buckets import Size, assign_bucket, log_bucket_table, make_buckets
from .config import dataset_entries
from .errors import InputError
from .rng import caption_rng, class_sample_rng, epoch_order_generator, sample_rng

logger = logging.getLogger(__name__)

_PIL_FILTERS = {
    "nearest": Image.Resampling.NEAREST,
    "nearest_exact": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
    "lanczos": Image.Resampling.LANCZOS,
}


# Training images with a shorter side below this carry too little to learn from; they are refused, named.
MIN_IMAGE_SIDE = 32
# An image upscaled more than this much to its training size is named in a warning (it will look soft).
MAX_UPSCALE = 2.0


def image_extensions() -> set[str]:
    """File extensions PIL can open (".png", ".jpg", ".webp", ...)."""
    Image.init()
    return {ext.lower() for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}


def to_rgb(image: Image.Image) -> Image.Image:
    """Upright 8-bit RGB: EXIF orientation applied, transparency composited on white, 16-bit scaled down."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit greyscale: scale the full range to 8 bits instead of clipping at 255.
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        image = Image.fromarray(np.clip(array / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")


def open_image(path: Path | io.BytesIO, name: str | None = None) -> Image.Image:
    """Open and fully decode an image file as RGB; a file that cannot be read raises naming the file."""
    name = name or str(path)
    try:
        with Image.open(path) as image:
            image.load()
            rgb = to_rgb(image)
    except Exception as error:  # PIL raises many types: UnidentifiedImageError, OSError, SyntaxError...
        raise InputError(f"Cannot read image {name}: {error}. Fix or remove the file.") from error
    if rgb.width == 0 or rgb.height == 0:
        raise InputError(f"Image {name} is empty (0 pixels). Remove the file.")
    return rgb


@dataclass
class ImageRecord:
    """One training image and its caption. Its pixels come from a file (`path`), a dataset's encoded image file
    (`encoded`, decoded when needed, so a dataset is never held decoded in memory) or an image in memory."""

    caption: str
    path: Path | None = None
    image: Image.Image | None = None
    size: Size | None = None  # upright; filled when the image is first decoded
    encoded: bytes | None = None
    label: str | None = None  # how messages name it, when not by its path

    def load(self) -> Image.Image:
        if self.path is not None:
            image = open_image(self.path, self.label)
        elif self.encoded is not None:
            image = open_image(io.BytesIO(self.encoded), self.name)
        else:
            image = to_rgb(self.image)
        self.size = Size(*image.size)
        return image

    def dimensions(self) -> Size:
        """The upright image's size."""
        return self.size if self.size is not None else Size(*self.load().size)

    @property
    def name(self) -> str:
        return self.label or (str(self.path) if self.path is not None else "an image in memory")


def checked_size(image: Image.Image, name: str) -> Size:
    """The size of a training image, refused (named) when it is too small to learn from."""
    if min(image.size) < MIN_IMAGE_SIDE:
        raise InputError(
            f"Image {name} is only {image.width}x{image.height} pixels; training images need at least "
            f"{MIN_IMAGE_SIDE} px on each side. Remove it or use a larger version."
        )
    return Size(*image.size)


def records_from_folder(folder: Path, instance_prompt: str, caption_extension: str = ".txt") -> list[ImageRecord]:
    """Every image file in `folder` (sorted by name), decoded once here to fail early. An image's caption is
    the text of its sidecar file (`photo.jpg` + `photo.txt`), else `instance_prompt`."""
    if not folder.is_dir():
        raise InputError(f"--instance_data_dir {folder} is not a folder (missing, or a file); pass the image folder.")
    extensions = image_extensions()
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    images = [p for p in files if p.suffix.lower() in extensions]
    sidecars = {p.with_suffix(caption_extension) for p in images}
    others = [p.name for p in files if p.suffix.lower() not in extensions and p not in sidecars]
    if others:
        logger.warning("Ignoring %d non-image file(s) in %s: %s", len(others), folder, ", ".join(others[:10]))
    if not images:
        raise InputError(f"--instance_data_dir {folder} holds no images ({', '.join(sorted(extensions)[:8])}, ...).")
    records = []
    for path in images:
        caption = sidecar_caption(path, caption_extension) or instance_prompt
        records.append(ImageRecord(caption=caption, path=path, size=checked_size(open_image(path), str(path))))
    captioned = sum(path.with_suffix(caption_extension).is_file() for path in images)
    logger.info(
        "%d of %d images have a %s caption file; the others use --instance_prompt.",
        captioned,
        len(images),
        caption_extension,
    )
    return records


def sidecar_caption(image: Path, extension: str) -> str | None:
    """The caption in the file beside `image` with `extension`, if there is one and it is not empty."""
    sidecar = image.with_suffix(extension)
    if not sidecar.is_file():
        return None
    try:
        caption = " ".join(sidecar.read_text(encoding="utf-8").split())
    except UnicodeDecodeError as error:
        raise InputError(f"Caption file {sidecar} is not UTF-8 text ({error}). Re-save it as UTF-8.") from error
    if not caption:
        logger.warning("Caption file %s is empty; using --instance_prompt.", sidecar)
    return caption or None


def records_from_dataset(args: argparse.Namespace) -> list[ImageRecord]:
    """Rows of a datasets ImageFolder (local path) or Hub dataset, with captions from `--caption_column`."""
    from datasets import Image as ImageFeature
    from datasets import load_dataset

    dataset = load_dataset(
        args.dataset_name, args.dataset_config_name, cache_dir=args.cache_dir, revision=None, split="train"
    )
    columns = list(dataset.column_names)
    for flag in ("image_column", "caption_column"):
        column = getattr(args, flag)
        if column is not None and column not in columns:
            raise InputError(
                f"--{flag} {column!r} is not a column of {args.dataset_name}; its columns are: {', '.join(columns)}."
            )
    if len(dataset) == 0:
        raise InputError(f"Dataset {args.dataset_name} has no rows.")
    if isinstance(dataset.features[args.image_column], ImageFeature):
        # Undecoded: a bad file fails here, named, and only its path or encoded bytes are kept.
        dataset = dataset.cast_column(args.image_column, ImageFeature(decode=False))
    records = []
    for i, row in enumerate(dataset):
        caption = row[args.caption_column] if args.caption_column else args.instance_prompt
        if not isinstance(caption, str) or not caption.strip():
            logger.warning("Row %d has no caption; using --instance_prompt.", i + 1)
            caption = args.instance_prompt
        records.append(_dataset_record(row[args.image_column], caption, i + 1, args))
    return records


def _dataset_record(value: object, caption: str, row: int, args: argparse.Namespace) -> ImageRecord:
    """A dataset cell (an undecoded `{"bytes", "path"}` image, or a PIL image) as a checked record that keeps
    the image file's path or its encoded bytes, not its pixels; `row` counts from 1."""
    column = args.image_column
    if isinstance(value, Image.Image):
        image, label = to_rgb(value), f"the image in row {row} of column {column!r}"
        return ImageRecord(caption, image=image, size=checked_size(image, label), label=label)
    if isinstance(value, dict) and (value.get("bytes") or value.get("path")):
        label = f"{value.get('path') or 'in the dataset'} (row {row} of column {column!r})"
        if value.get("bytes"):
            size = checked_size(open_image(io.BytesIO(value["bytes"]), label), label)
            return ImageRecord(caption, size=size, encoded=value["bytes"], label=label)
        path = Path(value["path"])
        return ImageRecord(caption, path=path, size=checked_size(open_image(path, label), label), label=label)
    if value is None:
        raise InputError(
            f"Row {row} of {args.dataset_name} has no image in column {column!r}.{_metadata_hint(args, row)}"
        )
    raise InputError(f"Row {row} of column {column!r} is not an image ({type(value).__name__}).")


def _metadata_hint(args: argparse.Namespace, row: int) -> str:
    """For a local ImageFolder, where the row with no image comes from: a metadata file row without `file_name`."""
    folder = Path(args.dataset_name)
    if not folder.is_dir():
        return ""
    files = sorted(p for p in folder.rglob("metadata.*") if p.suffix in (".jsonl", ".csv", ".parquet"))
    where = str(files[0]) if len(files) == 1 else f"the metadata file of {folder}"
    return f' Row {row} of {where} has no "file_name" field: add the image\'s file name to it, or remove the row.'


def load_records(args: argparse.Namespace) -> list[ImageRecord]:
    if args.dataset_name:
        return records_from_dataset(args)
    return records_from_folder(Path(args.instance_data_dir), args.instance_prompt, args.caption_extension)


@dataclass
class Sample:
    """One image ready for the model, with SDXL's micro-conditioning (all as (height, width) / (top, left))."""

    pixel_values: torch.Tensor | None  # [3, H, W] in [-1, 1]; None when cached latents stand in
    caption: str
    original_size: tuple[int, int]  # (height, width)
    crop_top_left: tuple[int, int]
    target_size: tuple[int, int]  # (height, width)
    prior: Sample | None = None  # with prior preservation: the class image paired with this one
    latent_params: torch.Tensor | None = None  # --cache_latents: the VAE posterior's mean and log-variance


def resize_to_cover(image: Image.Image, size: Size, interpolation: str) -> Image.Image:
    """Scale, keeping the aspect ratio, to the smallest size that covers `size`."""
    scale = max(size.width / image.width, size.height / image.height)
    width, height = max(size.width, round(image.width * scale)), max(size.height, round(image.height * scale))
    return image.resize((width, height), resample=_PIL_FILTERS[interpolation])


def crop_and_flip(
    image: Image.Image, size: Size, rng: np.random.Generator, center_crop: bool, random_flip: bool
) -> tuple[torch.Tensor, tuple[int, int]]:
    """Crop `size` from a resized image, maybe flip it; return pixels in [-1, 1] and the crop's (top, left) in
    the resized image's pixels, as SDXL was trained to expect."""
    (width, height), (crop_width, crop_height) = image.size, size
    if center_crop:
        top, left = (height - crop_height) // 2, (width - crop_width) // 2
    else:
        top = int(rng.integers(0, height - crop_height + 1))
        left = int(rng.integers(0, width - crop_width + 1))
    image = image.crop((left, top, left + crop_width, top + crop_height))
    if random_flip and rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        # SDXL conditions on where the crop was taken; mirrored, the crop's left edge mirrors too.
        left = width - left - crop_width
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1)
    return pixels / 127.5 - 1.0, (top, left)


def transform_caption(caption: str, rng: np.random.Generator, shuffle: bool, keep_tokens: int, dropout: float) -> str:
    """Caption augmentation: with probability `dropout` the empty caption (trains unconditional generation);
    with `shuffle`, the comma-separated tags in random order, the first `keep_tokens` staying in front."""
    if dropout and rng.random() < dropout:
        return ""
    if not shuffle:
        return caption
    tags = [tag.strip() for tag in caption.split(",")]
    kept, rest = tags[:keep_tokens], tags[keep_tokens:]
    rest = [rest[i] for i in rng.permutation(len(rest))]
    return ", ".join(kept + rest)


# Resized images kept in memory per worker, so a photo is decoded and resized once per run instead of
# once per epoch (a 12 MP JPEG costs ~0.2 s to decode and resize). About 4 MB each at 1024 px.
RESIZED_CACHE_IMAGES = 256


class DreamBoothDataset(torch.utils.data.Dataset):
    """Instance images, indexed by `(epoch, i)` so crops and flips are reproducible per epoch and sample.

    With `class_records` (prior preservation), each instance sample is paired with a class image, prepared
    the same way. The pairing walks through all class images across epochs (sample i of epoch e takes
    class image (e x len + i) mod count), where the reference pairs i with i mod count and so never uses
    more class images than it has instance images.
    """

    def __init__(
        self,
        records: list[ImageRecord],
        args: argparse.Namespace,
        seed: int,
        class_records: list[ImageRecord] | None = None,
    ):
        self.records = records
        self.class_records = class_records or []
        self._resized: dict[tuple[int, Size], tuple[Image.Image, tuple[int, int]]] = {}
        self.sizes = training_sizes(records, args)  # each record's: the --resolution square or its bucket
        self.latent_cache: dict | None = None  # set by latents.build_latent_cache with --cache_latents
        self.repeats = args.repeats
        self.resolution = args.resolution
        self.center_crop = args.center_crop
        self.random_flip = args.random_flip
        self.interpolation = args.image_interpolation_mode
        self.caption_options = (args.shuffle_caption, args.keep_tokens, args.caption_dropout)
        self.seed = seed

    def __len__(self) -> int:
        return len(self.records) * self.repeats

    def __getitem__(self, key: tuple[int, int]) -> Sample:
        epoch, index = key
        size = self.sizes[index % len(self.records)]
        if self.latent_cache is not None:
            return self._cached_sample(epoch, index, size)
        sample = self._prepare(self.records[index % len(self.records)], size, sample_rng(self.seed, epoch, index))
        sample.caption = self._caption(sample.caption, epoch, index)
        if self.class_records:
            record = self.class_records[(epoch * len(self) + index) % len(self.class_records)]
            # The same size as its instance sample: one batch.
            sample.prior = self._prepare(record, size, class_sample_rng(self.seed, epoch, index))
        return sample

    def _caption(self, caption: str, epoch: int, index: int) -> str:
        if not any(self.caption_options):
            return caption
        return transform_caption(caption, caption_rng(self.seed, epoch, index), *self.caption_options)

    def _cached_sample(self, epoch: int, index: int, size: Size) -> Sample:
        """The sample from cached latents: only the flip (and the caption) change from epoch to epoch."""
        flipped = self.random_flip and sample_rng(self.seed, epoch, index).random() < 0.5
        record_index = index % len(self.records)
        sample = self._from_cache((False, record_index, size, flipped), self.records[record_index].caption, size)
        sample.caption = self._caption(sample.caption, epoch, index)
        if self.class_records:
            class_index = (epoch * len(self) + index) % len(self.class_records)
            caption = self.class_records[class_index].caption
            sample.prior = self._from_cache((True, class_index, size, flipped), caption, size)
        return sample

    def _from_cache(self, key: tuple, caption: str, size: Size) -> Sample:
        entry = self.latent_cache[key]
        return Sample(None, caption, entry.original_size, entry.crop_top_left, size.hw, None, entry.params)

    def _prepare(self, record: ImageRecord, size: Size, rng: np.random.Generator) -> Sample:
        resized, original_size = self._resized_image(record, size)
        pixels, crop = crop_and_flip(resized, size, rng, self.center_crop, self.random_flip)
        return Sample(pixels, record.caption, original_size, crop, size.hw)

    def _resized_image(self, record: ImageRecord, size: Size) -> tuple[Image.Image, tuple[int, int]]:
        """The record's image resized to cover `size`, and its original (height, width)."""
        key = (id(record), size)
        cached = self._resized.get(key)
        if cached is None:
            image = record.load()
            cached = (resize_to_cover(image, size, self.interpolation), Size(*image.size).hw)
            if len(self._resized) < RESIZED_CACHE_IMAGES:
                self._resized[key] = cached
        return cached


def training_sizes(records: list[ImageRecord], args: argparse.Namespace) -> list[Size]:
    """The size each record is trained at: the --resolution square, or its aspect-ratio bucket."""
    if not args.aspect_ratio_bucketing:
        sizes = [Size(args.resolution, args.resolution)] * len(records)
    else:
        buckets = make_buckets(args.resolution, args.bucket_min_side, args.bucket_max_side, args.bucket_step)
        sizes = [assign_bucket(r.dimensions(), buckets, args.bucket_step, args.bucket_upscale) for r in records]
        log_bucket_table(sizes)
    warn_about_upscaling(records, sizes)
    return sizes


def warn_about_upscaling(records: list[ImageRecord], sizes: list[Size]) -> None:
    """One warning naming the images that are upscaled more than MAX_UPSCALE times to their training size."""
    upscaled = []
    for record, size in zip(records, sizes, strict=True):
        width, height = record.dimensions()
        if max(size.width / width, size.height / height) > MAX_UPSCALE:
            upscaled.append(f"{record.name} ({width}x{height})")
    if upscaled:
        logger.warning(
            "%d image(s) are upscaled more than %gx to their training size and will train soft: %s",
            len(upscaled),
            MAX_UPSCALE,
            ", ".join(upscaled[:10]),
        )


@dataclass
class Batch:
    """Instance samples, then (with prior preservation) their paired class samples: the last `num_prior`."""

    pixel_values: torch.Tensor | None  # [B, 3, H, W]
    captions: list[str]
    time_ids: torch.Tensor  # [B, 6]: original (h, w), crop (top, left), target (h, w)
    num_prior: int = 0
    latent_params: torch.Tensor | None = None  # [B, 2C, h, w] with --cache_latents, instead of pixels


def collate(samples: list[Sample]) -> Batch:
    priors = [s.prior for s in samples if s.prior is not None]
    everything = samples + priors
    time_ids = [list(s.original_size + s.crop_top_left + s.target_size) for s in everything]
    cached = everything[0].latent_params is not None
    return Batch(
        pixel_values=None if cached else torch.stack([s.pixel_values for s in everything]).contiguous(),
        captions=[s.caption for s in everything],
        time_ids=torch.tensor(time_ids, dtype=torch.float32),
        num_prior=len(priors),
        latent_params=torch.stack([s.latent_params for s in everything]) if cached else None,
    )


class StepPlan:
    """Which samples every optimizer step of every epoch uses, on this process.

    Each epoch draws a permutation from (seed, epoch); with several processes the permutation is padded by
    wrapping around to a multiple of the process count and dealt out round-robin, so every process runs the
    same number of batches. Micro-batches are grouped `accumulation` at a time into optimizer steps; the last
    step of an epoch may have fewer.

    With `groups` (the aspect-ratio bucket of every sample), each batch holds samples of one group only: the
    permuted samples are cut into batches group by group, the batches are shuffled, padded by wrapping to a
    multiple of the process count, and dealt out round-robin.
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        accumulation: int,
        seed: int,
        num_processes: int = 1,
        process_index: int = 0,
        groups: list[object] | None = None,
    ):
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.accumulation = accumulation
        self.seed = seed
        self.num_processes = num_processes
        self.process_index = process_index
        self.groups = groups if groups is not None and len(set(groups)) > 1 else None
        if self.groups is None:
            self.batches_per_epoch = math.ceil(math.ceil(num_samples / num_processes) / batch_size)
        else:
            total = sum(math.ceil(n / batch_size) for n in Counter(self.groups).values())
            self.batches_per_epoch = math.ceil(total / num_processes)
        self.steps_per_epoch = math.ceil(self.batches_per_epoch / accumulation)

    def epoch_batches(self, epoch: int) -> list[list[tuple[int, int]]]:
        generator = epoch_order_generator(self.seed, epoch)
        order = torch.randperm(self.num_samples, generator=generator).tolist()
        if self.groups is not None:
            return self._grouped_batches(epoch, order, generator)
        padded = math.ceil(self.num_samples / self.num_processes) * self.num_processes
        order = (order * math.ceil(padded / self.num_samples))[:padded]
        mine = order[self.process_index :: self.num_processes]
        return [[(epoch, i) for i in mine[b : b + self.batch_size]] for b in range(0, len(mine), self.batch_size)]

    def _grouped_batches(
        self, epoch: int, order: list[int], generator: torch.Generator
    ) -> list[list[tuple[int, int]]]:
        by_group: dict[object, list[int]] = {}
        for i in order:
            by_group.setdefault(self.groups[i], []).append(i)
        batches = [
            members[b : b + self.batch_size]
            for members in by_group.values()
            for b in range(0, len(members), self.batch_size)
        ]
        batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
        padded = self.batches_per_epoch * self.num_processes
        batches = (batches * math.ceil(padded / len(batches)))[:padded]
        return [[(epoch, i) for i in batch] for batch in batches[self.process_index :: self.num_processes]]

    def step_groups(self, epoch: int) -> list[list[list[tuple[int, int]]]]:
        """The epoch's batches grouped into optimizer steps."""
        batches = self.epoch_batches(epoch)
        return [batches[s : s + self.accumulation] for s in range(0, len(batches), self.accumulation)]


class _EndlessStepBatches:
    """The batch sampler of one DataLoader for the whole run: the plan's batches from `start_step` on,
    epoch after epoch (one loader, so workers and their caches live for the whole run)."""

    def __init__(self, plan: StepPlan, start_step: int):
        self.plan, self.start_step = plan, start_step

    def __iter__(self):
        epoch, first = divmod(self.start_step, self.plan.steps_per_epoch)
        while True:
            for group in self.plan.step_groups(epoch)[first:]:
                yield from group
            epoch, first = epoch + 1, 0


def iterate_steps(dataset: DreamBoothDataset, plan: StepPlan, start_step: int, num_workers: int):
    """Yield `(step, [Batch, ...])` for every optimizer step from `start_step` on, forever (epoch after epoch).

    The caller stops at its last step. Skipping to a resumed step costs no image loading.
    """
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_sampler=_EndlessStepBatches(plan, start_step),
        collate_fn=collate,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
    )
    batches = iter(loader)
    epoch, first = divmod(start_step, plan.steps_per_epoch)
    step = start_step
    while True:
        for group in plan.step_groups(epoch)[first:]:
            yield step, [next(batches) for _ in group]
            step += 1
        epoch, first = epoch + 1, 0


def entry_flags(args: argparse.Namespace, entry: dict) -> argparse.Namespace:
    """The flags as one --datasets entry sees them: its own values over the run's (config.ENTRY_KEYS)."""
    own = {
        key: value for key, value in entry.items() if value is not None and key not in ("image_dir", "repeats", "role")
    }
    flags = argparse.Namespace(**{**vars(args), **own})
    flags.instance_data_dir, flags.dataset_name = entry["image_dir"], entry["dataset_name"]
    if entry["role"] == "class":  # captioned with the class prompt, whatever files or columns say
        flags.instance_prompt, flags.caption_column = entry["class_prompt"] or args.class_prompt, None
    return flags


def _entry_records(flags: argparse.Namespace, role: str) -> list[ImageRecord]:
    if flags.dataset_name:
        return records_from_dataset(flags)
    folder = Path(flags.instance_data_dir)
    if role == "instance":
        return records_from_folder(folder, flags.instance_prompt, flags.caption_extension)
    from .class_images import list_images

    paths = list_images(folder)
    if not paths:
        raise InputError(f"--datasets: the class image folder {folder} holds no images.")
    return [ImageRecord(caption=flags.instance_prompt, path=p, size=open_image(p).size) for p in paths]


def load_entry_records(args: argparse.Namespace, role: str) -> tuple[list[ImageRecord], list[tuple[int, int]]]:
    """--datasets: the records of every entry of `role` ("instance" or "class"), each entry's repeated its
    `repeats` times (so an epoch sees the entries in the ratio of their repeats), and the (width, height) each
    record trains at (instance entries: their own resolution or buckets; class records take their partner's)."""
    records, sizes = [], []
    for entry in dataset_entries(args, role):
        flags = entry_flags(args, entry)
        found = _entry_records(flags, role)
        logger.info(
            "--datasets %s entry %s: %d images x %d repeats",
            role,
            flags.instance_data_dir or flags.dataset_name,
            len(found),
            entry["repeats"],
        )
        records += found * entry["repeats"]
        if role == "instance":
            sizes += training_sizes(found, flags) * entry["repeats"]
    return records, sizes
