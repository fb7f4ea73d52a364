"""Uploaded images into a run folder. Only decoded images are kept, re-encoded as PNG under generated names
(`img_000.png`, ...): no name or path from the client is ever used as a path. Zips are read in memory, and one
with `../` or absolute entries is refused whole."""

from __future__ import annotations

import io
import re
import secrets
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from PIL import Image

MAX_IMAGES = 150
MIN_IMAGES = 2
IMAGE_NAME = re.compile(r"^img_(\d{3})\.png$")
CAPTION_SUFFIX = ".txt"
# A decoded image larger than this is refused (decompression bombs).
MAX_PIXELS = 64_000_000


@dataclass
class UploadReport:
    accepted: list[Path] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)  # one message per refused file, naming it


def new_run_folder(root: Path) -> Path:
    """A fresh, uniquely named folder for one run: `run-<time>-<random>` with an `images/` folder."""
    folder = Path(root) / f"run-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(4)}"
    (folder / "images").mkdir(parents=True)
    return folder


def list_images(images_dir: Path) -> list[Path]:
    """The run's stored images, in upload order."""
    if not images_dir.is_dir():
        return []
    return sorted(p for p in images_dir.iterdir() if IMAGE_NAME.match(p.name))


def add_uploads(uploaded: list[str | Path], images_dir: Path) -> UploadReport:
    """Store every image among `uploaded` (server-side temporary files; zips are opened) into `images_dir`."""
    report = UploadReport()
    for path in map(Path, uploaded):
        label = path.name  # for messages only
        if zipfile.is_zipfile(path):
            try:
                members = read_zip(path)
            except UnsafeZipError as error:
                report.rejected.append(f"{label}: {error}")
                continue
            items = [(f"{label}/{name}", data) for name, data in members]
        else:
            items = [(label, path.read_bytes())]
        for name, data in items:
            _store_one(name, data, images_dir, report)
    return report


def _store_one(label: str, data: bytes, images_dir: Path, report: UploadReport) -> None:
    count = len(list_images(images_dir))
    if count >= MAX_IMAGES:
        report.rejected.append(f"{label}: refused, a run takes at most {MAX_IMAGES} images.")
        return
    image = decode_image(data)
    if image is None:
        report.rejected.append(f"{label}: not an image (it could not be decoded); it was not added.")
        return
    report.accepted.append(save_image(image, images_dir))


class UnsafeZipError(ValueError):
    pass


def read_zip(path: Path) -> list[tuple[str, bytes]]:
    """The files of a zip, as (name, bytes). Refuses the whole zip if any entry is absolute or climbs out
    (`../`), since such a zip was made to write outside its folder."""
    with zipfile.ZipFile(path) as archive:
        infos = archive.infolist()
        for info in infos:
            name = info.filename.replace("\\", "/")
            parts = PurePosixPath(name).parts
            if name.startswith("/") or re.match(r"^[A-Za-z]:", name) or ".." in parts:
                raise UnsafeZipError(f"refused: the zip entry {info.filename!r} points outside the zip.")
        return [(info.filename, archive.read(info)) for info in infos if not info.is_dir()]


def decode_image(data: bytes) -> Image.Image | None:
    """The image `data` encodes (RGB), or None when it does not decode as one."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.width * image.height > MAX_PIXELS:
                return None
            image.load()
            return image.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError):
        return None


def save_image(image: Image.Image, images_dir: Path) -> Path:
    """Save as the next `img_NNN.png` of the run."""
    images_dir.mkdir(parents=True, exist_ok=True)
    existing = [int(IMAGE_NAME.match(p.name).group(1)) for p in list_images(images_dir)]
    path = images_dir / f"img_{max(existing, default=-1) + 1:03d}.png"
    image.save(path, format="PNG")
    return path


def stored_image(images_dir: Path, name: str) -> Path:
    """The stored image called `name` (as `list_images` named it); anything else is refused."""
    if not IMAGE_NAME.match(name) or not (images_dir / name).is_file():
        raise ValueError(f"no stored image {name!r}")
    return images_dir / name


def remove_image(images_dir: Path, name: str) -> None:
    path = stored_image(images_dir, name)
    path.unlink()
    path.with_suffix(CAPTION_SUFFIX).unlink(missing_ok=True)


def read_caption(image: Path) -> str:
    caption = image.with_suffix(CAPTION_SUFFIX)
    return caption.read_text(encoding="utf-8").strip() if caption.is_file() else ""


def write_caption(image: Path, text: str) -> None:
    """The sidecar caption the trainer reads (`--caption_extension .txt`)."""
    image.with_suffix(CAPTION_SUFFIX).write_text(text.strip(), encoding="utf-8")
