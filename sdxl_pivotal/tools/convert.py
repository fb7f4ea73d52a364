"""Convert a LoRA file between diffusers' format and kohya's (AUTOMATIC1111, Forge, ComfyUI).

Reads the files of this trainer and kohya LoRA files of other trainers (SAI-named `lora_unet_...`, `lora_te1_...`,
`lora_te2_...` modules, an alpha per module). Module names and paths come from the SDXL module tree built, without
weights, from --base's configs (default: SDXL base). A diffusers file cannot hold embeddings: a kohya file's bundled
embeddings are written beside it as `<output stem>_emb.safetensors`; --embeddings bundles such a file into a kohya
output.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from ..errors import InputError
from ..formats.architecture import SDXL_BASE_MODEL, empty_sdxl_models
from ..formats.kohya import LOKR_OPTIONS_KEY, TOKENS_METADATA_KEY, embedding_name, kohya_state_metadata
from .files import FORMATS, embeddings_path, existing_file, new_output, read_embeddings, read_lora, write_lora


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", help="LoRA file (.safetensors), diffusers or kohya format")
    parser.add_argument("output", help="file to write (.safetensors)")
    parser.add_argument("--to", choices=FORMATS, default=None, help="output format (default: the other one)")
    parser.add_argument(
        "--base", default=None, help="SDXL pipeline folder whose configs give the module tree (default: SDXL base)"
    )
    parser.add_argument(
        "--name", default=None, help="kohya output: its name, and its bundled embedding's (default: output stem)"
    )
    parser.add_argument("--embeddings", default=None, help="kohya output: an _emb.safetensors file to bundle")
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files")


def run(args: argparse.Namespace) -> None:
    written = convert_lora(args.input, args.output, args.to, args.base, args.name, args.embeddings, args.overwrite)
    for path in written:
        print(f"wrote {path}")


def convert_lora(
    input_file: str | Path,
    output: str | Path,
    to: str | None = None,
    base: str | Path | None = None,
    name: str | None = None,
    embeddings: str | Path | None = None,
    overwrite: bool = False,
) -> list[Path]:
    """Write the LoRA `input_file` as `output` in the format `to` (default: the other one); return the files."""
    source = existing_file(input_file)
    models = empty_sdxl_models(base)
    lora = read_lora(source, models)
    to = to or ("diffusers" if lora.format == "kohya" else "kohya")
    output = new_output(output, overwrite, source)
    name = name or output.stem
    if embeddings is not None:
        if to != "kohya":
            raise InputError("--embeddings bundles embeddings into a kohya file; diffusers files cannot hold them.")
        vectors, metadata = read_embeddings(embeddings)
        tokens = {key: value for key, value in metadata.items() if key == TOKENS_METADATA_KEY}
        lora = dataclasses.replace(lora, embeddings={embedding_name(name): vectors}, metadata=lora.metadata | tokens)
    if to == "diffusers" and lora.embeddings:
        new_output(embeddings_path(output), overwrite, source)
    if to == "kohya" and lora.format == "diffusers":
        base_model = str(base or SDXL_BASE_MODEL)
        metadata = kohya_state_metadata(lora.lora, name, base_model, lora.tokens, bundled=bool(lora.embeddings))
        metadata |= {key: value for key, value in lora.metadata.items() if key == LOKR_OPTIONS_KEY}
        lora = dataclasses.replace(lora, metadata=metadata)
    return write_lora(output, dataclasses.replace(lora, format=to), models)
