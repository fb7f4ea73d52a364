"""Caption images with a vision-language model through transformers; sidecar `.txt` files for the trainer.

    python -m sdxl_pivotal.caption FOLDER [--model Salesforce/blip-image-captioning-large] [--prefix "a photo of TOK"]

Any image-text-to-text model transformers supports natively works (BLIP, GIT, Florence-2 with `--prompt
"<CAPTION>"`); `trust_remote_code` is never used. Writes `photo.txt` beside `photo.jpg` (existing ones are kept
unless `--overwrite`).
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable
from pathlib import Path

import torch
from PIL import Image

from .errors import InputError

DEFAULT_MODEL = "Salesforce/blip-image-captioning-large"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class Captioner:
    """A captioning model and its processor, loaded once."""

    def __init__(self, model, processor, prompt: str | None = None, max_new_tokens: int = 40):
        self.model = model.eval()
        self.processor = processor
        self.prompt = prompt
        self.max_new_tokens = max_new_tokens

    @classmethod
    def load(cls, model_id: str = DEFAULT_MODEL, prompt: str | None = None, device: str | None = None) -> Captioner:
        """Load `model_id` (Hub id or folder). Raises InputError, saying why, when it cannot be loaded
        (offline, unknown id, not a captioning model)."""
        from transformers import AutoModelForImageTextToText, AutoProcessor

        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        try:
            processor = AutoProcessor.from_pretrained(model_id)
            model = AutoModelForImageTextToText.from_pretrained(model_id)
        except (OSError, ValueError) as error:
            raise InputError(
                f"Could not load the captioning model {model_id!r}: {str(error).splitlines()[0]} "
                "It needs the Hugging Face Hub (or a local copy of the model); write the captions by hand, "
                "or pick a model available here."
            ) from None
        return cls(model.to(device), processor, prompt)

    @torch.no_grad()
    def caption(self, images: list[Image.Image]) -> list[str]:
        """One caption per image (greedy decoding: the same image gets the same caption)."""
        kwargs = {"images": [image.convert("RGB") for image in images], "return_tensors": "pt"}
        if self.prompt:
            kwargs["text"] = [self.prompt] * len(images)
        inputs = self.processor(**kwargs).to(self.model.device)
        ids = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        texts = self.processor.batch_decode(ids, skip_special_tokens=True)
        return [" ".join(text.replace(self.prompt or "", "", 1).split()) for text in texts]


def with_concept(caption: str, concept: str | None, position: str = "before") -> str:
    """`caption` with the concept sentence ("a photo of TOK") before or after it."""
    if not concept:
        return caption
    if not caption:
        return concept
    return f"{concept}, {caption}" if position == "before" else f"{caption}, {concept}"


def image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def caption_folder(
    folder: Path,
    captioner: Captioner,
    concept: str | None = None,
    position: str = "before",
    overwrite: bool = False,
    batch_size: int = 4,
) -> list[Path]:
    """Write a sidecar caption for every image of `folder` that has none (or all, with `overwrite`)."""
    todo = [p for p in image_files(folder) if overwrite or not p.with_suffix(".txt").exists()]
    written = []
    for batch in _chunks(todo, batch_size):
        images = []
        for path in batch:
            with Image.open(path) as image:
                images.append(image.convert("RGB"))
        for path, text in zip(batch, captioner.caption(images), strict=True):
            path.with_suffix(".txt").write_text(with_concept(text, concept, position), encoding="utf-8")
            written.append(path.with_suffix(".txt"))
    return written


def _chunks(items: list, size: int) -> Iterable[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write sidecar .txt captions for the images of a folder.")
    parser.add_argument("folder", type=Path)
    parser.add_argument("--model", default=DEFAULT_MODEL, help="Hub id or folder of an image-text-to-text model")
    parser.add_argument("--prompt", default=None, help='task prompt some models need, e.g. Florence-2: "<CAPTION>"')
    parser.add_argument("--prefix", default=None, help='concept sentence before each caption, e.g. "a photo of TOK"')
    parser.add_argument(
        "--suffix", default=None, help='concept sentence after each caption, e.g. "in the style of TOK"'
    )
    parser.add_argument("--overwrite", action="store_true", help="replace existing caption files")
    parser.add_argument("--batch_size", type=int, default=4)
    args = parser.parse_args(argv)
    try:
        if not args.folder.is_dir():
            raise InputError(f"{args.folder} is not a folder of images.")
        if args.prefix and args.suffix:
            raise InputError("Pass --prefix or --suffix, not both.")
        captioner = Captioner.load(args.model, args.prompt)
    except InputError as error:
        print(f"error: {error}")
        return 2
    concept, position = (args.prefix, "before") if args.prefix else (args.suffix, "after")
    written = caption_folder(args.folder, captioner, concept, position, args.overwrite, args.batch_size)
    for path in written:
        print(f"{path.name}: {path.read_text(encoding='utf-8')}")
    print(f"wrote {len(written)} caption files in {args.folder}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
