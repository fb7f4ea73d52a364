"""Byte-reproducible safetensors files: the same tensors and metadata give the same bytes.

safetensors writes the metadata (`__metadata__`) from a Rust HashMap, whose order changes from process to
process; so every file we write gets its metadata sorted afterwards (`sort_metadata`). The tensors' order and
offsets are already fixed by the writer (by dtype alignment, then name) and are kept as they are.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

_LENGTH_BYTES = 8  # the header's length, a little-endian u64, then the JSON header, padded with spaces to 8


def sort_metadata(path: Path) -> None:
    """Rewrite the header of the safetensors file at `path` with its metadata in sorted order (in place when the
    header keeps its length, which a reordering of the same JSON does)."""
    with open(path, "rb") as file:
        length = int.from_bytes(file.read(_LENGTH_BYTES), "little")
        header = json.loads(file.read(length))
    if "__metadata__" not in header:
        return
    ordered = {"__metadata__": dict(sorted(header.pop("__metadata__").items()))} | header
    encoded = json.dumps(ordered, separators=(",", ":"), ensure_ascii=False).encode()
    encoded += b" " * (-len(encoded) % _LENGTH_BYTES)
    if len(encoded) == length:
        with open(path, "r+b") as file:
            file.seek(_LENGTH_BYTES)
            file.write(encoded)
        return
    rewritten = path.with_name(path.name + ".sorted")
    with open(path, "rb") as source, open(rewritten, "wb") as target:
        source.seek(_LENGTH_BYTES + length)
        target.write(len(encoded).to_bytes(_LENGTH_BYTES, "little") + encoded)
        shutil.copyfileobj(source, target)
    rewritten.replace(path)
