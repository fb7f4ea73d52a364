"""Merge several LoRAs into one of rank --rank by SVD of their summed updates, module by module (kohya's svd_merge).

Each module's update is ΔW = Σ ratio_i · (alpha_i / rank_i) · up_i · down_i over the LoRAs that adapt it (Linear
and Conv2d layers, in the UNet and the text encoders); the result keeps its best approximation of rank --rank
(--conv_rank for 3x3 convolutions, default --rank), or the module's full rank where that is lower, with alpha = the
new rank. At full rank the merged LoRA equals loading the inputs together at their ratios. Inputs may be kohya or
diffusers files, of any trainer; the output has the first input's format unless --to says otherwise. LoRA only
(not LoHa, LoKr or DoRA, whose updates do not add up factor-wise); bundled embeddings are not merged. Prints the
retained energy per module and overall.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ..errors import InputError
from ..formats.architecture import SDXL_BASE_MODEL, empty_sdxl_models
from ..formats.families import lora_to_kohya
from ..formats.kohya import kohya_modules, kohya_state_metadata
from .files import FORMATS, LoraFile, existing_file, new_output, read_lora, write_lora
from .lowrank import RetainedEnergy, lora_factors, print_energy_report, retained_energy, svd_of_product


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", help="LoRA files (.safetensors), kohya or diffusers format")
    parser.add_argument("--output", required=True, help="file to write (.safetensors)")
    parser.add_argument("--ratios", type=float, nargs="+", default=None, help="one weight per input (default 1.0)")
    parser.add_argument("--rank", type=int, required=True, help="rank of the merged LoRA")
    parser.add_argument("--conv_rank", type=int, default=None, help="rank of 3x3 convolutions (default --rank)")
    parser.add_argument("--to", choices=FORMATS, default=None, help="output format (default: the first input's)")
    parser.add_argument(
        "--base", default=None, help="SDXL pipeline folder whose configs give the module tree (default: SDXL base)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")


def run(args: argparse.Namespace) -> None:
    written, report = svd_merge(
        args.inputs, args.output, args.ratios, args.rank, args.conv_rank, args.to, args.base, args.overwrite
    )
    print_energy_report(report)
    for path in written:
        print(f"wrote {path}")


def svd_merge(
    inputs: list[str | Path],
    output: str | Path,
    ratios: list[float] | None,
    rank: int,
    conv_rank: int | None = None,
    to: str | None = None,
    base: str | Path | None = None,
    overwrite: bool = False,
) -> tuple[list[Path], list[RetainedEnergy]]:
    """Write the merge of `inputs` at `ratios` as `output`; return the files written and the energy report."""
    ratios = [1.0] * len(inputs) if ratios is None else ratios
    if len(ratios) != len(inputs):
        raise InputError(f"--ratios: {len(ratios)} ratios for {len(inputs)} LoRA files; give one per file.")
    for flag, value in (("--rank", rank), ("--conv_rank", conv_rank)):
        if value is not None and value < 1:
            raise InputError(f"{flag} {value}: a rank is at least 1.")
    sources = [existing_file(path) for path in inputs]
    output = new_output(output, overwrite, *sources)
    models = empty_sdxl_models(base)
    loras = [read_lora(source, models) for source in sources]
    merged, report = merge_states([lora.lora for lora in loras], ratios, rank, conv_rank or rank)
    metadata = kohya_state_metadata(merged, output.stem, str(base or SDXL_BASE_MODEL))
    result = LoraFile(to or loras[0].format, merged, metadata=metadata)
    return write_lora(output, result, models), report


def merge_states(
    states: list[dict[str, torch.Tensor]], ratios: list[float], rank: int, conv_rank: int
) -> tuple[dict[str, torch.Tensor], list[RetainedEnergy]]:
    """Kohya LoRA states merged module by module, and what each merged module keeps."""
    by_module: dict[str, list[tuple[float, dict[str, torch.Tensor]]]] = {}
    for state, ratio in zip(states, ratios, strict=True):
        for module, tensors in kohya_modules(state).items():
            by_module.setdefault(module, []).append((ratio, tensors))
    merged, report = {}, []
    for module, weighted in sorted(by_module.items()):
        tensors, kept = merge_module(module, weighted, rank, conv_rank)
        merged |= {f"{module}.{key}": value for key, value in tensors.items()}
        report.append(kept)
    return merged, report


def merge_module(
    module: str, weighted: list[tuple[float, dict[str, torch.Tensor]]], rank: int, conv_rank: int
) -> tuple[dict[str, torch.Tensor], RetainedEnergy]:
    """One module's Σ ratio · scale · up · down at the chosen rank (alpha = that rank), and what it keeps. The
    factors are stacked ([up_1 ... up_n] @ [down_1; ...; down_n] is the sum), so the SVD is exact and small."""
    shapes = {tensors["lora_down.weight"].shape[1:] for _, tensors in weighted if "lora_down.weight" in tensors}
    if len(shapes) > 1:
        raise InputError(f"{module}: the LoRAs have different shapes ({sorted(shapes)}); they are not of one model.")
    ups, downs = [], []
    for ratio, tensors in weighted:
        if "lora_down.weight" not in tensors or "dora_scale" in tensors:
            raise InputError(f"{module}: only plain LoRA modules can be merged ({', '.join(sorted(tensors))}).")
        down, up = tensors["lora_down.weight"], tensors["lora_up.weight"]
        scale = float(tensors["alpha"]) / down.shape[0] if "alpha" in tensors else 1.0
        ups.append(ratio * scale * up.flatten(1).double())
        downs.append(down.flatten(1).double())
    down, up = weighted[0][1]["lora_down.weight"], weighted[0][1]["lora_up.weight"]
    u, sigma, vh = svd_of_product(torch.cat(ups, dim=1), torch.cat(downs, dim=0))
    is_3x3 = down.dim() == 4 and down.shape[2:] != (1, 1)
    new_rank = min(conv_rank if is_3x3 else rank, len(sigma))
    new_down, new_up = lora_factors(u, sigma, vh, new_rank, torch.Size([up.shape[0], *down.shape[1:]]))
    factors = {"lora_A.weight": new_down.to(down.dtype), "lora_B.weight": new_up.to(up.dtype)}
    return lora_to_kohya(factors, 1.0), retained_energy(module, sigma, new_rank)
