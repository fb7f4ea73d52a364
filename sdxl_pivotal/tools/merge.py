"""Fuse a LoRA (and its embeddings) into its base pipeline and save the result as a diffusers pipeline.

LORA is any file this trainer writes (diffusers, kohya with or without bundled embeddings), or a run's output
folder or checkpoint (its LoRA and `_emb` file), loaded as `load_for_diffusers` loads it (exact alpha, DoRA,
embeddings); --embeddings adds an `_emb` file. --scale multiplies the LoRA's update, as loading it with
`pipe.set_adapters(name, scale)` does ((IA)³, whose vectors multiply features, has no such scale: 1 only). The new
tokens of pivotal tuning stay in both tokenizers and text encoders of the merged pipeline: prompt it with them
(`<s0><s1>`), as with the LoRA.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ..errors import InputError
from ..export import atomic_folder
from ..formats.load import load_for_diffusers
from .files import bad_input, existing_dir, existing_file, new_output

ADAPTER = "merged"
DTYPES = ("float32", "float16", "bfloat16")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("lora", help="LoRA file, or a run's output folder / checkpoint")
    parser.add_argument("--base", required=True, help="the base pipeline folder (diffusers format)")
    parser.add_argument("--output", required=True, help="folder for the merged pipeline")
    parser.add_argument("--scale", type=float, default=1.0, help="LoRA scale (default 1.0)")
    parser.add_argument("--embeddings", default=None, help="an _emb.safetensors file to add")
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="dtype to load and save the pipeline in")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")


def run(args: argparse.Namespace) -> None:
    tokens = merge_lora(args.lora, args.base, args.output, args.scale, args.embeddings, args.dtype, args.overwrite)
    print(f"wrote {args.output}" + (f" (new tokens: {' '.join(tokens)})" if tokens else ""))


def merge_lora(
    lora: str | Path,
    base: str | Path,
    output: str | Path,
    scale: float = 1.0,
    embeddings: str | Path | None = None,
    dtype: str = "float32",
    overwrite: bool = False,
) -> list[str]:
    """Save `base` with `lora` fused in at `scale` (and the embeddings added) as the pipeline `output`; return
    the new tokens."""
    from diffusers import StableDiffusionXLPipeline

    lora = Path(lora) if Path(lora).is_dir() else existing_file(lora)
    base = existing_dir(base)
    if not (base / "model_index.json").is_file():
        raise InputError(f"{base} is not a diffusers pipeline folder (no model_index.json).")
    output = new_output(output, overwrite, base, lora)
    pipe = StableDiffusionXLPipeline.from_pretrained(base, torch_dtype=getattr(torch, dtype))
    with bad_input(lora):
        tokens = load_for_diffusers(pipe, lora, adapter_name=ADAPTER)
        if embeddings is not None:
            tokens += load_for_diffusers(pipe, existing_file(embeddings))
    if scale != 1.0 and has_ia3(pipe):
        raise InputError(
            f"{lora}: (IA)³ vectors have no scale to change (they multiply features); merge at --scale 1."
        )
    if any(ADAPTER in adapters for adapters in pipe.get_list_adapters().values()):
        pipe.fuse_lora(lora_scale=scale, adapter_names=[ADAPTER])
        pipe.unload_lora_weights()
    with atomic_folder(output) as staging:
        pipe.save_pretrained(staging, safe_serialization=True)
    return tokens


def has_ia3(pipe) -> bool:
    """Whether (IA)³ layers were loaded into the pipeline's models."""
    from peft.tuners.ia3 import IA3Layer

    models = (pipe.unet, pipe.text_encoder, pipe.text_encoder_2)
    return any(isinstance(module, IA3Layer) for model in models for module in model.modules())
