"""Fuse a LoRA (and its embeddings) into its base pipeline: save a diffusers pipeline, or one checkpoint file.

LORA is any file this trainer writes (diffusers, kohya with or without bundled embeddings), or a run's output
folder or checkpoint (its LoRA and `_emb` file), loaded as `load_for_diffusers` loads it (exact alpha, DoRA,
embeddings); --embeddings adds an `_emb` file. --scale multiplies the LoRA's update, as loading it with
`pipe.set_adapters(name, scale)` does ((IA)³, whose vectors multiply features, has no such scale: 1 only).

--format diffusers (the default for any other --output) saves a diffusers pipeline folder: the new tokens of
pivotal tuning stay in both tokenizers and text encoders, so prompt it with them (`<s0><s1>`), as with the LoRA.

--format single_file (the default for an --output ending in .safetensors) writes the UNet, VAE and both text
encoders into one safetensors file with Stability AI's original key names (the layout of
`sd_xl_base_1.0.safetensors`), for AUTOMATIC1111 / Forge (`models/Stable-diffusion/`) and ComfyUI
(`models/checkpoints/`). Such a file has no tokenizers, so it cannot hold new tokens: its token embeddings keep
the base vocabulary, and the new tokens' embeddings are written beside it as `<output stem>_emb.safetensors`. Put
that file into the UI's embeddings folder and write its name where the prompts had `<s0><s1>` (A1111 / Forge
`a photo of NAME_emb dog`, ComfyUI `embedding:NAME_emb`). In diffusers:
`StableDiffusionXLPipeline.from_single_file(FILE, config=BASE, local_files_only=True)` reads it offline, with
BASE the base pipeline's folder (or its Hub id, once cached), then `load_for_diffusers(pipe, "NAME_emb.safetensors")`
adds the tokens. --dtype float16 gives the half-size file the UIs usually take.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ..errors import InputError
from ..export import atomic_folder, save_safetensors
from ..formats.load import load_for_diffusers
from ..formats.single_file import new_token_embeddings, sgm_state_dict
from .files import bad_input, embeddings_path, existing_dir, existing_file, new_output

ADAPTER = "merged"
DTYPES = ("float32", "float16", "bfloat16")
OUTPUT_FORMATS = ("diffusers", "single_file")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("lora", help="LoRA file, or a run's output folder / checkpoint")
    parser.add_argument("--base", required=True, help="the base pipeline folder (diffusers format)")
    parser.add_argument(
        "--output", required=True, help="folder for the merged pipeline, or the .safetensors file (single_file)"
    )
    parser.add_argument(
        "--format",
        choices=OUTPUT_FORMATS,
        default=None,
        help="diffusers: a pipeline folder; single_file: one checkpoint for A1111 / Forge / ComfyUI, new tokens in "
        "<output stem>_emb.safetensors beside it (default: single_file for an --output ending in .safetensors)",
    )
    parser.add_argument("--scale", type=float, default=1.0, help="LoRA scale (default 1.0)")
    parser.add_argument("--embeddings", default=None, help="an _emb.safetensors file to add")
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="dtype to load and save the pipeline in")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an existing output (single_file: also its _emb file)"
    )


def run(args: argparse.Namespace) -> None:
    output_format = merge_format(args.output, args.format)
    tokens = merge_lora(
        args.lora, args.base, args.output, args.scale, args.embeddings, args.dtype, args.overwrite, output_format
    )
    if output_format == "diffusers" or not tokens:
        print(f"wrote {args.output}" + (f" (new tokens: {' '.join(tokens)})" if tokens else ""))
        return
    emb = embeddings_path(Path(args.output))
    print(f"wrote {args.output} and {emb} (the embeddings of {' '.join(tokens)}: prompt the UIs with {emb.stem})")


def merge_format(output: str | Path, output_format: str | None) -> str:
    """The output format: `output_format`, else single_file for a `.safetensors` output and diffusers otherwise."""
    is_file = Path(output).suffix == ".safetensors"
    output_format = output_format or ("single_file" if is_file else "diffusers")
    if output_format == "single_file" and not is_file:
        raise InputError(f"--format single_file writes one .safetensors file; --output {output} is not one.")
    if output_format == "diffusers" and is_file:
        raise InputError(f"--format diffusers writes a pipeline folder, not {output}; or pass --format single_file.")
    return output_format


def merge_lora(
    lora: str | Path,
    base: str | Path,
    output: str | Path,
    scale: float = 1.0,
    embeddings: str | Path | None = None,
    dtype: str = "float32",
    overwrite: bool = False,
    output_format: str | None = None,
) -> list[str]:
    """Save `base` with `lora` fused in at `scale` (and the embeddings added) as `output`, in `output_format`
    (`merge_format`); return the new tokens."""
    from diffusers import StableDiffusionXLPipeline

    output_format = merge_format(output, output_format)
    lora = Path(lora) if Path(lora).is_dir() else existing_file(lora)
    base = existing_dir(base)
    if not (base / "model_index.json").is_file():
        raise InputError(f"{base} is not a diffusers pipeline folder (no model_index.json).")
    output = new_output(output, overwrite, base, lora)
    if output_format == "single_file":
        new_output(embeddings_path(output), overwrite, base, lora)
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
    if output_format == "single_file":
        with bad_input(base):  # a model the SAI layout has no place for
            save_single_file(pipe, tokens, output)
    else:
        with atomic_folder(output) as staging:
            pipe.save_pretrained(staging, safe_serialization=True)
    return tokens


def save_single_file(pipe, tokens: list[str], output: Path) -> None:
    """Write `pipe` as the checkpoint `output` with the base vocabulary, and the embeddings of its new `tokens` as
    `<stem>_emb.safetensors` beside it (first, so a checkpoint never lacks its embeddings file)."""
    if tokens:
        save_safetensors(new_token_embeddings(pipe, tokens), embeddings_path(output))
    save_safetensors(sgm_state_dict(pipe, len(tokens)), output)


def has_ia3(pipe) -> bool:
    """Whether (IA)³ layers were loaded into the pipeline's models."""
    from peft.tuners.ia3 import IA3Layer

    models = (pipe.unet, pipe.text_encoder, pipe.text_encoder_2)
    return any(isinstance(module, IA3Layer) for model in models for module in model.modules())
