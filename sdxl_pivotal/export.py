"""Write output files atomically (the file formats themselves: `formats/`).

Every file is written atomically: into a temporary name in the same folder, then renamed over the target,
so a crash leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"


def output_name(output_dir: str | Path) -> str:
    """The run's name for its files: the output folder's last component ("runs/tok-dog" -> "tok-dog")."""
    return Path(output_dir).resolve().name


def embeddings_file_name(output_dir: str | Path) -> str:
    return f"{output_name(output_dir)}_emb.safetensors"


@contextlib.contextmanager
def atomic_folder(target: Path) -> Iterator[Path]:
    """Yield a fresh temporary folder beside `target`; on success it replaces `target` in one rename."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        yield staging
        _default_permissions(staging)
        if target.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, trash / target.name)
            os.replace(staging, target)
            shutil.rmtree(trash)
        else:
            os.replace(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging)


def _default_permissions(path: Path) -> None:
    """Give `path` (and a folder's contents) the permissions of a normally created file: temporary files
    are private (0600/0700), but outputs must be readable by the user's other tools and services."""
    umask = os.umask(0)
    os.umask(umask)
    for item in [path, *path.rglob("*")] if path.is_dir() else [path]:
        os.chmod(item, (0o777 if item.is_dir() else 0o666) & ~umask)


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; once the caller has written it, it replaces `path`."""
    with tempfile.TemporaryDirectory(prefix=".write-", dir=path.parent) as staging:
        temporary = Path(staging) / path.name
        yield temporary
        _default_permissions(temporary)
        os.replace(temporary, path)


def save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> Path:
    from safetensors.torch import save_file

    from .safetensors_order import sort_metadata

    with atomic_path(path) as temporary:
        save_file(tensors, temporary, metadata=metadata)
        sort_metadata(temporary)
    return path


def save_text(text: str, path: Path) -> Path:
    with atomic_path(path) as temporary:
        temporary.write_text(text, encoding="utf-8")
    return path


def save_image(image, path: Path) -> Path:
    """Save a PIL image as PNG."""
    with atomic_path(path) as temporary:
        image.save(temporary, format="PNG")
    return path
